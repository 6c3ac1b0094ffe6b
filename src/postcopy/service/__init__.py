"""The service around a guest: a stable address that follows the VM, and its load.

- `front`: the service front. Clients connect to it once (a TCP or Unix address that no VM
  process owns); VM processes' request devices connect to it as backends, and it sends
  requests to whichever VM runs the guest now, holding them across the switchover.
- `checker`: the model of the kvstore and the verdict on every answer (pure).
- `load`: the load generator behind `postcopy load`.
- `plot`: request latency over time with the migration's phases as bands.

This package sits with the control layer (it imports postcopy.vm's frame format and the
kvstore model; nothing below imports it).
"""
