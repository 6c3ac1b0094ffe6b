"""Migration statistics: byte and page counters, rates, request latency and blocktime.

Names follow QEMU's query-migrate fields. Time comes from an injectable clock (seconds,
monotonic) so the accounting can be tested deterministically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from postcopy.linux.sched import runnable_seconds

Clock = Callable[[], float]


def percentiles(values: npt.NDArray[np.float64], quantiles: tuple[float, ...]) -> list[float]:
    """np.percentile's (linear interpolation between the closest ranks) of a non-empty 1-D
    array, with one numpy call: np.percentile's own Python around the sort cost ~0.45 ms a
    call on this host, and query-migrate made three under the GIL that the destination's
    receiver and fault thread need (a poll every 50 ms from the bench or libvirt)."""
    ordered = np.sort(values)
    last = ordered.size - 1
    found = []
    for quantile in quantiles:
        position = quantile / 100 * last
        low = int(position)
        high = min(low + 1, last)
        below, above = float(ordered[low]), float(ordered[high])
        found.append(below + (above - below) * (position - low))
    return found


@dataclass
class RamCounters:
    """What the source sent (QEMU's MigrationStats.ram)."""

    total: int = 0  # bytes of guest RAM
    normal: int = 0  # pages sent with data
    duplicate: int = 0  # zero pages sent as markers
    transferred: int = 0  # bytes put on the wire, headers included
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    postcopy_requests: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0  # pages per second, measured between syncs
    remaining: int = 0  # bytes still to send
    page_size: int = 4096
    pages_pushed: int = 0  # after switchover: pages sent by the background push
    pages_requested: int = 0  # after switchover: pages sent because they were requested
    pages_resent: int = 0  # requested while the push's copy was still on its way
    # rates of the last window (migration.accounting keeps them with QEMU's rules)
    mbps: float = 0.0
    pages_per_second: int = 0

    def as_qmp(self, elapsed: float | None = None) -> dict[str, Any]:
        """query-migrate's ram object; with `elapsed`, the rates are averages over it."""
        mbps, pages_per_second = self.mbps, self.pages_per_second
        if elapsed is not None:
            mbps = self.transferred * 8 / 1e6 / elapsed if elapsed > 0 else 0.0
            pages = self.normal + self.duplicate
            pages_per_second = int(pages / elapsed) if elapsed > 0 else 0
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * self.page_size,
            "mbps": round(mbps, 3),
            "pages-per-second": pages_per_second,
            "dirty-pages-rate": self.dirty_pages_rate,
            "dirty-sync-count": self.dirty_sync_count,
            "dirty-sync-missed-zero-copy": 0,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "postcopy-requests": self.postcopy_requests,
            "page-size": self.page_size,
            "skipped": 0,
            "multifd-bytes": 0,
            "x-pages-pushed": self.pages_pushed,
            "x-pages-requested": self.pages_requested,
            "x-pages-resent": self.pages_resent,
        }


class RateMeter:
    """Bytes per second over a sliding window, for expected downtime and the live display."""

    def __init__(self, clock: Clock = time.monotonic, window: float = 0.5) -> None:
        self._clock = clock
        self._window = window
        self._start = clock()
        self._bytes = 0
        self.rate = 0.0

    def add(self, count: int) -> None:
        self._bytes += count
        now = self._clock()
        elapsed = now - self._start
        if elapsed >= self._window:
            self.rate = self._bytes / elapsed
            self._start = now
            self._bytes = 0


class LatencyRecorder:
    """Request latency, fault read to page placed, per page.

    The pages asked for and not placed yet are a dict per block (page -> when asked): a
    handful at a time, so the fault thread's `asked` and the urgent receiver's one-page
    `placed` are a dict operation each, and the main receiver's `placed` of a pushed run
    (every 2 MiB) sees an empty dict and returns without taking the lock. A per-page
    array cost both receivers numpy calls (microseconds each here) under the lock the
    fault thread takes on every request."""

    def __init__(self, block_pages: list[int], clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._asked_at: list[dict[int, float]] = [{} for _ in block_pages]
        self._samples: list[float] = []
        self._lock = threading.Lock()

    def asked(self, block: int, first_page: int, count: int, when: float) -> None:
        with self._lock:
            asked_at = self._asked_at[block]
            for page in range(first_page, first_page + count):
                asked_at[page] = when

    def asked_page(self, block: int, page: int, when: float) -> None:
        """`asked` for one page (the fault thread's common case, before its request)."""
        with self._lock:
            self._asked_at[block][page] = when

    def placed(self, block: int, first_page: int, count: int) -> None:
        asked_at = self._asked_at[block]
        # read without the lock: a page asked for after this read was placed before its
        # request went out (the fault thread read `received` before this run was recorded),
        # as if `asked` had taken the lock after us: its sample comes with the copy the
        # request brings (a page asked for before it is in the dict by now)
        if not asked_at:
            return
        # two receivers may place the same page (a request raced the push): the lock makes
        # test-and-clear one step, so each request yields one sample
        with self._lock:
            if count == 1:
                when = asked_at.pop(first_page, None)
                if when is not None:
                    self._samples.append(self._clock() - when)
                return
            end = first_page + count
            found = [page for page in asked_at if first_page <= page < end]
            if found:
                now = self._clock()
                for page in found:
                    self._samples.append(now - asked_at.pop(page))

    def waiting(self) -> tuple[int, float]:
        """The pages asked for and not placed yet, and how long the oldest has waited (s):
        a request lost on the way shows here as a wait that only grows."""
        with self._lock:
            oldest = min(
                (min(asked_at.values()) for asked_at in self._asked_at if asked_at), default=None
            )
            count = sum(len(asked_at) for asked_at in self._asked_at)
        return count, 0.0 if oldest is None else self._clock() - oldest

    def summary(self) -> dict[str, float | int]:
        samples = self.samples()
        waiting, oldest = self.waiting()
        pending = {"waiting": waiting, "oldest-waiting-ms": round(oldest * 1e3, 1)}
        if samples.size == 0:
            return {"count": 0, "p50-us": 0.0, "p99-us": 0.0, "max-us": 0.0} | pending
        p50, p99 = percentiles(samples, (50, 99))
        return {
            "count": int(samples.size),
            "p50-us": round(float(p50) * 1e6, 1),
            "p99-us": round(float(p99) * 1e6, 1),
            "max-us": round(float(samples.max()) * 1e6, 1),
        } | pending

    def samples(self) -> npt.NDArray[np.float64]:
        with self._lock:
            return np.array(self._samples, dtype=np.float64)


# the wait log (x-request-hops "waits"): one row per counted wait, in the order they end
WAIT_FIELDS = ("vcpu", "block", "page", "kind", "begin", "end", "run_pages")
WAIT_LOG_CAPACITY = 20_000


@dataclass
class _Waiter:
    block: int = -1
    page: int = -1
    since: float = 0.0
    kind: str = ""


@dataclass
class BlocktimeTracker:
    """QEMU's postcopy-blocktime: per vCPU the time it waited for pages, and the total time
    during which all vCPUs waited at once. Times are in milliseconds in the QMP view.

    And the vCPU faults, each counted once its outcome is known (`handled`): it needed a
    page from the source (asked for by it or before it), or it was resolved here (the
    precopy copy moved back, a zero page filled, the page placed meanwhile). So `faults`
    is by construction their sum; a fault that meets EAGAIN counts when it is handled.

    Besides the sums, each wait is logged (up to WAIT_LOG_CAPACITY): the vCPU, the page,
    what the fault thread did about it (`kind`: asked for it, found it in flight, moved it
    back, found it there), when the wait began and ended, and the size of the run whose
    placement ended it (0: the vCPU ran on without it): where the blocktime goes, wait by
    wait (x-request-hops)."""

    vcpus: int
    clock: Clock = time.monotonic
    per_vcpu: list[float] = field(default_factory=list)
    total: float = 0.0
    faults_from_source: int = 0
    faults_resolved_here: int = 0
    refaults: int = 0  # a fault of a vCPU recorded as waiting for another page
    waits: list[tuple[int, int, int, str, float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_vcpu = [0.0] * self.vcpus
        self._waiting = [_Waiter() for _ in range(self.vcpus)]
        self._blocked = 0
        self._all_blocked_since = 0.0
        self._lock = threading.Lock()
        self.vcpu_sleep: VcpuSleep | None = None

    @property
    def faults(self) -> int:
        """vCPU faults handled: from the source + resolved here."""
        return self.faults_from_source + self.faults_resolved_here

    def fault(self, vcpu: int, block: int, page: int, when: float) -> bool:
        """vCPU `vcpu` faulted on (block, page), read at `when`. True when a wait began
        there: a fault to count once `handled`; False for the page it already waits on
        (the same fault raised again, as after a signal: one wait, one fault)."""
        with self._lock:
            waiter = self._waiting[vcpu]
            if waiter.block >= 0:
                if (waiter.block, waiter.page) == (block, page):
                    return False
                # a thread waits in one fault at a time: this vCPU was woken from the other
                # page, which is placed and not yet recorded (the placer wakes, then records)
                # or which it left on a signal. Its wait ended by now: charge it until now
                # and wait on this page. (QEMU's mark_postcopy_blocktime_begin drops the
                # earlier wait's time instead; a fault on the same page restarts its clock.)
                self.per_vcpu[vcpu] += max(when - waiter.since, 0.0)
                self.refaults += 1
                self._log(vcpu, waiter, when, 0)
                waiter.block, waiter.page, waiter.since, waiter.kind = block, page, when, ""
                return True
            waiter.block, waiter.page, waiter.since, waiter.kind = block, page, when, ""
            self._blocked += 1
            if self._blocked == self.vcpus:
                self._all_blocked_since = when
            return True

    def handled(self, *, from_source: bool) -> None:
        """A fault that `fault` began a wait for was handled: its page had to come from the
        source, or it was resolved here."""
        with self._lock:
            if from_source:
                self.faults_from_source += 1
            else:
                self.faults_resolved_here += 1

    def watch_vcpus(self, thread_ids: list[int]) -> None:
        """At RUN, the running vCPUs' threads: the kernel's view of their waits beside
        the counter (VcpuSleep, x-vcpu-slept-us)."""
        if thread_ids:
            self.vcpu_sleep = VcpuSleep(thread_ids, self.clock)

    def all_placed(self) -> None:
        """Every page is in: the vCPUs wait for no page from here on."""
        if self.vcpu_sleep is not None:
            self.vcpu_sleep.stop()

    def note(self, vcpu: int, block: int, page: int, kind: str) -> None:
        """What the fault thread did about the wait of `vcpu` on this page (the wait log)."""
        with self._lock:
            waiter = self._waiting[vcpu]
            if waiter.block == block and waiter.page == page:
                waiter.kind = kind
            elif self.waits and self.waits[-1][:4] == (vcpu, block, page, ""):
                # resolved at once, before the fault thread said how (a local fault)
                self.waits[-1] = (vcpu, block, page, kind, *self.waits[-1][4:])

    def placed(self, block: int, first_page: int, count: int) -> None:
        with self._lock:
            if self._blocked == 0:
                return
            now = self.clock()
            for vcpu, waiter in enumerate(self._waiting):
                if waiter.block == block and first_page <= waiter.page < first_page + count:
                    if self._blocked == self.vcpus:
                        self.total += now - self._all_blocked_since
                    self.per_vcpu[vcpu] += now - waiter.since
                    self._log(vcpu, waiter, now, count)
                    waiter.block = -1
                    self._blocked -= 1

    def _log(self, vcpu: int, waiter: _Waiter, end: float, run_pages: int) -> None:
        """A wait ended (the lock held): into the wait log while it has room."""
        if len(self.waits) < WAIT_LOG_CAPACITY:
            self.waits.append(
                (vcpu, waiter.block, waiter.page, waiter.kind, waiter.since, end, run_pages)
            )

    def wait_log(self) -> dict[str, list[Any]]:
        """The waits as columns (times in seconds of the host's monotonic clock, to the µs)."""
        with self._lock:
            rows = list(self.waits)
        columns: dict[str, list[Any]] = {name: [] for name in WAIT_FIELDS}
        for vcpu, block, page, kind, begin, end, run_pages in rows:
            columns["vcpu"].append(vcpu)
            columns["block"].append(block)
            columns["page"].append(page)
            columns["kind"].append(kind)
            columns["begin"].append(round(begin, 6))
            columns["end"].append(round(end, 6))
            columns["run_pages"].append(run_pages)
        return columns

    def as_qmp(self) -> dict[str, Any]:
        with self._lock:  # one moment: the fault counts add up
            return self._as_qmp()

    def _as_qmp(self) -> dict[str, Any]:
        return {
            "postcopy-blocktime": int(self.total * 1000),
            "postcopy-vcpu-blocktime": [int(t * 1000) for t in self.per_vcpu],
            "x-postcopy-blocktime-us": round(self.total * 1e6, 1),
            "x-postcopy-vcpu-blocktime-us": [round(t * 1e6, 1) for t in self.per_vcpu],
            "x-postcopy-vcpu-faults": self.faults,
            "x-postcopy-vcpu-faults-from-source": self.faults_from_source,
            "x-postcopy-vcpu-faults-resolved-here": self.faults_resolved_here,
            "x-postcopy-vcpu-refaults": self.refaults,
            **(self.vcpu_sleep.as_qmp() if self.vcpu_sleep is not None else {}),
        }


class VcpuSleep:
    """The kernel's view of the vCPUs' waits in postcopy, beside the blocktime counter: how
    long each vCPU thread slept (neither running nor runnable) from RUN to the last page,
    from its schedstat. A guest that never halts sleeps only while it waits for a page
    (from the fault itself, before the fault thread reads it, to the wake-up) or for the
    GIL after an exit to the VMM; the blocktime counts from the fault read to the
    placement, as QEMU's. A counter above this figure counts time a vCPU ran."""

    def __init__(self, thread_ids: list[int], clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._tids = thread_ids
        self._start = clock()
        self._runnable = [_runnable(tid) for tid in thread_ids]
        self.slept: list[float] | None = None

    def stop(self) -> None:
        """The last page is in: the vCPUs wait for no page from here on."""
        if self.slept is not None:
            return
        wall = self._clock() - self._start
        now = [_runnable(tid) for tid in self._tids]
        self.slept = [
            max(0.0, wall - (after - before))
            for before, after in zip(self._runnable, now, strict=True)
        ]

    def as_qmp(self) -> dict[str, Any]:
        if self.slept is None:
            return {}
        return {"x-vcpu-slept-us": [round(t * 1e6, 1) for t in self.slept]}


def _runnable(tid: int) -> float:
    try:
        return runnable_seconds(tid)
    except OSError:  # the thread is gone: it slept no more
        return 0.0
