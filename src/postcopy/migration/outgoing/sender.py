"""Sending RAM runs on the source, with the accounting and the bandwidth limits.

Owns `RamSender`: every run of pages the source sends (precopy rounds, the downtime's last
pages, the postcopy push, requested pages) goes through `send_pages`, which finds its zero
pages, sends one RAM_RUN frame, counts it in `RamCounters` (QEMU's MigrationStats.ram) and
the rate meter, and keeps to max-bandwidth / max-postcopy-bandwidth (QEMU's ram.c
ram_save_host_page and the migration rate limit).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from postcopy.migration.channel import StreamWriter
from postcopy.migration.parameters import Parameters
from postcopy.migration.stats import Clock, RamCounters, RateMeter
from postcopy.ram import RamBlock, RamList, zero_pages


class RamSender:
    """Sends runs of one machine's RAM and accounts for them."""

    def __init__(self, ram: RamList, parameters: Parameters, clock: Clock) -> None:
        self.parameters = parameters
        self._clock = clock
        self.counters = RamCounters(total=ram.total_bytes, page_size=min(b.page_size for b in ram))
        self._rate = RateMeter(clock)
        self._counters_lock = threading.Lock()
        self._throttle_start = 0.0
        self._throttle_bytes = 0

    def restart_throttle(self) -> None:
        """The bandwidth limit counts from now (start of precopy, start of the push)."""
        self._throttle_start, self._throttle_bytes = self._clock(), 0

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
    ) -> int:
        if self.parameters.zero_page_detection == "none":
            zero = np.zeros(count, dtype=np.bool_)
        else:
            zero = zero_pages(block.page_view(first, count), block.page_size)
        size = writer.send_ram_run(index, block, first, zero)
        zeros = int(np.count_nonzero(zero))
        with self._counters_lock:
            self._count_sent(count, zeros, size, phase, block.page_size)
        self._rate.add(size)
        self._throttle(size, phase)
        return size

    def _count_sent(self, count: int, zeros: int, size: int, phase: str, page_size: int) -> None:
        self.counters.duplicate += zeros
        self.counters.normal += count - zeros
        self.counters.transferred += size
        if phase == "precopy":
            self.counters.precopy_bytes += size
        elif phase == "downtime":
            self.counters.downtime_bytes += size
        else:
            self.counters.postcopy_bytes += size
        self.counters.remaining = max(self.counters.remaining - count * page_size, 0)

    def _throttle(self, size: int, phase: str) -> None:
        """Keep to max-bandwidth (precopy) or max-postcopy-bandwidth (the background push).
        Pages in the downtime and pages a vCPU is waiting for are never held back."""
        limit = (
            self.parameters.max_postcopy_bandwidth
            if phase == "postcopy"
            else self.parameters.max_bandwidth
        )
        if phase in ("downtime", "requested") or limit <= 0:
            return
        self._throttle_bytes += size
        due = self._throttle_start + self._throttle_bytes / limit
        delay = due - self._clock()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:  # fell far behind (a slow link): don't burst to catch up
            self._throttle_start = self._clock()
            self._throttle_bytes = 0
