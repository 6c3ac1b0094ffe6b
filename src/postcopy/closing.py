"""`Closing`: the one context-manager plumbing of every object that owns a resource.

An fd, a mapping, a socket, a VM: each has an idempotent ``close()``, and ``with obj:``
closes it when the block ends, whatever happened. Used by every layer (it imports
nothing of the project), so it sits beside them rather than in one.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Mixin: ``with obj:`` returns obj and calls ``obj.close()`` when the block ends."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
