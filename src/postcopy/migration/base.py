"""What both ends of a migration keep the same way: status, QMP events, times, timeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from postcopy.migration.parameters import Capabilities
from postcopy.migration.stats import Clock
from postcopy.migration.status import FINISHED, MigrationStatus, StatusHolder

EventSink = Callable[[str, dict[str, Any]], None]


class MigrationBase:
    def __init__(
        self, capabilities: Capabilities, on_event: EventSink | None, clock: Clock
    ) -> None:
        self.capabilities = capabilities
        self._clock = clock
        self._emit: EventSink = on_event or (lambda name, data: None)
        self.status = StatusHolder(self._status_changed)
        self.error: str | None = None
        self.start_time = 0.0
        self.end_time: float | None = None
        self.timeline: list[dict[str, Any]] = []

    @property
    def finished(self) -> bool:
        return self.status.value in FINISHED

    def _status_changed(self, status: MigrationStatus) -> None:
        if status in FINISHED:
            self.end_time = self._clock()
        self._trace("status", status=status.value)
        if self.capabilities["events"]:
            self._emit("MIGRATION", {"status": status.value})

    def _trace(self, kind: str, **fields: Any) -> None:
        now = self._clock()
        # "mono" is the host's monotonic clock: entries of both ends on one host line up
        self.timeline.append(
            {"t": round(now - self.start_time, 6), "mono": round(now, 6), "event": kind, **fields}
        )
