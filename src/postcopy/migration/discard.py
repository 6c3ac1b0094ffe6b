"""The discard sender: pages the destination holds but the guest dirtied since they were sent.

At switchover the source turns (sent AND dirty) into runs of pages, and sends them per
block in commands of at most MAX_DISCARD_RANGES ranges, as QEMU's
postcopy_discard_send_range/finish do; the destination empties those pages so they fault.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from postcopy.ram import Bitmap, runs

MAX_DISCARD_RANGES = 12


def discard_ranges(sent: Bitmap, dirty: Bitmap) -> Iterator[tuple[tuple[int, int], ...]]:
    """Groups of at most MAX_DISCARD_RANGES (first page, page count) ranges to discard."""
    starts, lengths = runs(sent & dirty)
    pairs = np.stack([starts, lengths], axis=1).tolist()
    for index in range(0, len(pairs), MAX_DISCARD_RANGES):
        yield tuple((int(a), int(b)) for a, b in pairs[index:index + MAX_DISCARD_RANGES])
