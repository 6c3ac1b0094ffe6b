"""The QMP server: QEMU's control protocol over a Unix socket."""
