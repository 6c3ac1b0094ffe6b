"""Postcopy on each kind of RAM: what userfaultfd must offer, how pages land, how they go.

What the kernel offers differs by memory (measured on this host, see
../shared/research/memory-backends.md and docs/ARCHITECTURE.md):

- anonymous: MISSING; normal pages by COPY (or MOVE from the side mapping: the incoming
  RAM swap), zero pages by ZEROPAGE; discard MADV_DONTNEED.
- shmem (memfd, tmpfs): MISSING_SHMEM; COPY (MOVE is EINVAL), ZEROPAGE; discard punches a
  hole (and MADV_DONTNEED for a private mapping).
- hugetlb (hugetlb memfd, hugetlbfs): MISSING_HUGETLBFS; one COPY per whole huge page, zero
  huge pages copied from a zero buffer (no ZEROPAGE; a 4 KiB copy is EINVAL); discard
  punches a hole, which gives the page back to the pool.
- minor mode (shmem or hugetlb, shared): + MINOR_SHMEM / MINOR_HUGETLBFS, registered
  MISSING|MINOR; data read into a second mapping, then CONTINUE; zero pages fallocated,
  then CONTINUE.

A RAM block's page is its host page (2 MiB on hugetlb): the source sends, discards and
re-sends whole huge pages, faults are reported at the huge page's start and requests name
it, so a huge page always arrives in one piece, in one RAM run, on one channel; the
receiver reads it whole into its staging buffer (QEMU's tmp_huge_page) and it is placed
with one UFFDIO_COPY, which wakes every vCPU waiting anywhere in it.

Minor-fault mode (`x-postcopy-minor-faults`, beyond QEMU, for shared memfd and hugetlb
RAM): RAM is registered MISSING|MINOR; a run is read straight into a second mapping of the
same file (the page cache, no staging copy) and UFFDIO_CONTINUE maps it into guest RAM.
MINOR alone would let a hole read as zeros with no fault; with MISSING too a hole faults.
The guest mapping cannot see a page before CONTINUE, so a half-written page is never read;
a page already placed is never written again (each page is claimed once, under a lock).

`uffd_needs` is what `postcopy check` reports and LISTEN checks; `placement_for` picks the
`Placement` the destination's placer calls for every run from LISTEN on. Placement runs
no Python per page: one ioctl per run of normal or zero pages (per huge page on hugetlb).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from postcopy.ram import Bitmap, RamBlock, runs

PLACEMENT_SAMPLES = 4096  # the last N huge page copies' durations, for x-placement-us


@dataclass
class Landing:
    """Where a run's data goes: `views` (one per normal page run, read in order) or, if
    None, the receiver's staging buffer. `mine`: the pages this receiver claimed."""

    views: list[memoryview] | None = None
    mine: Bitmap | None = None


class BackendUnsupported(ValueError):
    """Postcopy cannot serve this RAM; the message says why and what to use instead."""


@dataclass(frozen=True)
class UffdNeeds:
    """What a RAM block needs of userfaultfd: features, registration mode, ioctls."""

    features: Feature
    mode: RegisterMode
    ioctls: Ioctl

    def describe(self) -> str:
        features = "+".join(f.name for f in Feature if f in self.features and f.name) or "none"
        ioctls = "/".join(i.name for i in Ioctl if i in self.ioctls and i.name)
        modes = "|".join(m.name for m in RegisterMode if m in self.mode and m.name)
        return f"features {features}, register {modes} with {ioctls}"


def uffd_needs(memory_type: str, *, minor: bool = False) -> UffdNeeds:
    """What postcopy needs of userfaultfd for RAM of `memory_type` (ram.backend)."""
    if memory_type == "other":
        raise BackendUnsupported(
            "userfaultfd serves only anonymous memory, shmem (memfd, tmpfs) and hugetlbfs: "
            "put the RAM file on a hugetlbfs or tmpfs mount, or use precopy"
        )
    if minor and memory_type == "anonymous":
        raise BackendUnsupported(
            "minor faults need RAM with a page cache (memfd, memfd-hugetlb, a shared file): "
            "private anonymous RAM has none"
        )
    features = {
        "anonymous": Feature(0),
        "shmem": Feature.MISSING_SHMEM,
        "hugetlb": Feature.MISSING_HUGETLBFS,
    }[memory_type]
    ioctls = Ioctl.COPY | Ioctl.WAKE
    if memory_type != "hugetlb":
        ioctls |= Ioctl.ZEROPAGE
    mode = RegisterMode.MISSING
    if minor:
        features |= Feature.MINOR_HUGETLBFS if memory_type == "hugetlb" else Feature.MINOR_SHMEM
        mode |= RegisterMode.MINOR
        ioctls = Ioctl.CONTINUE | Ioctl.WAKE
    return UffdNeeds(features, mode, ioctls)


def minor_possible(block: RamBlock) -> bool:
    """Minor-fault mode needs a page cache and a second shared mapping of it."""
    return (
        block.memory_type in ("shmem", "hugetlb") and block.shared and block.mapping.fd is not None
    )


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


class Placement:
    """Places the runs of one RAM block: UFFDIO_COPY for normal pages, UFFDIO_ZEROPAGE for
    zero pages (anonymous and shmem memory). Thread-safe: both receivers may call it."""

    name = "copy"

    def __init__(self, block: RamBlock, uffd: UserfaultFd) -> None:
        self.block = block
        self.uffd = uffd
        self.page_size = block.page_size
        self.duplicates = 0  # pages a request had placed already (EEXIST)
        self.ioctls = 0
        self._lock = threading.Lock()

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
        starts, lengths = runs(~zero)
        offset = 0
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            self._copy(base + start * size, data_address + offset, length * size)
            offset += length * size
        starts, lengths = runs(zero)
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            self._zero(base + start * size, length * size)

    def resolve_fault(self, page: int) -> bool:
        """A fault on a page known to be complete here (a zero page never placed, or a page
        placed after the fault was raised): fill it with zeros, or wake the waiters.
        True if it was filled."""
        address = self.block.host_address + page * self.page_size
        try:
            self._zero_one(address)
            return True
        except PageExistsError:
            self.uffd.wake(address, self.page_size)
            return False

    def close(self) -> None:
        pass

    # -- the ioctl loops: EEXIST counted and skipped, EAGAIN retried ----------------------

    def _copy(self, destination: int, source: int, length: int) -> None:
        self._loop(self.uffd.copy, destination, source, length)

    def _zero(self, destination: int, length: int) -> None:
        self._loop(lambda d, _s, n: self.uffd.zeropage(d, n), destination, 0, length)

    def _zero_one(self, address: int) -> None:
        self.uffd.zeropage(address, self.page_size)

    def _loop(
        self, ioctl: Callable[[int, int, int], int], destination: int, source: int, length: int
    ) -> None:
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


class HugePagePlacement(Placement):
    """hugetlb: one UFFDIO_COPY per huge page (QEMU's postcopy_place_page), zero huge pages
    copied from a zero buffer (no UFFDIO_ZEROPAGE on hugetlb). Each copy's duration is kept
    (`placement_us`): the figure the 2 MiB placement budget is checked against."""

    name = "copy-huge"

    def __init__(self, block: RamBlock, uffd: UserfaultFd) -> None:
        super().__init__(block, uffd)
        self._zero_address = zero_buffer(self.page_size)
        self._samples = np.zeros(PLACEMENT_SAMPLES, dtype=np.float64)
        self._sampled = 0

    def _copy(self, destination: int, source: int, length: int) -> None:
        for offset in range(0, length, self.page_size):
            started = time.perf_counter()
            self._loop(self.uffd.copy, destination + offset, source + offset, self.page_size)
            self._sample(time.perf_counter() - started)

    def _zero(self, destination: int, length: int) -> None:
        for offset in range(0, length, self.page_size):
            self._loop(self.uffd.copy, destination + offset, self._zero_address, self.page_size)

    def _zero_one(self, address: int) -> None:
        self.uffd.copy(address, self._zero_address, self.page_size)

    def _sample(self, seconds: float) -> None:
        with self._lock:
            self._samples[self._sampled % PLACEMENT_SAMPLES] = seconds * 1e6
            self._sampled += 1

    def placement_us(self) -> dict[str, float | int]:
        """p50/p99 of the last huge page copies, in microseconds, and how many there were."""
        with self._lock:
            samples = self._samples[: min(self._sampled, PLACEMENT_SAMPLES)].copy()
            count = self._sampled
        if samples.size == 0:
            return {"count": 0}
        p50, p99 = np.percentile(samples, [50, 99])
        return {"count": count, "p50": round(float(p50), 1), "p99": round(float(p99), 1)}


class MinorPlacement(Placement):
    """Minor-fault mode: runs are read into a second mapping of the RAM's file, then mapped
    into guest RAM with UFFDIO_CONTINUE; zero pages are fallocated (zeroed page cache) and
    continued. Each page is claimed once: a page already placed (or being placed by the
    other receiver) is read into a scratch buffer instead, never over live guest memory."""

    name = "continue"

    def __init__(self, block: RamBlock, uffd: UserfaultFd, received: Bitmap) -> None:
        if not minor_possible(block):
            raise BackendUnsupported(
                f"minor faults need shared RAM with a page cache; {block.describe()} is not"
            )
        super().__init__(block, uffd)
        self.alias = block.mapping.alias()
        self._claimed = received.copy()  # what precopy left in place needs no claim
        self._scratch = Mapping.anonymous(block.page_size)

    @property
    def needs(self) -> UffdNeeds:
        return uffd_needs(self.block.memory_type, minor=True)

    def unclaim(self, first_page: int, count: int) -> None:
        """Pages discarded again (before LISTEN only): they must be received anew."""
        with self._lock:
            self._claimed[first_page : first_page + count] = False

    def landing(self, first_page: int, zero: Bitmap) -> Landing:
        count = zero.size
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
        size = self.page_size
        zero_mine = zero & mine
        if zero_mine.any():
            starts, lengths = runs(zero_mine)
            for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                self.alias.allocate((first_page + start) * size, length * size)
        starts, lengths = runs(mine)
        base = self.block.host_address + first_page * size
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            self._loop(
                lambda d, _s, n: self.uffd.continue_(d, n), base + start * size, 0, length * size
            )

    def resolve_fault(self, page: int) -> bool:
        size = self.page_size
        address = self.block.host_address + page * size
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
    block: RamBlock, uffd: UserfaultFd, received: Bitmap, *, minor: bool = False
) -> Placement:
    """The placement for a RAM block: minor-fault mode if asked for and possible, whole huge
    pages on hugetlb, else COPY/ZEROPAGE."""
    if minor and minor_possible(block):
        return MinorPlacement(block, uffd, received)
    uffd_needs(block.memory_type)  # raises for memory userfaultfd cannot serve
    if block.hugetlb:
        return HugePagePlacement(block, uffd)
    return Placement(block, uffd)


def features_for(blocks: list[RamBlock], *, minor: bool = False) -> Feature:
    """The userfaultfd features to ask for at the API handshake for these blocks."""
    features = Feature(0)
    for block in blocks:
        features |= uffd_needs(block.memory_type, minor=minor and minor_possible(block)).features
    return features
