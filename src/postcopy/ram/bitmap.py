"""Page bitmaps as numpy bool arrays, and the runs of set pages they contain.

A bitmap has one entry per page of a RAM block. Everything here is vectorised: no Python
loop runs per page, only per run.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Bitmap = npt.NDArray[np.bool_]
Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def new_bitmap(pages: int, *, value: bool = False) -> Bitmap:
    """A bitmap of `pages` entries, all clear (or all set)."""
    return np.full(pages, value, dtype=np.bool_)


def runs(bitmap: Bitmap) -> Runs:
    """Starts and lengths of the runs of set entries, in page order."""
    if bitmap.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    padded = np.empty(bitmap.size + 2, dtype=np.int8)
    padded[0] = 0
    padded[-1] = 0
    padded[1:-1] = bitmap
    edges = np.flatnonzero(np.diff(padded))
    starts = edges[0::2].astype(np.int64)
    lengths = (edges[1::2] - edges[0::2]).astype(np.int64)
    return starts, lengths


def clear_runs(bitmap: Bitmap) -> list[tuple[int, int]]:
    """(start, length) of the runs of clear entries, as Python ints: of a run's zero
    bitmap, its runs of normal pages. No `runs` call when none is set (a run whose pages
    all hold data: most of a bulk round and of the push), where it costs ~20 us."""
    if not bitmap.any():
        return [(0, int(bitmap.size))] if bitmap.size else []
    starts, lengths = runs(~bitmap)
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


def set_runs(bitmap: Bitmap) -> list[tuple[int, int]]:
    """(start, length) of the runs of set entries, as Python ints (none: no `runs` call)."""
    if not bitmap.any():
        return []
    starts, lengths = runs(bitmap)
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


def split_runs(
    starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], max_length: int
) -> Runs:
    """The same pages, with every run cut into pieces of at most `max_length` pages."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, not {max_length}")
    if starts.size == 0:
        return starts, lengths
    pieces = (lengths + max_length - 1) // max_length
    run_of_piece = np.repeat(np.arange(starts.size), pieces)
    first_piece = np.cumsum(pieces) - pieces
    piece_in_run = np.arange(run_of_piece.size) - first_piece[run_of_piece]
    new_starts = starts[run_of_piece] + piece_in_run * max_length
    ends = starts[run_of_piece] + lengths[run_of_piece]
    new_lengths = np.minimum(new_starts + max_length, ends) - new_starts
    return new_starts.astype(np.int64), new_lengths.astype(np.int64)


def pages_after(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> list[int]:
    """For runs in page order (as `split_runs` gives them): how many pages follow each run
    without a gap, up to the end of its stretch of adjacent runs."""
    if starts.size == 0:
        return []
    ends = starts + lengths
    # a new stretch begins where a run does not start at the previous run's end
    stretch = np.cumsum(np.concatenate(([True], starts[1:] != ends[:-1])))
    last_end = np.zeros(int(stretch[-1]) + 1, dtype=np.int64)
    last_end[stretch] = ends  # the last run of a stretch writes last
    return (last_end[stretch] - ends).tolist()


def fold(bitmap: Bitmap, factor: int) -> Bitmap:
    """A bitmap of small pages as one of pages `factor` times larger: a large page is set
    if any of its small pages is (a partly dirty huge page is wholly dirty)."""
    if factor == 1:
        return bitmap
    if factor <= 0 or bitmap.size % factor:
        raise ValueError(f"{bitmap.size} pages do not fold into groups of {factor}")
    return np.asarray(bitmap.reshape(-1, factor).any(axis=1), dtype=np.bool_)


def unfold(bitmap: Bitmap, factor: int) -> Bitmap:
    """The inverse view: each page repeated `factor` times (large pages to small ones)."""
    if factor == 1:
        return bitmap
    if factor <= 0:
        raise ValueError(f"cannot unfold by {factor}")
    return np.repeat(bitmap, factor)


def set_range(bitmap: Bitmap, first: int, count: int) -> None:
    _check_range(bitmap, first, count)
    bitmap[first : first + count] = True


def clear_range(bitmap: Bitmap, first: int, count: int) -> None:
    _check_range(bitmap, first, count)
    bitmap[first : first + count] = False


def all_set(bitmap: Bitmap, first: int, count: int) -> bool:
    _check_range(bitmap, first, count)
    return bool(bitmap[first : first + count].all())


def _check_range(bitmap: Bitmap, first: int, count: int) -> None:
    if first < 0 or count < 0 or first + count > bitmap.size:
        raise IndexError(f"page range {first}+{count} outside bitmap of {bitmap.size} pages")


def zero_pages(data: npt.NDArray[np.uint8] | memoryview, page_size: int) -> Bitmap:
    """Which pages of `data` (a whole number of pages) are all zero.

    The caller must guarantee the memory is present (the GIL rule): this reads it with
    numpy while holding the GIL for the reduction's setup.
    """
    array = np.frombuffer(data, dtype=np.uint64)
    words_per_page = page_size // 8
    if array.size % words_per_page:
        raise ValueError(f"{array.size * 8} bytes is not a whole number of {page_size}-byte pages")
    return zero_rows(array.reshape(-1, words_per_page))


def zero_rows(pages: npt.NDArray[np.uint64], rows: npt.NDArray[np.intp] | None = None) -> Bitmap:
    """Whether each page of `pages` (one row of 8-byte words per page), or each of its
    `rows`, is all zero (the GIL rule as for `zero_pages`).

    A page is read only as far as it must be: most pages with data have some in their
    first word, most of the rest in their first cache line. Reading one word per page
    first costs about a third of reading the first cache line of each (the cost is one
    cache and TLB miss per page either way, and the reduction over 8 words per row), and
    it is what the bulk round pays for every page of RAM."""
    result: Bitmap = (pages[:, 0] if rows is None else pages[rows, 0]) == 0
    candidates = np.flatnonzero(result)
    if candidates.size:
        where = candidates if rows is None else rows[candidates]
        data = pages[where, : min(8, pages.shape[1])].any(axis=1)
        result[candidates[data]] = False
        candidates, where = candidates[~data], where[~data]
        if candidates.size:
            result[candidates] = ~pages[where].any(axis=1)
    return result
