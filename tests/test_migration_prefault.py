"""The precopy prefaulter on real memory: which pages it populates, which it leaves alone.

Presence is read from /proc/self/pagemap, so each assertion is about what the kernel holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.linux.pagemap import Pagemap
from postcopy.migration.prefault import Prefaulter
from postcopy.ram import RamBlock

PAGE = 4096
PAGES = 4096  # 16 MiB
RUN = 64


@pytest.fixture
def block() -> Iterator[RamBlock]:
    mapping = Mapping.anonymous(PAGES * PAGE)
    try:
        yield RamBlock("pc.ram", mapping)
    finally:
        mapping.close()


def present(block: RamBlock) -> np.ndarray:
    with Pagemap() as pagemap:
        return pagemap.present(block.host_address, block.length)


def settle(prefaulter: Prefaulter, pages: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while prefaulter.pages_populated < pages and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_dense_run_populates_the_window_after_it(block: RamBlock) -> None:
    received = [np.zeros(PAGES, dtype=np.bool_)]
    prefaulter = Prefaulter([block], received, window_runs=4)
    try:
        prefaulter.advance(0, 0, RUN, normal_pages=RUN)
        settle(prefaulter, 4 * RUN)
    finally:
        prefaulter.close()
    held = present(block)
    assert not held[:RUN].any()  # the run being read is the receiver's own business
    assert held[RUN : 5 * RUN].all()
    assert not held[5 * RUN :].any()
    assert prefaulter.prefaulted[0][RUN : 5 * RUN].all()
    assert prefaulter.pages_populated == 4 * RUN


def test_the_window_slides_without_repeating_and_stops_at_the_block_end(block: RamBlock) -> None:
    received = [np.zeros(PAGES, dtype=np.bool_)]
    prefaulter = Prefaulter([block], received, window_runs=4)
    try:
        for first in range(0, PAGES, RUN):
            prefaulter.advance(0, first, RUN, normal_pages=RUN)
        settle(prefaulter, PAGES - RUN)
    finally:
        prefaulter.close()
    assert prefaulter.pages_populated == PAGES - RUN
    assert present(block)[RUN:].all()


def test_sparse_runs_and_received_pages_are_left_alone(block: RamBlock) -> None:
    received = [np.zeros(PAGES, dtype=np.bool_)]
    received[0][RUN : 2 * RUN] = True  # already here: warm, nothing to do
    prefaulter = Prefaulter([block], received, window_runs=2)
    try:
        prefaulter.advance(0, 0, RUN, normal_pages=RUN // 4)  # mostly zero pages: no look-ahead
        prefaulter.advance(0, RUN, RUN, normal_pages=RUN)  # dense: window [2 RUN, 4 RUN)
        settle(prefaulter, 2 * RUN)
    finally:
        prefaulter.close()
    held = present(block)
    assert not held[: 2 * RUN].any()
    assert held[2 * RUN : 4 * RUN].all()
    assert not held[4 * RUN :].any()


def test_nothing_is_populated_after_close(block: RamBlock) -> None:
    received = [np.zeros(PAGES, dtype=np.bool_)]
    prefaulter = Prefaulter([block], received, window_runs=4)
    prefaulter.close()
    prefaulter.advance(0, 0, RUN, normal_pages=RUN)
    time.sleep(0.05)
    assert not present(block).any()
    assert prefaulter.pages_populated == 0


def test_the_window_must_hold_a_run(block: RamBlock) -> None:
    with pytest.raises(ValueError, match="at least one run"):
        Prefaulter([block], [np.zeros(PAGES, dtype=np.bool_)], window_runs=0)


def test_a_side_mapping_is_populated_where_it_holds_no_stale_page(block: RamBlock) -> None:
    """Postcopy: the target is the RAM swap's side mapping, not guest RAM; pages already
    there when it starts (stale precopy pages) and received pages are left alone."""
    side = Mapping.anonymous(PAGES * PAGE)
    try:
        side.view[(RUN + 3) * PAGE] = 1  # a stale page in the window
        received = [np.zeros(PAGES, dtype=np.bool_)]
        received[0][RUN + 10] = True  # placed already
        prefaulter = Prefaulter([block], received, window_runs=1, targets=[side])
        try:
            prefaulter.advance(0, 0, RUN, normal_pages=RUN)
            settle(prefaulter, RUN - 2)
        finally:
            prefaulter.close()
        with Pagemap() as pagemap:
            held = pagemap.present(side.address, side.length)
        assert held[RUN : 2 * RUN].sum() == RUN - 1  # all but the received page
        assert not held[RUN + 10]
        assert prefaulter.pages_populated == RUN - 2  # neither the stale nor the received
        assert not present(block).any()  # guest RAM untouched
    finally:
        side.close()
