"""The destination side of a migration: receive precopy RAM, then serve postcopy faults.

Threads:
- the receiver reads the main stream. Before LISTEN it reads page data straight into guest
  RAM (nothing is registered on userfaultfd yet, so no thread can block on it), while the
  prefault thread populates the RAM the next runs will land in (see prefault). From
  LISTEN on it reads each run into the side mapping that holds the stale precopy pages,
  or without RAM swap into a staging buffer, and places whole runs with UFFDIO_MOVE /
  UFFDIO_COPY / UFFDIO_ZEROPAGE, which wake the vCPUs waiting on them.
- the fault thread polls the userfaultfd and a quit eventfd, reads faults in batches and
  sends REQ_PAGES on the return path for pages not yet asked for.
- with postcopy-preempt, a second receiver places the urgent pages of the preempt channel.

The GIL rule: once RAM is registered, no Python code here reads or writes guest RAM; only
ioctls (which release the GIL) and socket reads into the staging buffer touch pages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from postcopy.linux.memory import Advice, EventFd, Mapping
from postcopy.linux.userfaultfd import (
    Feature,
    Ioctl,
    PageExistsError,
    PageFault,
    RegisterMode,
    RetryError,
    UffdError,
    UserfaultFd,
)
from postcopy.migration.base import EventSink, MigrationBase
from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.migration.hostcheck import check_host
from postcopy.migration.machine import Machine
from postcopy.migration.parameters import Capabilities, Parameters
from postcopy.migration.prefault import Prefaulter
from postcopy.migration.stats import (
    BlocktimeTracker,
    Clock,
    LatencyRecorder,
    prefer_this_thread,
    set_thread_nice,
)
from postcopy.migration.status import FINISHED, MigrationStatus
from postcopy.ram import Bitmap, RamBlock, runs, split_runs
from postcopy.transport import AuthConfig, Connection, Listener, TlsServerConfig, listen
from postcopy.wire import (
    MAX_SHUT_REASON_BYTES,
    Advise,
    BlockInfo,
    DeviceState,
    Direction,
    Discard,
    EndOfRound,
    Handshake,
    Listen,
    Package,
    Ping,
    Pong,
    PostcopyComplete,
    PrecopyComplete,
    RamRunHeader,
    ReqPages,
    Run,
    Shut,
    StreamContext,
)

log = logging.getLogger(__name__)

S = MigrationStatus
STAGING_BYTES = 4 << 20
FAULT_BATCH = 64
MOVE_CHUNK_PAGES = 64  # a fault on a page being moved waits for at most one chunk
FAULT_MOVE_PAGES = 64  # valid pages moved back on a fault: the faulting one and those after
MOVER_NICE = 5


class IncomingError(RuntimeError):
    pass


class PagePlacer:
    """Places runs atomically on a userfaultfd, records what arrived, wakes waiters."""

    def __init__(
        self,
        uffd: UserfaultFd,
        ram: list[RamBlock],
        received: list[Bitmap],
        latency: LatencyRecorder,
        blocktime: BlocktimeTracker,
    ) -> None:
        self.uffd = uffd
        self.ram = ram
        self.received = received
        self.latency = latency
        self.blocktime = blocktime
        self.duplicates = 0
        self.placed_pages = 0
        self._lock = threading.Lock()

    def place(self, block_index: int, first_page: int, zero: Bitmap, staging_address: int) -> None:
        block = self.ram[block_index]
        page_size = block.page_size
        normal_starts, normal_lengths = runs(~zero)
        offset_in_staging = 0
        for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
            destination = block.host_address + (first_page + start) * page_size
            self._copy(
                destination, staging_address + offset_in_staging, length * page_size, page_size
            )
            offset_in_staging += length * page_size
        self._place_zero_pages(block, first_page, zero)
        self._record(block_index, first_page, int(zero.size))

    def place_from_side(
        self, block_index: int, first_page: int, zero: Bitmap, side_address: int
    ) -> None:
        """Like `place`, for a run whose normal pages were read into the block's side
        mapping at their own offsets: they move into guest RAM (UFFDIO_MOVE, no copy and
        no page to allocate), zero pages are filled as usual."""
        block = self.ram[block_index]
        page_size = block.page_size
        normal_starts, normal_lengths = runs(~zero)
        for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
            offset = (first_page + start) * page_size
            self._fill(
                self.uffd.move,
                block.host_address + offset,
                side_address + offset,
                length * page_size,
                page_size,
                fallback=self._copy,
            )
        self._place_zero_pages(block, first_page, zero)
        self._record(block_index, first_page, int(zero.size))

    def _place_zero_pages(self, block: RamBlock, first_page: int, zero: Bitmap) -> None:
        page_size = block.page_size
        zero_starts, zero_lengths = runs(zero)
        for start, length in zip(zero_starts.tolist(), zero_lengths.tolist(), strict=True):
            destination = block.host_address + (first_page + start) * page_size
            self._zeropage(destination, length * page_size, page_size)

    def _record(self, block_index: int, first_page: int, count: int) -> None:
        self.received[block_index][first_page : first_page + count] = True
        with self._lock:
            self.placed_pages += count
        self.latency.placed(block_index, first_page, count)
        self.blocktime.placed(block_index, first_page, count)

    def _copy(self, destination: int, source: int, length: int, page_size: int) -> None:
        self._fill(self.uffd.copy, destination, source, length, page_size)

    def _fill(
        self,
        ioctl: Callable[[int, int, int], int],
        destination: int,
        source: int,
        length: int,
        page_size: int,
        fallback: Callable[[int, int, int, int], None] | None = None,
    ) -> None:
        """Run UFFDIO_COPY or UFFDIO_MOVE over a range to its end. EEXIST: a request raced
        the push and that page is already there (counted, skipped); EAGAIN: go on. Any
        other error (e.g. EBUSY for a page the kernel cannot move now) hands the rest of
        the range to `fallback`, if given."""
        done = 0
        while done < length:
            try:
                done += ioctl(destination + done, source + done, length - done)
            except PageExistsError as error:
                done += error.done + page_size
                with self._lock:
                    self.duplicates += 1
            except RetryError as error:
                done += error.done
            except UffdError as error:
                if fallback is None:
                    raise
                done += error.done
                fallback(destination + done, source + done, length - done, page_size)
                return

    def _zeropage(self, destination: int, length: int, page_size: int) -> None:
        done = 0
        while done < length:
            try:
                done += self.uffd.zeropage(destination + done, length - done)
            except PageExistsError as error:
                done += error.done + page_size
            except RetryError as error:
                done += error.done


class IncomingMigration(MigrationBase):
    """Waits for a migration stream on `uri` and loads it into `machine`."""

    def __init__(
        self,
        machine: Machine,
        uri: str,
        *,
        parameters: Parameters,
        capabilities: Capabilities,
        on_event: EventSink | None = None,
        auth: AuthConfig | None = None,
        tls: TlsServerConfig | None = None,
        allow_insecure_network: bool = False,
        autostart: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(capabilities, on_event, clock)
        self.machine = machine
        self.uri = uri
        self.parameters = parameters
        self.auth = auth
        self.tls = tls
        self.allow_insecure_network = allow_insecure_network
        self.autostart = autostart
        self._tid_to_vcpu: dict[int, int] = {}
        self.peer_capabilities: frozenset[str] = frozenset()
        ram = list(machine.ram)
        self._ram = ram
        self.received = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
        self._requested = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
        self.latency = LatencyRecorder([block.pages for block in ram], clock)
        self.blocktime = BlocktimeTracker(machine.vcpu_count, clock)
        self.uffd: UserfaultFd | None = None
        self._quit = EventFd()
        self._listener: Listener | None = None
        self._main: Connection | None = None
        self._preempt: Connection | None = None
        self._return: StreamWriter | None = None
        self._placer: PagePlacer | None = None
        self._staging = Mapping.anonymous(STAGING_BYTES)
        self._prefaulter: Prefaulter | None = None  # precopy only: see _receive_run
        self._threads: list[threading.Thread] = []
        self._thp_off = False
        # RAM swap at LISTEN (see _listen): the precopy mapping of each block, and which of
        # its pages still hold valid content that has not been moved into the new mapping
        self._swap_ram = False
        self._old_mappings: list[Mapping | None] = [None] * len(ram)
        self._unmoved = [np.zeros(0, dtype=np.bool_) for _ in ram]
        self._moving_done = threading.Event()
        self._moving_done.set()
        self._guest_started = threading.Event()
        self._quit_moving = threading.Event()
        self.pages_moved = 0
        self.pages_prefaulted = 0
        self._device_state: dict[str, Any] | None = None
        self.postcopy_start: float | None = None
        self.bytes_received = 0
        self.requests_sent = 0
        self.local_zero_faults = 0
        self.rounds = 0
        self.bound_uri: str | None = None
        self._receiver_done = threading.Event()

    # -- control -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (errors surface here, synchronously), then accept on a thread."""
        self._listener = listen(
            self.uri,
            auth=self.auth,
            tls=self.tls,
            allow_insecure_network=self.allow_insecure_network,
        )
        self.bound_uri = str(self._listener.uri)
        thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self._threads.append(thread)
        thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._receiver_done.wait(timeout)

    def cancel(self) -> None:
        for connection in (self._main, self._preempt):
            if connection is not None:
                connection.shutdown()
        if self._listener is not None:
            self._listener.close()

    def query(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.status.value.value}
        if self.status.value == S.NONE:
            return info
        now = self.end_time if self.end_time is not None else self._clock()
        info["total-time"] = int((now - self.start_time) * 1000)
        if self.capabilities["postcopy-blocktime"] or self.postcopy_start is not None:
            info.update(self.blocktime.as_qmp())
        info["x-request-latency"] = self.latency.summary()
        info["x-bytes-received"] = self.bytes_received
        info["x-postcopy-requests-sent"] = self.requests_sent
        info["x-local-zero-faults"] = self.local_zero_faults
        prefaulter = self._prefaulter
        info["x-pages-prefaulted"] = (
            prefaulter.pages_populated if prefaulter is not None else self.pages_prefaulted
        )
        if self._placer is not None:
            info["x-duplicate-pages"] = self._placer.duplicates
            info["x-pages-placed"] = self._placer.placed_pages
            info["x-pages-moved"] = self.pages_moved
            info["x-ram-swapped"] = self._swap_ram
        if self.error:
            info["error-desc"] = self.error
        return info

    def close(self) -> None:
        self.cancel()
        self._stop_fault_thread()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)
        self._stop_prefaulting()
        self._release_uffd()
        for index, old in enumerate(self._old_mappings):
            if old is not None:
                old.close()
                self._old_mappings[index] = None
        self._staging.close()
        self._quit.close()

    # -- receiving -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            assert self._listener is not None
            self._main = self._listener.accept(None)
            self.start_time = self._clock()
            self.status.move(S.SETUP)
            self._receive()
        except Exception as error:
            self._fail(error)
        finally:
            if self.end_time is None:
                self.end_time = self._clock()
            if self._listener is not None:
                self._listener.close()
            self._receiver_done.set()

    def _fail(self, error: BaseException) -> None:
        self.error = str(error) or type(error).__name__
        log.error("incoming migration failed: %s", self.error)
        if self._return is not None:
            with contextlib.suppress(OSError):
                reason = _clip_utf8(self.error, MAX_SHUT_REASON_BYTES)
                self._return.send(Shut(error=True, reason=reason))
        if self.postcopy_start is not None:
            # vCPUs may sleep on missing pages: ask them to stop, then release the faults
            # (unregistering wakes them); the guest's RAM is incomplete, it must not go on.
            stopper = threading.Thread(
                target=self.machine.stop, name="stop-on-failure", daemon=True
            )
            stopper.start()
            self._stop_fault_thread()
            self._release_uffd()
            stopper.join(10)
        for connection in (self._main, self._preempt):
            if connection is not None:
                connection.close()
        if self.status.value not in FINISHED:
            if self.status.value == S.NONE:
                self.status.move(S.SETUP)
            self.status.move(S.FAILED)

    def _receive(self) -> None:
        assert self._main is not None
        blocks = tuple(BlockInfo(b.name, b.length, b.page_size) for b in self._ram)
        reader = StreamReader(
            self._main, Direction.MAIN, StreamContext(Direction.MAIN, blocks=blocks)
        )
        self._return = StreamWriter(self._main, Direction.RETURN)
        self._return.send_stream_header()
        reader.read_stream_header()
        handshake = reader.read()
        if not isinstance(handshake, Handshake):
            raise IncomingError(f"expected a handshake, got {type(handshake).__name__}")
        self._check_configuration(handshake)
        self.peer_capabilities = handshake.capabilities
        if "postcopy-preempt" in handshake.capabilities:
            # the source opens the urgent-page channel as soon as we accept the configuration
            preempt_thread = threading.Thread(
                target=self._preempt_receiver, name="preempt", daemon=True
            )
            self._threads.append(preempt_thread)
            preempt_thread.start()
        self.status.move(S.ACTIVE)
        self._trace("handshake", capabilities=sorted(handshake.capabilities))
        set_thread_nice(self.parameters.x_migration_thread_nice)
        self._prefaulter = Prefaulter(
            self._ram, self.received, nice=self.parameters.x_migration_thread_nice
        )
        while True:
            message = reader.read()
            if isinstance(message, RamRunHeader):
                self._receive_run(reader, message)
            elif isinstance(message, EndOfRound):
                self.rounds = message.round
            elif isinstance(message, Ping):
                self._return.send(Pong(message.value))
            elif isinstance(message, Advise):
                self._advise(message)
            elif isinstance(message, Discard):
                self._discard(message)
            elif isinstance(message, Listen):
                self._listen()
            elif isinstance(message, DeviceState):
                self._device_state = json.loads(message.data)
            elif isinstance(message, PrecopyComplete):
                self._complete_precopy()
                return
            elif isinstance(message, Package):
                self._run_package(message)
            elif isinstance(message, Run):
                self._start_guest()
            elif isinstance(message, PostcopyComplete):
                self._complete_postcopy()
                return
            else:
                raise IncomingError(f"unexpected {type(message).__name__} in the main stream")
            self.bytes_received = reader.bytes_received

    def _check_configuration(self, handshake: Handshake) -> None:
        ours = [f"{b.name}:{b.length}@{b.page_size}" for b in self._ram]
        theirs = [f"{b.name}:{b.length}@{b.page_size}" for b in handshake.blocks]
        if ours != theirs or handshake.vcpus != self.machine.vcpu_count:
            reason = (
                f"VM configuration mismatch: source has blocks {theirs} and "
                f"{handshake.vcpus} vCPUs, destination has blocks {ours} and "
                f"{self.machine.vcpu_count} vCPUs"
            )
            raise IncomingError(reason)
        wanted = {"postcopy-ram", "postcopy-preempt"} & set(handshake.capabilities)
        for name in sorted(wanted):
            if not self.capabilities[name]:
                raise IncomingError(
                    f"the source uses capability {name} but it is not enabled "
                    "on the destination (migrate-set-capabilities)"
                )

    def _receive_run(self, reader: StreamReader, header: RamRunHeader) -> None:
        block = self._ram[header.block]
        if self.uffd is None:
            # RAM is not registered yet: read normal pages straight into guest memory
            first, count = header.first_page, header.zero.size
            received = self.received[header.block][first : first + count]
            prefaulter = self._prefaulter
            if prefaulter is not None and not received.all():
                prefaulter.advance(
                    header.block, first, count, header.data_length // block.page_size
                )
            normal_starts, normal_lengths = runs(~header.zero)
            for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
                reader.read_data_into(block.page_view(first + start, length))
            held = received
            if prefaulter is not None:
                held = received | prefaulter.prefaulted[header.block][first : first + count]
            stale_zero = header.zero & held
            if stale_zero.any():
                # a page we hold (or prefaulted) became zero on the source: empty it
                zero_starts, zero_lengths = runs(stale_zero)
                for start, length in zip(zero_starts.tolist(), zero_lengths.tolist(), strict=True):
                    block.mapping.madvise(
                        Advice.DONTNEED,
                        (header.first_page + start) * block.page_size,
                        length * block.page_size,
                    )
            received[:] = True
            return
        assert self._placer is not None
        side = self._old_mappings[header.block] if self._swap_ram else None
        if side is not None:
            # The side mapping holds this block's stale precopy pages: warm memory, already
            # allocated, at the same offsets. Reading the run there and moving the pages in
            # spares the kernel allocating and zeroing a page per UFFDIO_COPY, which is most
            # of the cost of placing a page on this host.
            normal_starts, normal_lengths = runs(~header.zero)
            for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
                offset = (header.first_page + start) * block.page_size
                reader.read_data_into(side.view[offset : offset + length * block.page_size])
            self._placer.place_from_side(header.block, header.first_page, header.zero, side.address)
            return
        staging = self._staging.view[: header.data_length]
        if header.data_length:
            reader.read_data_into(staging)
        self._placer.place(header.block, header.first_page, header.zero, self._staging.address)

    def _stop_prefaulting(self) -> None:
        prefaulter, self._prefaulter = self._prefaulter, None
        if prefaulter is not None:
            prefaulter.close()
            self.pages_prefaulted = prefaulter.pages_populated

    # -- postcopy ------------------------------------------------------------------------------

    def _advise(self, advise: Advise) -> None:
        if not self.capabilities["postcopy-ram"]:
            raise IncomingError(
                "postcopy requested by the source but capability postcopy-ram "
                "is off on the destination"
            )
        report = check_host(
            ram_page_sizes=tuple(sorted({b.page_size for b in self._ram})),
            shared_ram=any(b.shared for b in self._ram),
        )
        if not report.postcopy_possible:
            raise IncomingError("postcopy is not possible on the destination: " + report.summary())
        # empty all RAM, so every page the source never sends stays missing
        for block in self._ram:
            # no MADV_HUGEPAGE: with THP defrag "madvise", huge page faults stall on
            # compaction here and made the precopy receive erratic (0.3-1.2 GB/s)
            block.mapping.madvise(Advice.DONTNEED)
        self.received = [np.zeros(block.pages, dtype=np.bool_) for block in self._ram]
        self._swap_ram = _can_swap_ram(self._ram)
        self._trace("advise", swap_ram=self._swap_ram)

    def _huge_pages_off(self) -> None:
        """Before any discard: a huge page must not be half emptied, nor khugepaged refill
        a hole with zeros behind our back (postcopy_ram_prepare_discard in the seed)."""
        if not self._thp_off:
            for block in self._ram:
                block.mapping.madvise(Advice.NOHUGEPAGE)
            self._thp_off = True

    def _discard(self, discard: Discard) -> None:
        block = self._ram[discard.block]
        for first, count in discard.ranges:
            self.received[discard.block][first : first + count] = False
            if not self._swap_ram:
                # in place: the page must really be emptied, so that it faults (the seed's way)
                self._huge_pages_off()
                block.mapping.madvise(
                    Advice.DONTNEED, first * block.page_size, count * block.page_size
                )

    def _listen(self) -> None:
        """Register RAM on a userfaultfd and start the fault thread.

        With RAM swap (the default where UFFDIO_MOVE exists), stale pages are not discarded
        in place: freeing a gigabyte of them takes ~0.5 s, which would sit in the downtime.
        Instead every page of a block moves out at once to a side mapping (mremap with
        MREMAP_DONTUNMAP moves page tables, ~0.5 ms per GiB), which leaves guest RAM empty
        at the same address, so KVM's memory slot is untouched. Pages that are still valid
        move back (UFFDIO_MOVE, no copy) on demand when a vCPU faults on them and in the
        background otherwise; the side mapping, with the stale pages, goes at the end.
        """
        self._trace("discards-done")
        self._stop_prefaulting()  # it touches guest RAM: never once RAM can be missing
        features = Feature.THREAD_ID | (Feature.MOVE if self._swap_ram else Feature(0))
        uffd = UserfaultFd.open(features)
        if self._swap_ram:
            for index, block in enumerate(self._ram):
                self._old_mappings[index] = block.mapping.move_pages_out()
                self._unmoved[index] = self.received[index].copy()
            self._moving_done.clear()
        # khugepaged must not collapse a range with missing pages into a huge page
        self._huge_pages_off()
        for block in self._ram:
            allowed = uffd.register(block.host_address, block.length, RegisterMode.MISSING)
            needed = Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE
            if self._swap_ram:
                needed |= Ioctl.MOVE
            if allowed & needed != needed:
                uffd.close()
                raise IncomingError(
                    f"userfaultfd on block {block.name!r} lacks {needed & ~allowed!r}"
                )
        self.uffd = uffd
        self._placer = PagePlacer(uffd, self._ram, self.received, self.latency, self.blocktime)
        fault_thread = threading.Thread(target=self._fault_thread, name="fault", daemon=True)
        self._threads.append(fault_thread)
        fault_thread.start()
        if self._swap_ram:
            mover = threading.Thread(target=self._mover, name="mover", daemon=True)
            self._threads.append(mover)
            mover.start()
        self._trace("listen")

    def _run_package(self, package: Package) -> None:
        for message in package.messages:
            if isinstance(message, DeviceState):
                self._device_state = json.loads(message.data)
            elif isinstance(message, Run):
                self._start_guest()
            else:
                raise IncomingError(f"unexpected {type(message).__name__} in a package")

    def _start_guest(self) -> None:
        if self._device_state is None:
            raise IncomingError("RUN before any device state")
        self.machine.load_state(self._device_state)
        self.postcopy_start = self._clock()
        self._tid_to_vcpu = {tid: i for i, tid in enumerate(self.machine.vcpu_thread_ids())}
        self.status.move(S.POSTCOPY_ACTIVE)
        if self.autostart:
            self.machine.cont()
        self._guest_started.set()
        self._trace("run")

    def _preempt_receiver(self) -> None:
        assert self._listener is not None and self._main is not None
        prefer_this_thread()
        try:
            self._preempt = self._listener.accept_channel(self._main.session, "preempt", 30.0)
        except Exception as error:
            log.error("preempt channel never came: %s", error)
            return
        blocks = tuple(BlockInfo(b.name, b.length, b.page_size) for b in self._ram)
        reader = StreamReader(
            self._preempt, Direction.MAIN, StreamContext(Direction.MAIN, blocks=blocks)
        )
        staging = Mapping.anonymous(STAGING_BYTES)
        try:
            reader.read_stream_header()
            handshake = reader.read()
            if not isinstance(handshake, Handshake):
                raise IncomingError("the preempt channel must begin with a handshake")
            while True:
                header = reader.read()
                if not isinstance(header, RamRunHeader):
                    raise IncomingError(
                        f"unexpected {type(header).__name__} on the preempt channel"
                    )
                if header.data_length:
                    reader.read_data_into(staging.view[: header.data_length])
                if self._placer is None:
                    raise IncomingError("urgent pages arrived before LISTEN")
                self._placer.place(header.block, header.first_page, header.zero, staging.address)
        except Exception as error:
            if self.status.value == S.POSTCOPY_ACTIVE and not self._all_received():
                log.error("preempt channel: %s", error)
        finally:
            staging.close()

    def _fault_thread(self) -> None:
        """postcopy_ram_fault_thread: faults in, page requests out, no duplicates in flight."""
        prefer_this_thread()
        uffd = self.uffd
        assert uffd is not None and self._return is not None
        poller = select.poll()
        poller.register(uffd.fileno(), select.POLLIN)
        poller.register(self._quit.fileno(), select.POLLIN)
        while True:
            ready = poller.poll()
            if any(fd == self._quit.fileno() for fd, _ in ready):
                return
            try:
                events = uffd.read_events(FAULT_BATCH)
            except OSError as error:
                if error.errno == errno.EBADF:
                    return
                raise
            now = self._clock()
            requests: list[ReqPages] = []
            for event in events:
                if not isinstance(event, PageFault):
                    continue
                block_index, page = self._locate(event.address)
                vcpu = self._tid_to_vcpu.get(event.thread_id)
                if vcpu is not None:
                    self.blocktime.fault(vcpu, block_index, page, now)
                if self._swap_ram and self._unmoved[block_index][page]:
                    # and the valid pages after it: a guest that touched this one is likely
                    # to touch those next, and each fault costs a trip through this thread
                    # (no lock with the mover: see _mover)
                    self._move_pages(block_index, page, FAULT_MOVE_PAGES, on_demand=True)
                if self.received[block_index][page]:
                    self._resolve_locally(block_index, page)
                elif not self._requested[block_index][page]:
                    self._requested[block_index][page] = True
                    self.latency.asked(block_index, page, 1, now)
                    requests.append(ReqPages(block_index, page, 1))
            for request in _coalesce(requests):
                self._return.send(request)
                self.requests_sent += 1

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
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MOVER_NICE)
        try:
            for index, unmoved in enumerate(self._unmoved):
                starts, lengths = split_runs(*runs(unmoved.copy()), MOVE_CHUNK_PAGES)
                for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                    if self._quit_moving.is_set():
                        return
                    self._move_pages(index, start, length, on_demand=False)
            self._finish_moving()
        except Exception as error:
            log.error("moving precopy pages back: %s", error)

    def _move_pages(self, block_index: int, first: int, count: int, *, on_demand: bool) -> None:
        """Move the still-unmoved pages of a range from the precopy mapping into guest RAM.
        Safe to run in two threads at once on the same pages (see _mover).

        Holes (zero pages never written) are skipped; they stay missing and a fault on one
        is filled with a zero page by _resolve_locally.
        """
        assert self.uffd is not None
        old = self._old_mappings[block_index]
        assert old is not None
        block = self._ram[block_index]
        page_size = block.page_size
        window = self._unmoved[block_index][first : first + count]
        starts, lengths = runs(window.copy())
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            offset = (first + start) * page_size
            done, size = 0, length * page_size
            while done < size:
                try:
                    done += self.uffd.move(
                        block.host_address + offset + done,
                        old.address + offset + done,
                        size - done,
                        dontwake=on_demand,
                        allow_src_holes=True,
                    )
                except PageExistsError as error:
                    done += error.done + page_size
                except RetryError as error:
                    done += error.done
            self.pages_moved += length
            # cleared only once landed: the fault thread reads these bits without the lock,
            # and a page it sees as moved must really be in guest RAM
            window[start : start + length] = False

    def _finish_moving(self) -> None:
        """Every valid page has moved back. The side mappings stay: the pushed pages land
        there first (see _receive_run); they go when postcopy completes."""
        self._trace("moved", pages=self.pages_moved)
        self._moving_done.set()

    def _free_side_mappings(self) -> None:
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

    def _locate(self, address: int) -> tuple[int, int]:
        for index, block in enumerate(self._ram):
            if block.contains_host(address):
                return index, (address - block.host_address) // block.page_size
        raise IncomingError(f"fault at {address:#x} outside guest RAM")

    def _resolve_locally(self, block_index: int, page: int) -> None:
        """A fault on a page we already know: a zero page never populated, or one placed
        after the fault was raised. ZEROPAGE fills the first; EEXIST means the second."""
        assert self.uffd is not None
        block = self._ram[block_index]
        address = block.host_address + page * block.page_size
        try:
            self.uffd.zeropage(address, block.page_size)
            self.local_zero_faults += 1
        except PageExistsError:
            self.uffd.wake(address, block.page_size)
        self.blocktime.placed(block_index, page, 1)

    def _all_received(self) -> bool:
        return all(bool(r.all()) for r in self.received)

    def _complete_precopy(self) -> None:
        if self._device_state is None:
            raise IncomingError("precopy completed without device state")
        self._stop_prefaulting()
        self.machine.load_state(self._device_state)
        if self.autostart:
            self.machine.cont()
        assert self._return is not None
        self._return.send(Shut(error=False))
        self.status.move(S.COMPLETED)
        self._trace("completed")

    def _complete_postcopy(self) -> None:
        # with a preempt channel the last requested pages may still be on their way
        deadline = self._clock() + 30.0
        while not self._all_received():
            if self._clock() > deadline:
                missing = sum(int((~r).sum()) for r in self.received)
                raise IncomingError(f"postcopy completed with {missing} pages never received")
            time.sleep(0.001)
        if not self._moving_done.wait(30.0):
            raise IncomingError("valid precopy pages were still being moved after 30 s")
        self._stop_fault_thread()
        self._release_uffd()
        self._free_side_mappings()
        for block in self._ram:
            block.mapping.madvise(Advice.HUGEPAGE)
        self._thp_off = False
        assert self._return is not None
        self._return.send(Shut(error=False))
        self.status.move(S.COMPLETED)
        self._trace("completed")

    def _stop_fault_thread(self) -> None:
        self._quit_moving.set()
        self._guest_started.set()  # a mover still waiting for RUN must see the quit
        with contextlib.suppress(OSError, ValueError):
            self._quit.write(1)
        for thread in self._threads:
            if thread.name == "fault" and thread is not threading.current_thread():
                thread.join(5)

    def _release_uffd(self) -> None:
        if self.uffd is None:
            return
        uffd, self.uffd = self.uffd, None
        for block in self._ram:
            try:
                uffd.unregister(block.host_address, block.length)
            except OSError:
                log.exception("unregistering %s", block.name)
        uffd.close()


def _clip_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")


def _close_all(mappings: list[Mapping]) -> None:
    for mapping in mappings:
        mapping.close()


def _can_swap_ram(ram: list[RamBlock]) -> bool:
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


def _coalesce(requests: list[ReqPages]) -> list[ReqPages]:
    """Merge requests for adjacent pages of one block (faults often come in order)."""
    merged: list[ReqPages] = []
    for request in sorted(requests, key=lambda r: (r.block, r.first_page)):
        if (
            merged
            and merged[-1].block == request.block
            and merged[-1].first_page + merged[-1].page_count == request.first_page
        ):
            last = merged[-1]
            merged[-1] = ReqPages(last.block, last.first_page, last.page_count + request.page_count)
        else:
            merged.append(request)
    return merged
