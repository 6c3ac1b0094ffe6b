"""The destination's door: wait for a source, drop strangers (QEMU has no such guard).

A peer is the source once it has passed the whole handshake: the transport's part (hello,
key, TLS) and the stream's (its stream header and the Handshake frame, `Door.vet`). Both
run in the listener, on the peer's own handshake thread (transport/acceptor.py), several
peers at once and within one time limit, so a peer that stalls in either part cannot hold
back the source behind it. A peer that fails either before any RAM is written (a port
scan, a health check, garbage, a wrong key, a stream of another version, silence) is a
stranger: it is dropped and reported to `on_refused` (one log line, one count), and the
destination goes on waiting. What comes after the Handshake is the migration's, and ends
it. A second source that passes the handshake while one migration is under way is told
so (a SHUT with the reason: it waited in setup for the first migration to end, then
failed without one) and counted. Once the source is in, a main channel may also be its
reconnect (postcopy recovery): its stream begins with RESUME_REQUEST, kept for
incoming/recovery.py (`take_reconnect`), which decides whether it belongs here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.migration.incoming.errors import IncomingError
from postcopy.transport import MAIN_CHANNEL, Connection, Listener, TransportError
from postcopy.wire import (
    MAX_SHUT_REASON_BYTES,
    BlockInfo,
    Direction,
    Handshake,
    Message,
    ProtocolError,
    RamRunHeader,
    Shut,
    StreamContext,
)

log = logging.getLogger(__name__)

Passed = tuple[StreamWriter, StreamReader, Handshake]


class RefusalCounter:
    """Counts and logs refused peers (x-refused-connections); called from any thread."""

    def __init__(self, where: Callable[[], str]) -> None:
        self._where = where
        self._lock = threading.Lock()
        self.count = 0

    def __call__(self, error: Exception) -> None:
        with self._lock:
            self.count += 1
        log.warning("refused a connection to %s: %s", self._where(), error)


class Door:
    """The stream's part of the handshake (`vet`, the listener's hook) and the wait for
    the first peer that passed it (`wait_for_source`)."""

    def __init__(self, blocks: tuple[BlockInfo, ...]) -> None:
        self._blocks = blocks  # ours: a reconnect's stream carries on with them
        self._lock = threading.Lock()
        self._passed: dict[Connection, Passed] = {}
        self._reconnects: dict[
            Connection, tuple[StreamWriter, StreamReader, Message | RamRunHeader]
        ] = {}
        self._source: str | None = None  # the peer whose migration runs here

    def vet(self, connection: Connection) -> None:
        """On the peer's handshake thread, its socket under the handshake's time limit:
        send our stream header, read its header and Handshake; raise to refuse it."""
        if connection.channel != MAIN_CHANNEL:
            return  # a migration's second channel: wait_for_source or accept_channel decide
        writer = StreamWriter(connection, Direction.RETURN)
        writer.send_stream_header()
        with self._lock:
            source = self._source
        if source is not None:
            self._vet_reconnect(connection, writer, source)
            return
        # no blocks of ours in the context: a source whose Handshake declares other blocks
        # is not a stranger but the wrong VM, a failed migration (the receiver's
        # configuration check); the context takes the blocks from the Handshake
        reader = StreamReader(connection, Direction.MAIN, StreamContext(Direction.MAIN))
        reader.read_stream_header()
        handshake = reader.read()
        if not isinstance(handshake, Handshake):
            raise IncomingError(
                f"{connection.peer} began its stream with {type(handshake).__name__}, "
                "not a handshake"
            )
        with self._lock:
            source = self._source
            if source is None:
                self._passed[connection] = (writer, reader, handshake)
                return
        raise _turn_away(connection, writer, source)

    def _vet_reconnect(self, connection: Connection, writer: StreamWriter, source: str) -> None:
        """A main channel once the source is in: a reconnect's stream carries on ours (no
        Handshake); one that begins with a Handshake is a second source, turned away."""
        context = StreamContext(Direction.MAIN, blocks=self._blocks, resumed=True)
        reader = StreamReader(connection, Direction.MAIN, context)
        reader.read_stream_header()
        try:
            request = reader.read()
        except ProtocolError as error:
            if error.field == "event" and error.value == Handshake.__name__:
                raise _turn_away(connection, writer, source) from None
            raise
        with self._lock:
            self._reconnects[connection] = (writer, reader, request)

    def take_reconnect(
        self, connection: Connection
    ) -> tuple[StreamWriter, StreamReader, Message | RamRunHeader] | None:
        """What `vet` read of a reconnect: the return path's writer (its stream header
        sent), the main stream's reader, and its first message; None if it was not vetted."""
        with self._lock:
            return self._reconnects.pop(connection, None)

    def wait_for_source(
        self, listener: Listener, on_refused: Callable[[Exception], None]
    ) -> tuple[Connection, StreamWriter, StreamReader, Handshake]:
        """The first peer to pass the handshake: its connection, the return path's writer
        (its stream header sent), the main stream's reader and the Handshake it sent."""
        while True:
            connection = listener.accept(None)
            with self._lock:
                passed = self._passed.pop(connection, None)
            if passed is None:
                connection.close()
                on_refused(
                    IncomingError(
                        f"{connection.peer} opened a {connection.channel} channel of a "
                        "migration that is not running here"
                    )
                )
                continue
            with self._lock:
                self._source = connection.peer
                others = [(other, w) for other, (w, _, _) in self._passed.items()]
                self._passed.clear()
            for other, writer in others:  # passed just as this one did: too late
                on_refused(_turn_away(other, writer, connection.peer))
                other.close()
            return connection, *passed


def _turn_away(connection: Connection, writer: StreamWriter, source: str) -> IncomingError:
    """Tell a second source that a migration from `source` runs here (as its SHUT's
    reason); return the refusal to log."""
    reason = f"this destination is already receiving a migration from {source}"
    with contextlib.suppress(OSError, TransportError):
        writer.send(
            Shut(error=True, reason=reason.encode()[:MAX_SHUT_REASON_BYTES].decode(errors="ignore"))
        )
    return IncomingError(f"{connection.peer} came while a migration from {source} runs here")
