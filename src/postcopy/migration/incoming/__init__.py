"""The destination side of a migration: receive precopy RAM, then serve postcopy faults.

One file per concern, along QEMU's seams:
- `control`: `IncomingMigration`, the receiver thread and the state around it: accept,
  handshake, the main stream's dispatch, precopy pages, ADVISE/DISCARD/LISTEN, the
  package that starts the guest, completion, failure, query-migrate; the preempt receiver
  (QEMU's migration.c and savevm.c).
- `placer`: `PagePlacer`, reading a postcopy run to where it lands and placing it
  atomically, then recording it as received (postcopy_place_page); `placement`: how a
  run is placed for each RAM backend (COPY/ZEROPAGE, huge pages, CONTINUE); `keptcache`:
  minor-fault mode's discards, which keep the page cache for the page's next copy.
- `swap`: `RamSwap`, the side mappings the precopy pages move out to at LISTEN and the
  mover thread that moves the valid ones back.
- `faults`: `FaultThread`, vCPU faults in, REQ_PAGES out (postcopy_ram_fault_thread).
- `eagain`: bounded, paused retries of EAGAIN; deferral on the fault thread.
- `errors`: `IncomingError`.

Which thread touches which shared state, and why that is safe without a lock, is the
table in docs/ARCHITECTURE.md ("Shared state: which thread touches what, and why no
lock"); each lock-free access says why at its line.
"""

from postcopy.migration.incoming.control import IncomingMigration
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.placer import PagePlacer

__all__ = ["IncomingError", "IncomingMigration", "PagePlacer"]
