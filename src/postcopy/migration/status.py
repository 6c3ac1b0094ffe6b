"""Migration status with QEMU's names, and the legal transitions as a table.

Both ends report one of these in query-migrate. A transition that is not in the table is a
bug in the migration code, so it raises instead of being ignored.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    DEVICE = "device"


S = MigrationStatus
FINISHED = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP, S.FAILED}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset({S.DEVICE, S.POSTCOPY_ACTIVE, S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER, S.FAILED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
}


class IllegalTransition(RuntimeError):
    pass


class StatusHolder:
    """The current status, thread-safe, with a listener called on every change."""

    def __init__(self, on_change: Callable[[MigrationStatus], None] | None = None) -> None:
        self._status = S.NONE
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._on_change = on_change

    @property
    def value(self) -> MigrationStatus:
        return self._status

    def move(self, new: MigrationStatus) -> None:
        with self._lock:
            old = self._status
            if new == old:
                return
            if new not in TRANSITIONS[old]:
                raise IllegalTransition(
                    f"migration status {old.value} -> {new.value} is not allowed"
                )
            self._status = new
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(new)

    def move_if(self, allowed_from: frozenset[MigrationStatus], new: MigrationStatus) -> bool:
        """Move only if the current status is one of `allowed_from`; says whether it moved."""
        with self._lock:
            if self._status not in allowed_from:
                return False
        self.move(new)
        return True

    def wait_for(self, statuses: frozenset[MigrationStatus], timeout: float | None) -> bool:
        with self._lock:
            return self._changed.wait_for(lambda: self._status in statuses, timeout)
