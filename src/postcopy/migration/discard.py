"""The discard sender: pages the destination holds but the guest dirtied since they were sent.

At switchover the source turns (sent AND dirty) into runs of pages, and sends them per
block in commands of at most MAX_DISCARD_RANGES ranges, as QEMU's
postcopy_discard_send_range/finish do; the destination empties those pages so they fault.
The runs go to `StreamWriter.send_discards` as arrays: all their frames are built with numpy
and sent at once (a guest writing random pages makes one range per page).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from postcopy.ram import Bitmap, runs

MAX_DISCARD_RANGES = 12

Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
"""(first pages, page counts) of runs of pages: what `StreamWriter.send_discards` sends."""


def stale_runs(sent: Bitmap, dirty: Bitmap) -> Runs:
    """The runs of pages sent and dirtied since: the destination must drop them."""
    starts, lengths = runs(sent & dirty)
    return starts.astype(np.int64), lengths.astype(np.int64)


def page_runs(pages: npt.NDArray[np.int64]) -> Runs:
    """The runs of a sorted array of page numbers; work in proportion to its size, not to
    the block's (the final sync of a stopped guest is small)."""
    if pages.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    ends = pages[np.concatenate((breaks - 1, [pages.size - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def discard_ranges(sent: Bitmap, dirty: Bitmap) -> Iterator[tuple[tuple[int, int], ...]]:
    """Groups of at most MAX_DISCARD_RANGES (first page, page count) ranges to discard: the
    DISCARD commands `send_discards` makes of `stale_runs`."""
    yield from _groups(*stale_runs(sent, dirty))


def page_ranges(pages: npt.NDArray[np.int64]) -> Iterator[tuple[tuple[int, int], ...]]:
    """The same groups for a sorted array of page numbers (`page_runs`)."""
    yield from _groups(*page_runs(pages))


def _groups(
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
) -> Iterator[tuple[tuple[int, int], ...]]:
    pairs = np.stack([starts, lengths], axis=1).tolist()
    for index in range(0, len(pairs), MAX_DISCARD_RANGES):
        yield tuple((int(a), int(b)) for a, b in pairs[index : index + MAX_DISCARD_RANGES])
