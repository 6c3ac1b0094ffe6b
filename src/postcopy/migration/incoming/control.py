"""The destination's receiver and control: `IncomingMigration`.

Owns the incoming migration's state and the threads that read the stream:
- `incoming`, the receiver: accepts, checks the handshake, reads the main stream and acts
  on every message. Before LISTEN it reads page data straight into guest RAM (nothing is
  registered on userfaultfd yet, so no thread can block on it), while the prefault thread
  populates the RAM the next runs will land in (see migration/prefault.py). At LISTEN it
  registers RAM on a userfaultfd (after the RAM swap, see swap.py) and starts the fault
  thread (faults.py). From then on it reads each run into the side mapping that holds
  the stale precopy pages, or without RAM swap into a staging buffer (or, in minor-fault
  mode, into a second mapping of the RAM's file), and hands it to the `PagePlacer`
  (placer.py), which places it as the block's backend needs (backends.py). It completes or
  fails the migration.
- `preempt` (with postcopy-preempt): a second receiver for the urgent pages of the
  preempt channel, placed with the same `PagePlacer`.

Once the guest runs, a broken link pauses instead of failing: the receiver waits in
recovery.py (`DestinationRecovery`) until a reconnect has resumed the migration, then goes
on with the new stream; each connection's receivers know its generation.

The GIL rule: once RAM is registered, no Python code here reads or writes guest RAM; only
ioctls (which release the GIL) and socket reads into the staging buffer touch pages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

import numpy as np

from postcopy.linux.memory import Advice, Mapping
from postcopy.linux.userfaultfd import Feature, UserfaultFd
from postcopy.migration import failures, globalstate
from postcopy.migration.backends import BackendUnsupported, features_for
from postcopy.migration.base import EventSink, MigrationBase
from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.migration.hops import HopLog
from postcopy.migration.hostcheck import check_host
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.faults import FaultThread
from postcopy.migration.incoming.keptcache import KeptCache
from postcopy.migration.incoming.placement import Placement, check_huge_page_pool, placement_for
from postcopy.migration.incoming.placer import PagePlacer, staging_bytes
from postcopy.migration.incoming.preempt import PreemptReceivers
from postcopy.migration.incoming.recovery import DestinationRecovery
from postcopy.migration.incoming.strangers import Door, RefusalCounter
from postcopy.migration.incoming.swap import RamSwap, can_swap_ram, register_for_swap
from postcopy.migration.machine import Machine
from postcopy.migration.parameters import Capabilities, Parameters
from postcopy.migration.prefault import Prefaulter
from postcopy.migration.recovery import HEARTBEAT_PING, watch_link
from postcopy.migration.scheduling import set_thread_nice
from postcopy.migration.shared import SharedClients
from postcopy.migration.stats import BlocktimeTracker, Clock, LatencyRecorder
from postcopy.migration.status import FINISHED, PAUSED_OR_RECOVERING, POSTCOPY, MigrationStatus
from postcopy.ram import runs
from postcopy.transport import (
    AuthConfig,
    Connection,
    Listener,
    TlsServerConfig,
    TransportError,
    listen,
)
from postcopy.wire import (
    MAX_SHUT_REASON_BYTES,
    Advise,
    BlockInfo,
    DeviceState,
    Discard,
    EndOfRound,
    Handshake,
    Listen,
    Package,
    Ping,
    Pong,
    PostcopyComplete,
    PrecopyComplete,
    ProtocolError,
    RamRunHeader,
    Run,
    Shut,
    backend_mismatch,
)

log = logging.getLogger(__name__)


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
        exit_on_error: bool = True,
        guest: str = "",
        clock: Clock = time.monotonic,
        shared: SharedClients | None = None,
        ram_zero: bool = False,
    ) -> None:
        """`ram_zero`: every page of guest RAM reads zero and nothing else writes it (a VM
        made for this incoming migration): private anonymous RAM is then not emptied at
        ADVISE, which keeps a preallocation (`--mem-prealloc`) for the pages to land on."""
        super().__init__(capabilities, on_event, clock)
        self.machine = machine
        self.uri = uri
        self.parameters = parameters
        self.auth = auth
        self.tls = tls
        self.allow_insecure_network = allow_insecure_network
        self.autostart = autostart
        # QEMU's migrate-incoming exit-on-error: once a source has passed the handshake, a
        # failure ends the process (True) or leaves it up with status failed (False)
        self.exit_on_error = exit_on_error
        self.guest = guest  # the guest this destination expects ("" = any)
        # peers dropped in their handshake (x-refused-connections)
        self._refused = RefusalCounter(lambda: self.bound_uri or self.uri)
        self.peer_capabilities: frozenset[str] = frozenset()
        ram = list(machine.ram)
        self._ram = ram
        self.received = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
        self.latency = LatencyRecorder([block.pages for block in ram], clock)
        self.blocktime = BlocktimeTracker(machine.vcpu_count, clock)
        self.hops = HopLog(clock)  # the requests' hops, for x-request-hops
        self.uffd: UserfaultFd | None = None
        self.listener: Listener | None = None
        self.main: Connection | None = None
        self.preempt_connection: Connection | None = None
        self.return_writer: StreamWriter | None = None
        self.placer: PagePlacer | None = None  # from LISTEN on
        self._placements: list[Placement] = []  # from LISTEN on, one per block
        self.faults: FaultThread | None = None  # from LISTEN on
        self._shared = shared  # other processes mapping guest RAM (vhost-user's part)
        self._staging = Mapping.anonymous(staging_bytes(ram))
        self._prefaulter: Prefaulter | None = None  # precopy only: see _receive_run
        self._threads: list[threading.Thread] = []
        self._thp_off = False
        self._kept = KeptCache(ram, enabled=False)  # minor-fault mode's discards: at ADVISE
        # RAM swap at LISTEN (see _listen): decided at ADVISE, done at LISTEN
        self._swap_ram = False
        self._swap: RamSwap | None = None
        self._ram_zero = ram_zero  # until the first page lands
        self.pages_prefaulted = 0
        self._device_state: dict[str, Any] | None = None
        self.postcopy_start: float | None = None
        self.bytes_received = 0
        self.rounds = 0
        self.bound_uri: str | None = None
        self._receiver_done = threading.Event()
        # this side's RAM as the handshake declares it, backends included
        self.block_infos = tuple(BlockInfo(b.name, b.length, b.page_size, b.backend) for b in ram)
        self.door = Door(self.block_infos)
        self.recovery: DestinationRecovery | None = None  # from RUN on
        self.source_heartbeats = False
        self._reader: StreamReader | None = None  # the first main stream's
        self.preempt = PreemptReceivers(self)  # with postcopy-preempt

    # -- for recovery.py and preempt.py ----------------------------------------------------

    def refused(self, error: Exception) -> None:
        """A peer refused (x-refused-connections): a stranger, or a reconnect that is not
        this migration's."""
        self._refused(error)

    # -- control -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (errors surface here, synchronously), then accept on a thread."""
        self.listener = listen(
            self.uri,
            auth=self.auth,
            tls=self.tls,
            allow_insecure_network=self.allow_insecure_network,
            on_refused=self._refused,
            vet=self.door.vet,
        )
        self.bound_uri = str(self.listener.uri)
        thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self._threads.append(thread)
        thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._receiver_done.wait(timeout)

    def cancel(self) -> None:
        for connection in (self.main, self.preempt_connection):
            if connection is not None:
                connection.shutdown()
        if self.listener is not None:
            self.listener.close()

    def query(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.status.value.value}
        info["x-refused-connections"] = self._refused.count
        if self.status.value == MigrationStatus.NONE:
            return info
        now = self.end_time if self.end_time is not None else self._clock()
        info["total-time"] = int((now - self.start_time) * 1000)
        if self.capabilities["postcopy-blocktime"]:  # as QEMU: the capability asks for them
            info.update(self.blocktime.as_qmp())
        info["x-request-latency"] = self.latency.summary()
        info["x-bytes-received"] = self.bytes_received
        faults = self.faults
        info["x-postcopy-requests-sent"] = faults.requests_sent if faults is not None else 0
        info["x-local-zero-faults"] = faults.local_zero_faults if faults is not None else 0
        prefaulter = self._prefaulter
        info["x-pages-prefaulted"] = self.pages_prefaulted + (
            prefaulter.pages_populated if prefaulter is not None else 0
        )
        if self.placer is not None:
            info["x-duplicate-pages"] = self.placer.duplicates
            info["x-pages-placed"] = self.placer.placed_pages
            info["x-pages-moved"] = self._swap.pages_moved if self._swap is not None else 0
            info["x-ram-swapped"] = self._swap_ram
            info["x-placement"] = {
                block.name: placement.name
                for block, placement in zip(self._ram, self._placements, strict=True)
            }
            huge = [p.placement_us() for p in self._placements if p.samples is not None]
            if huge:
                info["x-huge-page-placement-us"] = huge[0]
        if faults is not None and self._shared is not None:
            info["x-shared-faults"] = faults.shared_faults
        if self.recovery is not None:
            info.update(self.recovery.query())
        if self.error:
            info["error-desc"] = self.error
        return info

    def termination_notice(self) -> str | None:
        """What ending this process now would do to the guest, or None if nothing: in
        postcopy (paused too) the guest has run here; the pages still missing are lost."""
        if self.status.value not in POSTCOPY:
            return None
        return failures.destination_terminated_in_postcopy(*self._missing())

    def _missing(self) -> tuple[int, int]:
        """Pages not yet received, and their bytes."""
        missing = [int((~r).sum()) for r in self.received]
        size = sum(count * block.page_size for count, block in zip(missing, self._ram, strict=True))
        return sum(missing), size

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        self.cancel()
        self._stop_fault_thread()
        self.preempt.join(5)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)
        if self._swap is not None:
            self._swap.join(5)
        self._stop_prefaulting()
        self._release_uffd()
        if self._swap is not None:
            self._swap.close()
        for placement in self._placements:
            placement.close()
        self._staging.close()
        if self.faults is not None:
            self.faults.close()

    # -- receiving -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            assert self.listener is not None
            self.main, self.return_writer, reader, handshake = self.door.wait_for_source(
                self.listener, self._refused
            )
            watch_link(self.main, self.parameters)
            self.start_time = self._clock()
            self.status.move(MigrationStatus.SETUP)
            self._receive(reader, handshake)
        except Exception as error:
            self._fail(error)
        finally:
            if self.end_time is None:
                self.end_time = self._clock()
            if self.listener is not None:
                self.listener.close()
            self._receiver_done.set()

    def _fail(self, error: BaseException) -> None:
        if self.status.value in PAUSED_OR_RECOVERING:
            # closed while paused: never failed, the source still has what we lack
            log.error("incoming postcopy closed while paused: %s", error)
            return
        if isinstance(error, OSError | TransportError | ProtocolError):
            self.error = failures.link_error(error, "source")
        else:
            self.error = str(error) or type(error).__name__
        if self.postcopy_start is not None and self.status.value not in FINISHED:
            self.error += "; " + failures.guest_lost_on_destination(*self._missing())
        log.error("incoming migration failed: %s", self.error)
        if self.return_writer is not None:
            with contextlib.suppress(OSError):
                reason = self.error.encode()[:MAX_SHUT_REASON_BYTES].decode(errors="ignore")
                self.return_writer.send(Shut(error=True, reason=reason))
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
        for connection in (self.main, self.preempt_connection):
            if connection is not None:
                connection.close()
        if self.status.value not in FINISHED:
            if self.status.value == MigrationStatus.NONE:
                self.status.move(MigrationStatus.SETUP)
            self.status.move(MigrationStatus.FAILED)

    def _receive(self, reader: StreamReader, handshake: Handshake) -> None:
        assert self.main is not None and self.return_writer is not None
        self._check_configuration(handshake)
        self.peer_capabilities = handshake.capabilities
        if "postcopy-preempt" in handshake.capabilities:
            # the source opens the urgent-page channel as soon as we accept the configuration
            self.preempt.start(None, 0)
        self.status.move(MigrationStatus.ACTIVE)
        self._trace("handshake", capabilities=sorted(handshake.capabilities))
        set_thread_nice(self.parameters.x_migration_thread_nice)
        self._prefaulter = Prefaulter(
            self._ram, self.received, nice=self.parameters.x_migration_thread_nice
        )
        generation = 0
        self._reader = reader
        while True:
            try:
                self._receive_stream(reader, generation)
                return
            except Exception as error:
                recovery = self.recovery
                if recovery is None:
                    raise  # the guest never ran here: the migration fails
                recovery.link_failed(failures.link_error(error, "source"), generation)
                reader, generation = recovery.wait_resumed(generation)

    def _receive_stream(self, reader: StreamReader, generation: int) -> None:
        """Act on every message of one connection's main stream, to the end of the
        migration (returns) or of the connection (raises)."""
        while True:
            message = reader.read()
            if isinstance(message, RamRunHeader):
                self._receive_run(reader, message)
            elif isinstance(message, EndOfRound):
                self.rounds = message.round
            elif isinstance(message, Ping):
                if message.value & HEARTBEAT_PING:
                    self.source_heartbeats = True  # silence from it means a dead link
                assert self.return_writer is not None
                self.return_writer.send(Pong(message.value))
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
                self._complete_postcopy(generation)
                return
            else:
                raise IncomingError(f"unexpected {type(message).__name__} in the main stream")
            self.bytes_received = reader.bytes_received

    def _check_configuration(self, handshake: Handshake) -> None:
        mismatch = backend_mismatch(handshake.blocks, self.block_infos)
        if mismatch is not None:
            raise IncomingError(mismatch)
        ours = [f"{b.name}:{b.length}@{b.page_size}" for b in self._ram]
        theirs = [f"{b.name}:{b.length}@{b.page_size}" for b in handshake.blocks]
        if ours != theirs or handshake.vcpus != self.machine.vcpu_count:
            reason = (
                f"VM configuration mismatch: source has blocks {theirs} and "
                f"{handshake.vcpus} vCPUs, destination has blocks {ours} and "
                f"{self.machine.vcpu_count} vCPUs"
            )
            raise IncomingError(reason)
        if self.guest and handshake.guest and handshake.guest != self.guest:
            raise IncomingError(
                f"guest mismatch: the source runs {handshake.guest}, this destination "
                f"expects {self.guest} (start it with the source's guest and parameters)"
            )
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
            self._ram_zero = False
            first, count = header.first_page, header.zero.size
            normal = header.data_length // block.page_size
            received = self.received[header.block][first : first + count]
            prefaulter = self._prefaulter
            if prefaulter is not None and not received.all():
                prefaulter.advance(header.block, first, count, normal)
            if normal == count:  # no zero page (most of a bulk round): one read, nothing to empty
                reader.read_data_into(block.page_view(first, count))
                received[:] = True
                return
            normal_starts, normal_lengths = runs(~header.zero)
            for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
                reader.read_data_into(block.page_view(first + start, length))
            held = received
            if prefaulter is not None:
                # written by the prefault thread, read here without a lock: a page it populates
                # just after this read stays populated with zeros, the right content, not freed
                held = received | prefaulter.prefaulted[header.block][first : first + count]
            stale_zero = header.zero & held
            if stale_zero.any():
                # a page we hold (or prefaulted) became zero on the source: empty it (a
                # hole punched in shared memory: DONTNEED there would keep the old data)
                zero_starts, zero_lengths = runs(stale_zero)
                for start, length in zip(zero_starts.tolist(), zero_lengths.tolist(), strict=True):
                    block.discard(header.first_page + start, length)
            self._kept.received(header.block, first, header.zero)
            received[:] = True  # before LISTEN: the prefaulter's hint is all that reads it
            return
        assert self.placer is not None
        side = self._swap.side(header.block) if self._swap is not None else None
        if self._prefaulter is not None:  # the side mappings' (see _listen)
            count, normal = header.zero.size, header.data_length // block.page_size
            self._prefaulter.advance(header.block, header.first_page, count, normal)
        self.placer.receive_run(reader, header, self._staging, side)

    def _stop_prefaulting(self) -> None:
        prefaulter, self._prefaulter = self._prefaulter, None
        if prefaulter is not None:
            prefaulter.close()
            self.pages_prefaulted += prefaulter.pages_populated

    # -- postcopy ------------------------------------------------------------------------------

    def _advise(self, advise: Advise) -> None:
        if not self.capabilities["postcopy-ram"]:
            raise IncomingError(
                "postcopy requested by the source but capability postcopy-ram "
                "is off on the destination"
            )
        report = check_host(
            ram_page_sizes=tuple(sorted({b.page_size for b in self._ram})),
            memory_types=tuple(sorted({b.memory_type for b in self._ram})),
            minor=self.parameters.x_postcopy_minor_faults,
            kvm=False,  # the machine exists already; the migration needs only userfaultfd
        )
        if not report.postcopy_possible:
            raise IncomingError("postcopy is not possible on the destination: " + report.summary())
        self._swap_ram = can_swap_ram(self._ram)
        # Empty all RAM, so every page the source never sends stays missing (a hole punched
        # in memory with a file behind it, QEMU's ram_block_discard_range). With RAM swap,
        # LISTEN moves every page aside and `received` alone says which are missing, so RAM
        # that is all zeros needs no emptying: preallocated, it stays populated, and the
        # precopy round and the push land on memory the host has already backed (4 GiB
        # memtouch: bulk round 0.33 -> 1.9 GB/s here, where first touch is slow).
        keep = self._swap_ram and self._ram_zero
        for block in self._ram:
            # no MADV_HUGEPAGE: with THP defrag "madvise", huge page faults stall on
            # compaction here and made the precopy receive erratic (0.3-1.2 GB/s)
            if not keep:
                block.discard(0, block.pages)
        check_huge_page_pool(self._ram)
        for received in self.received:
            # in place: the prefaulter (and later the placer, the fault thread and the
            # swap) hold these same arrays; a new list would leave them a stale one
            received[:] = False
        minor = self.parameters.x_postcopy_minor_faults and self._shared is None  # keptcache.py
        self._kept = KeptCache(self._ram, enabled=minor and not self._swap_ram)
        self._trace("advise", swap_ram=self._swap_ram, ram_kept=keep)

    def _huge_pages_off(self) -> None:
        """Before any discard: a huge page must not be half emptied, nor khugepaged refill
        a hole with zeros behind our back (postcopy_ram_prepare_discard in the seed)."""
        if not self._thp_off:
            for block in self._ram:
                if block.memory_type == "anonymous":
                    block.mapping.madvise(Advice.NOHUGEPAGE)
            self._thp_off = True

    def _discard(self, discard: Discard) -> None:
        block = self._ram[discard.block]
        if self._kept.stale[discard.block] is not None:
            self._stop_prefaulting()  # it would map a stale page again (keptcache.py)
        for first, count in discard.ranges:
            self.received[discard.block][first : first + count] = False
            if not self._swap_ram and not self._kept.discard(discard.block, first, count):
                # in place: the page must really be emptied, so that it faults (the seed's
                # way); a hole punched in shared memory (ram.backend.discard_range)
                self._huge_pages_off()
                block.discard(first, count)

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
        minor = self.parameters.x_postcopy_minor_faults
        features = Feature.THREAD_ID | features_for(self._ram, minor=minor)
        if self._swap_ram:
            features |= Feature.MOVE
        uffd = UserfaultFd.open(features)
        if self._swap_ram:
            self._swap = RamSwap(self._ram, self.received, uffd, self._trace)
        # khugepaged must not collapse a range with missing pages into a huge page
        self._huge_pages_off()
        try:
            for index, block in enumerate(self._ram):
                received, stale = self.received[index], self._kept.stale[index]
                placement = placement_for(block, uffd, received, minor=minor, stale=stale)
                self._placements.append(placement)
                if self._swap_ram:
                    register_for_swap(uffd, block)
                else:
                    placement.register()
        except (BackendUnsupported, OSError) as error:
            uffd.close()
            raise IncomingError(str(error)) from None
        self.uffd = uffd
        self.placer = PagePlacer(
            uffd,
            self._ram,
            self.received,
            self.latency,
            self.blocktime,
            self._placements,
            self._shared,
            hops=self.hops,
        )
        self.faults = FaultThread(
            uffd,
            self.machine.ram,
            self.received,
            self.return_writer,
            latency=self.latency,
            blocktime=self.blocktime,
            swap=self._swap,
            clock=self._clock,
            placements=self._placements,
            shared=self._shared,
            hops=self.hops,
        )
        self.faults.start()
        if self._swap is not None:
            self._swap.start_mover()
            # pushed runs land in the side mappings: populate them ahead of the receiver
            # where no stale page is (postcopy from the start: everywhere); see prefault.py
            self._prefaulter = Prefaulter(
                self._ram,
                self.received,
                nice=self.parameters.x_migration_thread_nice,
                targets=self._swap.sides(),
            )
        self._trace("listen", placement=[p.name for p in self._placements])

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
        if self.faults is not None:
            self.faults.set_vcpu_threads(self.machine.vcpu_thread_ids())
        # from here on a broken link pauses (recovery.py) instead of failing
        assert self.listener is not None and self.main is not None
        self.recovery = DestinationRecovery(self, self.listener, self.main.session)
        if self.faults is not None:
            self.faults.on_send_failed = self.link_failed
        self.status.move(MigrationStatus.POSTCOPY_ACTIVE)
        self._resume_as_on_the_source()
        self.blocktime.watch_vcpus(self.machine.vcpu_thread_ids() if self.machine.running else [])
        if self._swap is not None:
            self._swap.guest_started()
        assert self._reader is not None
        connections = [c for c in (self.main, self.preempt_connection) if c is not None]
        self.recovery.start(connections, self._reader)
        self._trace("run")

    def _resume_as_on_the_source(self) -> None:
        """Start the guest if it ran on the source and -S was not given (globalstate.py);
        a guest stopped on the source stays stopped here until `cont`."""
        assert self._device_state is not None
        try:
            runstate = globalstate.target_runstate(self._device_state)
        except globalstate.GlobalStateError as error:
            raise IncomingError(str(error)) from None
        self._trace("runstate", source=runstate, autostart=self.autostart)
        if globalstate.starts_guest(runstate, self.autostart):
            self.machine.cont()

    def link_failed(self, error: BaseException, generation: int) -> None:
        if self.recovery is not None:
            self.recovery.link_failed(failures.link_error(error, "source"), generation)

    def all_received(self) -> bool:
        # read by the receiver (and preempt) while the receivers set bits: a bit is set
        # only after its page is placed, and after LISTEN never cleared
        return all(bool(r.all()) for r in self.received)

    def _complete_precopy(self) -> None:
        if self._device_state is None:
            raise IncomingError("precopy completed without device state")
        self._stop_prefaulting()
        self.machine.load_state(self._device_state)
        self._resume_as_on_the_source()
        assert self.return_writer is not None
        self.return_writer.send(Shut(error=False))
        if self._shared is not None:
            self._shared.end()
        self.status.move(MigrationStatus.COMPLETED)
        self._trace("completed")

    def _complete_postcopy(self, generation: int) -> None:
        recovery = self.recovery
        assert recovery is not None
        recovery.stream_complete = True  # no more frames: the main stream's silence is normal
        # with a preempt channel the last requested pages may still be on their way
        deadline = self._clock() + 30.0
        while not self.all_received():
            recovery.check(generation)  # a link that breaks now: pause, and wait for them
            if self._clock() > deadline:
                missing = sum(int((~r).sum()) for r in self.received)
                raise IncomingError(f"postcopy completed with {missing} pages never received")
            time.sleep(0.001)
        while self._swap is not None and not self._swap.wait_moved(0.1):
            recovery.check(generation)
            if self._clock() > deadline + 30.0:
                raise IncomingError("valid precopy pages were still being moved after 30 s")
        self.blocktime.all_placed()
        recovery.stop()  # from here no pause: the last steps are local, and SHUT
        self._stop_fault_thread()
        self._release_uffd()
        if self._shared is not None:
            self._shared.end()  # the sharing processes' ranges go too: every page is here
        self._stop_prefaulting()  # it populates the side mappings
        if self._swap is not None:
            self._swap.free_side_mappings()
        for block in self._ram:
            if block.memory_type == "anonymous":
                block.mapping.madvise(Advice.HUGEPAGE)
        self._thp_off = False
        assert self.return_writer is not None
        self.return_writer.send(Shut(error=False))
        self.status.move(MigrationStatus.COMPLETED)
        self._trace("completed")

    def _stop_fault_thread(self) -> None:
        if self._swap is not None:
            self._swap.stop()
        if self.faults is not None:
            self.faults.stop()

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
