"""Sending RAM runs on the source, with the accounting and the bandwidth limits.

Owns `RamSender`: every run of pages the source sends (precopy rounds, the downtime's last
pages, the postcopy push, requested pages) goes through `send_pages`, which finds its zero
pages (asking the kernel which pages were never touched, ram.touched, so that those are not
read), sends one RAM_RUN frame, counts it with QEMU's rules (migration.accounting, over
`RamCounters`: QEMU's MigrationStats.ram) and in the rate meter, and keeps to max-bandwidth /
max-postcopy-bandwidth (QEMU's ram.c ram_save_host_page and the migration rate limit).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import numpy as np

from postcopy.linux.pagemap import Pagemap
from postcopy.migration.accounting import Accounting
from postcopy.migration.channel import StreamWriter
from postcopy.migration.parameters import Parameters
from postcopy.migration.stats import Clock, RamCounters, RateMeter
from postcopy.ram import Bitmap, RamBlock, RamList, pages_after, runs, split_runs
from postcopy.ram.touched import ZeroPageFinder
from postcopy.wire import max_run_pages


def run_pages_for(block: RamBlock, run_pages: int) -> int:
    """At most `run_pages` pages per run, and no more than one RAM_RUN frame may carry for
    the block's page size (8 huge pages of 2 MiB: a huge page is always sent whole)."""
    return max(1, min(run_pages, max_run_pages(block.page_size)))


def runs_ahead(pages: Bitmap, run_pages: int) -> list[tuple[int, int, int]]:
    """The runs of set `pages` in order, at most `run_pages` long, each with the number of
    pages that follow it without a gap (`send_pages`'s `ahead`)."""
    starts, lengths = split_runs(*runs(pages), run_pages)
    return list(zip(starts.tolist(), lengths.tolist(), pages_after(starts, lengths), strict=True))


THROTTLE_SLICE = 0.05  # seconds: the longest a new bandwidth limit waits to take effect


RESEND_MAX_PAGE_SIZE = 64 << 10


def resend_taken_pages(block: RamBlock) -> bool:
    """Whether the urgent channel sends again a requested page the push has taken: small
    pages yes (a resend costs little, the push's copy may be megabytes behind), huge pages
    no (one page is megabytes: the push's copy is the next thing to arrive)."""
    return block.page_size <= RESEND_MAX_PAGE_SIZE


_ZERO_PAGES: dict[int, bytes] = {}


def _zero_page(page_size: int) -> bytes:
    zero = _ZERO_PAGES.get(page_size)
    if zero is None:
        zero = _ZERO_PAGES[page_size] = bytes(page_size)
    return zero


class RamSender:
    """Sends runs of one machine's RAM and accounts for them."""

    def __init__(
        self,
        ram: RamList,
        parameters: Parameters,
        clock: Clock,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        """`give_up` says when a wait for the bandwidth limit should end at once (the
        migration was cancelled or the destination gave up)."""
        self.parameters = parameters
        self._clock = clock
        self._give_up = give_up
        self.counters = RamCounters(total=ram.total_bytes, page_size=min(b.page_size for b in ram))
        self.accounting = Accounting(self.counters, clock)
        self._rate = RateMeter(clock)
        self._counters_lock = threading.Lock()  # the rate meter's (Accounting has its own)
        self._throttle_start = 0.0
        self._throttle_bytes = 0
        self._throttle_limit = 0  # the limit the bytes since the start were counted against
        self._wake = threading.Event()
        self._pagemap: Pagemap | None = None
        with contextlib.suppress(OSError):  # no /proc: every page is read
            self._pagemap = Pagemap()
        self._zero = {id(block): ZeroPageFinder(block, self._pagemap) for block in ram}

    def close(self) -> None:
        if self._pagemap is not None:
            self._pagemap.close()

    @property
    def pages_not_read(self) -> int:
        """Pages found zero without being read: the process never touched them."""
        return sum(finder.pages_skipped for finder in self._zero.values())

    def forget_zero_pages(self) -> None:
        """The dirty log was synced: zero pages found ahead of the runs sent must be found
        again (ram.touched.ZeroPageFinder)."""
        for finder in self._zero.values():
            finder.forget()

    def restart_throttle(self) -> None:
        """The bandwidth limit counts from now (start of precopy, start of the push)."""
        self._throttle_start, self._throttle_bytes = self._clock(), 0

    def _restart_throttle(self, limit: int) -> None:
        self.restart_throttle()
        self._throttle_limit = limit

    def bandwidth(self) -> float:
        elapsed = self._clock() - self._throttle_start
        measured = self._rate.rate or (self.counters.transferred / elapsed if elapsed > 0 else 0.0)
        return measured

    def send_pages(
        self,
        writer: StreamWriter,
        index: int,
        block: RamBlock,
        first: int,
        count: int,
        *,
        phase: str,
        ahead: int = 0,
    ) -> int:
        """Send one run of `phase`: "precopy", "downtime", "postcopy" (the push) or
        "requested". Precopy and push runs count against their bandwidth limit (see
        `wait_for_bandwidth`); the others are never held back. `ahead`: pages the caller
        sends right after these (their zero pages are found with these: `forget_zero_pages`
        at every sync of the dirty log)."""
        if count == 1 and block.page_size <= RESEND_MAX_PAGE_SIZE:
            return self._send_page(writer, index, block, first, phase)
        if self.parameters.zero_page_detection == "none":
            zero = np.zeros(count, dtype=np.bool_)
        else:
            zero = self._zero[id(block)].zero_pages(first, count, ahead)
        size = writer.send_ram_run(index, block, first, zero)
        self.accounting.sent(count, int(np.count_nonzero(zero)), size, phase, block.page_size)
        with self._counters_lock:
            self._rate.add(size)  # the push and (with preempt) the return path both send
        if phase in ("precopy", "postcopy") and self._limit(phase) > 0:
            self._throttle_bytes += size
        return size

    def _send_page(
        self, writer: StreamWriter, index: int, block: RamBlock, page: int, phase: str
    ) -> int:
        """`send_pages` of one small page (a requested page, on the latency-critical path)
        without numpy: each numpy call costs microseconds of fixed overhead here, and a
        page request's hop on the source was ~250 µs of such calls."""
        # the source's RAM is all there (no userfaultfd here); a copy and a memcmp are
        # ~1 µs for 4 KiB, against ~6 µs for one numpy call, and the copy is what is sent
        data = bytes(block.page_view(page, 1))
        zero = self.parameters.zero_page_detection != "none" and data == _zero_page(block.page_size)
        size = writer.send_ram_page(index, block, page, zero, data)
        self.accounting.sent(1, int(zero), size, phase, block.page_size)
        with self._counters_lock:
            self._rate.add(size)
        if phase in ("precopy", "postcopy") and self._limit(phase) > 0:
            self._throttle_bytes += size
        return size

    def interrupt_wait(self) -> None:
        """End a `wait_for_bandwidth` now: a page request was queued, or postcopy was asked
        for (QEMU kicks its rate-limit wait the same way)."""
        self._wake.set()

    def wait_for_bandwidth(self, phase: str) -> bool:
        """Before a run of `phase` ("precopy" or "postcopy"): wait until the bytes sent so
        far keep to max-bandwidth or max-postcopy-bandwidth. False if the wait ended early
        (`interrupt_wait`, or the migration is ending): look at what came first.

        The wait goes in slices and reads the limit again after each one, so that a limit
        set during the migration (migrate-set-parameters) takes effect at once, also to
        lift a very low one: a test holds precopy or the push with 1 byte/s. A new limit
        counts from when it is seen, as QEMU's per-window rate limit does: the bytes sent
        under the old one are neither a debt (1 GiB sent at 1 GiB/s, then 1 MiB/s, waited
        1,000 s) nor a credit (a limit lifted after a hold of one second let a second's
        worth go at once, far above the new limit)."""
        limit = self._limit(phase)
        if limit <= 0:
            return True
        if limit != self._throttle_limit:
            self._restart_throttle(limit)
        while True:
            delay = self._throttle_start + self._throttle_bytes / limit - self._clock()
            if delay <= 0:
                if delay < -1.0:  # fell far behind (a slow link): don't burst to catch up
                    self.restart_throttle()
                return True
            if self._wake.wait(min(delay, THROTTLE_SLICE)):
                self._wake.clear()
                return False
            if self._give_up():
                return False
            limit = self._limit(phase)
            if limit <= 0:
                return True
            if limit != self._throttle_limit:
                self._restart_throttle(limit)
                return True

    def _limit(self, phase: str) -> int:
        if phase == "postcopy":
            return self.parameters.max_postcopy_bandwidth
        return self.parameters.max_bandwidth
