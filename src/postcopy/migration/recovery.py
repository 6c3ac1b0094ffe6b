"""What both ends of a postcopy recovery share: heartbeat, backoff, counters, link errors.

Once the destination runs the guest, neither side holds the whole guest: a broken link
must pause both sides, never fail them (QEMU's postcopy-paused), until a new connection
resumes the migration. The source's half is `outgoing/recovery.py`, the destination's
`incoming/recovery.py`; docs/ARCHITECTURE.md ("Recovery") has the whole picture and
docs/PROTOCOL.md §4.11 the handshake on the wire.

Here:
- `Heartbeat`: a thread that keeps a silent link from going unnoticed. Each side sends a
  small frame every `interval` without ever blocking on a stuck socket (the source a PING
  with the top bit set, answered by a PONG; the destination an unsolicited PONG with
  value HEARTBEAT_PONG) and declares the link dead when nothing came from the peer for
  `timeout`. A silent partition (a frozen proxy, a pulled cable) is otherwise never seen:
  the peer's kernel may even keep ACKing (research/recovery.md §6).
- `Backoff`: the source's capped exponential delay between automatic reconnects.
- `RecoveryStats`: the x- fields of query-migrate (recoveries, time paused, ...).
- `LinkBroken`: raised in a thread that notices its connection was given up.
Link failures are worded by failures.py.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
from collections.abc import Callable
from typing import Any

from postcopy.migration.parameters import Parameters
from postcopy.migration.stats import Clock
from postcopy.transport import Connection

log = logging.getLogger(__name__)

HEARTBEAT_PING = 0x8000_0000
"""Heartbeat PINGs of the source carry this bit (and a counter); others are the migration's
own probes (setup, drain, RUN), whose PONGs the source waits for."""
HEARTBEAT_PONG = 0xFFFF_FFFF
"""The destination's unsolicited heartbeat PONG value."""
PAUSED_BY_USER = "Postcopy migration is paused by the user"  # QEMU's error text


class LinkBroken(RuntimeError):
    """The connection this thread used was given up (pause, or a newer connection)."""


def watch_link(connection: Connection, parameters: Parameters) -> None:
    """Every migration connection: TCP_USER_TIMEOUT and keepalives at the heartbeat's
    timeout, so that the kernel too gives up a dead link in about that time."""
    connection.set_user_timeout(parameters.x_heartbeat_timeout_ms / 1000)


def writable(fileno: int) -> bool:
    """True if a small frame can be written to this socket now without blocking."""
    try:
        _, ready, _ = select.select([], [fileno], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready)


class Backoff:
    """Capped exponential delays: first, 2*first, 4*first, ... up to `cap` (seconds)."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = max(cap, first)
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class RecoveryStats:
    """Counters of pauses and recoveries, reported as x- fields of query-migrate."""

    def __init__(self, clock: Clock, trace: Callable[..., None]) -> None:
        self._clock = clock
        self._trace = trace
        self._lock = threading.Lock()
        self.recoveries = 0
        self.pauses = 0
        self.attempts = 0
        self.refused = 0
        self.resent_pages = 0
        self.last_pause_reason = ""
        self._paused_since: float | None = None
        self._paused_total = 0.0
        self.last_recovery_ms: float | None = None
        # destination: requests pending at the last resume, and when the last arrived
        self.pending_pages = 0
        self.pending_ms: float | None = None

    def paused(self, reason: str) -> None:
        with self._lock:
            self.pauses += 1
            self.last_pause_reason = reason
            if self._paused_since is None:
                self._paused_since = self._clock()
        self._trace("paused", reason=reason)

    def resumed(self, epoch: int) -> None:
        with self._lock:
            self.recoveries += 1
            if self._paused_since is not None:
                self.last_recovery_ms = (self._clock() - self._paused_since) * 1000
                self._paused_total += self._clock() - self._paused_since
                self._paused_since = None
        self._trace("resumed", epoch=epoch, paused_ms=round(self.last_recovery_ms or 0))

    def paused_seconds(self) -> float:
        with self._lock:
            current = self._clock() - self._paused_since if self._paused_since is not None else 0
            return self._paused_total + current

    def as_qmp(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "x-recoveries": self.recoveries,
            "x-pauses": self.pauses,
            "x-paused-ms": int(self.paused_seconds() * 1000),
        }
        if self.last_pause_reason:
            info["x-last-pause-reason"] = self.last_pause_reason
        return info


class Heartbeat:
    """Every `interval` s: `send()` (must not block) and check `last_heard()`; when nothing
    came for `timeout` s, `on_silence(seconds)` (once per silence). `active()` says whether
    the link is expected to be alive now (e.g. not while paused)."""

    def __init__(
        self,
        name: str,
        *,
        interval: float,
        timeout: float,
        send: Callable[[], None],
        last_heard: Callable[[], float | None],
        on_silence: Callable[[float], object],
        active: Callable[[], bool],
        clock: Clock,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self._send = send
        self._last_heard = last_heard
        self._on_silence = on_silence
        self._active = active
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        tick = min(self.interval, self.timeout / 4)
        while not self._stop.wait(tick):
            if not self._active():
                continue
            with contextlib.suppress(Exception):
                self._send()
            heard = self._last_heard()
            if heard is None:
                continue
            silent = self._clock() - heard
            if silent > self.timeout and self._active():
                log.error("no sign of the peer for %.1f s: the link is taken for dead", silent)
                try:
                    self._on_silence(silent)
                except Exception:
                    log.exception("pausing after a silent link")
