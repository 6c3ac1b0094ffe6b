"""Minor-fault mode: discarded pages keep their page cache, so a re-sent page needs no new one.

Owns `KeptCache`. In minor-fault mode (x-postcopy-minor-faults) guest RAM is registered
MISSING|MINOR, and a page that is in the page cache but not mapped in guest RAM raises a
MINOR fault, as a hole raises a MISSING one: both become page requests until the page has
been received (faults.py never maps a page it has not received). So a discard there needs
only to unmap the page from guest RAM (MADV_DONTNEED on the shared mapping keeps the data);
punching a hole would free it, and its next copy would land in a new page that the kernel
must first allocate and zero: on 2 MiB pages that zeroing is as long as the copy of the
data itself (~190 us each here), on the path of a page a vCPU waits for.

What stays in the page cache is stale: `stale` marks those pages per block, until their
data is written again. A zero page that arrives for a stale page must be emptied for real
(a hole punched) before it counts as received: mapped as it is, it would show the old data.
Only where minor-fault mode applies (memfd or hugetlb, shared) and no other process maps
guest RAM (shared.py): a process of its own maps whatever the page cache holds. Nothing may
map a stale page into guest RAM again before LISTEN registers it: the receiver writes only
whole pages it receives (then they are current), and the precopy prefaulter, which
populates ahead of the receiver, stops at the first such discard (discards come at the
switchover, after the last bulk round).
"""

from __future__ import annotations

import numpy as np

from postcopy.linux.memory import Advice
from postcopy.migration.backends import minor_possible
from postcopy.ram import Bitmap, RamBlock, runs


class KeptCache:
    """The pages of each block discarded with their page cache kept (None: a block whose
    discards punch holes)."""

    def __init__(self, ram: list[RamBlock], enabled: bool) -> None:
        self._ram = ram
        self.stale: list[Bitmap | None] = [
            np.zeros(block.pages, dtype=np.bool_) if enabled and minor_possible(block) else None
            for block in ram
        ]

    def discard(self, index: int, first: int, count: int) -> bool:
        """Unmap pages from guest RAM, keeping their page cache; False if this block's
        discards must punch holes (then nothing was done)."""
        stale = self.stale[index]
        if stale is None:
            return False
        block = self._ram[index]
        block.mapping.madvise(Advice.DONTNEED, first * block.page_size, count * block.page_size)
        stale[first : first + count] = True
        return True

    def received(self, index: int, first: int, zero: Bitmap) -> None:
        """A run arrived for pages first.. (before LISTEN, its normal pages written through
        guest RAM): its stale zero pages are emptied, and none of its pages is stale now."""
        stale = self.stale[index]
        if stale is None:
            return
        window = stale[first : first + zero.size]
        empty_stale(self._ram[index], first, zero & window)
        window[:] = False


def empty_stale(block: RamBlock, first: int, pages: Bitmap) -> None:
    """Punch holes where `pages` (from page `first` on) is set: a page cache page with old
    data must not be taken for a zero page."""
    if not pages.any():
        return
    starts, lengths = runs(pages)
    size = block.page_size
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        block.mapping.punch_hole((first + start) * size, length * size)
