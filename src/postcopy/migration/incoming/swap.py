"""The RAM swap at LISTEN: the side mappings that keep the precopy pages, and the mover.

Owns `RamSwap`: at LISTEN every RAM block's pages move out to a side mapping in one
mremap(MREMAP_DONTUNMAP), which leaves guest RAM empty at the same address (KVM's memory
slot is untouched); which of those pages are still valid (`_unmoved`); the `mover` thread
that moves them back with UFFDIO_MOVE once the guest runs; and, at the end, freeing what is
left in the side mappings. The fault thread moves the page a vCPU waits for itself
(`move_pages(on_demand=True)`); the receiver reads pushed runs into the side mapping
(`side`) so that they too move in instead of being copied.

Why: discarding the stale pages in place (MADV_DONTNEED, the seed's way) costs ~0.25-0.5 s
per GiB, all of it downtime; moving page tables costs ~0.5 ms per GiB. Without UFFDIO_MOVE
(before Linux 6.8) or with shared RAM there is no swap (`can_swap_ram`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import (
    Feature,
    Ioctl,
    PageExistsError,
    RegisterMode,
    RetryError,
    UserfaultFd,
)
from postcopy.migration.incoming.eagain import Retrier
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.scheduling import BACKGROUND_NICE, set_thread_nice
from postcopy.ram import Bitmap, RamBlock, runs

log = logging.getLogger(__name__)

# the mover's chunk: one UFFDIO_MOVE and a few numpy calls each. With 64 pages (3,600
# chunks per GiB, Python most of the mover's CPU at nice +5) the mover trailed the push by
# 0.3-1.1 s on a loaded host, the end of postcopy waiting for it, and the guest faulted on
# valid precopy pages it had not reached (7-16 ms of blocktime); with 512 it ended 2-32 ms
# after the push and those waits were 0-1 ms (memtouch-1g postcopy1, loaded host, 3 runs
# each). A vCPU that faults on a page of
# the chunk being moved does not wait for the chunk: the fault thread moves that page
# itself (or finds it moved: a hole it skips) and its move wakes the vCPU
MOVE_CHUNK_PAGES = 512

Trace = Callable[..., None]


class RamSwap:
    """The side mappings of one incoming migration's RAM, from LISTEN to completion."""

    def __init__(
        self, ram: list[RamBlock], received: list[Bitmap], uffd: UserfaultFd, trace: Trace
    ) -> None:
        """Move every block's pages out to a side mapping (guest RAM is left empty); the
        pages `received` says are valid are the ones to move back."""
        self._ram = ram
        self._uffd = uffd
        self._trace = trace
        self._old_mappings: list[Mapping | None] = [None] * len(ram)
        self._unmoved = [np.zeros(0, dtype=np.bool_) for _ in ram]
        self._threads: list[threading.Thread] = []
        self._moving_done = threading.Event()
        self._guest_started = threading.Event()
        self._quit_moving = threading.Event()
        self._moved_on_demand = 0  # written by the fault thread only
        self._pivot: tuple[int, int] | None = None  # where the mover goes on (`follow`)
        self._moved_in_background = 0  # written by the mover only
        for index, block in enumerate(ram):
            self._old_mappings[index] = block.mapping.move_pages_out()
            self._unmoved[index] = received[index].copy()

    def sides(self) -> list[Mapping]:
        """Every block's side mapping (before they are freed)."""
        return [old for old in self._old_mappings if old is not None]

    def side(self, block_index: int) -> Mapping | None:
        """The block's side mapping (None once freed)."""
        return self._old_mappings[block_index]

    def is_unmoved(self, block_index: int, page: int) -> bool:
        """Read by the fault thread while the mover clears bits, without a lock: bits are
        only ever cleared, and only after their pages landed in guest RAM, so False means
        the page is there; a True that is already stale only leads to a second move,
        which finds a hole and skips it."""
        return bool(self._unmoved[block_index][page])

    def follow(self, block_index: int, page: int) -> None:
        """The fault thread's pre-paging (prepaging.py) ended at `page`: the mover goes on
        from there, where the guest is heading, instead of in address order."""
        # a hint, read and cleared by the mover without a lock: one lost between the read
        # and the clear leaves the mover where it was (it still moves every page)
        self._pivot = (block_index, page)

    def start_mover(self) -> None:
        mover = threading.Thread(target=self._mover, name="mover", daemon=True)
        self._threads.append(mover)
        mover.start()

    def guest_started(self) -> None:
        self._guest_started.set()

    def stop(self) -> None:
        """The mover stops after its current chunk (also if it still waits for RUN)."""
        self._quit_moving.set()
        self._guest_started.set()

    def wait_moved(self, timeout: float) -> bool:
        return self._moving_done.wait(timeout)

    def _mover(self) -> None:
        """Move every still-valid precopy page back into guest RAM, once the guest runs.

        Its own thread at low priority, so that faults never wait behind it; the fault
        thread moves the page a vCPU waits for itself. They need no lock between them:
        UFFDIO_MOVE moves each page atomically (both page table locks held), so when both
        move the same page one of them finds a hole and skips it; and `_unmoved` bits are
        cleared only after the move, so a page the fault thread sees as moved is in guest
        RAM before it zero-fills what it believes to be a hole. (A lock here made faults
        wait for this thread, which at nice +5 is easily preempted mid-chunk.)"""
        self._guest_started.wait()
        set_thread_nice(BACKGROUND_NICE)
        try:
            block, position = 0, [0] * len(self._unmoved)
            while True:
                if self._quit_moving.is_set():
                    return
                pivot, self._pivot = self._pivot, None  # see follow()
                if pivot is not None:
                    block, position[block] = pivot[0], pivot[1]
                start = _next_set(self._unmoved[block], position[block])
                if start is None:  # none from there on: from the block's start, other blocks
                    left = [i for i, bits in enumerate(self._unmoved) if bits.any()]
                    if not left:
                        break
                    block = left[0] if block not in left else block
                    position[block] = 0
                    continue
                self.move_pages(block, start, MOVE_CHUNK_PAGES, on_demand=False)
                position[block] = start + MOVE_CHUNK_PAGES
            self._finish_moving()
        except Exception as error:
            log.error("moving precopy pages back: %s", error)

    def move_pages(self, block_index: int, first: int, count: int, *, on_demand: bool) -> bool:
        """Move the still-unmoved pages of a range from the precopy mapping into guest RAM.
        Safe to run in two threads at once on the same pages (see _mover).

        Holes (zero pages never written) are skipped; they stay missing and a fault on one
        is filled with a zero page by the fault thread. The move wakes the threads waiting
        on the range (a waiter on a hole faults again). On the fault thread's behalf
        (`on_demand`) an EAGAIN is not waited out: False, and the pages not known to have
        moved keep their `_unmoved` bit (moving them again later is harmless: a page that
        did move left a hole, which is skipped). The mover retries (eagain.py).
        """
        old = self._old_mappings[block_index]
        assert old is not None
        block = self._ram[block_index]
        page_size = block.page_size
        window = self._unmoved[block_index][first : first + count]
        starts, lengths = runs(window.copy())
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            offset = (first + start) * page_size
            done, size = 0, length * page_size
            retry = Retrier("UFFDIO_MOVE")
            while done < size:
                try:
                    done += self._uffd.move(
                        block.host_address + offset + done,
                        old.address + offset + done,
                        size - done,
                        dontwake=False,  # a vCPU waiting here runs on at once
                        allow_src_holes=True,
                    )
                except PageExistsError as error:
                    done += error.done + page_size
                except RetryError as error:
                    done += error.done
                    if on_demand:
                        return False
                    retry.again(error)
            # each thread counts in its own counter: a shared `+=` from two threads loses
            # updates. (When both move the same chunk at once, both count it.)
            if on_demand:
                self._moved_on_demand += length
            else:
                self._moved_in_background += length
            # cleared only once landed: the fault thread reads these bits without the lock,
            # and a page it sees as moved must really be in guest RAM
            window[start : start + length] = False
        return True

    @property
    def pages_moved(self) -> int:
        """Valid precopy pages moved back (or found to be holes), by both threads."""
        return self._moved_on_demand + self._moved_in_background

    def _finish_moving(self) -> None:
        """Every valid page has moved back. The side mappings stay: the pushed pages land
        there first (see the receiver); they go when postcopy completes."""
        self._trace("moved", pages=self.pages_moved)
        self._moving_done.set()

    def free_side_mappings(self) -> None:
        """What is left in the side mappings (stale pages a request overtook, pages
        never asked for again) is freed on a thread: ~0.4 s per GiB when it is full."""
        stale = [old for old in self._old_mappings if old is not None]
        self._old_mappings = [None] * len(self._old_mappings)
        if stale:
            freer = threading.Thread(
                target=_close_all, args=(stale,), name="free-stale", daemon=True
            )
            self._threads.append(freer)
            freer.start()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def close(self) -> None:
        """Unmap the side mappings now (the threads have been joined)."""
        for index, old in enumerate(self._old_mappings):
            if old is not None:
                old.close()
                self._old_mappings[index] = None


def _next_set(bits: Bitmap, start: int) -> int | None:
    """The first set bit at or after `start`, or None."""
    rest = bits[start:]
    if rest.size == 0:
        return None
    found = int(np.argmax(rest))  # stops at the first True
    return start + found if rest[found] else None


def _close_all(mappings: list[Mapping]) -> None:
    for mapping in mappings:
        mapping.close()


def can_swap_ram(ram: list[RamBlock]) -> bool:
    """RAM swap needs private anonymous RAM, MREMAP_DONTUNMAP and UFFDIO_MOVE (Linux 6.8)."""
    if any(block.mapping.kind != "anonymous" or block.shared for block in ram):
        return False
    try:
        with UserfaultFd.open(Feature.MOVE) as uffd, Mapping.anonymous(1 << 21) as probe:
            allowed = uffd.register(probe.address, probe.length, RegisterMode.MISSING)
            uffd.unregister(probe.address, probe.length)
            probe.move_pages_out().close()
            return bool(allowed & Ioctl.MOVE)
    except OSError:
        return False


def register_for_swap(uffd: UserfaultFd, block: RamBlock) -> None:
    """Register a block whose pages moved out (MISSING, with MOVE for moving them back)."""
    allowed = uffd.register(block.host_address, block.length, RegisterMode.MISSING)
    needed = Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE | Ioctl.MOVE
    if allowed & needed != needed:
        raise IncomingError(f"userfaultfd on block {block.name!r} lacks {needed & ~allowed!r}")
