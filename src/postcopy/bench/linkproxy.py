"""A man in the middle for the migration link: forward, reset, freeze, drop, cut at byte N.

Recovery is tested by breaking a live link at a chosen point. `LinkProxy` sits between a
source and a destination (the source connects to `proxy.uri`, the proxy to `target`)
and forwards bytes until told otherwise:

- `reset()`: every connection is closed with SO_LINGER 0, so both ends get a TCP RST
  (ECONNRESET) at once, as with `ss -K`;
- `freeze()` / `thaw()`: the proxy stops reading; the senders' buffers fill and nobody
  hears anything (the proxy's kernel still ACKs, so keepalives cannot see it: only a
  heartbeat or TCP_USER_TIMEOUT can);
- `drop(direction)`: one direction's bytes are read and thrown away (a one-way blackhole);
- `refuse_new()` / `hold_new()`: new connections are reset at once / accepted and never
  forwarded (double failures at reconnect and in the handshake);
- `arm(Cut(...))`: one of the above at an exact point: after N bytes of a direction, or
  K bytes into the next frame of a given type (e.g. inside a RAM_RUN's page data, inside
  the RECV_BITMAP reply), which the proxy finds by following the stream's framing.

Everything runs on one selector thread, and commands from other threads run on it
between two reads, so what is forwarded before a cut is exact: `wait_cut()` reports the
byte and frame at which it happened. It needs no privileges (the alternative, `ss -K`,
needs CAP_NET_ADMIN; netem is not in this kernel; see research/recovery.md §6).

Framing is followed only on plain connections (the transport's hello, its auth frames,
then the stream header and frames of docs/PROTOCOL.md); over TLS a cut by byte count
still works. "down" is source -> destination, "up" the other way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from postcopy.bench.frametracker import FrameTracker
from postcopy.transport.sockets import tune
from postcopy.transport.uri import Uri, parse_uri

__all__ = ["Cut", "CutReport", "LinkProxy", "ProxiedConnection"]

Dir = Literal["down", "up"]
Action = Literal["reset", "freeze", "drop"]
Scope = Literal["link", "connection"]

CHUNK = 64 << 10
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where and how to break the link.

    Exactly one trigger: `after` bytes of `direction` counted from the moment the cut is
    armed, or `frame` (a FrameType) with `offset` bytes into the next such frame that
    starts after arming (clipped to the frame's last byte, so a cut is always inside it;
    with `clip` False the offset may reach beyond it, e.g. "4 MiB after the PACKAGE"; with
    `skip_short` the frames too short to hold `offset` are passed over, e.g. a one-page
    RAM_RUN answering a request when the point is inside a long run of the push).
    `connection` restricts it to the connection with that index (0 = the first accepted).
    `scope` "link" breaks every connection (a network failure); "connection" only the one
    where the trigger fired (e.g. only the preempt channel). A reset waits `settle`
    seconds after the last byte before the cut went out: a RST makes the receiving
    kernel drop what its application has not read yet, and the point is for the
    receiver to see the stream end where the cut is (it reads meanwhile; nothing else
    crosses, the cut direction is held from the trigger on)."""

    action: Action = "reset"
    direction: Dir = "down"
    after: int | None = None
    frame: int | None = None
    offset: int = 0
    clip: bool = True
    skip_short: bool = False
    connection: int | None = None
    scope: Scope = "link"
    settle: float = 0.05

    def __post_init__(self) -> None:
        if (self.after is None) == (self.frame is None):
            raise ValueError("a Cut needs exactly one of after= and frame=")
        if (self.after is not None and self.after < 0) or self.offset < 0:
            raise ValueError("byte counts must be >= 0")


@dataclasses.dataclass(frozen=True)
class CutReport:
    """Where a cut happened: the connection, its direction, the bytes forwarded in that
    direction before the cut, and the frame it fell in (type, offset inside it, length)."""

    connection: int
    direction: Dir
    forwarded: int
    frame_type: int | None
    frame_offset: int | None
    frame_length: int | None


@dataclasses.dataclass
class ProxiedConnection:
    """One source connection and its upstream twin, with the bytes forwarded each way."""

    index: int
    client: socket.socket
    server: socket.socket | None
    forwarded: dict[str, int] = dataclasses.field(default_factory=lambda: {"down": 0, "up": 0})
    pending: dict[str, bytearray] = dataclasses.field(
        default_factory=lambda: {"down": bytearray(), "up": bytearray()}
    )
    frozen: bool = False
    held: bool = False
    dropping: set[str] = dataclasses.field(default_factory=set)
    closed: bool = False
    connected: bool = False
    eof: set[str] = dataclasses.field(default_factory=set)
    trackers: dict[str, FrameTracker] = dataclasses.field(default_factory=dict)
    after_flush: dict[str, Callable[[], None]] = dataclasses.field(default_factory=dict)
    held_directions: set[str] = dataclasses.field(default_factory=set)


class LinkProxy:
    """Forwards connections from `listen` (default a free port on 127.0.0.1) to `target`."""

    def __init__(self, target: str, listen: str = "tcp:127.0.0.1:0") -> None:
        self.target = target
        self._listen_uri = parse_uri(listen)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self.connections: list[ProxiedConnection] = []
        self._changed = threading.Condition(self._lock)
        self._page_sizes: dict[int, int] = {}
        self._cut: Cut | None = None
        self._cut_base: dict[tuple[int, str], int] = {}
        self._cut_report: CutReport | None = None
        self._refuse = False
        self._hold = False
        self._frozen = False
        self._stop = False
        self._timers: list[tuple[float, Callable[[], None]]] = []
        self._listener = self._bind()
        self._thread = threading.Thread(target=self._loop, name="link-proxy", daemon=True)
        self._thread.start()

    # -- public, any thread ----------------------------------------------------------------

    @property
    def uri(self) -> str:
        """Where the source should connect."""
        if self._listen_uri.scheme == "unix":
            return str(self._listen_uri)
        host, port = self._listener.getsockname()[:2]
        return str(Uri.tcp(host, port))

    def live(self) -> list[ProxiedConnection]:
        with self._lock:
            return [c for c in self.connections if not c.closed]

    def wait_connections(self, count: int, timeout: float = 30.0) -> list[ProxiedConnection]:
        """Wait until `count` connections have been accepted in all; returns them all."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.connections) >= count, timeout):
                raise TimeoutError(f"only {len(self.connections)} of {count} connections came")
            return list(self.connections)

    def reset(self) -> None:
        """Reset every live connection (RST to both ends)."""

        def run() -> None:
            for connection in list(self.connections):
                self._reset(connection)

        self._call(run)

    def freeze(self) -> None:
        """Stop forwarding on every live connection and on those that come later."""

        def run() -> None:
            self._frozen = True
            for connection in self.connections:
                connection.frozen = True
                self._update(connection)

        self._call(run)

    def thaw(self) -> None:
        def run() -> None:
            self._frozen = False
            for connection in self.connections:
                connection.frozen = False
                self._update(connection)

        self._call(run)

    def drop(self, direction: Dir) -> None:
        """Throw away everything one direction carries from now on (live connections)."""

        def run() -> None:
            for connection in self.connections:
                connection.dropping.add(direction)

        self._call(run)

    @staticmethod
    def request_lost(destination_info: dict[str, Any], sent_before: int) -> bool:
        """After `drop("up")`: has a vCPU a request that was lost? `destination_info` is the
        destination's query-migrate, `sent_before` its `x-postcopy-requests-sent` counted
        after the drop. A request sent after the count was lost; so was one sent just
        before it that is still not answered two seconds on (a page that was already on its
        way is placed in a round trip): the vCPU waits on it and asks nothing more."""
        if destination_info.get("x-postcopy-requests-sent", 0) > sent_before:
            return True
        latency = destination_info.get("x-request-latency") or {}
        return latency.get("waiting", 0) >= 1 and latency.get("oldest-waiting-ms", 0.0) >= 2000

    def refuse_new(self, refuse: bool = True) -> None:
        """New connections are reset as soon as they are accepted (True) or forwarded."""
        self._call(lambda: setattr(self, "_refuse", refuse))

    def hold_new(self, hold: bool = True) -> None:
        """New connections are accepted and then left alone: no upstream, nothing read."""
        self._call(lambda: setattr(self, "_hold", hold))

    def arm(self, cut: Cut) -> None:
        """Break the link when `cut`'s trigger fires; see `wait_cut`."""

        def run() -> None:
            self._cut, self._cut_report = cut, None
            self._cut_base = {
                (c.index, d): c.forwarded[d] for c in self.connections for d in ("down", "up")
            }

        self._call(run)

    def wait_cut(self, timeout: float = 60.0) -> CutReport:
        with self._changed:
            if not self._changed.wait_for(lambda: self._cut_report is not None, timeout):
                raise TimeoutError(f"the armed cut {self._cut} did not fire within {timeout} s")
            assert self._cut_report is not None
            return self._cut_report

    def close(self) -> None:
        """Close every connection and the listener, and stop the thread."""
        self._call(self._shutdown)
        self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()
        if self._listen_uri.scheme == "unix" and self._listen_uri.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._listen_uri.path)

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the loop thread -------------------------------------------------------------------

    def _call(self, command: Callable[[], object]) -> None:
        """Run `command` on the loop thread and wait for it."""
        if threading.current_thread() is self._thread:
            command()
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def wrapped() -> None:
            try:
                command()
            except BaseException as error:  # handed back to the caller
                failure.append(error)
            finally:
                done.set()

        with self._lock:
            if self._stop:
                return
            self._commands.append(wrapped)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(10):
            raise TimeoutError("the link proxy's thread did not answer")
        if failure:
            raise failure[0]

    def _bind(self) -> socket.socket:
        uri = self._listen_uri
        if uri.scheme == "unix":
            assert uri.path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(uri.path)
            sock.bind(uri.path)
        else:
            family = socket.AF_INET6 if ":" in (uri.host or "") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((uri.host or "127.0.0.1", uri.port or 0))
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def _loop(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, ("accept", None))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        while not self._stop:
            timeout = 0.5
            if self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
            for key, mask in self._selector.select(timeout):
                kind, payload = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    self._run_commands()
                else:
                    self._service(payload, kind, mask)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, due = self._timers.pop(0)
                due()
        self._run_commands()

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        if delay <= 0:
            action()
            return
        self._timers.append((time.monotonic() + delay, action))
        self._timers.sort(key=lambda timer: timer[0])

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            command()

    def _shutdown(self) -> None:
        for connection in self.connections:
            self._close(connection, reset=False)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._listener.close()
        with self._lock:
            self._stop = True

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        tune(client, None)  # as the ends do: Nagle on a relay held each small frame ~40 ms
        connection = ProxiedConnection(index=len(self.connections), client=client, server=None)
        connection.frozen = self._frozen
        for direction in ("down", "up"):
            connection.trackers[direction] = FrameTracker(self._page_sizes)
        with self._changed:
            self.connections.append(connection)
            self._changed.notify_all()
        if self._refuse:
            self._reset(connection)
            return
        if self._hold:
            connection.held = True
            return
        try:
            connection.server = self._connect_upstream()
        except OSError:
            self._reset(connection)
            return
        self._update(connection)

    def _connect_upstream(self) -> socket.socket:
        uri = parse_uri(self.target)
        if uri.scheme == "unix":
            assert uri.path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = uri.path
        else:
            family = socket.AF_INET6 if ":" in (uri.host or "") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            address = (uri.host or "127.0.0.1", uri.port)
        tune(sock, None)
        sock.setblocking(False)
        error = sock.connect_ex(address)  # type: ignore[arg-type]
        if error not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise OSError(error, os.strerror(error))
        return sock

    def _update(self, connection: ProxiedConnection) -> None:
        """Register each socket for what it should wait for now."""
        if connection.closed or connection.held:
            return
        for sock, reading, writing in (
            (connection.client, "down", "up"),
            (connection.server, "up", "down"),
        ):
            if sock is None:
                continue
            mask = 0
            if not connection.frozen:
                if (
                    not connection.pending[reading]
                    and reading not in connection.eof
                    and reading not in connection.held_directions
                    and (sock is connection.client or connection.connected)
                ):
                    mask |= selectors.EVENT_READ
                if connection.pending[writing]:
                    mask |= selectors.EVENT_WRITE
            if sock is connection.server and not connection.connected:
                mask |= selectors.EVENT_WRITE
            kind = "client" if sock is connection.client else "server"
            try:
                key = self._selector.get_key(sock)
            except KeyError:
                key = None
            if mask and key is None:
                self._selector.register(sock, mask, (kind, connection))
            elif mask and key is not None and key.events != mask:
                self._selector.modify(sock, mask, (kind, connection))
            elif not mask and key is not None:
                self._selector.unregister(sock)

    def _service(self, connection: ProxiedConnection, kind: str, mask: int) -> None:
        if connection.closed:
            return
        try:
            if kind == "server" and not connection.connected and mask & selectors.EVENT_WRITE:
                assert connection.server is not None
                error = connection.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
                connection.connected = True
            reading, sock = (
                ("down", connection.client) if kind == "client" else ("up", connection.server)
            )
            writing = "up" if kind == "client" else "down"
            assert sock is not None
            if mask & selectors.EVENT_WRITE and connection.pending[writing]:
                self._flush(connection, writing)
            if connection.closed:
                return
            if mask & selectors.EVENT_READ and not connection.frozen:
                self._read(connection, reading, sock)
        except OSError:
            # one end failed: pass the failure on as a reset of the other (a router would
            # not, but the end that failed is gone, and it keeps tests from hanging)
            self._reset(connection)
            return
        self._update(connection)

    def _read(self, connection: ProxiedConnection, direction: str, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            connection.eof.add(direction)
            other = connection.server if direction == "down" else connection.client
            if other is not None:
                with contextlib.suppress(OSError):
                    other.shutdown(socket.SHUT_WR)
            if connection.eof >= {"down", "up"}:
                self._close(connection, reset=False)
            return
        if direction in connection.dropping:
            return
        data = self._apply_cut(connection, direction, data)
        if data:
            connection.forwarded[direction] += len(data)
            connection.pending[direction] += data
            self._flush(connection, direction)

    def _flush(self, connection: ProxiedConnection, direction: str) -> None:
        sock = connection.server if direction == "down" else connection.client
        buffer = connection.pending[direction]
        if sock is None or (direction == "down" and not connection.connected):
            return
        while buffer:
            try:
                sent = sock.send(buffer)
            except (BlockingIOError, InterruptedError):
                return
            del buffer[:sent]
        action = connection.after_flush.pop(direction, None)
        if action is not None:
            action()

    # -- cuts ------------------------------------------------------------------------------

    def _apply_cut(self, connection: ProxiedConnection, direction: str, data: bytes) -> bytes:
        """Follow the framing; if the armed cut falls in `data`, clip it there and schedule
        the cut for when the clipped part has been written out."""
        tracker = connection.trackers[direction]
        before = tracker.position
        started = tracker.feed(data)
        cut = self._cut
        if cut is None or self._cut_report is not None or cut.direction != direction:
            return data
        if cut.connection is not None and cut.connection != connection.index:
            return data
        if cut.frame is not None:
            frame = next(
                (
                    f
                    for f in started
                    if f.type == cut.frame and (not cut.skip_short or f.length > cut.offset)
                ),
                None,
            )
            if frame is None:
                return data
            offset = min(cut.offset, frame.length - 1) if cut.clip else cut.offset
            point = frame.start + offset - before
            # from here the point is a byte count (it may lie in a later chunk); what
            # was read has all been forwarded, so `forwarded` is the stream position
            cut = dataclasses.replace(cut, frame=None, after=0)
            self._cut = cut
            self._cut_base[(connection.index, direction)] = connection.forwarded[direction] + point
        assert cut.after is not None
        target = self._cut_base.setdefault((connection.index, direction), 0) + cut.after
        keep = target - connection.forwarded[direction]
        if not 0 <= keep < len(data):
            return data
        cut_position = before + keep
        frame = tracker.frame_at(cut_position) if tracker.enabled else None
        report = CutReport(
            connection.index,
            cut.direction,
            connection.forwarded[direction] + keep,
            frame.type if frame else None,
            cut_position - frame.start if frame else None,
            frame.length if frame else None,
        )
        connection.forwarded[direction] += keep
        connection.pending[direction] += data[:keep]
        connection.held_directions.add(direction)
        delay = cut.settle if cut.action == "reset" else 0.0
        connection.after_flush[direction] = lambda: self._later(
            delay, lambda: self._fire(cut, connection, report)
        )
        self._flush(connection, direction)
        return b""

    def _fire(self, cut: Cut, connection: ProxiedConnection, report: CutReport) -> None:
        targets = (
            [connection]
            if cut.scope == "connection"
            else [c for c in self.connections if not c.closed]
        )
        for target in targets:
            if cut.action == "reset":
                self._reset(target)
            elif cut.action == "freeze":
                target.frozen = True
                self._update(target)
            else:
                target.dropping.add(cut.direction)
        if cut.action == "freeze" and cut.scope == "link":
            self._frozen = True
        with self._changed:
            self._cut_report = report
            self._cut = None
            self._changed.notify_all()

    # -- closing ---------------------------------------------------------------------------

    def _reset(self, connection: ProxiedConnection) -> None:
        self._close(connection, reset=True)

    def _close(self, connection: ProxiedConnection, *, reset: bool) -> None:
        if connection.closed:
            return
        connection.closed = True
        for sock in (connection.client, connection.server):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            if reset and sock.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        with self._changed:
            self._changed.notify_all()
