"""Tests of postcopy.linux.pagemap on the real kernel: presence without touching (even of
userfaultfd-missing pages), and PAGEMAP_SCAN write tracking with userfaultfd WP_ASYNC."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.linux.pagemap import PageCategory, Pagemap, PagemapError, ScanFlag
from postcopy.linux.userfaultfd import Feature, RegisterMode, UserfaultFd

pytestmark = pytest.mark.timeout(60, method="thread")

PAGE = mmap.PAGESIZE


def test_present_reports_touched_pages_only() -> None:
    with Mapping.anonymous(8 * PAGE) as mapping, Pagemap() as pagemap:
        mapping.view[PAGE] = 1
        mapping.view[5 * PAGE + 17] = 1
        present = pagemap.present(mapping.address, mapping.length)
        assert present.tolist() == [False, True, False, False, False, True, False, False]
        entries = pagemap.entries(mapping.address, 2 * PAGE)
        assert entries.dtype == np.uint64 and len(entries) == 2
        with pytest.raises(ValueError, match="page-aligned"):
            pagemap.present(mapping.address + 1, PAGE)


def test_present_does_not_fault_missing_pages() -> None:
    # Reading pagemap of a userfaultfd-missing range must neither block nor fault it in.
    with (
        Mapping.anonymous(4 * PAGE) as mapping,
        Mapping.anonymous(PAGE) as source,
        UserfaultFd.open() as uffd,
        Pagemap() as pagemap,
    ):
        ctypes.memset(source.address, 0x5A, PAGE)
        uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
        uffd.copy(mapping.address + 2 * PAGE, source.address, PAGE)
        assert pagemap.present(mapping.address, mapping.length).tolist() == [
            False,
            False,
            True,
            False,
        ]
        assert uffd.read_events() == []  # no fault was raised


def test_scan_finds_present_ranges() -> None:
    with Mapping.anonymous(16 * PAGE) as mapping, Pagemap() as pagemap:
        ctypes.memset(mapping.address + 2 * PAGE, 1, 3 * PAGE)
        ctypes.memset(mapping.address + 9 * PAGE, 1, PAGE)
        regions, walk_end = pagemap.scan(
            mapping.address,
            mapping.address + mapping.length,
            category_mask=PageCategory.PRESENT,
            return_mask=PageCategory.PRESENT,
        )
        assert [
            (int(r["start"]) - mapping.address, int(r["end"]) - mapping.address) for r in regions
        ] == [(2 * PAGE, 5 * PAGE), (9 * PAGE, 10 * PAGE)]
        assert all(int(r["categories"]) == PageCategory.PRESENT for r in regions)
        assert walk_end == mapping.address + mapping.length


def test_scan_with_wp_async_tracks_writes_and_reprotects() -> None:
    needed = Feature.WP_ASYNC | Feature.WP_UNPOPULATED
    if needed & ~UserfaultFd.probe_features():
        pytest.skip("this kernel's userfaultfd lacks WP_ASYNC")
    with (
        Mapping.anonymous(32 * PAGE) as mapping,
        UserfaultFd.open(needed) as uffd,
        Pagemap() as pagemap,
    ):
        start, end = mapping.address, mapping.address + mapping.length
        uffd.register(start, mapping.length, RegisterMode.WP)
        uffd.writeprotect(start, mapping.length, protect=True)
        # WP_ASYNC: the kernel resolves write-protect faults itself, nothing blocks.
        ctypes.memset(start + 3 * PAGE, 1, 2 * PAGE)
        ctypes.memset(start + 20 * PAGE, 1, 1)

        def written_and_reprotect() -> list[tuple[int, int]]:
            regions, _ = pagemap.scan(
                start,
                end,
                flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
                category_mask=PageCategory.WRITTEN,
                return_mask=PageCategory.WRITTEN,
            )
            return [(int(r["start"]) - start, int(r["end"]) - start) for r in regions]

        assert written_and_reprotect() == [(3 * PAGE, 5 * PAGE), (20 * PAGE, 21 * PAGE)]
        assert written_and_reprotect() == []  # re-protected by the first scan
        ctypes.memset(start + 4 * PAGE, 2, 1)
        assert written_and_reprotect() == [(4 * PAGE, 5 * PAGE)]


def test_scan_errors_name_the_range() -> None:
    with Mapping.anonymous(2 * PAGE) as mapping, Pagemap() as pagemap:
        with pytest.raises(PagemapError) as raised:  # CHECK_WPASYNC on unregistered memory
            pagemap.scan(
                mapping.address,
                mapping.address + mapping.length,
                flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
                category_mask=PageCategory.WRITTEN,
                return_mask=PageCategory.WRITTEN,
            )
        assert "PAGEMAP_SCAN" in str(raised.value) and f"{mapping.address:#x}" in str(raised.value)
