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
from postcopy.ram.bitmap import Bitmap, zero_pages
from postcopy.ram.block import RamBlock

HELD = PageCategory.PRESENT | PageCategory.SWAPPED
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
    `ram.zero_pages`; on the source they always are."""

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

    def zero_pages(self, first: int, count: int) -> Bitmap:
        block = self.block
        if self._file is not None:
            held = self._held_by_file(self._file, first, count)
        elif self._pagemap is None or count <= SMALL_RUN_PAGES:
            return zero_pages(block.page_view(first, count), block.page_size)
        else:
            held = self._held(first, count)
        if held.all():
            return zero_pages(block.page_view(first, count), block.page_size)
        zero = ~held
        self.pages_skipped += int(np.count_nonzero(zero))
        rows = np.flatnonzero(held)
        if rows.size:
            words = block.page_size // 8
            pages = np.frombuffer(block.page_view(first, count), dtype=np.uint64).reshape(
                count, words
            )
            # fancy indexing reads only the rows asked for: the untouched pages stay untouched
            zero[rows] = ~pages[rows].any(axis=1)
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
