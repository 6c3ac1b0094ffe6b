"""Tests of ram.touched on the real kernel: zero pages found without touching the pages
the process never touched, and the same answer as reading every page."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.linux.pagemap import Pagemap
from postcopy.ram import RamBlock, zero_pages
from postcopy.ram.touched import LOOKAHEAD_BYTES, ZeroPageFinder

pytestmark = pytest.mark.timeout(60, method="thread")

PAGE = mmap.PAGESIZE


def test_untouched_pages_are_zero_and_stay_untouched() -> None:
    with Mapping.anonymous(64 * PAGE) as mapping, Pagemap() as pagemap:
        block = RamBlock("pc.ram", mapping)
        ctypes.memset(mapping.address + 3 * PAGE, 7, PAGE)  # data
        ctypes.memset(mapping.address + 10 * PAGE, 0, 2 * PAGE)  # written, but zeros
        mapping.view[40 * PAGE + 100] = 1  # one byte of data
        finder = ZeroPageFinder(block, pagemap)
        zero = finder.zero_pages(0, 64)
        expected = np.ones(64, dtype=np.bool_)
        expected[[3, 40]] = False
        assert zero.tolist() == expected.tolist()
        present = pagemap.present(mapping.address, mapping.length)
        assert np.flatnonzero(present).tolist() == [3, 10, 11, 40]
        assert finder.pages_skipped == 60


def test_pages_only_read_before_are_not_read_again() -> None:
    with Mapping.anonymous(17 * PAGE) as mapping, Pagemap() as pagemap:
        block = RamBlock("pc.ram", mapping)
        assert mapping.view[5 * PAGE] == 0  # a read maps the shared zero page
        mapping.view[6 * PAGE] = 9
        finder = ZeroPageFinder(block, pagemap)
        zero = finder.zero_pages(0, 16 + 1)[4:8]  # a run longer than SMALL_RUN_PAGES
        assert zero.tolist() == [True, True, False, True]
        assert finder.pages_skipped == 16  # page 5 holds the zero page: not read either


def test_same_answer_as_reading_every_page() -> None:
    rng = np.random.default_rng(7)
    pages = 512
    with Mapping.anonymous(pages * PAGE) as mapping, Pagemap() as pagemap:
        block = RamBlock("pc.ram", mapping)
        written = rng.random(pages) < 0.3
        for page in np.flatnonzero(written).tolist():
            value = int(rng.integers(0, 3))  # some written pages hold only zeros
            ctypes.memset(mapping.address + page * PAGE + int(rng.integers(0, PAGE)), value, 1)
        finder = ZeroPageFinder(block, pagemap)
        for first, count in ((0, 512), (17, 100), (300, 212), (40, 3)):
            found = finder.zero_pages(first, count)
            assert found.tolist() == zero_pages(block.page_view(first, count), PAGE).tolist()


def test_pages_found_ahead_are_found_once_with_the_same_answer_until_forgotten() -> None:
    # a sweep that says what follows is looked at LOOKAHEAD_BYTES at a time: the answers
    # are the ones reading every page gives, each untouched page is counted once, and
    # after forget() (a dirty-log sync) a page written meanwhile is found again
    lookahead = LOOKAHEAD_BYTES // PAGE
    pages = lookahead + 700
    rng = np.random.default_rng(5)
    with Mapping.anonymous(pages * PAGE) as mapping, Pagemap() as pagemap:
        block = RamBlock("pc.ram", mapping)
        written = np.flatnonzero(rng.random(pages) < 0.3)
        for page in written.tolist():
            value = int(rng.integers(0, 3))  # some written pages hold only zeros
            ctypes.memset(mapping.address + page * PAGE + int(rng.integers(0, PAGE)), value, 1)
        expected = zero_pages(block.page_view(0, pages), PAGE)  # maps the shared zero page
        finder = ZeroPageFinder(block, pagemap)
        runs = [(first, min(512, pages - first)) for first in range(0, pages, 512)]
        for first, count in runs:
            found = finder.zero_pages(first, count, ahead=pages - first - count)
            assert found.tolist() == expected[first : first + count].tolist()
        assert finder.pages_skipped == pages - written.size
        # found ahead and kept: a write now is not seen (the dirty log sees it) ...
        finder.forget()
        finder.zero_pages(0, 512, ahead=1000)  # [0, 1512) found at once
        target = 600 + int(np.flatnonzero(expected[600:1400])[0])
        ctypes.memset(mapping.address + target * PAGE + 9, 4, 1)
        assert finder.zero_pages(target, 20)[0]
        # ... until the next sync says to look again; past the window it looks again anyway
        finder.forget()
        assert not finder.zero_pages(target, 20)[0]
        assert finder.zero_pages(lookahead + 600, 50).tolist() == (
            expected[lookahead + 600 : lookahead + 650].tolist()
        )


def test_shared_memory_is_never_found_ahead() -> None:
    # another process may write shared memory, and no dirty log sees it
    with Mapping.memfd(64 * PAGE) as mapping, Pagemap() as pagemap:
        finder = ZeroPageFinder(RamBlock("pc.ram", mapping), pagemap)
        assert finder.zero_pages(0, 20, ahead=44).all()
        mapping.view[30 * PAGE] = 1
        assert np.flatnonzero(~finder.zero_pages(20, 20, ahead=24)).tolist() == [10]


def test_shared_memory_holes_are_zero_and_data_is_found_wherever_written() -> None:
    # a shared page can hold data in the page cache with no mapping in this process: the
    # file says where its data is, the holes are zero pages, never read (nor allocated)
    with Mapping.memfd(64 * PAGE) as mapping, Pagemap() as pagemap:
        assert mapping.fd is not None
        alias = mmap.mmap(mapping.fd, 64 * PAGE)
        try:
            alias[2 * PAGE] = 1  # written through another mapping: absent from ours
            mapping.view[10 * PAGE : 12 * PAGE] = bytes(2 * PAGE)  # written, zeros
            mapping.view[40 * PAGE + 7] = 3
            block = RamBlock("pc.ram", mapping)
            finder = ZeroPageFinder(block, pagemap)
            zero = finder.zero_pages(0, 64)
            assert np.flatnonzero(~zero).tolist() == [2, 40]
            assert finder.pages_skipped == 60  # only pages 2, 10, 11 and 40 were read
            assert finder.zero_pages(30, 20).tolist() == [i != 10 for i in range(20)]
            assert zero.tolist() == zero_pages(block.page_view(0, 64), PAGE).tolist()
        finally:
            alias.close()


def test_private_file_memory_is_read_page_by_page() -> None:
    with Mapping.memfd(8 * PAGE, shared=False) as mapping, Pagemap() as pagemap:
        mapping.view[3 * PAGE] = 5  # a private copy: the file itself stays a hole
        finder = ZeroPageFinder(RamBlock("pc.ram", mapping), pagemap)
        assert np.flatnonzero(~finder.zero_pages(0, 8)).tolist() == [3]
        assert finder.pages_skipped == 0


def test_without_a_pagemap_every_page_is_read() -> None:
    with Mapping.anonymous(8 * PAGE) as mapping:
        block = RamBlock("pc.ram", mapping)
        mapping.view[PAGE] = 1
        assert ZeroPageFinder(block).zero_pages(0, 8).tolist() == [
            True,
            False,
            *([True] * 6),
        ]


def test_shared_pages_the_page_cache_lacks_are_found_by_seek_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a swapped-out shmem page is absent from mincore's answer yet holds data: stand in
    # for swap by making mincore say nothing is resident
    with Mapping.memfd(64 * PAGE) as mapping, Pagemap() as pagemap:
        for page in (0, 1, 2, 17, 40, 63):
            mapping.view[page * PAGE + 5] = 9
        monkeypatch.setattr(mapping, "resident", lambda offset, length: bytearray(length // PAGE))
        finder = ZeroPageFinder(RamBlock("pc.ram", mapping), pagemap)
        assert np.flatnonzero(~finder.zero_pages(0, 64)).tolist() == [0, 1, 2, 17, 40, 63]
        assert np.flatnonzero(~finder.zero_pages(16, 30)).tolist() == [1, 24]
