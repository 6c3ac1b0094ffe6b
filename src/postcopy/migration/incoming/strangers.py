"""The destination's door: wait for a source, drop strangers (QEMU has no such guard).

`wait_for_source` accepts until a peer passes the whole handshake. The transport's part
(hello, key, TLS) runs in the listener, several peers at once (transport/acceptor.py), so
a silent one cannot hold back the source behind it; the stream's part (its header and the
Handshake frame) runs here within the same time limit. A peer that fails either before
any RAM is written (a port scan, a health check, garbage, a wrong key) is a stranger: it
is dropped and reported to `on_refused` (one log line, one count), and the destination
goes on waiting. What comes after the Handshake is the migration's, and ends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.migration.incoming.errors import IncomingError
from postcopy.transport import MAIN_CHANNEL, Connection, Listener, TransportError
from postcopy.wire import Direction, Handshake, ProtocolError, StreamContext

log = logging.getLogger(__name__)


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


def wait_for_source(
    listener: Listener, on_refused: Callable[[Exception], None]
) -> tuple[Connection, StreamWriter, StreamReader, Handshake]:
    """The first peer to pass the handshake: its connection, the return path's writer
    (its stream header sent), the main stream's reader and the Handshake it sent."""
    while True:
        connection = listener.accept(None)
        try:
            if connection.channel != MAIN_CHANNEL:
                raise IncomingError(
                    f"{connection.peer} opened a {connection.channel} channel of a "
                    "migration that is not running here"
                )
            connection.set_timeout(listener.handshake_timeout)
            writer = StreamWriter(connection, Direction.RETURN)
            writer.send_stream_header()
            # no blocks of ours in the context: a source whose Handshake declares other
            # blocks is not a stranger but the wrong VM, a failed migration (the receiver's
            # configuration check); the context takes the blocks from the Handshake
            reader = StreamReader(connection, Direction.MAIN, StreamContext(Direction.MAIN))
            reader.read_stream_header()
            handshake = reader.read()
            if not isinstance(handshake, Handshake):
                raise IncomingError(
                    f"{connection.peer} began its stream with {type(handshake).__name__}, "
                    "not a handshake"
                )
            connection.set_timeout(None)
        except TimeoutError:
            connection.close()
            on_refused(
                IncomingError(
                    f"source {connection.peer} sent no stream header and handshake within "
                    f"{listener.handshake_timeout} s"
                )
            )
            continue
        except (IncomingError, ProtocolError, OSError, TransportError) as error:
            connection.close()
            on_refused(error)
            continue
        return connection, writer, reader, handshake
