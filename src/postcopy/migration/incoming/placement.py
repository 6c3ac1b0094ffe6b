"""Placement per RAM backend on the destination: where a run is read and how it lands.

`placement_for` picks, per RAM block, the `Placement` the placer (placer.py) calls for every
run from LISTEN on and the fault thread (faults.py) calls to fill a known page:
- `Placement`: UFFDIO_COPY for normal pages, UFFDIO_ZEROPAGE for zero pages (anonymous
  memory without the RAM swap, shmem);
- `HugePagePlacement` (hugetlb): one UFFDIO_COPY per whole huge page, zero huge pages
  copied from a zero buffer (QEMU's postcopy_place_page / _place_page_zero);
- `MinorPlacement` (x-postcopy-minor-faults, shmem or hugetlb, shared): the run is read
  into a second mapping of the RAM's file, then UFFDIO_CONTINUE maps it.
What each backend needs of userfaultfd, and why, is in migration/backends.py. No Python
runs per page: one ioctl per run of normal or zero pages (per huge page on hugetlb);
EEXIST is counted as a duplicate, EAGAIN retried with pauses (eagain.py). On huge pages
each placement of data is timed (`PlacementSamples`, x-huge-page-placement-us): the 2 MiB
COPY, or in minor-fault mode the CONTINUE, the data being in the page cache already.
`check_huge_page_pool`: after LISTEN emptied the RAM, the pool still holds its huge pages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from postcopy.linux.hugepages import hugepages_reserved
from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import Ioctl, PageExistsError, RetryError, UserfaultFd
from postcopy.migration.backends import BackendUnsupported, UffdNeeds, minor_possible, uffd_needs
from postcopy.migration.incoming.eagain import Retrier
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.keptcache import empty_stale
from postcopy.migration.stats import percentiles
from postcopy.ram import Bitmap, RamBlock, clear_runs, runs, set_runs

PLACEMENT_SAMPLES = 4096  # the last N huge page copies' durations, for x-huge-page-placement-us
HOLD_GIL_COPY_BYTES = 64 << 10  # a requested page up to this size is copied keeping the GIL


@dataclass
class Landing:
    """Where a run's data goes: `views` (one per normal page run, read in order) or, if
    None, the receiver's staging buffer. `mine`: the pages this receiver claimed."""

    views: list[memoryview] | None = None
    mine: Bitmap | None = None


def _read_only(bits: list[bool]) -> Bitmap:
    array = np.array(bits, dtype=np.bool_)
    array.flags.writeable = False
    return array


# Landing.mine of a one-page run: claimed by this receiver, or by the other one before it
_ONE_MINE = _read_only([True])
_ONE_TAKEN = _read_only([False])

_zero_lock = threading.Lock()
_zero_buffers: dict[int, Mapping] = {}


def zero_buffer(size: int) -> int:
    """The address of `size` bytes that read as zeros, for placing zero huge pages with
    UFFDIO_COPY (hugetlb has no UFFDIO_ZEROPAGE). One per size, kept for the process."""
    with _zero_lock:
        mapping = _zero_buffers.get(size)
        if mapping is None:
            mapping = _zero_buffers[size] = Mapping.anonymous(size, noreserve=False)
        return mapping.address


class PlacementSamples:
    """The durations of the last huge page placements (one ioctl each), in microseconds:
    `placement_us` is the figure the 2 MiB placement budget is checked against. Each is
    timed by the wall clock and by the placing thread's CPU time: the wall clock also counts
    waiting for a core and, once the ioctl is done, for the GIL (up to the switch interval
    when another thread holds it), which the vCPU, resumed by the ioctl, does not wait for."""

    def __init__(self) -> None:
        self._samples = np.zeros((PLACEMENT_SAMPLES, 2), dtype=np.float64)
        self._sampled = 0
        self._samples_lock = threading.Lock()

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def sample(self, started: tuple[float, float]) -> None:
        wall, cpu = time.perf_counter() - started[0], time.thread_time() - started[1]
        with self._samples_lock:
            self._samples[self._sampled % PLACEMENT_SAMPLES] = (wall * 1e6, cpu * 1e6)
            self._sampled += 1

    def placement_us(self) -> dict[str, float | int]:
        """p50/p99 of the last huge page placements, in microseconds (wall clock; cpu-p50:
        the placing thread's CPU time), and how many there were."""
        with self._samples_lock:
            samples = self._samples[: min(self._sampled, PLACEMENT_SAMPLES)].copy()
            count = self._sampled
        if samples.size == 0:
            return {"count": 0}
        p50, p99 = percentiles(samples[:, 0], (50, 99))
        (cpu,) = percentiles(samples[:, 1], (50,))
        return {
            "count": count,
            "p50": round(float(p50), 1),
            "p99": round(float(p99), 1),
            "cpu-p50": round(float(cpu), 1),
        }


class Placement:
    """Places the runs of one RAM block: UFFDIO_COPY for normal pages, UFFDIO_ZEROPAGE for
    zero pages (anonymous and shmem memory). Thread-safe: both receivers may call it."""

    name = "copy"
    samples: PlacementSamples | None = None  # huge pages: each placement's duration

    def __init__(self, block: RamBlock, uffd: UserfaultFd) -> None:
        self.block = block
        self.uffd = uffd
        self.page_size = block.page_size
        self.duplicates = 0  # pages a request had placed already (EEXIST)
        self.ioctls = 0
        self._lock = threading.Lock()

    def placement_us(self) -> dict[str, float | int] | None:
        """p50/p99 of the last huge page placements (µs) and their count; None where
        pages are not huge (x-huge-page-placement-us)."""
        return self.samples.placement_us() if self.samples is not None else None

    @property
    def needs(self) -> UffdNeeds:
        return uffd_needs(self.block.memory_type)

    def register(self) -> None:
        """Register the block's range on the userfaultfd, refusing a registration that
        lacks an ioctl this placement uses."""
        needs = self.needs
        allowed = self.uffd.register(self.block.host_address, self.block.length, needs.mode)
        lacking = needs.ioctls & ~allowed
        if lacking:
            names = "/".join(i.name for i in Ioctl if i in lacking and i.name)
            raise BackendUnsupported(
                f"userfaultfd on {self.block.describe()} lacks {names} "
                f"(registered {needs.describe()})"
            )

    def landing(self, first_page: int, zero: Bitmap) -> Landing:
        """Where a run's normal pages are to be read before `place`: by default into the
        receiver's staging buffer, back to back (then `place` gets its address)."""
        return Landing()

    def place(
        self, first_page: int, zero: Bitmap, data_address: int | None, landing: Landing
    ) -> None:
        """Place a run: its normal pages lie back to back at `data_address` (staging), or
        where `landing` said."""
        assert data_address is not None
        size = self.page_size
        base = self.block.host_address + first_page * size
        if zero.size == 1:  # a requested page: no numpy (microseconds a call here)
            if zero[0]:
                self._zero(base, size)
            elif size <= HOLD_GIL_COPY_BYTES:
                # the copy keeps the GIL: the preempt receiver gave it away here and
                # waited for it behind the main receiver and the prefaulter (perf on 1 GiB
                # memtouch: 0.12 s of GIL waits after this ioctl for ~1,000 requests)
                self._loop(self._copy_holding_gil, base, data_address, size)
            else:
                self._copy(base, data_address, size)
            return
        offset = 0
        for start, length in clear_runs(zero):
            self._copy(base + start * size, data_address + offset, length * size)
            offset += length * size
        for start, length in set_runs(zero):
            self._zero(base + start * size, length * size)

    def resolve_fault(self, page: int) -> bool:
        """A fault on a page known to be complete here (a zero page never placed, or a page
        placed after the fault was raised): fill it with zeros, or wake the waiters.
        True if it was filled. RetryError (EAGAIN): the fault thread tries again later."""
        address = self.block.host_address + page * self.page_size
        try:
            self._zero_one(address)
            return True
        except PageExistsError:
            self.uffd.wake(address, self.page_size)
            return False

    def abandon(self, first_page: int, landing: Landing) -> None:
        """A run read only in part (the link broke before its end); nothing to undo here."""

    def close(self) -> None:
        pass

    # -- the ioctl loops: EEXIST counted and skipped, EAGAIN retried ----------------------

    def _copy(self, destination: int, source: int, length: int) -> None:
        self._loop(self.uffd.copy, destination, source, length)

    def _copy_holding_gil(self, destination: int, source: int, length: int) -> int:
        return self.uffd.copy(destination, source, length, hold_gil=True)

    def _zero(self, destination: int, length: int) -> None:
        self._loop(lambda d, _s, n: self.uffd.zeropage(d, n), destination, 0, length)

    def _zero_one(self, address: int) -> None:
        self.uffd.zeropage(address, self.page_size)

    def _loop(
        self, ioctl: Callable[[int, int, int], int], destination: int, source: int, length: int
    ) -> None:
        retry: Retrier | None = None  # made at the first EAGAIN: most loops meet none
        done = 0
        while done < length:
            self.ioctls += 1
            try:
                done += ioctl(destination + done, source + done, length - done)
            except PageExistsError as error:
                done += error.done + self.page_size
                with self._lock:
                    self.duplicates += 1
            except RetryError as error:
                done += error.done
                if retry is None:
                    retry = Retrier(f"placing pages of {self.block.name} ({self.name})")
                retry.again(error)


class HugePagePlacement(Placement):
    """hugetlb: one UFFDIO_COPY per huge page (QEMU's postcopy_place_page), zero huge pages
    copied from a zero buffer (no UFFDIO_ZEROPAGE on hugetlb). Each copy's duration is kept
    (`samples`)."""

    name = "copy-huge"

    def __init__(self, block: RamBlock, uffd: UserfaultFd) -> None:
        super().__init__(block, uffd)
        self._zero_address = zero_buffer(self.page_size)
        self.samples = self._timed = PlacementSamples()

    def _copy(self, destination: int, source: int, length: int) -> None:
        for offset in range(0, length, self.page_size):
            started = self._timed.start()
            self._loop(self.uffd.copy, destination + offset, source + offset, self.page_size)
            self._timed.sample(started)

    def _zero(self, destination: int, length: int) -> None:
        for offset in range(0, length, self.page_size):
            self._loop(self.uffd.copy, destination + offset, self._zero_address, self.page_size)

    def _zero_one(self, address: int) -> None:
        self.uffd.copy(address, self._zero_address, self.page_size)


class MinorPlacement(Placement):
    """Minor-fault mode: runs are read into a second mapping of the RAM's file, then mapped
    into guest RAM with UFFDIO_CONTINUE; zero pages are fallocated (zeroed page cache) and
    continued. Each page is claimed once: a page already placed (or being placed by the
    other receiver) is read into a scratch buffer instead, never over live guest memory."""

    name = "continue"

    def __init__(
        self, block: RamBlock, uffd: UserfaultFd, received: Bitmap, stale: Bitmap | None = None
    ) -> None:
        if not minor_possible(block):
            raise BackendUnsupported(
                f"minor faults need shared RAM with a page cache; {block.describe()} is not"
            )
        super().__init__(block, uffd)
        self.samples = PlacementSamples() if block.hugetlb else None
        self.alias = block.mapping.alias()
        self._claimed = received.copy()  # what precopy left in place needs no claim
        # pages whose page cache holds old data (discarded, kept: keptcache.py), or None
        self._stale = stale
        self._scratch = Mapping.anonymous(block.page_size)

    @property
    def needs(self) -> UffdNeeds:
        return uffd_needs(self.block.memory_type, minor=True)

    def abandon(self, first_page: int, landing: Landing) -> None:
        """A run whose data did not all arrive (the link broke): the pages it claimed are
        claimed no more, so that their next copy (the source sends them again after a
        recovery) lands in the page cache and is mapped, not read into scratch."""
        if landing.mine is None:
            return
        with self._lock:
            window = self._claimed[first_page : first_page + landing.mine.size]
            window[landing.mine] = False

    def landing(self, first_page: int, zero: Bitmap) -> Landing:
        count = zero.size
        if count == 1:  # one page, as every run of huge pages: no numpy (see _place_one)
            with self._lock:
                ours = not self._claimed[first_page]
                self._claimed[first_page] = True
            if zero[0]:
                return Landing([], _ONE_MINE if ours else _ONE_TAKEN)
            if not ours:
                return Landing([self._scratch.view], _ONE_TAKEN)
            offset = first_page * self.page_size
            return Landing([self.alias.view[offset : offset + self.page_size]], _ONE_MINE)
        with self._lock:
            window = self._claimed[first_page : first_page + count]
            mine = ~window
            window[:] = True
        size = self.page_size
        views: list[memoryview] = []
        starts, lengths = runs(~zero)
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            # a page another copy claimed goes to scratch, one page at a time
            piece_starts, piece_lengths = runs(mine[start : start + length])
            position = start
            for piece, piece_length in zip(
                piece_starts.tolist(), piece_lengths.tolist(), strict=True
            ):
                for _ in range(start + piece - position):
                    views.append(self._scratch.view)
                offset = (first_page + start + piece) * size
                views.append(self.alias.view[offset : offset + piece_length * size])
                position = start + piece + piece_length
            for _ in range(start + length - position):
                views.append(self._scratch.view)
        return Landing(views, mine)

    def place(
        self, first_page: int, zero: Bitmap, data_address: int | None, landing: Landing
    ) -> None:
        mine = landing.mine
        assert mine is not None, "a minor-mode run is read where landing() says"
        if zero.size == 1:
            if mine[0]:
                self._place_one(first_page, bool(zero[0]))
            return
        size = self.page_size
        zero_mine = zero & mine
        stale = self._stale
        if zero_mine.any():
            if stale is not None:  # old data in the page cache is no zero page
                empty_stale(
                    self.block, first_page, zero_mine & stale[first_page : first_page + zero.size]
                )
            starts, lengths = runs(zero_mine)
            for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                self.alias.allocate((first_page + start) * size, length * size)
        starts, lengths = runs(mine)
        base = self.block.host_address + first_page * size
        samples = self.samples
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            if samples is None:
                self._loop(self._continue, base + start * size, 0, length * size)
                continue
            for page in range(start, start + length):  # huge pages: one CONTINUE each, timed
                started = samples.start()
                self._loop(self._continue, base + page * size, 0, size)
                if not zero[page]:  # as copy mode, which times the copies of data
                    samples.sample(started)
        if stale is not None:
            stale[first_page : first_page + zero.size][mine] = False

    def _place_one(self, page: int, zero: bool) -> None:
        """`place` of a one-page run this receiver claimed, with scalar work only: the push
        sends one huge page per run, and the runs / masks of the general path were ~30
        numpy calls per page, microseconds each here, on the receiver that a vCPU riding the
        push waits for (and holding the GIL the fault thread needs)."""
        size = self.page_size
        stale = self._stale
        if zero:
            if stale is not None and stale[page]:  # old data in the page cache: no zero page
                self.block.mapping.punch_hole(page * size, size)
            self.alias.allocate(page * size, size)
        address = self.block.host_address + page * size
        samples = self.samples
        if samples is None:
            self._loop(self._continue, address, 0, size)
        else:
            started = samples.start()
            self._loop(self._continue, address, 0, size)
            if not zero:  # as copy mode, which times the copies of data
                samples.sample(started)
        if stale is not None:
            stale[page] = False

    def _continue(self, destination: int, _source: int, length: int) -> int:
        return self.uffd.continue_(destination, length)

    def resolve_fault(self, page: int) -> bool:
        size = self.page_size
        address = self.block.host_address + page * size
        if self._stale is not None and self._stale[page]:  # never so (keptcache.py): safe
            self.alias.punch_hole(page * size, size)
        self.alias.allocate(page * size, size)  # a zero page never written: zeros
        try:
            self.uffd.continue_(address, size)
            return True
        except PageExistsError:
            self.uffd.wake(address, size)
            return False

    def close(self) -> None:
        self.alias.close()
        self._scratch.close()


def placement_for(
    block: RamBlock,
    uffd: UserfaultFd,
    received: Bitmap,
    *,
    minor: bool = False,
    stale: Bitmap | None = None,
) -> Placement:
    """The placement for a RAM block: minor-fault mode if asked for and possible (`stale`:
    its pages whose page cache holds old data, keptcache.py), whole huge pages on hugetlb,
    else COPY/ZEROPAGE."""
    if minor and minor_possible(block):
        return MinorPlacement(block, uffd, received, stale)
    uffd_needs(block.memory_type)  # raises for memory userfaultfd cannot serve
    if block.hugetlb:
        return HugePagePlacement(block, uffd)
    return Placement(block, uffd)


def check_huge_page_pool(ram: list[RamBlock]) -> None:
    """Emptied huge pages went back to the pool (and their reservation with them): the
    pages the source will send must still be there to take, or a placement fails later."""
    for size in sorted({b.page_size for b in ram if b.hugetlb}):
        needed = sum(b.pages for b in ram if b.hugetlb and b.page_size == size)
        total, free = hugepages_reserved(size)
        if free < needed:
            raise IncomingError(
                f"the {size >> 20} MiB huge page pool has {free} free pages of {total}, the "
                f"RAM needs {needed} (grow it: echo {total + needed - free} > "
                f"/sys/kernel/mm/hugepages/hugepages-{size >> 10}kB/nr_hugepages)"
            )
