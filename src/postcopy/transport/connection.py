"""Connections that carry the migration stream: connect, listen, accept, move bytes.

`connect()` and `Listener.accept()` hand out a `Connection` only after the pre-stream
handshake of `postcopy.transport.auth` (inside TLS when configured) has succeeded. A
`Connection` moves bytes and nothing else: it knows no message types.

Sending is scatter-gather: `send_all` gives the kernel a list of buffers per `sendmsg`
call (memoryviews of guest RAM go out without being joined), and after a partial send
it advances through the list by slicing views, never copying. Receiving fills a
caller's buffer with `recv_into` until it is full. The GIL is released inside both
system calls, so a receiver thread and a sender thread run in parallel; `send_now` is
the exception, for a short frame on a page request's path: it never blocks and keeps it.

Second channel: a source that uses QEMU-style postcopy-preempt opens a second
connection with `channel="preempt"` and the `session` of its main connection; the
destination pairs them with `Listener.accept_channel(main.session, "preempt", timeout)`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from postcopy.closing import Closing
from postcopy.linux._libc import held_libc
from postcopy.transport.acceptor import Acceptor, AcceptorCounts, RefusalSink
from postcopy.transport.auth import (
    MAIN_CHANNEL,
    AuthConfig,
    HandshakeResult,
    RefuseReason,
    check_channel,
    client_handshake,
    new_session,
    server_handshake,
)
from postcopy.transport.errors import (
    ConnectionClosed,
    HandshakeError,
    InsecureListenError,
    TlsConfigError,
    TlsError,
    TransportError,
)
from postcopy.transport.sockets import bind_tcp, bind_unix, describe_peer, open_socket, tune
from postcopy.transport.tls import (
    TlsClientConfig,
    TlsServerConfig,
    describe_error,
    wrap_client,
    wrap_server,
)
from postcopy.transport.uri import Uri, parse_uri

__all__ = ["Connection", "Listener", "check_listen_security", "connect", "listen"]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
# the rest of a peer's handshake, the user's (listen's `vet`): raises to refuse the peer
Vet = Callable[["Connection"], None]

# Socket buffer size asked for with SO_SNDBUF/SO_RCVBUF; None leaves the kernel's
# autotuning alone. Measured on loopback, 1 GiB in 1 MiB buffers, 11 alternating runs:
# TCP 2.47 GB/s autotuned vs 2.63 forced to 4 MiB, unix 3.30 vs 3.71, inside the noise
# of a shared 2-core machine. Setting SO_RCVBUF switches TCP receive autotuning off for
# good and is silently capped by net.core.rmem_max (208 KiB on stock kernels), so the
# default is None.
DEFAULT_SOCKET_BUFFER: int | None = None
HANDSHAKE_TIMEOUT = 10.0
MAX_PENDING_CONNECTIONS = 16

try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    IOV_MAX = 1024

# TLS cannot take a buffer list; small buffers are joined to this size so each TLS
# write fills whole records instead of one record per 4 KiB page.
_TLS_COALESCE = 256 * 1024


_BYTE_STRINGS = (bytes, bytearray)
_SEND_NOW_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else memoryview(buffer).nbytes


def _byte_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Connection(Closing):
    """A connected, handshaken socket carrying one channel of one migration session."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str,
        channel: str = MAIN_CHANNEL,
        session: bytes = b"",
        authenticated: bool = False,
    ) -> None:
        self._sock = sock
        self.peer = peer
        self.channel = channel
        self.session = session
        self.authenticated = authenticated
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    def socketpair(cls) -> tuple[Connection, Connection]:
        """Two connected ends of a Unix socket pair, without handshake (for tests)."""
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        session = new_session()
        return (
            cls(left, peer="socketpair", session=session),
            cls(right, peer="socketpair", session=session),
        )

    def send_all(self, buffers: Sequence[Buffer]) -> int:
        """Send every byte of `buffers` in order; returns the number of bytes sent.

        Plain sockets get the buffers as one `sendmsg` I/O vector (at most IOV_MAX per
        call); a partial send continues from a slice of the first unsent buffer.
        """
        if self.tls:
            return self._send_all_tls(buffers)
        pending = list(buffers)
        # Inline rather than _nbytes(): this runs once per buffer, twice as fast so.
        sizes = [
            b.nbytes
            if type(b) is memoryview
            else len(b)
            if type(b) in _BYTE_STRINGS
            else memoryview(b).nbytes
            for b in pending
        ]
        total = 0
        index = 0
        count = len(pending)
        while index < count:
            end = min(index + IOV_MAX, count)
            sent = self._sock.sendmsg(pending[index:end])
            total += sent
            if sent == sum(sizes[index:end]):
                index = end
                continue
            while sent >= sizes[index]:
                sent -= sizes[index]
                index += 1
            if sent:
                pending[index] = _byte_view(pending[index])[sent:]
                sizes[index] -= sent
        return total

    def _send_all_tls(self, buffers: Sequence[Buffer]) -> int:
        total = 0
        batch = bytearray()
        for buffer in buffers:
            size = _nbytes(buffer)
            if size >= _TLS_COALESCE:
                if batch:
                    self._sock.sendall(batch)
                    batch.clear()
                self._sock.sendall(buffer)
            else:
                batch += buffer
                if len(batch) >= _TLS_COALESCE:
                    self._sock.sendall(batch)
                    batch.clear()
            total += size
        if batch:
            self._sock.sendall(batch)
        return total

    def send_now(self, data: bytes) -> int:
        """Send what the socket takes of `data` at once, keeping the GIL (a short frame on
        a page request's path: see linux._libc.held_libc); returns the bytes sent, 0 if
        none (a full socket buffer, or TLS, which this does not do). The caller sends
        the rest with `send_all`."""
        if self.tls:
            return 0
        sent = held_libc.send(self._sock.fileno(), data, len(data), _SEND_NOW_FLAGS)
        if sent >= 0:
            return int(sent)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            return 0
        raise OSError(err, os.strerror(err))

    def recv_into(self, view: memoryview) -> int:
        """One receive into `view`; returns the byte count, 0 when the peer closed."""
        return self._sock.recv_into(view)

    def recv_exact_into(self, view: memoryview) -> None:
        """Fill all of `view`; raises `ConnectionClosed` if the peer closes first."""
        target = _byte_view(view)
        size = target.nbytes
        received = 0
        while received < size:
            count = self._sock.recv_into(target[received:])
            if count == 0:
                raise ConnectionClosed(
                    f"{self.peer} closed the connection after {received} of {size} bytes"
                )
            received += count

    def recv_exact(self, size: int) -> bytes:
        """Receive exactly `size` bytes."""
        buffer = bytearray(size)
        self.recv_exact_into(memoryview(buffer))
        return bytes(buffer)

    def set_timeout(self, seconds: float | None) -> None:
        """Time limit for each send or receive call (None: block; 0: non-blocking)."""
        self._sock.settimeout(seconds)

    def set_user_timeout(self, seconds: float) -> None:
        """TCP only: give up the connection when sent data stay unacknowledged for
        `seconds` (TCP_USER_TIMEOUT, which also bounds zero-window probing), and probe an
        idle one with keepalives so that a dead peer is found in about that time too.
        Without it a silent partition leaves a blocked send waiting for many minutes.
        A Unix socket has no such failure and ignores it."""
        if self._sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        with contextlib.suppress(OSError):
            self._sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000))
            )
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(seconds / 3)))
            self._sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(seconds / 9))
            )
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Shut the connection down (wakes a thread blocked on it); harmless if already gone.

        With TLS the plain socket underneath is shut down, not the SSLSocket:
        `ssl.SSLSocket.shutdown` drops its TLS state first, and a thread still reading
        then gets the raw ciphertext left in the kernel's buffer as if it were data (a
        recovery test found whole runs of it placed in guest RAM). This way the reader
        sees the end of the stream instead."""
        try:
            if isinstance(self._sock, ssl.SSLSocket):
                socket.socket.shutdown(self._sock, how)
            else:
                self._sock.shutdown(how)
        except OSError as error:
            if error.errno not in (errno.ENOTCONN, errno.EBADF):
                raise

    def close(self) -> None:
        """Shut down and close; calling it again does nothing.

        The shutdown wakes any thread blocked on this connection and ends the connection
        for every holder of the socket (a forked child's copy included).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.shutdown()
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Connection {self.channel} {self.peer} session={self.session.hex()[:8]} "
            f"{'tls ' if self.tls else ''}{state}>"
        )


class Listener(Closing):
    """A listening socket that hands out handshaken connections; see `listen()`.

    Peers are accepted and handshaken concurrently (`acceptor.Acceptor`): a peer that
    connects and says nothing cannot hold back the source behind it."""

    def __init__(
        self,
        sock: socket.socket,
        uri: Uri,
        *,
        auth: AuthConfig | None,
        tls_context: ssl.SSLContext | None,
        unix_identity: tuple[int, int] | None,
        socket_buffer: int | None,
        on_refused: RefusalSink | None = None,
        vet: Vet | None = None,
    ) -> None:
        self._sock = sock
        self._vet = vet
        self._uri = uri
        self._auth = auth
        self._tls_context = tls_context
        self._unix_identity = unix_identity
        self._socket_buffer = socket_buffer
        self._pending: collections.deque[Connection] = collections.deque()
        # Guards _pending alone: close() may run while another thread sits in accept().
        self._pending_lock = threading.Lock()
        self._accept_lock = threading.Lock()
        self._closed = False
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self._verifies_clients = (
            tls_context is not None and tls_context.verify_mode == ssl.CERT_REQUIRED
        )
        self._acceptor = Acceptor(
            sock, self._handshake_accepted, name=str(uri), on_refused=on_refused
        )

    @property
    def uri(self) -> Uri:
        """The bound endpoint, with the real port when port 0 was asked for."""
        return self._uri

    @property
    def peer_counts(self) -> AcceptorCounts:
        """Peers accepted, in their handshake now, dropped to make room, refused."""
        return self._acceptor.counts()

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> Connection:
        """Wait for a source and return its connection once TLS and authentication passed.

        `timeout` bounds the wait for a connection; the handshake of a connected peer has
        its own limit (`handshake_timeout`, 10 s), and several run at once. A refused peer
        is told why and closed, and the refusal is raised here (`AuthenticationError`,
        `TlsError`, `HandshakeError`, `ConnectionClosed`, or the OSError of a peer that
        reset), unless the listener was given `on_refused`, which then gets it instead.
        Connections queued by `accept_channel` come out first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._accept_lock:
            with self._pending_lock:
                if self._pending:
                    return self._pending.popleft()
            return self._accept_one(deadline, timeout)

    def accept_channel(self, session: bytes, channel: str, timeout: float | None) -> Connection:
        """Wait for the connection of `channel` in `session` (e.g. the preempt channel).

        Other sessions' or channels' connections arriving meanwhile are queued for later
        `accept` calls; peers refused by the handshake are logged and skipped, so a
        stray connection cannot abort the wait.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._accept_lock:
            with self._pending_lock:
                for connection in self._pending:
                    if connection.session == session and connection.channel == channel:
                        self._pending.remove(connection)
                        return connection
            while True:
                try:
                    connection = self._accept_one(deadline, timeout)
                except TimeoutError:
                    raise TimeoutError(
                        f"no {channel} connection for session {session.hex()} reached "
                        f"{self._uri} within {timeout} s"
                    ) from None
                except (HandshakeError, ConnectionClosed) as error:
                    log.warning("skipping a refused connection to %s: %s", self._uri, error)
                    continue
                except TransportError:
                    raise  # closed
                except OSError as error:  # a peer that reset during its handshake
                    log.warning("skipping a refused connection to %s: %s", self._uri, error)
                    continue
                if connection.session == session and connection.channel == channel:
                    return connection
                with self._pending_lock:
                    keep = not self._closed and len(self._pending) < MAX_PENDING_CONNECTIONS
                    if keep:
                        self._pending.append(connection)
                if not keep:
                    log.warning("closing unclaimed connection %r on %s", connection, self._uri)
                    connection.close()

    def _accept_one(self, deadline: float | None, timeout: float | None) -> Connection:
        if self._closed:
            raise TransportError(f"listener on {self._uri} is closed")
        return self._acceptor.next(deadline, timeout)

    def _handshake_accepted(self, sock: socket.socket, address: object) -> Connection:
        try:
            connection = self._handshake(sock, address)
        except BaseException:
            sock.close()
            raise
        if self._vet is not None:
            # the user's part of the handshake, on this thread and within the same limit:
            # a peer that passed ours and then says nothing holds back no one
            try:
                connection.set_timeout(self.handshake_timeout)
                self._vet(connection)
                connection.set_timeout(None)
            except TimeoutError:
                connection.close()
                raise HandshakeError(
                    f"source {connection.peer} did not complete the handshake within "
                    f"{self.handshake_timeout} s"
                ) from None
            except BaseException:
                connection.close()
                raise
        return connection

    def _handshake(self, sock: socket.socket, address: object) -> Connection:
        peer = describe_peer(sock, self._uri, address)
        tune(sock, self._socket_buffer)
        sock.settimeout(self.handshake_timeout)
        stream: socket.socket = sock
        result: HandshakeResult
        try:
            if self._tls_context is not None:
                first = sock.recv(1, socket.MSG_PEEK)
                if first == b"P":  # a plain-text hello: say in plain text that TLS is needed
                    server_handshake(
                        sock,
                        self._auth,
                        tls=True,
                        peer=peer,
                        refuse=(
                            RefuseReason.TLS,
                            "destination requires TLS: give the source a TLS CA file",
                        ),
                    )
                if not first:
                    raise ConnectionClosed(f"{peer} closed the connection before the handshake")
                stream = wrap_server(sock, self._tls_context, peer)
            result = server_handshake(
                stream, self._auth, tls=self._tls_context is not None, peer=peer
            )
        except TimeoutError:
            raise HandshakeError(
                f"source {peer} did not complete the handshake within {self.handshake_timeout} s"
            ) from None
        except ssl.SSLError as error:
            raise TlsError(f"TLS with source {peer} failed: {describe_error(error)}") from error
        stream.settimeout(None)
        return Connection(
            stream,
            peer=peer,
            channel=result.channel,
            session=result.session,
            authenticated=result.authenticated or self._verifies_clients,
        )

    def close(self) -> None:
        """Stop listening, close queued connections, remove the socket file we created."""
        if self._closed:
            return
        self._closed = True
        self._acceptor.close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._sock.close()
        with self._pending_lock:
            unclaimed = list(self._pending)
            self._pending.clear()
        for connection in unclaimed:
            connection.close()
        if self._unix_identity is not None and self._uri.path is not None:
            try:
                info = os.lstat(self._uri.path)
                if (info.st_dev, info.st_ino) == self._unix_identity:
                    os.unlink(self._uri.path)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        return f"<Listener {self._uri}{' closed' if self._closed else ''}>"


def listen(
    uri: Uri | str,
    *,
    auth: AuthConfig | None,
    tls: TlsServerConfig | None = None,
    allow_insecure_network: bool = False,
    backlog: int = 16,
    socket_buffer: int | None = DEFAULT_SOCKET_BUFFER,
    on_refused: RefusalSink | None = None,
    vet: Vet | None = None,
) -> Listener:
    """Listen on `uri` for sources; `auth` is required knowingly (pass None for no key).

    `on_refused` gets the refusal of every peer that fails its handshake (from the
    handshake's thread), and `accept` then returns only sources that passed. `vet`, if
    given, is the rest of the handshake (the migration's stream header and Handshake
    frame): it runs on the same thread once ours has passed, within the same time limit,
    and refuses the peer by raising.

    A TCP address that is not loopback needs a key or TLS client verification, unless
    `allow_insecure_network` says the network is trusted: whoever connects to a
    destination sends it the memory and CPU state it will run.
    """
    endpoint = parse_uri(uri) if isinstance(uri, str) else uri
    check_listen_security(
        endpoint, auth=auth, tls=tls, allow_insecure_network=allow_insecure_network
    )
    tls_context = tls.context() if tls is not None else None
    if endpoint.scheme == "unix":
        sock, identity = bind_unix(endpoint, backlog, socket_buffer)
        return Listener(
            sock,
            endpoint,
            auth=auth,
            tls_context=tls_context,
            unix_identity=identity,
            socket_buffer=socket_buffer,
            on_refused=on_refused,
            vet=vet,
        )
    sock = bind_tcp(endpoint, backlog, socket_buffer)
    bound = endpoint.with_port(sock.getsockname()[1])
    return Listener(
        sock,
        bound,
        auth=auth,
        tls_context=tls_context,
        unix_identity=None,
        socket_buffer=socket_buffer,
        on_refused=on_refused,
        vet=vet,
    )


def check_listen_security(
    endpoint: Uri,
    *,
    auth: AuthConfig | None,
    tls: TlsServerConfig | None,
    allow_insecure_network: bool,
) -> None:
    """Raise `InsecureListenError` for an unauthenticated listener on a network address."""
    verifies_clients = tls is not None and tls.verify_client
    if (
        endpoint.scheme == "tcp"
        and not endpoint.is_loopback
        and auth is None
        and not verifies_clients
        and not allow_insecure_network
    ):
        raise InsecureListenError(
            f"refusing to listen on {endpoint} without authentication: anyone who can reach "
            "it could feed this destination a VM to run. Give a key file (--key FILE), or "
            "listen on a loopback address or a unix: socket, or, on a network you trust "
            "completely, --allow-insecure-network"
        )


def connect(
    uri: Uri | str,
    *,
    auth: AuthConfig | None = None,
    tls: TlsClientConfig | None = None,
    timeout: float = 10.0,
    channel: str = MAIN_CHANNEL,
    session: bytes | None = None,
    socket_buffer: int | None = DEFAULT_SOCKET_BUFFER,
) -> Connection:
    """Connect to a destination and complete TLS and the handshake within `timeout` seconds.

    A new main connection gets a fresh random session id; pass `session=main.session`
    with `channel="preempt"` to open the second channel of the same migration.
    """
    endpoint = parse_uri(uri) if isinstance(uri, str) else uri
    session = new_session() if session is None else session
    check_channel(channel, session)
    server_hostname: str | None = None
    if tls is not None:
        server_hostname = tls.server_hostname or endpoint.host
        if not server_hostname:
            raise TlsConfigError(
                f"TLS to {endpoint} needs server_hostname: the name in the "
                "destination's certificate"
            )
    context = tls.context() if tls is not None else None
    deadline = time.monotonic() + timeout
    sock, peer = open_socket(endpoint, timeout, socket_buffer)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        stream: socket.socket = sock
        if context is not None and server_hostname is not None:
            stream = wrap_client(sock, context, server_hostname, peer)
            stream.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            result = client_handshake(
                stream, auth, channel=channel, session=session, tls=context is not None, peer=peer
            )
        except TimeoutError:
            raise HandshakeError(
                f"destination {peer} did not complete the handshake within {timeout} s"
            ) from None
        except ssl.SSLError as error:
            # With TLS 1.3 the server checks our certificate after our side of the TLS
            # handshake returned: its verdict arrives here, as an alert.
            raise TlsError(
                f"TLS with destination {peer} failed: {describe_error(error)}"
                " (does the destination require a client certificate?)"
            ) from error
        stream.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Connection(
        stream,
        peer=peer,
        channel=result.channel,
        session=result.session,
        authenticated=result.authenticated,
    )
