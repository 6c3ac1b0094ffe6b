"""Accepting peers on a listening socket, with several handshakes in flight at once.

A waiting destination must not be held up by a peer that connects and then says nothing
(a port scan that holds its connection, a health check, a stalled client): `Acceptor`
accepts on a thread of its own and runs each peer's handshake on a thread of its own,
each bounded by the handshake timeout, so a real source that connects behind a silent
peer is handed over as soon as its own handshake is done. At most `MAX_HANDSHAKES` peers
are in their handshake at once; a newcomer beyond that drops the oldest, so a crowd of
silent peers cannot lock the door: every new peer gets its turn.

Results come out in the order the handshakes complete: a `Connection`, or the refusal (an
exception) of a peer that failed its handshake. With an `on_refused` callback, refusals go
there instead (from the handshake's thread) and `next()` returns connections only.

Each peer in its handshake is known by a number of its own and held by a duplicate of its
socket that the acceptor owns: the handshake may close its socket before it reports back
(a refusal does), and the fd it had may already be the next peer's by then, so an fd is
never the key. `counts()` says how many peers were accepted, are in their handshake, were
dropped to make room and were refused, each counted where it happens, under the lock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from postcopy.transport.errors import ConnectionClosed, HandshakeError, TransportError

if TYPE_CHECKING:
    from postcopy.transport.connection import Connection

__all__ = ["MAX_HANDSHAKES", "MAX_READY", "Acceptor", "AcceptorCounts"]

log = logging.getLogger(__name__)

MAX_HANDSHAKES = 8  # peers in their handshake at once
MAX_READY = 16  # results nobody has taken yet; beyond that, connections are closed
# accept() errors that mean "no file descriptor or memory right now": wait, then go on
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Handshake = Callable[[socket.socket, object], "Connection"]
RefusalSink = Callable[[Exception], None]


class AcceptorCounts(NamedTuple):
    """The acceptor's counters at one moment (taken under its lock, so they agree)."""

    accepted: int  # peers accepted since the start
    in_handshake: int  # peers in their handshake now
    dropped: int  # peers dropped in their handshake to make room for a newer one
    refused: int  # handshakes that failed (the dropped ones too, once their thread ended)


class Acceptor:
    """Accepts on `sock` and hands out peers whose `handshake` succeeded."""

    def __init__(
        self,
        sock: socket.socket,
        handshake: Handshake,
        *,
        name: str,
        on_refused: RefusalSink | None = None,
    ) -> None:
        self._sock = sock
        self._handshake = handshake
        self._name = name
        self._on_refused = on_refused
        self._cond = threading.Condition()
        self._ready: collections.deque[Connection | Exception] = collections.deque()
        # each peer in its handshake, oldest first: its number, and a duplicate of its
        # socket that only the acceptor closes (see _drop)
        self._in_handshake: dict[int, socket.socket] = {}
        self._dropped: set[int] = set()  # numbers of dropped peers whose thread runs on
        self._numbers = itertools.count()
        self._accepted = 0
        self._dropped_count = 0
        self._refused = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._sock.settimeout(None)
            self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
            self._thread.start()

    def next(self, deadline: float | None, timeout: float | None) -> Connection:
        """The next peer whose handshake succeeded (or the next refusal, raised, when no
        `on_refused` takes them); TimeoutError at `deadline`, TransportError once closed."""
        self.start()
        with self._cond:
            while True:
                if self._ready:
                    item = self._ready.popleft()
                    if isinstance(item, Exception):
                        raise item
                    return item
                if self._closed:
                    raise TransportError(f"listener on {self._name} is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no source connected to {self._name} within {timeout} s")
                self._cond.wait(remaining)

    def counts(self) -> AcceptorCounts:
        with self._cond:
            return AcceptorCounts(
                accepted=self._accepted,
                in_handshake=len(self._in_handshake),
                dropped=self._dropped_count,
                refused=self._refused,
            )

    def close(self) -> None:
        """Stop accepting (the caller closes the listening socket), end the handshakes in
        flight, close the connections nobody took."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for number in list(self._in_handshake):
                self._drop(number)
            unclaimed = [item for item in self._ready if not isinstance(item, Exception)]
            self._ready.clear()
            self._cond.notify_all()
        for connection in unclaimed:
            connection.close()

    # -- threads -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._sock.accept()
            except OSError as error:
                with self._cond:
                    if self._closed:
                        return
                if error.errno in _RESOURCE_ERRORS:
                    log.warning("accepting on %s: %s; retrying", self._name, error.strerror)
                    time.sleep(0.1)
                continue  # ECONNABORTED and the like: that peer is gone already
            try:
                held = sock.dup()  # the acceptor's hold on the peer (see _drop)
            except OSError as error:  # no fd for it: as for accept()
                sock.close()
                log.warning("accepting on %s: %s; retrying", self._name, error.strerror)
                time.sleep(0.1)
                continue
            with self._cond:
                if self._closed:
                    held.close()
                    sock.close()
                    return
                if len(self._in_handshake) >= MAX_HANDSHAKES:
                    self._drop(next(iter(self._in_handshake)), to_make_room=True)
                number = next(self._numbers)
                self._in_handshake[number] = held
                self._accepted += 1
            threading.Thread(
                target=self._handshake_one,
                args=(sock, address, number),
                name="handshake",
                daemon=True,
            ).start()

    def _handshake_one(self, sock: socket.socket, address: object, number: int) -> None:
        refusal: Exception | None = None
        connection: Connection | None = None
        try:
            connection = self._handshake(sock, address)
        except Exception as error:
            # no traceback: it would keep the handshake's frames, and a TLS socket in them,
            # alive for as long as the refusal waits to be taken
            refusal = error.with_traceback(None)
        with self._cond:
            held = self._in_handshake.pop(number, None)
            if held is not None:
                held.close()
            dropped = number in self._dropped
            self._dropped.discard(number)
            if connection is not None and dropped:  # it finished as it was being dropped
                connection.close()
                connection, refusal = None, ConnectionClosed("connection dropped")
            if refusal is not None:
                self._refused += 1
                sock.close()
                if dropped and isinstance(refusal, ConnectionClosed | OSError):
                    why = (
                        "the listener closed"
                        if self._closed
                        else f"{MAX_HANDSHAKES} newer peers were in their handshake"
                    )
                    refusal = HandshakeError(
                        f"peer {_describe(address)} dropped before it completed its "
                        f"handshake: {why}"
                    )
                if self._on_refused is None and not self._closed:
                    self._keep(refusal)
            else:
                assert connection is not None
                if self._closed or len(self._ready) >= MAX_READY:
                    log.warning("closing unclaimed connection %r on %s", connection, self._name)
                    connection.close()
                else:
                    self._ready.append(connection)
                    self._cond.notify_all()
        if refusal is not None and self._on_refused is not None and not self._closed:
            try:
                self._on_refused(refusal)
            except Exception:
                log.exception("reporting a refused connection on %s", self._name)

    def _keep(self, refusal: Exception) -> None:
        if len(self._ready) >= MAX_READY:
            log.warning("refused a connection to %s: %s", self._name, refusal)
            return
        self._ready.append(refusal)
        self._cond.notify_all()

    def _drop(self, number: int, *, to_make_room: bool = False) -> None:
        """End the handshake of peer `number` (called with the lock held). shutdown()
        acts on the socket, so the acceptor's duplicate reaches it whatever the handshake
        did with its own socket object (TLS takes it over; a refusal closes it)."""
        held = self._in_handshake.pop(number)
        self._dropped.add(number)
        if to_make_room:
            self._dropped_count += 1
        with contextlib.closing(held), contextlib.suppress(OSError):
            held.shutdown(socket.SHUT_RDWR)


def _describe(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "on the unix socket"
