"""The source side of a migration: precopy rounds, switchover, and postcopy page service.

One file per concern, along QEMU's seams:
- `control`: `OutgoingMigration` and the `migration` thread: setup, precopy rounds,
  switchover, completion, failure and cancel, query-migrate (QEMU's migration.c).
- `sender`: `RamSender`, one RAM run on the wire with its accounting and the bandwidth
  limits (ram.c's page sending, the rate limit).
- `pageservice`: `PageService`, postcopy's background push and the page requests that
  overtake it, over the `needed` bitmap.
- `returnpath`: `ReturnPath`, the `return-path` thread reading REQ_PAGES, PONG and SHUT.
- `errors`: `MigrationError`, `Cancelled`.

Which thread touches which shared state, and why that is safe without a lock, is the
table in docs/ARCHITECTURE.md ("Shared state: which thread touches what, and why no
lock"); each lock-free access says why at its line.
"""

from postcopy.migration.outgoing.control import OutgoingMigration
from postcopy.migration.outgoing.errors import Cancelled, MigrationError

__all__ = ["Cancelled", "MigrationError", "OutgoingMigration"]
