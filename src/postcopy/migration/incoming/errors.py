"""What goes wrong on the destination, in the user's terms (query-migrate's error-desc)."""

from __future__ import annotations


class IncomingError(RuntimeError):
    pass
