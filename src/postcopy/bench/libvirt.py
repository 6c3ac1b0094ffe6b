"""The switch to postcopy made the way a management tool makes it (`-libvirt` scenarios).

libvirt does not let QEMU switch by itself: it polls query-migrate (every 10 ms while it
waits) and sends migrate-start-postcopy once `dirty-sync-count` says the first pass is over
(2: QEMU counts its setup sync; virsh --postcopy-after-precopy does the same on the
MIGRATION_PASS event with pass 2). A tool reacts to what the counters say, so a counter
that lags makes it switch a whole pass late: the bench measures the switch that way to
hold our counters to QEMU's meaning, as benchmarks/qemu/run.py does for QEMU.
"""

from __future__ import annotations

from typing import Any, Protocol

POLL_SECONDS = 0.010  # libvirt's query-migrate interval


class Commander(Protocol):
    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


class LibvirtSwitch:
    """Watches the source's query-migrate answers; sends migrate-start-postcopy once."""

    def __init__(self, source: Commander, at_sync_count: int) -> None:
        self._source = source
        self.at_sync_count = at_sync_count
        self.requested_at: float | None = None  # seconds after migrate
        self.first_count_seen: int | None = None  # dirty-sync-count of the first active poll
        self.count_at_switch: int | None = None
        self.error: str | None = None

    def check(self, t: float, info: dict[str, Any] | None) -> bool:
        """One poll's answer `info`, `t` seconds after migrate; True if it switched now."""
        if self.requested_at is not None or self.error is not None or not info:
            return False
        if info.get("status") != "active":
            return False
        count = (info.get("ram") or {}).get("dirty-sync-count")
        if not isinstance(count, int):
            return False
        if self.first_count_seen is None:
            self.first_count_seen = count
        if count < self.at_sync_count:
            return False
        try:
            self._source.execute("migrate-start-postcopy")
        except Exception as error:  # the migration may have ended meanwhile
            self.error = f"migrate-start-postcopy: {error}"
            return False
        self.requested_at, self.count_at_switch = t, count
        return True

    def as_json(self) -> dict[str, Any]:
        return {
            "by": "libvirt",
            "at_sync_count": self.at_sync_count,
            "poll_s": POLL_SECONDS,
            "requested_at_s": self.requested_at,
            "first_count_seen": self.first_count_seen,
            "count_at_switch": self.count_at_switch,
            "error": self.error,
        }
