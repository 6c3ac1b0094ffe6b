"""The destination's preempt channel: a receiver of urgent pages per connection.

Owns `PreemptReceivers` (QEMU's postcopy_preempt_thread): with postcopy-preempt the source
sends requested pages on a second connection, so that they never wait behind the
background push. Its receiver accepts that connection (the first one; after a recovery,
recovery.py hands over the new one), reads each run into its own staging buffer and
places it with the same `PagePlacer` as the main receiver. A failure of the channel once
the guest runs pauses the migration like any other (recovery.py); `alive` tells the
recovery whether the old connection's receiver has stopped, so that the received
bitmaps it sends are final. It runs SCHED_FIFO: it is one of the three hops of a request.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from postcopy.linux.memory import Mapping
from postcopy.migration.channel import BufferedStreamReader
from postcopy.migration.hops import URGENT
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.placer import staging_bytes
from postcopy.migration.recovery import watch_link
from postcopy.migration.scheduling import prefer_this_thread
from postcopy.migration.status import MigrationStatus
from postcopy.transport import Connection
from postcopy.wire import Direction, Handshake, RamRunHeader, StreamContext

if TYPE_CHECKING:
    from postcopy.migration.incoming.control import IncomingMigration

log = logging.getLogger(__name__)

FIRST_CHANNEL_TIMEOUT = 30.0  # seconds the first preempt connection may take to come


class PreemptReceivers:
    """The receivers of one incoming migration's preempt connections."""

    def __init__(self, owner: IncomingMigration) -> None:
        self._owner = owner
        self._threads: list[threading.Thread] = []

    def start(self, connection: Connection | None, generation: int) -> None:
        """A receiver for `connection` (None: accept the first one on the listener)."""
        thread = threading.Thread(
            target=self._receive, args=(connection, generation), name="preempt", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _receive(self, connection: Connection | None, generation: int) -> None:
        owner = self._owner
        listener, main = owner.listener, owner.main
        assert listener is not None and main is not None
        prefer_this_thread()
        if connection is None:
            try:
                connection = listener.accept_channel(main.session, "preempt", FIRST_CHANNEL_TIMEOUT)
                watch_link(connection, owner.parameters)
            except Exception as error:
                log.error("preempt channel never came: %s", error)
                return
            owner.preempt_connection = connection
        reader = BufferedStreamReader(
            connection, Direction.MAIN, StreamContext(Direction.MAIN, blocks=owner.block_infos)
        )
        staging = Mapping.anonymous(staging_bytes(list(owner.machine.ram)))
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
                placer = owner.placer
                if placer is None:  # assigned once, by the receiver at LISTEN
                    raise IncomingError("urgent pages arrived before LISTEN")
                placer.receive_run(reader, header, staging, None, channel=URGENT)
        except Exception as error:
            if owner.recovery is not None:
                owner.link_failed(error, generation)
            elif owner.status.value == MigrationStatus.POSTCOPY_ACTIVE and not owner.all_received():
                log.error("preempt channel: %s", error)
        finally:
            staging.close()
