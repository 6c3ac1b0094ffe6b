"""Adaptive pre-paging: which pages to bring in after a fault, following where faults go.

Hines and Gopalan's idea (post-copy live migration with adaptive pre-paging, VEE 2009),
not QEMU's fixed neighbourhood: a fault at page p is a hint that the guest will touch the
pages around p next, in the direction its faults have been going. `FaultWindow` turns a
fault into a window of pages to bring in: `base` pages from p forward for a fault out of
the blue; while faults keep coming at the edge of the last window or up to `maximum` pages
beyond it (a guest walking through its memory, up or down, behind the mover, which goes on
from the edge), the window doubles in that direction, up to `maximum`. A fault elsewhere
starts again at `base`. One window per block at a time: the last fault's.

Pure policy (no I/O): the destination's fault thread asks it which valid precopy pages to
move back on a fault (incoming/faults.py), and the mover continues from the window's far
edge (the pivot, swap.py).
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD, BACKWARD = 1, -1


@dataclass(frozen=True)
class Window:
    """Pages first .. first + count - 1 of `block`, brought in because of a fault going
    `direction`; `pivot` is where bringing in more should go on from (its far edge)."""

    block: int
    first: int
    count: int
    direction: int

    @property
    def end(self) -> int:
        return self.first + self.count

    @property
    def pivot(self) -> int:
        return self.end if self.direction == FORWARD else self.first


class FaultWindow:
    """The window of pages to bring in for each fault, grown along a streak of faults."""

    def __init__(self, base: int = 64, maximum: int = 1024) -> None:
        if not 1 <= base <= maximum:
            raise ValueError("pre-paging window: 1 <= base <= maximum")
        self.base = base
        self.maximum = maximum
        self._last: Window | None = None
        self.streak_faults = 0  # faults that continued a streak (the window grew or held)

    def window(self, block: int, page: int, pages: int) -> Window:
        """The pages to bring in for a fault at `page` of `block` (of `pages` pages): a
        window that holds `page`, within the block."""
        last = self._last
        direction, size = FORWARD, self.base
        if last is not None and last.block == block:
            grown = min(last.count * 2, self.maximum)
            # the mover goes on from the far edge (the pivot), so a walking guest's next
            # fault may come up to a window beyond it: still the same walk
            reach = self.maximum
            if last.direction == FORWARD and last.first <= page < last.end + reach:
                direction, size = FORWARD, grown  # at (or past) the far edge: on up
            elif last.direction == BACKWARD and last.first - reach <= page < last.end:
                direction, size = BACKWARD, grown  # on down
            elif last.first - self.base <= page < last.first:
                direction, size = BACKWARD, min(self.base * 2, self.maximum)  # turned down
            if size > self.base:
                self.streak_faults += 1
        if direction == FORWARD:
            first = page
            count = min(size, pages - page)
        else:
            first = max(page - size + 1, 0)
            count = page + 1 - first
        window = Window(block, first, count, direction)
        self._last = window
        return window
