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
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    DEVICE = "device"


FINISHED = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})
POSTCOPY = frozenset(
    {
        MigrationStatus.POSTCOPY_ACTIVE,
        MigrationStatus.POSTCOPY_PAUSED,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)
"""Every status of a postcopy that has not finished (migrate_cancel is refused in all)."""
PAUSED_OR_RECOVERING = frozenset(
    {
        MigrationStatus.POSTCOPY_PAUSED,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)

TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    MigrationStatus.NONE: frozenset({MigrationStatus.SETUP, MigrationStatus.FAILED}),
    MigrationStatus.SETUP: frozenset(
        {MigrationStatus.ACTIVE, MigrationStatus.FAILED, MigrationStatus.CANCELLING}
    ),
    MigrationStatus.ACTIVE: frozenset(
        {
            MigrationStatus.DEVICE,
            MigrationStatus.POSTCOPY_ACTIVE,
            MigrationStatus.COMPLETED,
            MigrationStatus.FAILED,
            MigrationStatus.CANCELLING,
        }
    ),
    MigrationStatus.DEVICE: frozenset(
        {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLING}
    ),
    # FAILED only before the destination runs the guest (then the source resumes it)
    MigrationStatus.POSTCOPY_ACTIVE: frozenset(
        {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.POSTCOPY_PAUSED}
    ),
    # QEMU: "never fail a postcopy migration; switch back to PAUSED instead". Neither side
    # holds the whole guest any more, so no path leads from here to FAILED.
    # RECOVER_SETUP is the source's (connecting); the destination goes PAUSED -> RECOVER.
    MigrationStatus.POSTCOPY_PAUSED: frozenset(
        {MigrationStatus.POSTCOPY_RECOVER_SETUP, MigrationStatus.POSTCOPY_RECOVER}
    ),
    MigrationStatus.POSTCOPY_RECOVER_SETUP: frozenset(
        {MigrationStatus.POSTCOPY_RECOVER, MigrationStatus.POSTCOPY_PAUSED}
    ),
    MigrationStatus.POSTCOPY_RECOVER: frozenset(
        {MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED}
    ),
    MigrationStatus.CANCELLING: frozenset({MigrationStatus.CANCELLED, MigrationStatus.FAILED}),
    MigrationStatus.COMPLETED: frozenset({MigrationStatus.SETUP}),
    MigrationStatus.FAILED: frozenset({MigrationStatus.SETUP}),
    MigrationStatus.CANCELLED: frozenset({MigrationStatus.SETUP}),
}


class IllegalTransition(RuntimeError):
    pass


class StatusHolder:
    """The current status, thread-safe, with a listener called on every change."""

    def __init__(self, on_change: Callable[[MigrationStatus], None] | None = None) -> None:
        self._status = MigrationStatus.NONE
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
