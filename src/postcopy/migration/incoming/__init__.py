"""The destination side of a migration: receive precopy RAM, then serve postcopy faults.

One file per concern, along QEMU's seams:
- `control`: `IncomingMigration`, the receiver thread and the state around it: accept,
  handshake, the main stream's dispatch, precopy pages, ADVISE/DISCARD/LISTEN, the
  package that starts the guest, completion, failure, query-migrate; the preempt receiver
  (QEMU's migration.c and savevm.c).
- `placer`: `PagePlacer`, placing whole runs atomically with UFFDIO_COPY / MOVE / ZEROPAGE
  and recording them as received (postcopy_place_page).
- `swap`: `RamSwap`, the side mappings the precopy pages move out to at LISTEN and the
  mover thread that moves the valid ones back.
- `faults`: `FaultThread`, vCPU faults in, REQ_PAGES out (postcopy_ram_fault_thread).
- `errors`: `IncomingError`.

Which thread touches which shared state, and why that is safe without a lock, is in
docs/ARCHITECTURE.md ("Processes and threads").
"""

from postcopy.migration.incoming.control import IncomingMigration
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.placer import PagePlacer

__all__ = ["IncomingError", "IncomingMigration", "PagePlacer"]
