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
# where migrate_cancel takes effect: before the destination can run the guest
CANCELLABLE = frozenset({MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE})
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
        self._cancel_refused = False

    @property
    def value(self) -> MigrationStatus:
        return self._status

    def move(self, new: MigrationStatus) -> None:
        with self._lock:
            changed = self._move_locked(new)
        if changed and self._on_change is not None:
            self._on_change(new)

    def move_if(self, allowed_from: frozenset[MigrationStatus], new: MigrationStatus) -> bool:
        """Move only if the current status is one of `allowed_from`; says whether it moved.
        The check and the move are one step under the lock: a migrate_cancel racing the
        migration thread's own move (to completed, say) must lose quietly, not raise."""
        with self._lock:
            if self._status not in allowed_from:
                return False
            if new == MigrationStatus.CANCELLING and self._cancel_refused:
                return False
            changed = self._move_locked(new)
        if changed and self._on_change is not None:
            self._on_change(new)
        return True

    def refuse_cancel(self) -> bool:
        """From now on a cancel (a move_if to cancelling) loses: the source is about to let
        the destination run the guest, and resuming it here too would run it twice. False
        if a cancel came first. A new migration (setup) takes cancels again."""
        with self._lock:
            self._cancel_refused = self._status != MigrationStatus.CANCELLING
            return self._cancel_refused

    def _move_locked(self, new: MigrationStatus) -> bool:
        old = self._status
        if new == old:
            return False
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"migration status {old.value} -> {new.value} is not allowed")
        self._status = new
        if new == MigrationStatus.SETUP:
            self._cancel_refused = False
        self._changed.notify_all()
        return True

    def wait_for(self, statuses: frozenset[MigrationStatus], timeout: float | None) -> bool:
        with self._lock:
            return self._changed.wait_for(lambda: self._status in statuses, timeout)
