"""The service front: one stable address for a service whose VM moves between processes.

Clients connect to the front's client address once and keep the connection. VM processes
with a request device (`postcopy vm run --service URI`) connect to its backend address and
say HELLO (postcopy.vm.reqframe). The front gives every client request a tag, growing by
one, remembers it until answered, and sends it to the current backend: the live backend
of the highest generation. When a backend of a newer generation says it is live (the VM
has resumed on the migration's destination), the front switches to it and re-sends, in
tag order, every unanswered request whose tag is above the backend's accepted tag: the
requests the old VM never took (the rest travelled inside the VM's state). Requests that
arrive while no backend is live wait in the front. Answers go back to the client that
asked, with its own request id; an answer to a tag that is not waiting is counted as a
duplicate and dropped. So, as long as each backend keeps its connection, clients see
every request answered exactly once, whatever the VM does in between.

One thread, non-blocking sockets, a selector: `run()` until `stop()`. Events (connections,
switches, errors) go to `on_event` as dicts with "t" on the monotonic clock, the clock the
migration's timelines and the load generator use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from postcopy.service.sockets import listen, remove_unix_socket
from postcopy.vm import reqframe
from postcopy.vm.reqframe import FrameError, FrameReader

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
EventSink = Callable[[dict[str, Any]], None]


class _Conn:
    """One accepted connection: a client or a backend (a VM's request device)."""

    def __init__(self, sock: socket.socket, role: str, name: str) -> None:
        self.sock = sock
        self.role = role
        self.name = name
        self.reader = FrameReader()
        self.out = bytearray()
        self.closed = False
        self.writing = False
        self.generation = -1
        self.accepted = 0
        self.live = False


class Front:
    """See the module docstring. `listen_address` is where clients connect (tcp: port 0
    picks a free one: see `address`), `backend_address` where request devices connect."""

    def __init__(
        self,
        listen_address: str,
        backend_address: str,
        *,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_event = on_event
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._client_listener, self.address = listen(listen_address)
        try:
            self._backend_listener, self.backend_address = listen(backend_address)
        except OSError:
            self._client_listener.close()
            remove_unix_socket(self.address)
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._client_listener, selectors.EVENT_READ, "client-listener")
        self._selector.register(self._backend_listener, selectors.EVENT_READ, "backend-listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: list[_Conn] = []
        self._dirty: set[_Conn] = set()
        self._next_tag = 1
        self._unanswered: dict[int, tuple[_Conn, int, bytes]] = {}
        self._current: _Conn | None = None
        self._generation = -1
        self._stopping = False
        self._names = 0
        self.counters = {
            "requests": 0,
            "answered": 0,
            "resent": 0,
            "switches": 0,
            "duplicates": 0,
            "orphaned": 0,
            "errors": 0,
        }

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Make run() return (from any thread or a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def stats(self) -> dict[str, Any]:
        current = self._current
        return {
            "address": str(self.address),
            "backend-address": str(self.backend_address),
            "clients": sum(1 for c in self._conns if c.role == "client"),
            "backends": sum(1 for c in self._conns if c.role == "backend"),
            "current": current.name if current else None,
            "generation": self._generation,
            "waiting": len(self._unanswered),
            **self.counters,
        }

    def close(self) -> None:
        for conn in list(self._conns):
            self._close(conn, None)
        for sock in (self._client_listener, self._backend_listener):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._selector.close()
        remove_unix_socket(self.address)
        remove_unix_socket(self.backend_address)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping:
            for key, mask in self._selector.select(1.0):
                data = key.data
                if data == "client-listener":
                    self._accept(self._client_listener, "client")
                elif data == "backend-listener":
                    self._accept(self._backend_listener, "backend")
                elif data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                else:
                    conn: _Conn = data
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
                    if mask & selectors.EVENT_WRITE and not conn.closed:
                        self._dirty.add(conn)
            self._flush_all()

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event({"t": round(self._clock(), 6), "event": event, **fields})

    def _accept(self, listener: socket.socket, role: str) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._names += 1
            conn = _Conn(sock, role, f"{role}-{self._names}")
            self._conns.append(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._emit("connected", name=conn.name, role=role)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            self._close(conn, f"{error.strerror or error}")
            return
        if not data:
            self._close(conn, None)
            return
        conn.reader.feed(data)
        try:
            for raw in conn.reader.raw_frames():
                if conn.role == "client":
                    self._request(conn, raw)
                else:
                    self._from_backend(conn, raw)
        except FrameError as error:
            self.counters["errors"] += 1
            self._close(conn, str(error))

    def _request(self, client: _Conn, raw: bytes) -> None:
        if raw[2] > reqframe.KIND_REQUEST_MAX:
            raise FrameError(f"kind {raw[2]:#x} from a client: clients send requests only")
        tag = self._next_tag
        self._next_tag += 1
        tagged = reqframe.with_id(raw, tag)
        self._unanswered[tag] = (client, reqframe.frame_id(raw), tagged)
        self.counters["requests"] += 1
        current = self._current
        if current is not None:
            current.out += tagged
            self._dirty.add(current)

    def _from_backend(self, backend: _Conn, raw: bytes) -> None:
        kind = raw[2]
        if kind == reqframe.KIND_ANSWER:
            tag = reqframe.frame_id(raw)
            entry = self._unanswered.pop(tag, None)
            if entry is None:
                self.counters["duplicates"] += 1
                self._emit("duplicate-answer", backend=backend.name, tag=tag)
                return
            client, request_id, _request = entry
            self.counters["answered"] += 1
            if client.closed:
                self.counters["orphaned"] += 1
                return
            client.out += reqframe.with_id(raw, request_id)
            self._dirty.add(client)
        elif kind == reqframe.KIND_HELLO:
            hello = reqframe.decode_hello(reqframe.decode(raw))
            backend.generation, backend.accepted, backend.live = (
                hello.generation,
                hello.accepted,
                hello.live,
            )
            self._emit(
                "hello",
                backend=backend.name,
                generation=hello.generation,
                accepted=hello.accepted,
                live=hello.live,
            )
            if hello.live and backend is not self._current:
                if self._current is not None and hello.generation <= self._generation:
                    self._emit("stale-backend", backend=backend.name, generation=hello.generation)
                    return
                self._switch(backend, hello.generation, hello.accepted)
        else:
            raise FrameError(f"kind {kind:#x} from a backend: backends send answers and hellos")

    def _switch(self, backend: _Conn, generation: int, accepted: int) -> None:
        previous = self._current
        self._current = backend
        self._generation = generation
        resend = [tagged for tag, (_c, _i, tagged) in self._unanswered.items() if tag > accepted]
        backend.out += b"".join(resend)
        self._dirty.add(backend)
        self.counters["switches"] += 1
        self.counters["resent"] += len(resend)
        self._emit(
            "switch",
            backend=backend.name,
            previous=previous.name if previous else None,
            generation=generation,
            accepted=accepted,
            resent=len(resend),
            waiting=len(self._unanswered),
        )

    def _flush_all(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            if conn.closed:
                continue
            try:
                while conn.out:
                    sent = conn.sock.send(conn.out)
                    del conn.out[:sent]
            except BlockingIOError:
                pass
            except OSError as error:
                self._close(conn, f"{error.strerror or error}")
                continue
            want_write = bool(conn.out)
            if want_write != conn.writing:
                conn.writing = want_write
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
                self._selector.modify(conn.sock, events, conn)

    def _close(self, conn: _Conn, error: str | None) -> None:
        if conn.closed:
            return
        conn.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        self._conns.remove(conn)
        if conn is self._current:
            self._current = None
        if error:
            log.warning("service front: %s: %s", conn.name, error)
        self._emit("disconnected", name=conn.name, role=conn.role, error=error)
