"""Page placement on the destination: whole runs land in guest RAM atomically.

Owns `PagePlacer`: from LISTEN on, the receiver and the preempt receiver hand it runs
(read into the staging buffer, into the side mapping at the pages' own offsets, or where
the block's placement says) and it places them, which wakes the vCPUs waiting there; then
it records them in `received`, the request latency and the blocktime, and wakes the other
processes sharing the memory (shared.py). QEMU's postcopy_place_page in
migration/postcopy-ram.c. How a run lands depends on the RAM backend (backends.py: one
UFFDIO_COPY / UFFDIO_ZEROPAGE per run, one COPY per huge page, or CONTINUE); runs read
into the side mapping move in with UFFDIO_MOVE (swap.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import PageExistsError, RetryError, UffdError, UserfaultFd
from postcopy.migration.channel import SHARED_SOCKET_PIECE, StreamReader
from postcopy.migration.hops import MAIN, HopLog
from postcopy.migration.incoming.eagain import Retrier
from postcopy.migration.incoming.placement import Landing, Placement
from postcopy.migration.shared import SharedClients
from postcopy.migration.stats import BlocktimeTracker, LatencyRecorder
from postcopy.ram import Bitmap, RamBlock, clear_runs, set_runs
from postcopy.wire import RamRunHeader, max_run_pages

STAGING_BYTES = 4 << 20  # a receiver's staging buffer: the largest run's data fits


def staging_bytes(ram: list[RamBlock]) -> int:
    """A staging buffer that holds the largest run of any block (16 MiB of huge pages)."""
    return max([STAGING_BYTES, *(max_run_pages(b.page_size) * b.page_size for b in ram)])


class PagePlacer:
    """Places runs atomically on a userfaultfd, records what arrived, wakes waiters."""

    def __init__(
        self,
        uffd: UserfaultFd,
        ram: list[RamBlock],
        received: list[Bitmap],
        latency: LatencyRecorder,
        blocktime: BlocktimeTracker,
        placements: list[Placement],
        shared: SharedClients | None = None,
        hops: HopLog | None = None,
    ) -> None:
        self.uffd = uffd
        self.hops = hops
        self.ram = ram
        self.received = received
        self.latency = latency
        self.blocktime = blocktime
        self.placements = placements
        self.shared = shared
        self._duplicates = 0
        self.placed_pages = 0
        self._lock = threading.Lock()

    @property
    def duplicates(self) -> int:
        """Pages that were there already when their copy came (a request raced the push)."""
        return self._duplicates + sum(p.duplicates for p in self.placements)

    def receive_run(
        self,
        reader: StreamReader,
        header: RamRunHeader,
        staging: Mapping,
        side: Mapping | None,
        *,
        channel: int = MAIN,
    ) -> None:
        """Read a run and place it (`_receive_run`); logged in the request hops."""
        header_read = self.hops.clock() if self.hops is not None else 0.0
        self._receive_run(reader, header, staging, side)
        if self.hops is not None:
            self.hops.run_placed(
                header.block, header.first_page, int(header.zero.size), header_read, channel
            )

    def _receive_run(
        self, reader: StreamReader, header: RamRunHeader, staging: Mapping, side: Mapping | None
    ) -> None:
        """Read a run's normal pages from the stream to where they land, then place it.

        Into `side`, the block's side mapping (RAM swap), at their own offsets: on top of
        the stale precopy pages, warm memory already allocated, so that they move in
        instead of being copied (allocating and zeroing a page per UFFDIO_COPY is most of
        the cost of placing a page on this host). Else where the block's placement says
        (the page cache, in minor-fault mode), or back to back into `staging`."""
        block = self.ram[header.block]
        if side is not None:
            count = int(header.zero.size)
            # no zero page (the header says: data for every page): one piece, no bitmap work
            dense = header.data_length == count * block.page_size
            normal = [(0, count)] if dense else clear_runs(header.zero)
            for start, length in normal:
                offset = (header.first_page + start) * block.page_size
                end = offset + length * block.page_size
                # in pieces: the fault thread's page requests share this socket's lock
                for piece in range(offset, end, SHARED_SOCKET_PIECE):
                    reader.read_data_into(side.view[piece : min(piece + SHARED_SOCKET_PIECE, end)])
            self.place_from_side(
                header.block, header.first_page, header.zero, side.address, normal=normal
            )
            return
        landing = self.landing(header.block, header.first_page, header.zero)
        if landing.views is not None:
            try:
                for view in landing.views:  # straight into the page cache (minor-fault mode)
                    reader.read_data_into(view)
            except BaseException:
                self.placements[header.block].abandon(header.first_page, landing)
                raise
        elif header.data_length:
            reader.read_data_into(staging.view[: header.data_length])
        self.place(header.block, header.first_page, header.zero, staging.address, landing)

    def landing(self, block_index: int, first_page: int, zero: Bitmap) -> Landing:
        """Where the receiver reads the run's normal pages (see Placement.landing)."""
        return self.placements[block_index].landing(first_page, zero)

    def place(
        self,
        block_index: int,
        first_page: int,
        zero: Bitmap,
        staging_address: int | None,
        landing: Landing | None = None,
    ) -> None:
        """Place a run read into staging (normal pages back to back), or where `landing`
        said, as the block's backend needs."""
        self.placements[block_index].place(first_page, zero, staging_address, landing or Landing())
        self._record(block_index, first_page, int(zero.size))

    def place_from_side(
        self,
        block_index: int,
        first_page: int,
        zero: Bitmap,
        side_address: int,
        *,
        normal: list[tuple[int, int]] | None = None,
    ) -> None:
        """Like `place`, for a run whose normal pages were read into the block's side
        mapping at their own offsets: they move into guest RAM (UFFDIO_MOVE, no copy and
        no page to allocate), zero pages are filled as usual. `normal`: the runs of normal
        pages, if the caller has them (`clear_runs(zero)`)."""
        block = self.ram[block_index]
        page_size = block.page_size
        if normal is None:
            normal = clear_runs(zero)
        for start, length in normal:
            offset = (first_page + start) * page_size
            self._fill(
                "UFFDIO_MOVE",
                self.uffd.move,
                block.host_address + offset,
                side_address + offset,
                length * page_size,
                page_size,
                fallback=self._copy,
            )
            # the move woke the vCPUs waiting there: their waits end now, not once the
            # whole run is recorded
            self.blocktime.placed(block_index, first_page + start, length)
        if len(normal) != 1 or normal[0][1] != zero.size:  # some pages are zero pages
            self._place_zero_pages(block, first_page, zero)
        self._record(block_index, first_page, int(zero.size))

    def _place_zero_pages(self, block: RamBlock, first_page: int, zero: Bitmap) -> None:
        page_size = block.page_size
        for start, length in set_runs(zero):
            destination = block.host_address + (first_page + start) * page_size
            self._zeropage(destination, length * page_size, page_size)

    def _record(self, block_index: int, first_page: int, count: int) -> None:
        # Set only now, after the ioctls above placed every page of the run: the fault
        # thread reads these bits without a lock and resolves a fault on a set one locally
        # (ZEROPAGE, or WAKE on EEXIST), so a set bit must mean "in guest RAM". Both
        # receivers may set the same bits (a request raced the push): both write True.
        if count == 1:  # a requested page: a scalar store, not a slice (microseconds here)
            self.received[block_index][first_page] = True
        else:
            self.received[block_index][first_page : first_page + count] = True
        with self._lock:
            self.placed_pages += count
        self.latency.placed(block_index, first_page, count)
        self.blocktime.placed(block_index, first_page, count)
        if self.shared is not None:
            self.shared.placed(block_index, first_page, count)

    def _copy(self, destination: int, source: int, length: int, page_size: int) -> None:
        self._fill("UFFDIO_COPY", self.uffd.copy, destination, source, length, page_size)

    def _fill(
        self,
        name: str,
        ioctl: Callable[[int, int, int], int],
        destination: int,
        source: int,
        length: int,
        page_size: int,
        fallback: Callable[[int, int, int, int], None] | None = None,
    ) -> None:
        """Run UFFDIO_COPY or UFFDIO_MOVE over a range to its end. EEXIST: a request raced
        the push and that page is already there (counted, skipped); EAGAIN: go on, with
        a pause if it made no progress, and not forever (eagain.py). Any other error
        (e.g. EBUSY for a page the kernel cannot move now) hands the rest of the range to
        `fallback`, if given."""
        retry = Retrier(name)
        done = 0
        while done < length:
            try:
                done += ioctl(destination + done, source + done, length - done)
            except PageExistsError as error:
                done += error.done + page_size
                with self._lock:
                    self._duplicates += 1
            except RetryError as error:
                done += error.done
                retry.again(error)
            except UffdError as error:
                if fallback is None:
                    raise
                done += error.done
                fallback(destination + done, source + done, length - done, page_size)
                return

    def _zeropage(self, destination: int, length: int, page_size: int) -> None:
        retry = Retrier("UFFDIO_ZEROPAGE")
        done = 0
        while done < length:
            try:
                done += self.uffd.zeropage(destination + done, length - done)
            except PageExistsError as error:
                done += error.done + page_size
            except RetryError as error:
                done += error.done
                retry.again(error)
