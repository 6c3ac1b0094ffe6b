"""How an outgoing migration ends other than completed, in the user's terms."""

from __future__ import annotations


class MigrationError(RuntimeError):
    """A migration failed; the message says why, for query-migrate's error-desc."""


class Cancelled(MigrationError):
    pass
