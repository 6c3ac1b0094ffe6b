"""The destination's half of postcopy recovery: pause on a broken link, accept a resume.

Owns `DestinationRecovery` (QEMU's postcopy_pause_incoming, the recovery half of
migration_ioc_process_incoming and loadvm_postcopy_handle_resume), from RUN to completion.

Pausing. Once the guest runs here, a failure of the main stream, the return path or the
preempt channel, silence from the source (the heartbeat), or `migrate-pause` moves the
migration to postcopy-paused, never to failed. The guest keeps running: vCPUs touching
pages that are here go on; one touching a missing page sleeps in the kernel, its request
kept as pending by the fault thread (which still resolves locally whatever it can). The
receivers of the broken connections stop; nothing is thrown away.

Resuming. A `recovery` thread accepts connections on the listener for the whole postcopy
(the original URI, or the one `migrate-recover` gives). Each must pass the transport's
authentication again, then prove it belongs to this migration: its first frame must be
RESUME_REQUEST carrying this migration's id (the session of the first main connection)
and an epoch above every earlier one. Anything else is refused with a SHUT naming why,
and the migration stays as it was. A valid request while still active means the source
lost the link and we had not noticed: we pause first. Then, in postcopy-recover:

  wait until the old receivers have stopped (the received bitmaps are final), answer each
  RECV_BITMAP_REQUEST with the block's received bitmap; at POSTCOPY_RESUME accept the new
  preempt channel (if any), send RESUME_ACK(epoch), hand the return path to the fault
  thread, re-send every pending page request, and go back to postcopy-active; the
  receiver thread carries on with the new stream.

Any failure or timeout (x-recover-timeout-ms) on the way goes back to postcopy-paused.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from postcopy.migration import failures
from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.recovery import (
    HEARTBEAT_PONG,
    PAUSED_BY_USER,
    Heartbeat,
    LinkBroken,
    RecoveryStats,
    watch_link,
)
from postcopy.migration.status import MigrationStatus
from postcopy.ram import Bitmap
from postcopy.transport import Connection, Listener, listen
from postcopy.transport.errors import HandshakeError, TransportError
from postcopy.wire import (
    MAX_SHUT_REASON_BYTES,
    Direction,
    Ping,
    Pong,
    PostcopyResume,
    RecvBitmap,
    RecvBitmapRequest,
    ResumeAck,
    ResumeRequest,
    Shut,
    StreamContext,
)

if TYPE_CHECKING:
    from postcopy.migration.incoming.control import IncomingMigration

log = logging.getLogger(__name__)

S = MigrationStatus
ALIVE = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER})


class DestinationRecovery:
    """Pause and resume of one incoming postcopy migration (see the module doc)."""

    def __init__(self, owner: IncomingMigration, listener: Listener, migration_id: bytes) -> None:
        self._owner = owner
        self._status = owner.status
        self._parameters = owner.parameters
        self._clock = owner._clock
        self.listener = listener
        self.migration_id = migration_id
        self._trace = owner._trace
        self.stats = RecoveryStats(owner._clock, owner._trace)
        self._cond = threading.Condition()
        self.generation = 0
        self.epoch = 0
        self._connections: list[Connection] = []
        self._reader: StreamReader | None = None  # the current main stream's
        self._handover: tuple[StreamReader, int] | None = None
        self._receiver_waiting = False
        self._finishing = False
        self.stream_complete = False  # POSTCOPY_COMPLETE read: the source sends no more
        self._thread = threading.Thread(target=self._accept_loop, name="recovery", daemon=True)
        self._heartbeat = Heartbeat(
            "heartbeat",
            interval=self._parameters.x_heartbeat_interval_ms / 1000,
            timeout=self._parameters.x_heartbeat_timeout_ms / 1000,
            send=self._send_heartbeat,
            last_heard=self._last_heard,
            on_silence=lambda seconds: self.link_failed(
                f"no data from the source for {seconds:.1f} s (x-heartbeat-timeout-ms): "
                "the link is taken for dead",
                self.generation,
            ),
            active=lambda: self._status.value == S.POSTCOPY_ACTIVE,
            clock=self._clock,
        )

    def start(self, connections: list[Connection], reader: StreamReader) -> None:
        with self._cond:
            self._connections = list(connections)
            self._reader = reader
        self._thread.start()
        self._heartbeat.start()

    def stop(self) -> None:
        """The migration is over (completed, or the process closes it): no more pauses."""
        with self._cond:
            self._finishing = True
            self._cond.notify_all()
        self._heartbeat.stop()

    # -- any thread ----------------------------------------------------------------------

    def link_failed(self, reason: str, generation: int) -> bool:
        """Pause, if connection `generation` is still the current one; True if it paused."""
        with self._cond:
            if self._finishing or generation != self.generation or self._status.value not in ALIVE:
                return False
            connections = self._pause_locked(reason)
        log.error("Detected IO failure for postcopy. Migration paused: %s", reason)
        for connection in connections:
            connection.shutdown()
        return True

    def check(self, generation: int) -> None:
        if generation != self.generation:
            raise LinkBroken("the connection was given up (postcopy paused)")

    def pause_by_user(self) -> None:
        if self._status.value not in ALIVE:
            raise IncomingError(
                "migrate-pause is currently only supported "
                "during postcopy-active or postcopy-recover state"
            )
        self.link_failed(PAUSED_BY_USER, self.generation)

    def listen_on(self, uri: str) -> str:
        """`migrate-recover`: accept the source's reconnect on `uri` from now on."""
        if self._status.value != S.POSTCOPY_PAUSED:
            raise IncomingError("Migrate recover can only be run when postcopy is paused.")
        owner = self._owner
        if uri in (str(self.listener.uri), owner.uri):
            return str(self.listener.uri)
        listener = listen(
            uri,
            auth=owner.auth,
            tls=owner.tls,
            allow_insecure_network=owner.allow_insecure_network,
            on_refused=owner.refused,
            vet=owner.door.vet,
        )
        with self._cond:
            old, self.listener = self.listener, listener
            owner.listener, owner.bound_uri = listener, str(listener.uri)
        old.close()  # the recovery thread wakes up and moves to the new one
        self._trace("recover-listen", uri=str(listener.uri))
        return str(listener.uri)

    def query(self) -> dict[str, Any]:
        info = self.stats.as_qmp()
        if self.stats.pending_ms is not None:
            info["x-pending-pages"] = self.stats.pending_pages
            info["x-pending-pages-ms"] = round(self.stats.pending_ms, 2)
        return info

    # -- the receiver thread -------------------------------------------------------------

    def wait_resumed(self, generation: int) -> tuple[StreamReader, int]:
        """Block the main receiver while paused; returns the next stream and its generation."""
        with self._cond:
            self._receiver_waiting = True
            self._cond.notify_all()
            try:
                while True:
                    if self._finishing:
                        raise LinkBroken("the migration was closed while paused")
                    handover = self._handover
                    if handover is not None and handover[1] > generation:
                        self._handover = None
                        return handover
                    self._cond.wait(1.0)
            finally:
                self._receiver_waiting = False

    # -- inside -------------------------------------------------------------------------

    def _pause_locked(self, reason: str) -> list[Connection]:
        self.generation += 1
        connections, self._connections = self._connections, []
        self._reader = None
        faults = self._owner.faults
        if faults is not None:
            faults.set_return_path(None, self.generation)
        self._owner.error = reason
        self.stats.paused(reason)
        self._status.move(S.POSTCOPY_PAUSED)
        self._cond.notify_all()
        return connections

    def _accept_loop(self) -> None:
        while True:
            with self._cond:
                if self._finishing:
                    return
                listener = self.listener
            try:
                connection = listener.accept(1.0)
            except TimeoutError:
                continue
            except (HandshakeError, ConnectionError) as error:
                # refused by the transport (authentication, TLS), or gone before its end
                self._owner.refused(error)
                continue
            except (TransportError, OSError) as error:
                if self._finishing or listener is not self.listener:
                    continue  # closed at completion, or replaced by migrate-recover
                log.error("recovery listener: %s", error)
                self._cond_wait(1.0)
                continue
            watch_link(connection, self._parameters)
            if connection.channel != "main":
                log.warning("closing an unexpected %s connection", connection.channel)
                connection.close()
                continue
            try:
                self._try_resume(connection)
            except Exception:
                log.exception("recovery attempt")
                connection.close()

    def _cond_wait(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait(seconds)

    def _refuse(self, writer: StreamWriter, connection: Connection, reason: str) -> None:
        self._owner.refused(IncomingError(f"refused a reconnect: {reason}"))
        try:
            clipped = reason.encode()[:MAX_SHUT_REASON_BYTES].decode(errors="ignore")
            writer.send(Shut(error=True, reason=clipped))
        except OSError:
            pass
        connection.close()

    def _try_resume(self, connection: Connection) -> None:
        owner = self._owner
        timeout = self._parameters.x_recover_timeout_ms / 1000
        connection.set_timeout(timeout)
        vetted = owner.door.take_reconnect(connection)
        if vetted is not None:  # the listener's vet hook read its beginning
            writer, reader, request = vetted
        else:
            writer = StreamWriter(connection, Direction.RETURN)
            context = StreamContext(Direction.MAIN, blocks=owner.block_infos, resumed=True)
            reader = StreamReader(connection, Direction.MAIN, context)
            try:
                writer.send_stream_header()
                reader.read_stream_header()
                request = reader.read()
            except Exception as error:
                self._owner.refused(
                    IncomingError(f"a reconnect that never asked to resume: {error}")
                )
                connection.close()
                return
        with self._cond:
            refusal = self._admit(connection, request)
            if refusal is None:
                assert isinstance(request, ResumeRequest)
                epoch = self.epoch = request.epoch
                if self._status.value != S.POSTCOPY_PAUSED:
                    # the source lost the link before we noticed: pause first
                    stale = self._pause_locked("the source reconnected: it lost the link")
                else:
                    stale = []
                generation = self.generation
                self._connections = [connection]
                self._status.move(S.POSTCOPY_RECOVER)
        if refusal is not None:
            self._refuse(writer, connection, refusal)
            return
        for old in stale:
            old.shutdown()
        self.stats.attempts += 1
        self._trace("recover-accept", epoch=epoch)
        try:
            self._handshake(connection, reader, writer, epoch, generation, timeout)
        except Exception as error:
            log.error("recovery handshake failed: %s", error)
            self.link_failed(f"recovery failed: {failures.link_error(error, 'source')}", generation)
            connection.close()

    def _admit(self, connection: Connection, request: object) -> str | None:
        """Why this reconnect is refused, or None to take it (with the lock held)."""
        if not isinstance(request, ResumeRequest):
            return f"expected RESUME_REQUEST, got {type(request).__name__}"
        if request.migration_id != self.migration_id or connection.session != self.migration_id:
            return "this connection belongs to another migration (its migration id differs)"
        status = self._status.value
        if self._finishing or status not in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED):
            return f"there is no paused postcopy to resume here (status {status.value})"
        if request.epoch <= self.epoch:
            return (
                f"a stale recovery attempt (epoch {request.epoch}; this migration is at "
                f"epoch {self.epoch})"
            )
        return None

    def _handshake(
        self,
        connection: Connection,
        reader: StreamReader,
        writer: StreamWriter,
        epoch: int,
        generation: int,
        timeout: float,
    ) -> None:
        owner = self._owner
        deadline = self._clock() + timeout
        with self._cond:
            # the old receivers must be done, so that the received bitmaps are final
            while not self._receiver_waiting or owner.preempt.alive():
                self.check(generation)
                if self._clock() > deadline:
                    raise TimeoutError("the old connection's receivers did not stop in time")
                self._cond.wait(0.05)
        while True:
            message = reader.read()
            self.check(generation)
            if isinstance(message, RecvBitmapRequest):
                bitmap = owner.received[message.block].copy()
                writer.send(RecvBitmap(message.block, bitmap))
            elif isinstance(message, Ping):
                writer.send(Pong(message.value))
            elif isinstance(message, PostcopyResume):
                break
            else:
                raise IncomingError(f"unexpected {type(message).__name__} in a recovery handshake")
        preempt: Connection | None = None
        if "postcopy-preempt" in owner.peer_capabilities:
            preempt = self.listener.accept_channel(self.migration_id, "preempt", timeout)
            watch_link(preempt, self._parameters)
            with self._cond:
                self.check(generation)
                self._connections.append(preempt)
        with self._cond:
            self.check(generation)
            connection.set_timeout(None)
            writer.send(ResumeAck(epoch))
            faults = owner.faults
            if faults is not None:
                faults.set_return_path(writer, generation)
            self._reader = reader
            self.stream_complete = False
            owner.main, owner.preempt_connection, owner.return_writer = connection, preempt, writer
            self._status.move(S.POSTCOPY_ACTIVE)
            owner.error = None
            self.stats.resumed(epoch)
            self._handover = (reader, generation)
            self._cond.notify_all()
        if preempt is not None:
            owner.preempt.start(preempt, generation)
        if faults is not None:
            pending = faults.pending()
            faults.resend_pending()
            threading.Thread(
                target=self._time_pending, args=(pending, self._clock()), daemon=True
            ).start()
        log.info("postcopy resumed (epoch %d)", epoch)

    def _time_pending(self, pending: list[Bitmap], resumed: float) -> None:
        """How long after the resume the last page a vCPU was waiting for arrived
        (x-pending-pages-ms): what a guest blocked through the outage waited beyond it."""
        count = sum(int(p.sum()) for p in pending)
        self.stats.pending_pages = count
        deadline = resumed + 60.0
        received = self._owner.received
        while not all(bool(got[p].all()) for got, p in zip(received, pending, strict=True)):
            if self._clock() > deadline or self._finishing:
                return
            time.sleep(0.0005)
        self.stats.pending_ms = (self._clock() - resumed) * 1000
        self._trace("pending-served", pages=count, ms=round(self.stats.pending_ms, 2))

    def _send_heartbeat(self) -> None:
        writer = self._owner.return_writer
        if writer is not None:
            writer.send_soon(Pong(HEARTBEAT_PONG))

    def _last_heard(self) -> float | None:
        reader = self._reader
        if reader is None or not self._owner.source_heartbeats or self.stream_complete:
            return None
        return reader.last_activity
