"""/proc/PID/pagemap: which pages of a range are present, without touching them.

Two interfaces of the same file:

- reading it: one u64 per base page (present, swapped, file/shared, exclusive, uffd-wp
  bits; the frame number only for root). Reading never faults the pages in, so it is the
  GIL-safe way to ask "has this page arrived?" while userfaultfd may hold missing pages.
- the PAGEMAP_SCAN ioctl (Linux 6.7+): ranges of pages by category in one call, and with
  a userfaultfd WP_ASYNC registration, "which pages were written since the last scan"
  plus re-protection in the same call: dirty tracking for host processes (soft-dirty is
  not available on this project's kernels).

Thin bindings, no policy; results are numpy arrays.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os

import numpy as np
import numpy.typing as npt

from postcopy.closing import Closing
from postcopy.linux._libc import ioctl_struct

PAGEMAP_SCAN = 0xC0606610
ENTRY_SIZE = 8

# Bits of a pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD = 1 << 58
PM_FILE_SHARED = 1 << 61
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63


class ScanFlag(enum.IntFlag):
    """pm_scan_arg.flags."""

    WP_MATCHING = 1 << 0  # write-protect the matching pages (uffd WP_ASYNC ranges)
    CHECK_WPASYNC = 1 << 1  # fail with EPERM unless the whole range is WP_ASYNC-registered


class PageCategory(enum.IntFlag):
    """PAGE_IS_* categories of PAGEMAP_SCAN."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7
    GUARD = 1 << 8


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])


class PagemapError(OSError):
    """A pagemap read or scan failed; the message names the operation, range and errno."""

    def __init__(self, err: int, operation: str, start: int, end: int) -> None:
        super().__init__(err, f"{operation} [{start:#x}, {end:#x}): {os.strerror(err)}")
        self.operation = operation
        self.start = start
        self.end = end


class Pagemap(Closing):
    """An open /proc/PID/pagemap (default: this process)."""

    def __init__(self, pid: int | str = "self") -> None:
        self.path = f"/proc/{pid}/pagemap"
        self.fd: int = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def entries(self, address: int, length: int) -> npt.NDArray[np.uint64]:
        """The raw u64 entry of every base page in [address, address+length)."""
        if address % self.page_size or length % self.page_size:
            raise ValueError(f"range [{address:#x}, +{length:#x}) is not page-aligned")
        pages = length // self.page_size
        buffer = bytearray(pages * ENTRY_SIZE)
        offset = address // self.page_size * ENTRY_SIZE
        done = 0
        view = memoryview(buffer)
        while done < len(buffer):
            try:
                count = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as error:
                raise PagemapError(
                    error.errno or errno.EIO, "read pagemap", address, address + length
                ) from None
            if count == 0:
                raise PagemapError(errno.EIO, "short pagemap read", address, address + length)
            done += count
        return np.frombuffer(buffer, dtype="<u8").astype(np.uint64, copy=False)

    def present(self, address: int, length: int) -> npt.NDArray[np.bool_]:
        """Per base page: is it in memory (mapped and not swapped out)?"""
        return (self.entries(address, length) & np.uint64(PM_PRESENT)) != 0

    def scan(
        self,
        start: int,
        end: int,
        *,
        category_mask: PageCategory | int = 0,
        category_inverted: PageCategory | int = 0,
        category_anyof_mask: PageCategory | int = 0,
        return_mask: PageCategory | int = 0,
        flags: ScanFlag | int = 0,
        max_pages: int = 0,
        max_regions: int = 1024,
    ) -> tuple[npt.NDArray[np.void], int]:
        """PAGEMAP_SCAN over [start, end): (regions, walk_end).

        `regions` is a structured array (start, end, categories). A page matches when all
        `category_mask` categories (after flipping `category_inverted`) hold and, if
        given, any of `category_anyof_mask`. The walk stops early when `max_regions` or
        `max_pages` fill up: then continue from `walk_end`. Completion is "fewer regions
        than max_regions returned", not walk_end == end.
        """
        regions = np.zeros(max_regions, dtype=REGION_DTYPE)
        arg = _ScanArg(
            size=ctypes.sizeof(_ScanArg),
            flags=int(flags),
            start=start,
            end=end,
            walk_end=0,
            vec=regions.ctypes.data,
            vec_len=max_regions,
            max_pages=max_pages,
            category_inverted=int(category_inverted),
            category_mask=int(category_mask),
            category_anyof_mask=int(category_anyof_mask),
            return_mask=int(return_mask),
        )
        try:
            filled = ioctl_struct(self.fd, PAGEMAP_SCAN, arg)
        except OSError as error:
            raise PagemapError(error.errno or errno.EINVAL, "PAGEMAP_SCAN", start, end) from None
        return regions[:filled].copy(), int(arg.walk_end)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
