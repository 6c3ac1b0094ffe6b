"""Page bitmaps and runs: properties against a plain Python model."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from postcopy.ram import bitmap as bm


def python_runs(bits: list[bool]) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []
    start = None
    for index, bit in enumerate([*bits, False]):
        if bit and start is None:
            start = index
        elif not bit and start is not None:
            result.append((start, index - start))
            start = None
    return result


@given(st.lists(st.booleans(), max_size=300))
def test_runs_match_python_model(bits: list[bool]) -> None:
    starts, lengths = bm.runs(np.array(bits, dtype=np.bool_))
    assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == python_runs(bits)


@given(st.lists(st.booleans(), max_size=300))
def test_clear_and_set_runs_match_python_model(bits: list[bool]) -> None:
    bitmap = np.array(bits, dtype=np.bool_)
    assert bm.set_runs(bitmap) == python_runs(bits)
    assert bm.clear_runs(bitmap) == python_runs([not bit for bit in bits])


@given(st.lists(st.booleans(), max_size=300), st.integers(1, 17))
def test_split_runs_cover_the_same_pages(bits: list[bool], max_length: int) -> None:
    starts, lengths = bm.split_runs(*bm.runs(np.array(bits, dtype=np.bool_)), max_length)
    assert (lengths <= max_length).all()
    assert (lengths > 0).all()
    rebuilt = np.zeros(len(bits), dtype=np.bool_)
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        assert not rebuilt[start : start + length].any()
        rebuilt[start : start + length] = True
    assert rebuilt.tolist() == bits


def test_zero_pages_detects_each_page() -> None:
    data = np.zeros(8 * 4096, dtype=np.uint8)
    data[4096 * 3 + 4095] = 1
    data[4096 * 6] = 7
    zero = bm.zero_pages(data, 4096)
    assert zero.tolist() == [True, True, True, False, True, True, False, True]


@given(st.lists(st.integers(0, 70), min_size=1, max_size=24), st.integers(0, 200))
def test_zero_rows_match_reading_every_word(places: list[int], seed: int) -> None:
    # data in the first word, elsewhere in the first cache line, or only past it: each
    # tier of zero_rows must find it, for all rows and for a choice of rows
    rng = np.random.default_rng(seed)
    pages = np.zeros((len(places), 64), dtype=np.uint64)  # 512-byte "pages"
    for row, place in enumerate(places):
        if place < 64:  # 64..70: a zero page
            pages[row, place] = int(rng.integers(1, 1 << 62))
    expected = [place >= 64 for place in places]
    assert bm.zero_rows(pages).tolist() == expected
    rows = np.flatnonzero(rng.random(len(places)) < 0.5)
    assert bm.zero_rows(pages, rows).tolist() == [expected[r] for r in rows.tolist()]


@given(st.lists(st.booleans(), max_size=300), st.integers(1, 17))
def test_pages_after_counts_to_the_end_of_each_stretch(bits: list[bool], max_length: int) -> None:
    starts, lengths = bm.split_runs(*bm.runs(np.array(bits, dtype=np.bool_)), max_length)
    after = bm.pages_after(starts, lengths)
    for start, length, ahead in zip(starts.tolist(), lengths.tolist(), after, strict=True):
        end = start + length
        assert all(bits[end : end + ahead])  # every page counted follows without a gap
        assert end + ahead == len(bits) or not bits[end + ahead]  # and no further


def test_range_helpers_check_bounds() -> None:
    bitmap = bm.new_bitmap(10)
    bm.set_range(bitmap, 2, 3)
    assert bm.all_set(bitmap, 2, 3)
    assert not bm.all_set(bitmap, 1, 3)
    bm.clear_range(bitmap, 3, 1)
    assert bitmap.tolist() == [False, False, True, False, True] + [False] * 5
    try:
        bm.set_range(bitmap, 8, 3)
    except IndexError as error:
        assert "8+3" in str(error)
    else:
        raise AssertionError("out-of-range set_range was accepted")
