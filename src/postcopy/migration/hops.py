"""The hops of page requests, timed on both sides: where a request's latency goes.

A page request crosses six hops: the fault is read (destination `fault` thread), the
request is sent, the source reads it (`return-path`), sends the page (preempt channel or
the push), the destination reads the run's header, and places it. Each side logs what it
saw with the host's monotonic clock (one clock for both processes on one host), and
`x-request-hops` hands the log out; `join_hops` matches the two logs request by request,
so that a slow request can be blamed on the hop that made it slow.

Logging is a list append under a lock per request and per placed run; the log keeps at
most `capacity` entries per kind (the first ones).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from postcopy.migration.stats import Clock

# destination: (block, first, count, fault_read, sent) per REQ_PAGES; (block, first, count,
# header_read, placed, channel) per placed run. source: (block, first, count, read, sent)
# per request served. Times in seconds of the host's monotonic clock.
REQUEST_FIELDS = ("block", "first", "count", "fault_read", "sent")
PLACED_FIELDS = ("block", "first", "count", "header_read", "placed", "channel")
SERVED_FIELDS = ("block", "first", "count", "read", "sent")
MAIN, URGENT = 0, 1  # the channel a run came on


class HopLog:
    """One side's log of request hops."""

    def __init__(self, clock: Clock = time.monotonic, capacity: int = 20_000) -> None:
        self.clock = clock
        self.capacity = capacity
        self._lock = threading.Lock()
        self.requests: list[tuple[int, int, int, float, float]] = []
        self.placed: list[tuple[int, int, int, float, float, int]] = []
        self.served: list[tuple[int, int, int, float, float]] = []

    def request_sent(self, block: int, first: int, count: int, fault_read: float) -> None:
        """Destination: REQ_PAGES for pages first.. went out; their first fault was read
        at `fault_read`."""
        with self._lock:
            if len(self.requests) < self.capacity:
                self.requests.append((block, first, count, fault_read, self.clock()))

    def run_placed(
        self, block: int, first: int, count: int, header_read: float, channel: int
    ) -> None:
        """Destination: a run whose header was read at `header_read` is in place now."""
        with self._lock:
            if len(self.placed) < self.capacity:
                self.placed.append((block, first, count, header_read, self.clock(), channel))

    def request_served(self, block: int, first: int, count: int, read: float) -> None:
        """Source: the request read at `read` has had its pages sent."""
        with self._lock:
            if len(self.served) < self.capacity:
                self.served.append((block, first, count, read, self.clock()))

    def as_qmp(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": _columns(REQUEST_FIELDS, self.requests),
                "placed": _columns(PLACED_FIELDS, self.placed),
                "served": _columns(SERVED_FIELDS, self.served),
            }


def _columns(fields: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """Column lists; times to the microsecond (the answer stays well under a QMP client's
    10 MB read limit at `capacity` entries)."""
    return {
        name: [round(row[i], 6) if isinstance(row[i], float) else row[i] for row in rows]
        for i, name in enumerate(fields)
    }


HOPS = (
    ("fault read -> request sent", "fault_read", "sent"),
    ("request sent -> read by the source", "sent", "read"),
    ("read -> page sent (source)", "read", "served"),
    ("page sent -> header read", "served", "header_read"),
    ("header read -> placed", "header_read", "placed"),
    ("fault read -> placed", "fault_read", "placed"),
    # a request the push answered: its page was in a pushed run whose header the
    # destination read before the source had served the request (`pushed` in join_hops);
    # negative when the run was already being read as the request went out (the vCPU
    # faulted on a page that was arriving: then "header read -> placed" is the rest)
    ("request sent -> pushed copy's header read", "sent", "header_read"),
)
# the hops of the source's own copy of the page: not the copy a pushed request got
_SERVICE_HOPS = ("read -> page sent (source)", "page sent -> header read")
_PUSHED_HOP = "request sent -> pushed copy's header read"


def join_hops(destination: dict[str, Any], source: dict[str, Any]) -> list[dict[str, float]]:
    """Each destination request with the times of all its hops (seconds), where found: the
    source's entry for the same (block, first, count) read after it was sent, and the first
    run placed after it that holds its first page. One dict per request. `pushed` (1.0)
    marks a request whose page came in a run of the push (main channel) whose header was
    read before the source served the request: the push answered it, and the source's
    copy, if any, came later (without preempt the page a vCPU faults on is often on its
    way already; these made "page sent -> header read" negative)."""
    requests = destination.get("requests") or {}
    placed = destination.get("placed") or {}
    served = source.get("served") or {}
    by_key: dict[tuple[int, int, int], list[tuple[float, float]]] = {}
    for block, first, count, read, sent in zip(
        *(served.get(name, []) for name in SERVED_FIELDS), strict=True
    ):
        by_key.setdefault((block, first, count), []).append((read, sent))
    runs: dict[int, list[tuple[float, int, int, float, int]]] = {}
    for block, first, count, header_read, done, channel in zip(
        *(placed.get(name, []) for name in PLACED_FIELDS), strict=True
    ):
        runs.setdefault(block, []).append((done, first, count, header_read, channel))
    for entries in runs.values():
        entries.sort()
    joined: list[dict[str, float]] = []
    for block, first, count, fault_read, sent in zip(
        *(requests.get(name, []) for name in REQUEST_FIELDS), strict=True
    ):
        row: dict[str, float] = {"fault_read": fault_read, "sent": sent}
        for read, served_at in by_key.get((block, first, count), []):
            if read >= sent - 1e-3:  # the same clock; allow for rounding
                row["read"], row["served"] = read, served_at
                break
        entries = runs.get(block, [])
        position = bisect_left(entries, (sent,))
        for done, run_first, run_count, header_read, channel in entries[position:]:
            if run_first <= first < run_first + run_count:
                row["header_read"], row["placed"], row["channel"] = header_read, done, channel
                if channel == MAIN and "served" in row and header_read < row["served"]:
                    row["pushed"] = 1.0
                break
        joined.append(row)
    return joined


def hop_summary(joined: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50/p99/max in µs of each hop over the requests that have both ends of it. The
    source's copy's hops leave out the requests the push answered (`pushed`), which have
    a hop of their own instead."""
    import numpy as np

    summary: dict[str, dict[str, float]] = {}
    for name, start, end in HOPS:
        if name in _SERVICE_HOPS:
            chosen = [r for r in joined if not r.get("pushed")]
        elif name == _PUSHED_HOP:
            chosen = [r for r in joined if r.get("pushed")]
        else:
            chosen = joined
        values = np.array([r[end] - r[start] for r in chosen if start in r and end in r])
        if values.size:
            p50, p99 = np.percentile(values, [50, 99])
            summary[name] = {
                "count": int(values.size),
                "p50-us": round(float(p50) * 1e6, 1),
                "p99-us": round(float(p99) * 1e6, 1),
                "max-us": round(float(values.max()) * 1e6, 1),
            }
    return summary


def wait_summary(waits: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    """Per kind of wait (the fault thread's `kind`, stats.BlocktimeTracker), and over all:
    how many, their sum in ms, p50/p99/max in µs: which waits make the blocktime."""
    import numpy as np

    kinds = waits.get("kind") or []
    lengths = np.array(waits.get("end") or [], dtype=np.float64) - np.array(
        waits.get("begin") or [], dtype=np.float64
    )
    summary: dict[str, dict[str, float]] = {}
    for kind in ["all", *sorted(set(kinds))]:
        chosen = lengths if kind == "all" else lengths[np.array(kinds) == kind]
        if chosen.size:
            p50, p99 = np.percentile(chosen, [50, 99])
            summary[kind or "unknown"] = {
                "count": int(chosen.size),
                "sum-ms": round(float(chosen.sum()) * 1e3, 3),
                "p50-us": round(float(p50) * 1e6, 1),
                "p99-us": round(float(p99) * 1e6, 1),
                "max-us": round(float(chosen.max()) * 1e6, 1),
            }
    return summary
