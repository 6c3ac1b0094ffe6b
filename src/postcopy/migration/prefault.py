"""Fault in, on a thread of its own, the guest RAM that the next precopy runs will land in.

The destination's RAM is untouched memory until precopy fills it, and on these machines a
first touch costs about as much as the socket read itself (1.1-1.5 GB/s against 1.5-2.5
GB/s): read straight into guest RAM, the receiver pays both, one after the other. The
bulk round sends RAM in ascending runs, so while the receiver reads one run the prefaulter
populates the next few (MADV_POPULATE_WRITE: one kernel call per range, no trap per page)
and the receiver's reads land in memory that is already there. Measured on loopback with
a 1 GiB transfer: 1.0-1.2 GB/s without, 1.5-1.7 GB/s with four runs ahead.

Zero pages should stay holes on the destination, so it looks ahead only after a dense run
(mostly pages with content); a prefaulted page that then arrives as a zero page is emptied
again by the receiver (`prefaulted` says which). It never populates a page already
received: those are warm.

It must be closed before RAM is registered on a userfaultfd: from then on no thread may
touch guest RAM that can be missing (populating a missing page would wait for ourselves).
In postcopy, a second one populates the RAM swap's side mappings instead (`targets`):
pushed runs are read there before they move into guest RAM, and those mappings are never
registered. The stale precopy pages already there (`skip`, found with the kernel's pagemap
when it starts) need nothing; postcopy from the start has none, so every pushed page would
otherwise be allocated and zeroed by the receiver's read.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading

import numpy as np

from postcopy.linux.memory import Advice, Mapping, MappingError
from postcopy.migration.scheduling import set_thread_nice
from postcopy.ram import Bitmap, RamBlock, runs
from postcopy.ram.touched import present_pages

log = logging.getLogger(__name__)

DENSE_FRACTION = 0.5  # a run is dense if at least this share of its pages has content


class Prefaulter:
    """Populates guest RAM ahead of the precopy receiver, `window_runs` runs ahead."""

    def __init__(
        self,
        ram: list[RamBlock],
        received: list[Bitmap],
        *,
        window_runs: int = 4,
        nice: int = 0,
        targets: list[Mapping] | None = None,
    ) -> None:
        """`targets`: the mappings to populate instead of the blocks' own (same layout);
        their pages present when the thread starts are left alone."""
        if window_runs < 1:
            raise ValueError("the prefault window must be at least one run")
        self._ram = ram
        self._targets = targets or [block.mapping for block in ram]
        self._skip: list[Bitmap] | None = None if targets is None else []
        self._received = received
        self.window_runs = window_runs
        self.prefaulted = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
        self._frontier = [0] * len(ram)  # per block: pages below it were queued or passed
        self._work: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self.pages_populated = 0
        self._enabled = True
        self._nice = nice
        self._thread = threading.Thread(target=self._populate_loop, name="prefault", daemon=True)
        self._thread.start()

    def advance(self, block_index: int, first: int, count: int, normal_pages: int) -> None:
        """The receiver is about to read run [first, first + count) of a block, with
        `normal_pages` pages of content: queue the window after it, if worth it."""
        end = first + count
        frontier = self._frontier[block_index]
        if not self._enabled or normal_pages < DENSE_FRACTION * count:
            self._frontier[block_index] = max(frontier, end)
            return
        block_pages = self._ram[block_index].pages
        window_end = min(end + self.window_runs * count, block_pages)
        start = max(frontier, end)
        if window_end > start:
            self._work.put((block_index, start, window_end - start))
            self._frontier[block_index] = window_end

    def close(self) -> None:
        """Stop after the range being populated; the rest of the queue is dropped."""
        self._enabled = False
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join()

    def _populate_loop(self) -> None:
        set_thread_nice(self._nice)
        if self._skip is not None:
            self._skip = [present_pages(target) for target in self._targets]
        while True:
            item = self._work.get()
            if item is None or not self._enabled:
                return
            block_index, first, count = item
            try:
                self._populate(block_index, first, count)
            except MappingError as error:
                # before Linux 5.14 there is no MADV_POPULATE_WRITE: receive without
                if error.errno not in (errno.EINVAL, errno.ENOSYS):
                    log.warning("prefaulting guest RAM: %s", error)
                self._enabled = False
                return

    def _populate(self, block_index: int, first: int, count: int) -> None:
        block, target = self._ram[block_index], self._targets[block_index]
        # read while the receiver sets these bits, without a lock: a hint only. A page
        # that arrives meanwhile is populated for nothing (MADV_POPULATE_WRITE leaves a
        # present page as it is); on guest RAM this thread stops before LISTEN, when
        # pages can go missing (the side mappings are never registered)
        missing = ~self._received[block_index][first : first + count]
        if self._skip:
            missing &= ~self._skip[block_index][first : first + count]
        starts, lengths = runs(missing)
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            if not self._enabled:
                return
            page = first + start
            target.madvise(Advice.POPULATE_WRITE, page * block.page_size, length * block.page_size)
            self.prefaulted[block_index][page : page + length] = True
            self.pages_populated += length
