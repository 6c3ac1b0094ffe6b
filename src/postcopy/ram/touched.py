"""Zero pages of a RAM block found without reading the pages the guest never touched.

A page of a private anonymous mapping that was never written has no memory behind it (or
the kernel's shared zero page, after a read): it reads as zeros. Reading it to find that
out faults it in, one minor fault per page: ~0.6 s per GiB, most of the bulk round of a
guest that uses a tenth of its RAM. The kernel already knows, so we ask it: one
PAGEMAP_SCAN per run of pages (Linux 6.7+; before that, the run's pagemap entries), and
only the pages it reports as holding memory of their own are read and checked.

Private anonymous memory asks the page tables. Shared memory cannot: a page of a memfd
can hold data in the page cache while this process has no mapping of it. There the file
itself is asked: mincore on the shared mapping says which pages the page cache holds
(mapped here or not), and SEEK_DATA confirms the pages it calls absent (a shmem page that
was swapped out reads as absent, yet holds data): the holes read as zeros, and reading one
would even allocate a page for it (shmem maps no shared zero page): a 1 GiB memfd guest
that used a tenth of its RAM spent ~3 s of its bulk round allocating and zeroing the rest.
(SEEK_HOLE is no use here: it walks every page of data to the next hole, to the end of a
full file, for each run: seconds per GiB.) Private file mappings and hugetlbfs (whose files
report no holes) are read page by page.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from postcopy.linux.memory import Mapping
from postcopy.linux.pagemap import (
    PM_PRESENT,
    PM_SWAPPED,
    PageCategory,
    Pagemap,
    PagemapError,
)
from postcopy.ram.bitmap import Bitmap, zero_pages, zero_rows
from postcopy.ram.block import RamBlock

HELD = PageCategory.PRESENT | PageCategory.SWAPPED
# a run that the caller says more pages follow (`ahead`) is looked at with up to this much
# RAM after it, at once: one PAGEMAP_SCAN and one zero check per 16 MiB instead of per run
LOOKAHEAD_BYTES = 16 << 20
# runs this short of private anonymous memory are read: a scan costs more than reading a
# few pages (a requested page); shared memory never reads a hole (it would allocate)
SMALL_RUN_PAGES = 16


def present_pages(mapping: Mapping) -> Bitmap:
    """Which base pages of `mapping` have memory of their own now (present or swapped,
    the shared zero page not counted). A kernel without PAGEMAP_SCAN (before 6.7)
    answers all False."""
    pages = mapping.length // mapping.page_size
    with Pagemap() as pagemap:
        try:
            return _scan_held(pagemap, mapping.address, pages, mapping.page_size)
        except PagemapError as error:
            if error.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return np.zeros(pages, dtype=np.bool_)


def _scan_held(pagemap: Pagemap, start: int, count: int, page_size: int) -> Bitmap:
    """Pages of [start, +count pages) held, by PAGEMAP_SCAN, 64 ranges per call."""
    end = start + count * page_size
    held = np.zeros(count, dtype=np.bool_)
    position = start
    while position < end:
        regions, walk_end = pagemap.scan(
            position,
            end,
            category_anyof_mask=HELD,
            return_mask=HELD | PageCategory.PFNZERO,
            max_regions=64,
        )
        for region_start, region_end, categories in regions.tolist():
            if not categories & PageCategory.PFNZERO:
                low = (region_start - start) // page_size
                held[low : (region_end - start) // page_size] = True
        if len(regions) < 64:
            break
        position = walk_end
    return held


class ZeroPageFinder:
    """`zero_pages(first, count)` of one block: which pages of the run are all zero.

    The caller must guarantee that the pages it reads are present (the GIL rule), as for
    `ram.zero_pages`; on the source they always are.

    Found ahead: a caller that will send the next `ahead` pages right after this run says
    so, and private anonymous RAM is then looked at up to LOOKAHEAD_BYTES at once (a
    PAGEMAP_SCAN and a zero check cost ~45 and ~60 us per call whatever their length up to
    a few MiB: per 2 MiB run they were a third of the bulk round's sending thread, per
    64-page push run a fifth of the push). The answers kept are as good as ones found when
    the run is sent, as long as every write to the pages in between is sent again later:
    the dirty log records it, and `forget` must be called at every sync of the dirty log
    (a page still pending at a sync is not marked to send again, so an answer found before
    the sync could hide a write made before it). Shared memory is never looked at ahead:
    another process may write it, and no dirty log sees that."""

    def __init__(self, block: RamBlock, pagemap: Pagemap | None = None) -> None:
        self.block = block
        eligible = block.mapping.kind == "anonymous" and not block.shared
        self._pagemap = pagemap if eligible else None
        # a shared mapping of a shmem file: its holes are zero pages (see the module doc)
        self._file = (
            block.mapping.fd
            if block.shared and block.mapping.fd is not None and block.memory_type == "shmem"
            else None
        )
        self._scan = True  # PAGEMAP_SCAN until the kernel says it has none
        self.pages_skipped = 0  # never touched: not read at all
        self._lookahead = max(1, LOOKAHEAD_BYTES // block.page_size)
        # pages found ahead: (first, zero, untouched), replaced whole (the push and, with
        # preempt, the return path may both ask; each reads one consistent tuple)
        self._found: tuple[int, Bitmap, Bitmap] | None = None

    def forget(self) -> None:
        """Drop the answers found ahead: the dirty log was synced (see the class doc)."""
        self._found = None

    def zero_pages(self, first: int, count: int, ahead: int = 0) -> Bitmap:
        """Which pages of [first, first + count) are zero; `ahead`: how many pages the
        caller will ask for right after these, in the same sweep (see the class doc)."""
        found = self._found
        if found is not None:
            low, zero, untouched = found
            if low <= first and first + count <= low + zero.size:
                offset = first - low
                self.pages_skipped += int(np.count_nonzero(untouched[offset : offset + count]))
                return zero[offset : offset + count].copy()
        if ahead <= 0 or self._pagemap is None or count <= SMALL_RUN_PAGES:
            return self._find(first, count)
        total = min(count + min(ahead, self._lookahead), self.block.pages - first)
        zero, untouched = self._find_untouched(first, total)
        self._found = (first, zero, untouched)
        self.pages_skipped += int(np.count_nonzero(untouched[:count]))
        return zero[:count].copy()

    def _find(self, first: int, count: int) -> Bitmap:
        block = self.block
        if self._file is not None:
            held = self._held_by_file(self._file, first, count)
        elif self._pagemap is None or count <= SMALL_RUN_PAGES:
            return zero_pages(block.page_view(first, count), block.page_size)
        else:
            zero, untouched = self._find_untouched(first, count)
            self.pages_skipped += int(np.count_nonzero(untouched))
            return zero
        if held.all():
            return zero_pages(block.page_view(first, count), block.page_size)
        return self._check_held(first, count, held)

    def _find_untouched(self, first: int, count: int) -> tuple[Bitmap, Bitmap]:
        """Private anonymous RAM: (zero, never touched) of a run, not counted."""
        block = self.block
        held = self._held(first, count)
        if held.all():
            return zero_pages(block.page_view(first, count), block.page_size), ~held
        return self._check_held(first, count, held, count_skipped=False), ~held

    def _check_held(
        self, first: int, count: int, held: Bitmap, *, count_skipped: bool = True
    ) -> Bitmap:
        """Zero pages of a run: those not `held`, and the held ones that read as zeros."""
        block = self.block
        zero = ~held
        if count_skipped:
            self.pages_skipped += int(np.count_nonzero(zero))
        rows = np.flatnonzero(held)
        if rows.size:
            words = block.page_size // 8
            pages = np.frombuffer(block.page_view(first, count), dtype=np.uint64).reshape(
                count, words
            )
            # fancy indexing reads only the rows asked for: the untouched pages stay untouched
            zero[rows] = zero_rows(pages, rows)
        return zero

    def _held(self, first: int, count: int) -> Bitmap:
        """Pages with memory of their own (present or swapped, not the shared zero page)."""
        assert self._pagemap is not None
        start = self.block.host_address + first * self.block.page_size
        end = start + count * self.block.page_size
        if self._scan:
            try:
                return _scan_held(self._pagemap, start, count, self.block.page_size)
            except PagemapError as error:
                if error.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._scan = False  # a kernel before 6.7: read the entries instead
        entries = self._pagemap.entries(start, end - start)
        held = (entries & np.uint64(PM_PRESENT | PM_SWAPPED)) != 0
        # as root the frame number shows the shared zero page too; else it reads 0 and a
        # page that was only read counts as held (it is then read: correct, only slower)
        return held

    def _held_by_file(self, fd: int, first: int, count: int) -> Bitmap:
        """Pages of the run that hold data in the file: in the page cache (mincore), or
        absent from it but not in a hole (SEEK_DATA lands on them: swapped out). One
        SEEK_DATA per stretch of absent pages, each stopping at the next data."""
        page_size = self.block.page_size
        vector = self.block.mapping.resident(first * page_size, count * page_size)
        held = (np.frombuffer(vector, dtype=np.uint8) & 1).astype(np.bool_)
        start = first * page_size
        absent = np.flatnonzero(~held)
        index = 0
        while index < absent.size:
            page = int(absent[index])
            try:
                data = os.lseek(fd, start + page * page_size, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # no data from here to the end of the file
                    break
                raise
            found = (data - start) // page_size
            if found >= count:
                break
            if found == page:
                held[page] = True  # data the page cache does not hold: swapped out
                index += 1
            else:  # a hole up to `found`: go on with the first absent page after it
                index = int(np.searchsorted(absent, found, side="left"))
                if index < absent.size and int(absent[index]) == found:
                    held[found] = True
                    index += 1
        return held
