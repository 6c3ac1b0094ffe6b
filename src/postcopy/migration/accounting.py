"""The source's query-migrate figures with exactly QEMU's meanings, and when they change.

A management tool decides from these figures (libvirt switches to postcopy once
`dirty-sync-count` reaches 2, or on the MIGRATION_PASS event with pass 2), so each one
follows QEMU 7.2's definition, cited by file and function:

- `dirty-sync-count`: dirty-bitmap syncs so far (ram.c, migration_bitmap_sync increments it).
  QEMU syncs once in setup (ram_init_bitmaps -> migration_bitmap_sync_precopy), so the count
  is 1 during the first pass, 2 once the first pass is over, and the final sync at the
  switchover (ram_postcopy_send_discard_bitmap) or the precopy completion (ram_save_complete)
  counts too.
- MIGRATION_PASS `{pass}`: sent by every sync with the new count (migration_bitmap_sync,
  capability `events`): pass 1 in setup, pass 2 after the first pass.
- `remaining`: bytes of the pages still marked dirty (ram_bytes_remaining: dirty pages x
  target page size), live; 0 once completed (populate_ram_info sets it only before).
- `dirty-pages-rate`: pages newly dirtied per second, over periods of at least one second
  between syncs (migration_bitmap_sync, migration_update_rates); 0 until such a period has
  passed, and 0 once completed.
- `transferred`, `precopy-bytes`, `downtime-bytes`, `postcopy-bytes`: RAM bytes on the wire,
  headers included, split by the state the guest was in when they were sent
  (ram_transferred_add: running -> precopy, in postcopy -> postcopy, else downtime).
- `mbps`, `pages-per-second`: rates over the last window of at least 100 ms (BUFFER_DELAY,
  migration_update_counters), not averages since the start; at completion `mbps` becomes
  the average over total-time minus setup-time (migration_calculate_complete) and
  `pages-per-second` keeps its last value. QEMU counts every byte of the main channel here
  (migration_total_bytes), so the preempt channel's urgent pages are missing from its
  `mbps`; ours counts the RAM bytes of both channels (device state and commands, a few
  KiB, are left out).
- `expected-downtime`: ms, the bytes dirty at the last sync over the bandwidth of the last
  window (migration_update_counters), recomputed only once a dirty-pages-rate exists and
  more than 10000 bytes went in the window; 0 before; present until completion.
- `dirty-sync-missed-zero-copy`: syncs that could not avoid copying dirty pages with
  zero-copy-send (7.1; multifd only); 0 here, we have neither.

Time comes from an injectable clock in seconds so that the rules are unit-tested.
"""

from __future__ import annotations

import threading
import time

from postcopy.migration.stats import Clock, RamCounters

BUFFER_DELAY = 0.1  # migration.c: counters are recomputed at most every 100 ms
RATE_PERIOD = 1.0  # ram.c migration_bitmap_sync: "more than 1 second = 1000 milliseconds"
WINDOW_FLOOR_BYTES = 10000  # migration_update_counters: "if we haven't sent anything"


class Accounting:
    """QEMU's update rules over a RamCounters (the figures query-migrate shows).

    The migration thread calls `sync` at each dirty-bitmap sync and `sent` after each run
    of pages; the return-path thread may call `sent` too (requested pages on the preempt
    channel), so both take the lock."""

    def __init__(self, counters: RamCounters, clock: Clock = time.monotonic) -> None:
        self.counters = counters
        self._clock = clock
        self._lock = threading.Lock()
        self.expected_downtime_ms = 0
        self.bandwidth = 0.0  # bytes per second over the last window
        self._dirty_bytes_at_sync = 0  # QEMU 7.2's ram_counters.remaining, set at each sync
        # the rate period (migration_bitmap_sync)
        self._period_start: float | None = None
        self._period_pages = 0
        # the window (migration_update_counters / update_iteration_initial_status)
        self._window_start: float | None = None
        self._window_bytes = 0
        self._window_pages = 0
        self.total_bytes = 0  # RAM bytes sent on every channel (QEMU: migration_total_bytes)

    def start(self) -> None:
        """The migration thread starts (migration_thread: update_iteration_initial_status)."""
        with self._lock:
            self._window_start = self._clock()
            self._window_bytes = self.total_bytes
            self._window_pages = self._pages()

    def sync(self, newly_dirty_pages: int, dirty_bytes: int) -> int:
        """A dirty-bitmap sync found `newly_dirty_pages` that were not already pending;
        the pages pending now hold `dirty_bytes`. Returns the pass number MIGRATION_PASS
        carries."""
        with self._lock:
            counters = self.counters
            counters.dirty_sync_count += 1
            now = self._clock()
            if self._period_start is None:
                self._period_start = now
            self._period_pages += newly_dirty_pages
            counters.remaining = dirty_bytes
            self._dirty_bytes_at_sync = counters.remaining
            # whole milliseconds, as QEMU's clock: the rate needs a period over 1000 ms
            elapsed_ms = int(now * 1000) - int(self._period_start * 1000)
            if elapsed_ms > RATE_PERIOD * 1000:
                counters.dirty_pages_rate = self._period_pages * 1000 // elapsed_ms
                self._period_start = now
                self._period_pages = 0
            return counters.dirty_sync_count

    def sent(
        self, pages: int, zero_pages: int, size: int, phase: str, page_size: int | None = None
    ) -> None:
        """`pages` (of `page_size`, default the target page) left in one run, `zero_pages`
        of them as markers, `size` bytes on the wire, in `phase`: "precopy" (guest
        running), "downtime" (stopped, precopy completion), "postcopy" or "requested"
        (after the switch)."""
        with self._lock:
            counters = self.counters
            counters.duplicate += zero_pages
            counters.normal += pages - zero_pages
            counters.transferred += size
            if phase == "precopy":
                counters.precopy_bytes += size
            elif phase == "downtime":
                counters.downtime_bytes += size
            else:
                counters.postcopy_bytes += size
            counters.remaining = max(
                counters.remaining - pages * (page_size or counters.page_size), 0
            )
            self.total_bytes += size
            self._update(self._clock())

    def update(self) -> None:
        """Recompute the window's rates if the window is long enough (also called on idle
        moments, e.g. while the push waits, so that the rates do not go stale)."""
        with self._lock:
            self._update(self._clock())

    def _pages(self) -> int:
        return self.counters.normal + self.counters.duplicate

    def _update(self, now: float) -> None:
        # migration_update_counters
        if self._window_start is None or now < self._window_start + BUFFER_DELAY:
            return
        spent = now - self._window_start
        transferred = self.total_bytes - self._window_bytes
        self.bandwidth = transferred / spent
        self.counters.mbps = transferred * 8 / spent / 1e6
        self.counters.pages_per_second = int((self._pages() - self._window_pages) / spent)
        if self.counters.dirty_pages_rate and transferred > WINDOW_FLOOR_BYTES:
            self.expected_downtime_ms = int(self._dirty_bytes_at_sync / self.bandwidth * 1000)
        self._window_start = now
        self._window_bytes = self.total_bytes
        self._window_pages = self._pages()

    def complete(self, total_time: float, setup_time: float) -> None:
        """The migration completed (migration_calculate_complete): mbps becomes the average
        over the transfer time; remaining and dirty-pages-rate read 0 (populate_ram_info)."""
        with self._lock:
            transfer_time = total_time - setup_time
            if transfer_time > 0:
                self.counters.mbps = self.total_bytes * 8 / transfer_time / 1e6
            self.counters.remaining = 0
            self.counters.dirty_pages_rate = 0
