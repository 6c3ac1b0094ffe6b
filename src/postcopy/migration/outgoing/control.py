"""The source's control: `OutgoingMigration` and the migration thread.

Owns the outgoing migration's state and the `migration` thread (QEMU's migration.c
migration_thread), which sends everything on the main channel: setup (connect, handshake,
ADVISE, the preempt channel), the bulk round and the dirty rounds, then either the precopy
completion (stop, last dirty pages, device state) or the postcopy switchover (stop,
DISCARD, LISTEN, PACKAGE(device state, RUN)) followed by the background push, which the
page service runs (pageservice.py). Sending a run and its accounting is sender.py; the
destination's messages are read by the return path (returnpath.py). Once the package has
left, a broken link pauses the migration and recovery.py reconnects and resumes it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from postcopy.migration import failures, globalstate
from postcopy.migration.base import EventSink, MigrationBase
from postcopy.migration.channel import BufferedStreamReader, StreamWriter
from postcopy.migration.discard import page_runs, stale_runs
from postcopy.migration.hops import HopLog
from postcopy.migration.machine import Machine
from postcopy.migration.outgoing.errors import Cancelled, MigrationError
from postcopy.migration.outgoing.pageservice import PageService
from postcopy.migration.outgoing.recovery import DestinationNeverRan, SourceRecovery
from postcopy.migration.outgoing.returnpath import ReturnPath
from postcopy.migration.outgoing.sender import RamSender, run_pages_for, runs_ahead
from postcopy.migration.parameters import Capabilities, Parameters
from postcopy.migration.recovery import HEARTBEAT_PING, watch_link
from postcopy.migration.scheduling import set_thread_nice, urgent_for_a_moment
from postcopy.migration.stats import Clock
from postcopy.migration.status import (
    CANCELLABLE,
    FINISHED,
    PAUSED_OR_RECOVERING,
    POSTCOPY,
    MigrationStatus,
)
from postcopy.ram import Bitmap, runs, split_runs
from postcopy.transport import AuthConfig, Connection, TlsClientConfig, connect, new_session
from postcopy.wire import (
    Advise,
    BlockInfo,
    DeviceState,
    Direction,
    EndOfRound,
    Handshake,
    Listen,
    Package,
    Ping,
    PrecopyComplete,
    Run,
    StreamContext,
)

log = logging.getLogger(__name__)

# how a round ended (_send_round)
ROUND_SENT, ROUND_SYNCED, ROUND_POSTCOPY, ROUND_CONVERGED = (
    "sent",
    "synced",
    "postcopy",
    "converged",
)
# longest the guest may take to finish the requests it holds before the stop (quiesce)
QUIESCE_SECONDS = 0.05
SETUP_PING = 1
RUN_PING = 2
# before the postcopy switchover stops the guest: at most this many reads of the dirty log
# whose stale pages are discarded while it runs, until one finds at most ENOUGH pages
# (random single pages: ~1 ms of DISCARD frames to read and apply on the destination)
STALE_HARVESTS = 3
STALE_HARVEST_ENOUGH = 256


class OutgoingMigration(MigrationBase):
    """One outgoing migration of `machine` to `uri`; start() runs it on its own thread."""

    def __init__(
        self,
        machine: Machine,
        uri: str,
        *,
        parameters: Parameters,
        capabilities: Capabilities,
        on_event: EventSink | None = None,
        auth: AuthConfig | None = None,
        tls: TlsClientConfig | None = None,
        guest: str = "",
        on_completed: Callable[[], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(capabilities, on_event, clock)
        # called just before the status says completed (the VM's postmigrate run state):
        # whoever sees "completed" sees the VM's new state too
        self._on_completed = on_completed
        self.machine = machine
        self.uri = uri
        self.guest = guest  # what runs in the VM, named in the Handshake ("" = not known)
        self.parameters = parameters
        self.auth = auth
        self.tls = tls
        self._sender = RamSender(machine.ram, parameters, clock, self._should_stop_waiting)
        self.counters = self._sender.counters
        self.hops = HopLog(clock)  # the requests' hops, for x-request-hops
        self._pages = PageService(machine.ram, self._sender, self.hops)
        self._return_path = ReturnPath(
            machine.ram, self.status, self.counters, self._pages.request, clock
        )
        self.rounds = 0
        self.setup_time = 0.0
        self.downtime: float | None = None
        self.downtime_to_run: float | None = None
        self.postcopy_start: float | None = None
        self._cancel = threading.Event()
        self._postcopy_requested = threading.Event()
        self._ping_value = RUN_PING
        self.needed_at_switchover = 0
        self.discarded_pages = 0
        self.stop_time = 0.0
        self._main: Connection | None = None
        self._preempt: Connection | None = None
        self._thread: threading.Thread | None = None
        self._stopped_vm = False  # the migration stopped a running guest
        self._runstate = globalstate.RUNNING  # what the guest was before the migration stopped it
        self.session = new_session()  # the migration id: every connection of it carries it
        self.recovery = SourceRecovery(self)
        self._return_path.on_broken = self._return_path_broken
        self._return_path.on_recovery = self.recovery.recovery_message
        self._return_path.on_pong = self._pages.pong

    # -- for recovery.py -------------------------------------------------------------------

    @property
    def return_path(self) -> ReturnPath:
        return self._return_path

    @property
    def page_service(self) -> PageService:
        return self._pages

    @property
    def sender(self) -> RamSender:
        return self._sender

    @property
    def run_confirmed(self) -> bool:
        """The destination answered the PING sent after RUN: it runs the guest."""
        return self._return_path.has_pong(RUN_PING)

    def set_connections(self, main: Connection, preempt: Connection | None) -> None:
        self._main, self._preempt = main, preempt

    def _return_path_broken(self, error: BaseException, generation: int) -> bool:
        if not self.recovery.package_sent:
            return False  # before the switchover: the migration fails (the guest runs here)
        self.recovery.link_failed(failures.link_error(error), generation)
        return True

    # -- control (any thread) --------------------------------------------------------------

    def start(self) -> None:
        self.start_time = self._clock()
        self.status.move(MigrationStatus.SETUP)
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        if self.status.move_if(CANCELLABLE, MigrationStatus.CANCELLING):
            self._cancel.set()  # only now: a cancel that lost to the switchover is no cancel
            for connection in (self._main, self._preempt):
                if connection is not None:
                    connection.shutdown()

    def start_postcopy(self) -> None:
        if not self.capabilities["postcopy-ram"]:
            raise MigrationError(
                "Enable postcopy with migrate_set_capability before the start of migration"
            )
        if self.status.value not in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            raise MigrationError(
                "Postcopy must be started after migration has been started "
                f"(status {self.status.value.value})"
            )
        self._postcopy_requested.set()
        self._sender.interrupt_wait()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def termination_notice(self) -> str | None:
        """What ending this process now would do to the guest, or None if nothing: in
        postcopy the guest runs on the destination and the pages not yet sent exist only
        here (the source's RAM is the one copy a recovery could resume from, too)."""
        if self.status.value not in POSTCOPY:
            return None
        remaining = self.counters.remaining
        return failures.source_terminated_in_postcopy(
            remaining // self.counters.page_size, remaining
        )

    def query(self) -> dict[str, Any]:
        status = self.status.value
        info: dict[str, Any] = {"status": status.value}
        if status == MigrationStatus.NONE:
            return info
        now = self.end_time if self.end_time is not None else self._clock()
        elapsed = now - self.start_time
        info["total-time"] = int(elapsed * 1000)
        info["setup-time"] = int(self.setup_time * 1000)
        if self.downtime is not None:
            info["downtime"] = int(self.downtime * 1000)
            info["x-downtime-us"] = round(self.downtime * 1e6, 1)
        if self.downtime_to_run is not None:
            info["x-downtime-to-run-us"] = round(self.downtime_to_run * 1e6, 1)
        if self.recovery.package_sent:
            info.update(self.recovery.query())
        if self.postcopy_start is not None:
            info["x-postcopy"] = {
                "discarded-pages": self.discarded_pages,
                "needed-pages": self.needed_at_switchover,
                "pushed-pages": self.counters.pages_pushed,
                "requested-pages": self.counters.pages_requested,
                "resent-pages": self.counters.pages_resent,
            }
        if not self.finished:
            # QEMU's populate_time_info: until completion, in postcopy too
            info["expected-downtime"] = self._sender.accounting.expected_downtime_ms
        info["ram"] = self.counters.as_qmp()
        info["ram"]["x-pages-not-read"] = self._sender.pages_not_read
        info["x-rounds"] = self.rounds
        if self.error:
            info["error-desc"] = self.error
        return info

    # -- the migration thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._migrate()
        except Exception as error:
            self._fail(error)
        finally:
            if self.end_time is None:
                self.end_time = self._clock()
            self._sender.close()
            for connection in (self._preempt, self._main):
                if connection is not None:
                    connection.close()

    def _fail(self, error: BaseException) -> None:
        cancelled = isinstance(error, Cancelled) or self._cancel.is_set()
        if isinstance(error, OSError) and not cancelled:
            # a destination that refuses closes the connection after saying why; that
            # reason, not our broken pipe, is what the user needs; without one, what the
            # return path saw (a reset, an end) names the cause better than a send's EPIPE
            said = self._return_path.wait_failure_for(1.0)
            error = MigrationError(said or failures.link_error(error))
        self.error = None if cancelled else str(error) or type(error).__name__
        status = self.status.value
        # the destination may run the guest: our RAM is its only complete copy
        ran_there = (
            status == MigrationStatus.POSTCOPY_ACTIVE
            and self.recovery.package_sent
            and not isinstance(error, DestinationNeverRan)
        )
        if self.error and ran_there:
            self.error += "; " + failures.destination_lost_in_postcopy()
        if not cancelled:
            log.error("migration failed: %s", self.error)
        if status in PAUSED_OR_RECOVERING:
            # never failed: our RAM holds pages the destination lacks (a bug got here)
            log.error("postcopy stays paused after an internal error: %s", self.error)
            return
        if status == MigrationStatus.POSTCOPY_ACTIVE:
            self.status.move(MigrationStatus.FAILED)
            if ran_there:
                return  # keep the VM stopped and every page
            # the destination never ran the guest: it goes on here, as after any failure
            self.postcopy_start = None
            status = MigrationStatus.FAILED
        if self._stopped_vm:
            self.machine.cont()
            self._stopped_vm = False
        if status == MigrationStatus.CANCELLING or (cancelled and status not in FINISHED):
            if status != MigrationStatus.CANCELLING:
                self.status.move(MigrationStatus.CANCELLING)
            self.status.move(MigrationStatus.CANCELLED)
        elif status not in FINISHED:
            self.status.move(MigrationStatus.FAILED)
        try:
            self.machine.stop_dirty_log()
        except Exception:
            log.exception("stopping dirty logging")

    def _should_stop_waiting(self) -> bool:
        return self._cancel.is_set() or self._return_path.failure() is not None

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")
        failure = self._return_path.failure()
        if failure is not None:
            raise MigrationError(failure)

    def _migrate(self) -> None:
        set_thread_nice(self.parameters.x_migration_thread_nice)
        ram = self.machine.ram
        postcopy = self.capabilities["postcopy-ram"]
        preempt = postcopy and self.capabilities["postcopy-preempt"]
        session = self.session
        self._main = connect(
            self.uri, auth=self.auth, tls=self.tls, channel="main", session=session
        )
        watch_link(self._main, self.parameters)
        main = StreamWriter(self._main, Direction.MAIN)
        blocks = tuple(BlockInfo(b.name, b.length, b.page_size, b.backend) for b in ram)
        # the return path reads from the start: a destination that refuses our configuration
        # says why and closes, and a send after that fails with EPIPE; its reason must have
        # been read by then, or the user is told only that the pipe broke
        reader = BufferedStreamReader(
            self._main, Direction.RETURN, StreamContext(Direction.RETURN, blocks=blocks)
        )
        self._return_path.start(reader)
        main.send_stream_header()
        main.send(
            Handshake(
                capabilities=self.capabilities.names(),
                blocks=blocks,
                vcpus=self.machine.vcpu_count,
                guest=self.guest,
            )
        )
        if postcopy:
            summary = 0
            for block in ram:
                summary |= block.page_size
            main.send(Advise(page_size_summary=summary, target_page_size=4096))
        if self.parameters.x_heartbeat_interval_ms:
            # the destination takes silence for a dead link only from a source that says it
            # sends heartbeats: this one says so before anything can go silent
            main.send(Ping(HEARTBEAT_PING))
        main.send(Ping(SETUP_PING))
        self._wait_pong(SETUP_PING)  # the destination accepted the configuration (and ADVISE)
        if preempt:
            self._preempt = connect(
                self.uri, auth=self.auth, tls=self.tls, channel="preempt", session=session
            )
            watch_link(self._preempt, self.parameters)
            urgent = StreamWriter(self._preempt, Direction.MAIN)
            urgent.send_stream_header()
            # the urgent channel is a stream of its own: it declares the same configuration
            urgent.send(
                Handshake(
                    capabilities=self.capabilities.names(),
                    blocks=blocks,
                    vcpus=self.machine.vcpu_count,
                    guest=self.guest,
                )
            )
            self._pages.set_urgent_channel(urgent)
        sent = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
        dirty = [np.ones(block.pages, dtype=np.bool_) for block in ram]
        self.machine.start_dirty_log()
        # QEMU syncs once in setup (ram_init_bitmaps): every page is pending already, but
        # the sync counts, so dirty-sync-count is 1 during the first pass and a management
        # tool waiting for 2 switches right after it (accounting.py)
        for pending, found in zip(dirty, self._sync_dirty(), strict=True):
            pending |= found
        self._count_sync(0, self._pending_bytes(dirty))
        self.setup_time = self._clock() - self.start_time
        self.status.move(MigrationStatus.ACTIVE)
        self._sender.restart_throttle()
        self._sender.accounting.start()
        previous_remaining: int | None = None
        while True:
            self._check_cancel()
            if self._should_switch_to_postcopy(previous_remaining):
                self._postcopy(main, sent, dirty)
                return
            self.rounds += 1
            self._trace("round-start", round=self.rounds, transferred=self.counters.transferred)
            self.counters.remaining = sum(
                int(np.count_nonzero(d)) * b.page_size for d, b in zip(dirty, ram, strict=True)
            )
            later = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
            outcome = self._send_round(main, sent, dirty, later)
            if outcome != ROUND_SENT and outcome != ROUND_SYNCED:
                both = [d | lt for d, lt in zip(dirty, later, strict=True)]
                if outcome == ROUND_POSTCOPY:
                    self._postcopy(main, sent, both)
                else:
                    self._complete_precopy(main, both)
                return
            main.send(EndOfRound(self.rounds))
            if outcome == ROUND_SENT:  # no sync during the round: one now
                at_end = self._sync_dirty()
                newly = sum(
                    int(np.count_nonzero(f & ~lt)) for f, lt in zip(at_end, later, strict=True)
                )
                for later_pages, found_now in zip(later, at_end, strict=True):
                    later_pages |= found_now
                self._count_sync(newly, self._pending_bytes(later))
            dirty[:] = later
            remaining = self._pending_bytes(dirty)
            self.counters.remaining = remaining
            bandwidth = max(self._sender.bandwidth(), 1.0)
            self._trace(
                "round-end",
                round=self.rounds,
                remaining=remaining,
                bandwidth=round(bandwidth),
                transferred=self.counters.transferred,
            )
            if self._should_switch_to_postcopy(previous_remaining, remaining):
                self._postcopy(main, sent, dirty)
                return
            max_rounds = self.parameters.x_max_rounds
            # QEMU's test (migration_iteration_run): pending below bandwidth x downtime-limit;
            # after a sync within the round, the next round's first run makes it
            converged = (
                outcome == ROUND_SENT
                and remaining / bandwidth * 1000 <= self.parameters.downtime_limit
            )
            if converged or (max_rounds and self.rounds >= max_rounds and not postcopy):
                self._complete_precopy(main, dirty)
                return
            previous_remaining = remaining

    def _should_switch_to_postcopy(
        self, previous: int | None, remaining: int | None = None
    ) -> bool:
        if not self.capabilities["postcopy-ram"]:
            return False
        if self._postcopy_requested.is_set():
            return True
        after = self.parameters.x_postcopy_after_rounds
        if after >= 0 and self.rounds >= after:
            return True
        return bool(
            self.parameters.x_postcopy_when_stalled
            and remaining is not None
            and previous is not None
            and remaining >= previous * 0.95
        )

    def _sync_dirty(self, *, final: bool = False) -> list[Bitmap]:
        """The pages the guest wrote since the last sync (KVM's dirty log)."""
        # the final sync happens with the guest stopped: nothing to protect again
        by_name = self.machine.sync_dirty_log(rearm=not final)
        self._sender.forget_zero_pages()  # what was found of pending pages may be stale now
        return [by_name[block.name] for block in self.machine.ram]

    def _pending_bytes(self, pending: list[Bitmap]) -> int:
        ram = self.machine.ram
        return sum(
            int(np.count_nonzero(p)) * b.page_size for p, b in zip(pending, ram, strict=True)
        )

    def _count_sync(self, newly_dirty: int, pending_bytes: int) -> None:
        """Account a sync as QEMU does (migration_bitmap_sync): `newly_dirty` pages found
        that were not pending yet, `pending_bytes` to send now; MIGRATION_PASS."""
        self._emit_pass(self._sender.accounting.sync(newly_dirty, pending_bytes))

    def _emit_pass(self, number: int) -> None:
        if self.capabilities["events"]:
            self._emit("MIGRATION_PASS", {"pass": number})

    def _send_round(
        self, writer: StreamWriter, sent: list[Bitmap], dirty: list[Bitmap], later: list[Bitmap]
    ) -> str:
        """Send every page of `dirty` (cleared as they go). As QEMU does (ram_save_pending),
        the dirty log is synced as soon as what is left of the round would cross in
        downtime-limit at the current bandwidth, not at its very end: what the sync finds
        goes to `later` (the next round), MIGRATION_PASS tells a management tool that the
        pass is as good as over, and the tool's migrate-start-postcopy still comes before
        the next pass. If everything pending then fits in downtime-limit, precopy can
        complete (QEMU's migration_iteration_run). Returns ROUND_SENT (no sync), ROUND_SYNCED,
        ROUND_POSTCOPY (postcopy was asked for) or ROUND_CONVERGED."""
        ram = self.machine.ram
        rest = total = self._pending_bytes(dirty)
        synced, send = False, self._sender.send_pages
        for index, block in enumerate(ram):
            run_pages = run_pages_for(block, self.parameters.x_precopy_run_pages)
            for start, length, ahead in runs_ahead(dirty[index], run_pages):
                if not synced and rest < self._threshold_bytes():
                    synced = True
                    if self._sync_within_round(dirty, later, started=rest < total):
                        return ROUND_CONVERGED
                self._sender.wait_for_bandwidth("precopy")
                self._check_cancel()
                if self._postcopy_requested.is_set():
                    return ROUND_POSTCOPY
                send(writer, index, block, start, length, phase="precopy", ahead=ahead)
                sent[index][start : start + length] = True
                dirty[index][start : start + length] = False
                rest -= length * block.page_size
        return ROUND_SYNCED if synced else ROUND_SENT

    def _threshold_bytes(self) -> float:
        """QEMU's threshold_size: what the link carries in downtime-limit at the bandwidth
        of the last window; 0 until a window has been measured (no sync before that)."""
        return self._sender.accounting.bandwidth * self.parameters.downtime_limit / 1000

    def _sync_within_round(self, dirty: list[Bitmap], later: list[Bitmap], started: bool) -> bool:
        """Sync while `dirty` still holds the round's unsent pages: found pages not among
        them go to `later`. True if precopy may complete now: all pending fits in
        downtime-limit, and postcopy is not on the way.

        With postcopy-ram, precopy completes only from a sync before the round `started`
        sending: the tool that asked for postcopy-ram switches on this sync's
        MIGRATION_PASS, and the rest of the round is its time to do so. QEMU completes
        from here too if it can, so that a guest that dirtied little behind the pass (or
        ahead of it: those pages count once) beat the tool's request and completed with
        all that rest in its downtime (1 GiB memtouch: 360 ms, no postcopy)."""
        found = self._sync_dirty()
        newly = 0
        for pending_now, pending_later, found_now in zip(dirty, later, found, strict=True):
            fresh = found_now & ~pending_now
            newly += int(np.count_nonzero(fresh & ~pending_later))
            pending_later |= fresh
        pending = self._pending_bytes(dirty) + self._pending_bytes(later)
        self._count_sync(newly, pending)
        self._trace(
            "round-sync",
            round=self.rounds,
            pending=pending,
            transferred=self.counters.transferred,
        )
        if self.capabilities["postcopy-ram"]:
            after = self.parameters.x_postcopy_after_rounds
            if started or (after >= 0 and self.rounds >= after):  # or our switch is due
                return False
        return pending < self._threshold_bytes()

    def _drain(self, writer: StreamWriter) -> None:
        """Wait until the destination has consumed everything sent so far (a Ping's Pong).

        Socket buffers hold megabytes that a busy destination needs a while to place; the
        guest should keep running during that time, not wait stopped."""
        self._ping_value += 1
        writer.send(Ping(self._ping_value))
        self._wait_pong(self._ping_value)
        self._trace("drained")

    def _stop_vm(self) -> float:
        """Stop the guest for the switchover, remembering its run state (QEMU's
        global_state_store): it travels with the device state, and only a guest that
        ran before is resumed here if the migration fails."""
        # the guest finishes the requests it holds here, where all its memory is, before
        # the clock of the downtime starts (postcopy.vm.requestdev; ~1 ms)
        self.machine.quiesce_devices(QUIESCE_SECONDS)
        self.stop_time = self._clock()
        self._stopped_vm = self.machine.running
        self._runstate = globalstate.RUNNING if self._stopped_vm else "paused"
        self.machine.stop()
        return self.stop_time

    def _device_state(self) -> DeviceState:
        state = globalstate.attach(self.machine.save_state(), self._runstate)
        return DeviceState(json.dumps(state).encode())

    def _complete_precopy(self, writer: StreamWriter, pending: list[Bitmap]) -> None:
        """Stop, then send what the last round left dirty plus what was dirtied since."""
        self._drain(writer)
        self.status.move(MigrationStatus.DEVICE)
        with urgent_for_a_moment():  # the guest waits for this thread: the downtime
            stop_time = self._stop_vm()
            self._trace("stop", phase="precopy")
            final = self._sync_dirty(final=True)
            newly = sum(int(np.count_nonzero(f & ~p)) for p, f in zip(pending, final, strict=True))
            dirty = [p | f for p, f in zip(pending, final, strict=True)]
            self._count_sync(newly, self._pending_bytes(dirty))
            for index, block in enumerate(self.machine.ram):
                run_pages = run_pages_for(block, self.parameters.x_precopy_run_pages)
                starts, lengths = split_runs(*runs(dirty[index]), run_pages)
                for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                    self._sender.send_pages(writer, index, block, start, length, phase="downtime")
            self.counters.remaining = 0
            writer.send(self._device_state())
            if not self.status.refuse_cancel():  # past this the destination may run the guest
                raise Cancelled("migration cancelled")
            writer.send(PrecopyComplete())
        shut = self._return_path.wait_shut(self._cancel.is_set, lambda: None)  # never postcopy
        if shut.error:
            raise MigrationError(f"destination failed to load the VM: {shut.reason}")
        self.downtime = self.downtime_to_run = self._clock() - stop_time
        self._trace("destination-running")
        self.machine.stop_dirty_log()
        self._complete()

    def _complete(self) -> None:
        self._sender.accounting.complete(self._clock() - self.start_time, self.setup_time)
        self._sender.close()
        if self._on_completed is not None:
            self._on_completed()
        self.status.move(MigrationStatus.COMPLETED)

    # -- postcopy ------------------------------------------------------------------------------

    def _postcopy(self, writer: StreamWriter, sent: list[Bitmap], dirty: list[Bitmap]) -> None:
        """Switch over: stale pages discarded, LISTEN, PACKAGE(state, RUN), then the push.

        What the guest dirtied before the last sync is already stale, so it is discarded
        while the guest still runs, and whole-RAM bitmap work happens then too; inside the
        downtime only the final sync's pages are handled, so it does not grow with RAM."""
        ram = self.machine.ram
        discarded = 0
        for index in range(len(ram)):
            discarded += writer.send_discards(index, *stale_runs(sent[index], dirty[index]))
        needed = [~sent[i] | dirty[i] for i in range(len(ram))]
        # counted now, while the guest runs, and in the downtime only what the final sync
        # adds: once the page service has `needed`, requests clear it as they are served
        needed_pages = [int(np.count_nonzero(n)) for n in needed]
        self._drain(writer)
        harvested = 0
        for _ in range(STALE_HARVESTS):
            found = self._harvest_stale(writer, needed, needed_pages)
            discarded += found
            harvested += found
            self._drain(writer)  # the destination applied them before the guest stops
            if found <= STALE_HARVEST_ENOUGH:
                break
        self.status.move(MigrationStatus.POSTCOPY_ACTIVE)
        with urgent_for_a_moment():  # the guest waits for this thread till the package is sent
            stop_time = self._stop_vm()
            self.postcopy_start = stop_time
            self._trace("stop", phase="postcopy")
            final = self._sync_dirty(final=True)
            self._trace("final-sync")
            newly_dirty = harvested
            in_downtime = 0
            for index in range(len(ram)):
                newly_stale = np.flatnonzero(final[index] & ~needed[index])
                newly_dirty += newly_stale.size
                in_downtime += writer.send_discards(index, *page_runs(newly_stale))
                needed[index] |= final[index]
                needed_pages[index] += newly_stale.size
            discarded += in_downtime
            self.needed_at_switchover = sum(needed_pages)
            self.discarded_pages = discarded
            # the final sync counts as QEMU's does (ram_postcopy_send_discard_bitmap syncs); it
            # sets `remaining`, which must happen before the return path can serve requests
            sync_number = self._sender.accounting.sync(
                newly_dirty,
                sum(count * b.page_size for count, b in zip(needed_pages, ram, strict=True)),
            )
            # from here on the return path may serve requests (and count them) concurrently
            self._pages.set_needed(needed)
            self._trace("discards-sent", pages=in_downtime)
            writer.send(Listen())
            writer.send(Package((self._device_state(), Run())))
            # from here the destination may run the guest: a broken link pauses, never fails
            self.recovery.package_on_its_way(writer, [c for c in (self._main, self._preempt) if c])
            # QEMU's downtime ends with the package sent; until the guest runs: the Pong's
            self.downtime = self._clock() - stop_time
        self._trace("package-sent", discarded=discarded, needed=self.needed_at_switchover)
        self._emit_pass(sync_number)  # outside the downtime
        self._sender.restart_throttle()
        self.recovery.finish_postcopy(writer, RUN_PING, self._check_cancel)
        if self.run_confirmed:
            self.downtime_to_run = self._return_path.pong_time(RUN_PING) - stop_time
        self._complete()
        self.machine.stop_dirty_log()  # last: 30-55 ms that held back the push's first requests

    def _harvest_stale(
        self, writer: StreamWriter, needed: list[Bitmap], needed_pages: list[int]
    ) -> int:
        """While the guest still runs: read the dirty log and discard the pages written
        since they were sent, so that the final sync (in the downtime) finds only what the
        guest wrote after this. Returns the pages discarded: the newly dirty ones (a page
        not sent yet was needed already).

        QEMU discards its whole bitmap inside the downtime (postcopy_start stops the VM,
        then ram_postcopy_send_discard_bitmap); a guest writing random pages makes one
        range per page, and thousands crossed in the downtime (randwrite: 5 -> 38 ms). Not
        counted as a sync of its own: the switchover's sync counts once, with the final one,
        so dirty-sync-count and MIGRATION_PASS say what QEMU's say."""
        found = self._sync_dirty()
        discarded = 0
        for index, pages in enumerate(found):
            newly_stale = np.flatnonzero(pages & ~needed[index])
            discarded += writer.send_discards(index, *page_runs(newly_stale))
            needed[index] |= pages
            needed_pages[index] += newly_stale.size
        self._trace("stale-harvest", pages=discarded)
        return discarded

    def _wait_pong(self, value: int) -> None:
        self._return_path.wait_pong(value, self._check_cancel)
