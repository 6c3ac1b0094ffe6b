"""The source's half of postcopy recovery: pause on a broken link, reconnect, resume.

Owns `SourceRecovery` (QEMU's postcopy_pause / postcopy_do_resume on the source). From
the moment the PACKAGE that starts the guest on the destination has left, a failure of
any channel (a send on main or preempt, the return path, the heartbeat's silence) or
`migrate-pause` moves the migration to postcopy-paused, never to failed: the source keeps
its stopped VM and every page. Each connection belongs to a *generation*; a failure
reported for a generation that is already over (a thread of the old connection noticing
late) changes nothing.

While paused the migration thread waits in `recover()` for `migrate {resume: true}`
(QMP) or, with x-postcopy-auto-recover, for the next backoff delay; then:

  postcopy-recover-setup: connect (the transport authenticates again, same session id)
  postcopy-recover:       RESUME_REQUEST(migration id, epoch), RECV_BITMAP_REQUEST per
                          block; the return path collects RECV_BITMAPs; needed := not
                          received (pages in flight at the cut go again); the preempt
                          channel reconnects; POSTCOPY_RESUME; RESUME_ACK(epoch) moves
                          the return path thread to postcopy-active
  postcopy-active:        the push goes on; the destination re-sends its pending requests

Any failure on the way goes back to postcopy-paused (with an event), never further.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from postcopy.migration import failures
from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.migration.outgoing.errors import MigrationError
from postcopy.migration.recovery import (
    HEARTBEAT_PING,
    PAUSED_BY_USER,
    Backoff,
    Heartbeat,
    LinkBroken,
    RecoveryStats,
    watch_link,
)
from postcopy.migration.status import MigrationStatus
from postcopy.ram import Bitmap
from postcopy.transport import Connection, connect
from postcopy.wire import (
    BlockInfo,
    Direction,
    Handshake,
    Message,
    Ping,
    PostcopyComplete,
    PostcopyResume,
    RecvBitmap,
    RecvBitmapRequest,
    ResumeAck,
    ResumeRequest,
    StreamContext,
)

if TYPE_CHECKING:
    from postcopy.migration.outgoing.control import OutgoingMigration

log = logging.getLogger(__name__)

S = MigrationStatus
ALIVE = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER})  # migration_postcopy_is_alive
PAUSABLE = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER})


class DestinationNeverRan(MigrationError):
    """The destination gave up before it ran the guest (its SHUT says so): the source's
    copy is the only one and the guest resumes here."""


class SourceRecovery:
    """Pause and resume of one outgoing postcopy migration (see the module doc)."""

    def __init__(self, owner: OutgoingMigration) -> None:
        self._owner = owner
        self._status = owner.status
        self._parameters = owner.parameters
        self._clock = owner._clock
        self._trace = owner._trace
        self.stats = RecoveryStats(owner._clock, owner._trace)
        self._cond = threading.Condition()
        self.generation = 0
        self.epoch = 0
        self.package_sent = False
        self._resume_uri: str | None = None
        self._connections: list[Connection] = []
        self._main_writer: StreamWriter | None = None
        self._heartbeat: Heartbeat | None = None
        self._heartbeats = 0
        self._bitmaps: dict[int, Bitmap] = {}
        self._acked = False
        self._pause_requested: str | None = None

    # -- the migration thread ------------------------------------------------------------

    def package_on_its_way(self, writer: StreamWriter, connections: list[Connection]) -> None:
        """The PACKAGE (device state, RUN) has been handed to the kernel whole: from now on
        the destination may run the guest, and a broken link pauses instead of failing."""
        with self._cond:
            self.package_sent = True
            self._main_writer = writer
            self._connections = list(connections)
            paused_early, self._pause_requested = self._pause_requested, None
        if paused_early is not None:
            self.link_failed(paused_early, self.generation)

    def _start_heartbeat(self) -> None:
        """Started after the downtime is taken (a thread's start waits for it to run)."""
        parameters = self._parameters
        self._heartbeat = Heartbeat(
            "heartbeat",
            interval=parameters.x_heartbeat_interval_ms / 1000,
            timeout=parameters.x_heartbeat_timeout_ms / 1000,
            send=self._send_heartbeat,
            last_heard=lambda: self._owner.return_path.last_heard,
            on_silence=lambda seconds: self.link_failed(
                f"no message from the destination for {seconds:.1f} s "
                "(x-heartbeat-timeout-ms): the link is taken for dead",
                self.generation,
            ),
            active=lambda: self._status.value == S.POSTCOPY_ACTIVE,
            clock=self._clock,
        )
        self._heartbeat.start()

    def finished(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def handle_failure(self, error: BaseException, generation: int) -> StreamWriter | None:
        """The push or a wait of the migration thread failed on connection `generation`.

        Before the package left, and when the destination says it gave up before running
        the guest, the error goes on (the migration fails and the guest resumes here).
        Otherwise pause (if no other thread did already) and wait until a recovery
        succeeds; returns the new main channel's writer, or None if the destination had
        completed before the link broke."""
        if not self.package_sent:
            raise error
        return_path = self._owner.return_path
        if not isinstance(error, LinkBroken) and generation == 0:
            # a destination that gives up says so, then closes: its SHUT may still be on
            # its way to the return path thread when our send fails
            return_path.wait_ended(generation, 1.0)
        shut = return_path.shut
        if shut is not None and not shut.error:
            return None  # the destination completed; only our last words were lost
        if shut is not None and shut.error and generation == 0 and not self._owner.run_confirmed:
            raise DestinationNeverRan(f"destination gave up: {shut.reason}") from error
        self.link_failed(failures.link_error(error), generation)
        return self.recover()

    def finish_postcopy(
        self, writer: StreamWriter, run_ping: int, check_cancel: Callable[[], None]
    ) -> None:
        """The push to its end and the destination's SHUT, across any number of pauses:
        after each, the new main channel's writer comes back and the push goes on with
        what the destination still lacks."""
        owner = self._owner
        generation = 0
        self._start_heartbeat()
        try:
            while True:
                try:
                    if generation == 0:
                        writer.send(Ping(run_ping))
                    check = functools.partial(self._check_postcopy, check_cancel, generation)
                    owner.page_service.push(writer, check)
                    writer.send(PostcopyComplete())
                    owner._trace("push-done")
                    shut = owner.return_path.wait_shut(lambda: False, check)
                    if shut.error:
                        raise MigrationError(f"destination failed in postcopy: {shut.reason}")
                    return
                except Exception as error:
                    resumed = self.handle_failure(error, generation)
                    if resumed is None:
                        return  # the destination had completed
                    writer, generation = resumed, self.generation
        finally:
            self.finished()

    def _check_postcopy(self, check_cancel: Callable[[], None], generation: int) -> None:
        check_cancel()
        self.check(generation)

    def recover(self) -> StreamWriter:
        """Wait while paused; reconnect when asked (or by itself); return once active."""
        backoff = Backoff(
            self._parameters.x_recover_backoff_ms / 1000,
            self._parameters.x_recover_backoff_max_ms / 1000,
        )
        while True:
            uri = self._wait_for_resume(backoff)
            self.stats.attempts += 1
            generation = self.generation
            try:
                connection = self._connect(uri, "main")
            except Exception as error:
                # QEMU's migration_connect_set_error: back to paused, with an event
                reason = f"reconnecting to {uri} failed: {failures.link_error(error)}"
                log.error("%s", reason)
                with self._cond:
                    self._owner.error = reason
                    self._status.move_if(frozenset({S.POSTCOPY_RECOVER_SETUP}), S.POSTCOPY_PAUSED)
                continue
            with self._cond:
                if generation != self.generation or not self._status.move_if(
                    frozenset({S.POSTCOPY_RECOVER_SETUP}), S.POSTCOPY_RECOVER
                ):
                    connection.close()
                    continue
                self._connections = [connection]
            try:
                writer = self._handshake(connection, generation)
            except Exception as error:
                log.error("recovery handshake failed: %s", error)
                self.link_failed(f"recovery failed: {failures.link_error(error)}", generation)
                continue
            backoff.reset()
            return writer

    # -- QMP (any thread) ----------------------------------------------------------------

    def pause_by_user(self) -> None:
        if self._status.value not in ALIVE:
            raise MigrationError(
                "migrate-pause is currently only supported "
                "during postcopy-active or postcopy-recover state"
            )
        with self._cond:
            if not self.package_sent:
                # postcopy-active, but the switchover is still being sent: pause as soon
                # as it is out (before that, a failure fails and the guest runs here)
                self._pause_requested = PAUSED_BY_USER
                return
        self.link_failed(PAUSED_BY_USER, self.generation)

    def resume(self, uri: str) -> None:
        """`migrate {uri, resume: true}`: QEMU's migrate_prepare for a resume."""
        with self._cond:
            if self._status.value != S.POSTCOPY_PAUSED:
                raise MigrationError("Cannot resume if there is no paused migration")
            self._resume_uri = uri
            self._owner.uri = uri
            self._status.move(S.POSTCOPY_RECOVER_SETUP)
            self._cond.notify_all()

    # -- any thread ----------------------------------------------------------------------

    def link_failed(self, reason: str, generation: int) -> bool:
        """Pause, if connection `generation` is still the current one; True if it paused.

        Shuts every connection of that generation down, so each thread using one wakes up
        with an error and finds the generation over."""
        with self._cond:
            if (
                not self.package_sent
                or generation != self.generation
                or self._status.value not in PAUSABLE
            ):
                return False
            self.generation += 1
            connections, self._connections = self._connections, []
            self._main_writer = None
            self._acked = False
            self._owner.error = reason
            self.stats.paused(reason)
            self._owner.page_service.set_urgent_channel(None)
            self._status.move(S.POSTCOPY_PAUSED)
            self._cond.notify_all()
        log.error("Detected IO failure for postcopy. Migration paused: %s", reason)
        self._owner.sender.interrupt_wait()
        for connection in connections:
            connection.shutdown()
        return True

    def check(self, generation: int) -> None:
        """Raise LinkBroken if connection `generation` was given up."""
        if generation != self.generation:
            raise LinkBroken("the connection was given up (postcopy paused)")

    def recovery_message(self, message: Message, generation: int) -> None:
        """RECV_BITMAP or RESUME_ACK, from the return path thread of `generation`."""
        with self._cond:
            if generation != self.generation:
                raise LinkBroken("a recovery message on a connection given up")
            if self._status.value != S.POSTCOPY_RECOVER:
                raise MigrationError(
                    f"{type(message).__name__} from the destination outside a recovery"
                )
            if isinstance(message, RecvBitmap):
                if message.block in self._bitmaps:
                    raise MigrationError(f"a second RECV_BITMAP for block {message.block}")
                self._bitmaps[message.block] = message.bitmap
            elif isinstance(message, ResumeAck):
                if message.value != self.epoch:
                    raise MigrationError(
                        f"RESUME_ACK for epoch {message.value}, this is epoch {self.epoch}"
                    )
                if len(self._bitmaps) != len(self._owner.machine.ram):
                    raise MigrationError("RESUME_ACK before every RECV_BITMAP")
                self._acked = True
                # before the next message is read: REQ_PAGES follow, legal only when active
                self._status.move(S.POSTCOPY_ACTIVE)
                self._owner.error = None
            self._cond.notify_all()

    def query(self) -> dict[str, Any]:
        info = self.stats.as_qmp()
        info["x-recovery-attempts"] = self.stats.attempts
        info["x-recovery-resent-pages"] = self.stats.resent_pages
        return info

    # -- inside -------------------------------------------------------------------------

    def _wait_for_resume(self, backoff: Backoff) -> str:
        """Block while paused; returns the URI once the status is postcopy-recover-setup
        (set by `resume`, or here when an automatic attempt is due)."""
        with self._cond:
            while True:
                if self._status.value == S.POSTCOPY_RECOVER_SETUP:
                    uri = self._resume_uri or self._owner.uri
                    self._resume_uri = None
                    return uri
                if self._parameters.x_postcopy_auto_recover:
                    delay = backoff.next()
                    self._trace("recover-wait", seconds=delay)
                    self._cond.wait_for(
                        lambda: self._status.value != S.POSTCOPY_PAUSED, timeout=delay
                    )
                    if self._status.value == S.POSTCOPY_PAUSED:
                        self._status.move(S.POSTCOPY_RECOVER_SETUP)
                else:
                    self._cond.wait(1.0)

    def _connect(self, uri: str, channel: str) -> Connection:
        owner = self._owner
        connection = connect(
            uri, auth=owner.auth, tls=owner.tls, channel=channel, session=owner.session
        )
        watch_link(connection, self._parameters)
        return connection

    def _deadline_wait(self, done: Any, generation: int, what: str) -> None:
        timeout = self._parameters.x_recover_timeout_ms / 1000
        deadline = self._clock() + timeout
        with self._cond:
            while not done():
                self.check(generation)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} from the destination within {timeout:g} s")
                self._cond.wait(min(remaining, 0.1))

    def _handshake(self, connection: Connection, generation: int) -> StreamWriter:
        owner = self._owner
        ram = owner.machine.ram
        blocks = tuple(BlockInfo(b.name, b.length, b.page_size) for b in ram)
        with self._cond:
            self.epoch += 1
            epoch = self.epoch
            self._bitmaps = {}
            self._acked = False
        self._trace("recover-connect", epoch=epoch)
        writer = StreamWriter(connection, Direction.MAIN)
        writer.send_stream_header()
        writer.send(ResumeRequest(owner.session, epoch))
        for index in range(len(ram)):
            writer.send(RecvBitmapRequest(index))
        reader = StreamReader(
            connection, Direction.RETURN, StreamContext(Direction.RETURN, blocks=blocks)
        )
        owner.return_path.start(reader, generation)
        self._deadline_wait(lambda: len(self._bitmaps) == len(ram), generation, "RECV_BITMAP")
        received = [self._bitmaps[index] for index in range(len(ram))]
        resent = owner.page_service.rebuild(received)
        self.stats.resent_pages += resent
        self._trace(
            "bitmaps", missing=sum(int(np.count_nonzero(~r)) for r in received), resent=resent
        )
        writer.send(PostcopyResume())
        urgent: StreamWriter | None = None
        preempt: Connection | None = None
        if owner.capabilities["postcopy-preempt"]:
            # after the main channel's round trips, as QEMU 8.0 does (a preempt channel
            # that came first could be taken for the main one); the destination accepts
            # it once it has POSTCOPY_RESUME, and acknowledges the resume after that
            preempt = self._connect(owner.uri, "preempt")
            with self._cond:
                self.check(generation)
                self._connections.append(preempt)
            urgent = StreamWriter(preempt, Direction.MAIN)
            urgent.send_stream_header()
            urgent.send(Handshake(owner.capabilities.names(), blocks, owner.machine.vcpu_count))
        owner.set_connections(connection, preempt)
        with self._cond:
            self.check(generation)
            self._main_writer = writer
            if urgent is not None:
                owner.page_service.set_urgent_channel(urgent)
        self._deadline_wait(lambda: self._acked, generation, "RESUME_ACK")
        owner.return_path.last_heard = self._clock()
        self.stats.resumed(epoch)
        owner.sender.restart_throttle()
        log.info("postcopy resumed (epoch %d)", epoch)
        return writer

    def _send_heartbeat(self) -> None:
        writer = self._main_writer
        if writer is not None:
            self._heartbeats = (self._heartbeats + 1) & (HEARTBEAT_PING - 1)
            writer.send_soon(Ping(HEARTBEAT_PING | self._heartbeats))
