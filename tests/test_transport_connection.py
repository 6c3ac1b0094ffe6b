"""Tests for postcopy.transport.connection on real loopback and unix sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from postcopy.transport import (
    ConnectError,
    Connection,
    ConnectionClosed,
    Listener,
    ListenError,
    TransportError,
    connect,
    listen,
)
from postcopy.transport import connection as connection_module
from postcopy.transport.acceptor import AcceptorCounts

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def short_tmp(tmp_path: Path) -> Path:
    # sun_path holds 107 bytes and pytest's tmp paths can be long.
    if len(str(tmp_path)) < 80:
        return tmp_path
    return Path(os.path.relpath(tmp_path))


def pair(
    uri: str, pool: ThreadPoolExecutor, closing: list[Connection | Listener], **options: object
) -> tuple[Connection, Connection]:
    """(source side, destination side) of one handshaken connection."""
    listener = listen(uri, auth=None, **options)  # type: ignore[arg-type]
    closing.append(listener)
    accepted: Future[Connection] = pool.submit(listener.accept, 10)
    source = connect(listener.uri, **options)  # type: ignore[arg-type]
    closing.append(source)
    destination = accepted.result(10)
    closing.append(destination)
    return source, destination


def ipv6_loopback_available() -> str | None:
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        return f"the kernel cannot bind ::1: {error.strerror}"
    return None


def endpoints(tmp_path: Path) -> dict[str, str]:
    return {
        "tcp": "tcp:127.0.0.1:0",
        "tcp6": "tcp:[::1]:0",
        "unix": f"unix:{short_tmp(tmp_path) / 'm.sock'}",
    }


def random_bytes(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def irregular_views(data: memoryview) -> list[memoryview | bytes]:
    """Views of `data`, mostly 4 KiB pages, some awkward or empty sizes, a few as bytes."""
    sizes = [1, 4095, 4096, 0, 4096, 4096, 65537, 4096, 3, 8192 * 3 + 7, 4096]
    views: list[memoryview | bytes] = []
    offset = 0
    index = 0
    while offset < len(data):
        size = min(sizes[index % len(sizes)], len(data) - offset)
        piece = data[offset : offset + size]
        views.append(bytes(piece) if index % 97 == 5 else piece)
        offset += size
        index += 1
    return views


@pytest.mark.parametrize("kind", ["tcp", "tcp6", "unix"])
def test_64_mib_of_scattered_views_arrive_intact(
    kind: str, tmp_path: Path, pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    if kind == "tcp6" and (reason := ipv6_loopback_available()):
        pytest.skip(reason)
    source, destination = pair(endpoints(tmp_path)[kind], pool, closing)
    payload = random_bytes(64 * MiB, seed=1)
    views = irregular_views(payload.data)
    assert len(views) > 1000
    sending = pool.submit(source.send_all, views)
    received = np.zeros(64 * MiB, dtype=np.uint8)
    target = received.data
    # Receive in pieces that do not line up with the sender's buffers.
    step = 3 * MiB + 5
    for offset in range(0, len(target), step):
        destination.recv_exact_into(target[offset : offset + step])
    assert sending.result(30) == 64 * MiB
    assert np.array_equal(received, payload)


def test_tcp_has_nodelay_and_peer_names_are_uris(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    source, destination = pair("tcp:127.0.0.1:0", pool, closing)
    for end in (source, destination):
        raw = socket.socket(fileno=os.dup(end.fileno()))
        try:
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            raw.close()
    assert source.peer == str(closing[0].uri)  # type: ignore[union-attr]
    assert destination.peer.startswith("tcp:127.0.0.1:")
    assert source.session == destination.session and len(source.session) == 16
    assert source.channel == destination.channel == "main"


def test_socket_buffer_option_is_applied(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    source, destination = pair("tcp:127.0.0.1:0", pool, closing, socket_buffer=256 * 1024)
    for end in (source, destination):
        raw = socket.socket(fileno=os.dup(end.fileno()))
        try:
            # Linux doubles the value asked for to account for its bookkeeping.
            assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 256 * 1024
            assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 256 * 1024
        finally:
            raw.close()


class RecordingSocket:
    """A real socket whose sendmsg results are recorded, to see partial sends happen."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[tuple[int, int]] = []  # (bytes offered, bytes sent)

    def sendmsg(self, buffers: list[memoryview | bytes]) -> int:
        offered = sum(memoryview(b).nbytes for b in buffers)
        sent = self.sock.sendmsg(buffers)
        self.calls.append((offered, sent))
        return sent

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def test_partial_sendmsg_with_tiny_socket_buffers(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    source, destination = pair("tcp:127.0.0.1:0", pool, closing, socket_buffer=4096)
    recorder = RecordingSocket(source._sock)
    source._sock = recorder  # type: ignore[assignment]
    # With a timeout the socket is non-blocking underneath: sendmsg returns what fit.
    source.set_timeout(20)
    payload = random_bytes(4 * MiB, seed=2)
    views = irregular_views(payload.data)
    sending = pool.submit(source.send_all, views)
    received = np.zeros(len(payload), dtype=np.uint8)
    target = received.data
    offset = 0
    while offset < len(target):
        count = destination.recv_into(target[offset : offset + 1000])
        assert count > 0
        offset += count
    assert sending.result(20) == len(payload)
    assert np.array_equal(received, payload)
    partial = [call for call in recorder.calls if call[1] < call[0]]
    assert partial, "expected the kernel to accept only part of some sendmsg calls"


class TricklingSocket:
    """A fake socket that accepts at most `limit` bytes per sendmsg and records them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = bytearray()
        self.max_buffers = 0

    def sendmsg(self, buffers: list[memoryview | bytes]) -> int:
        self.max_buffers = max(self.max_buffers, len(buffers))
        budget = self.limit
        for buffer in buffers:
            chunk = bytes(memoryview(buffer).cast("B")[:budget])
            self.received += chunk
            budget -= len(chunk)
            if budget == 0:
                break
        return self.limit - budget


@pytest.mark.parametrize("limit", [13, 4096, 10**9])
def test_send_all_advances_through_buffers_after_partial_sends(limit: int) -> None:
    data = bytes(random_bytes(300_000, seed=3))
    # More buffers than IOV_MAX, empty ones, and a non-byte format view.
    pieces: list[bytes | memoryview] = [data[i : i + 97] for i in range(0, 200_000, 97)]
    pieces.append(b"")
    pieces.append(memoryview(data[200_000 + 12 :]).cast("B").cast("I"))
    pieces.insert(3, data[200_000 : 200_000 + 12])
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
    fake = TricklingSocket(limit)
    connection = Connection(fake, peer="fake")  # type: ignore[arg-type]
    assert connection.send_all(pieces) == len(expected)
    assert bytes(fake.received) == expected
    assert fake.max_buffers <= connection_module.IOV_MAX


def test_send_all_of_nothing_sends_nothing(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    source, destination = Connection.socketpair()
    closing += [source, destination]
    assert source.send_all([]) == 0
    assert source.send_all([b"", memoryview(b"")]) == 0
    source.send_all([b"x"])
    assert destination.recv_exact(1) == b"x"


def test_send_now_sends_what_fits_and_never_blocks(
    closing: list[Connection | Listener], pool: ThreadPoolExecutor
) -> None:
    """send_now (a page request, keeping the GIL): what the socket takes at once, 0 on a
    full buffer, an error on a closed peer; send_all sends the rest."""
    source, destination = pair("tcp:127.0.0.1:0", pool, closing)
    assert source.send_now(b"request") == 7
    assert destination.recv_exact(7) == b"request"
    chunk = bytes(1 << 20)
    sent = 0
    while (count := source.send_now(chunk)) > 0:  # until the buffers are full
        sent += count
    assert sent > 0 and source.send_now(b"x") == 0
    receiving = pool.submit(destination.recv_exact, sent)
    assert receiving.result(10) == bytes(sent)
    destination.close()
    with pytest.raises(OSError) as raised:
        for _ in range(100):  # the reset comes with the peer's answer to the first sends
            source.send_now(b"y" * 4096)
    assert raised.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_eof_names_bytes_received_and_expected() -> None:
    source, destination = Connection.socketpair()
    with source, destination:
        source.send_all([b"0123456789"])
        source.close()
        target = memoryview(bytearray(100))
        with pytest.raises(ConnectionClosed, match="after 10 of 100 bytes") as info:
            destination.recv_exact_into(target)
        assert isinstance(info.value, ConnectionError)
        assert destination.recv_into(target) == 0


def test_recv_exact_and_timeout() -> None:
    source, destination = Connection.socketpair()
    with source, destination:
        source.send_all([b"abc", memoryview(b"defg")])
        assert destination.recv_exact(7) == b"abcdefg"
        assert destination.recv_exact(0) == b""
        destination.set_timeout(0.05)
        with pytest.raises(TimeoutError):
            destination.recv_exact(1)


def test_close_is_idempotent_and_context_manager_closes() -> None:
    source, destination = Connection.socketpair()
    with source:
        assert source.fileno() >= 0
    assert source.closed
    assert source.fileno() == -1
    source.close()
    destination.close()
    destination.close()
    assert "closed" in repr(destination)


def test_shutdown_wakes_a_blocked_receiver(pool: ThreadPoolExecutor) -> None:
    source, destination = Connection.socketpair()
    with source, destination:
        waiting = pool.submit(destination.recv_exact, 10)
        destination.shutdown()
        with pytest.raises(ConnectionClosed, match="after 0 of 10 bytes"):
            waiting.result(10)
        destination.shutdown()  # again: harmless


def test_port_zero_listener_reports_real_port(closing: list[Connection | Listener]) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    assert listener.uri.port not in (None, 0)
    assert str(listener.uri) == f"tcp:127.0.0.1:{listener.uri.port}"


def test_localhost_hostname_listens_and_connects(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    source, destination = pair("tcp:localhost:0", pool, closing)
    source.send_all([b"ping"])
    assert destination.recv_exact(4) == b"ping"


def test_accept_times_out(closing: list[Connection | Listener]) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    with pytest.raises(TimeoutError, match="no source connected"):
        listener.accept(0.05)
    with pytest.raises(TimeoutError, match="no source connected"):
        listener.accept(0)


def test_closing_listener_wakes_accept(pool: ThreadPoolExecutor) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=None)
    try:
        waiting = pool.submit(listener.accept, 30)
        threading.Event().wait(0.1)
        listener.close()
        with pytest.raises(TransportError, match="closed"):
            waiting.result(10)
    finally:
        listener.close()
    with pytest.raises(TransportError, match="closed"):
        listener.accept(0)


def test_unix_listener_removes_its_socket_file(tmp_path: Path) -> None:
    path = short_tmp(tmp_path) / "d.sock"
    listener = listen(f"unix:{path}", auth=None)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert listener.uri.path == str(path)
    finally:
        listener.close()
    assert not path.exists()
    listener.close()


def test_unix_listener_replaces_stale_socket_but_not_live_one_or_other_files(
    tmp_path: Path,
) -> None:
    base = short_tmp(tmp_path)
    stale = base / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # bound, never listening: what a killed process leaves
    with listen(f"unix:{stale}", auth=None) as listener:
        with pytest.raises(ListenError, match="another process is listening"):
            listen(f"unix:{stale}", auth=None)
        assert listener.uri.path == str(stale)
    regular = base / "file"
    regular.write_text("keep me")
    with pytest.raises(ListenError, match="not a socket"):
        listen(f"unix:{regular}", auth=None)
    assert regular.read_text() == "keep me"


def test_unix_listener_does_not_unlink_a_replacement(tmp_path: Path) -> None:
    path = short_tmp(tmp_path) / "r.sock"
    listener = listen(f"unix:{path}", auth=None)
    try:
        path.unlink()
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(path))
    finally:
        listener.close()
    assert path.exists()


def test_tcp_port_in_use_is_a_listen_error(closing: list[Connection | Listener]) -> None:
    first = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(first)
    with pytest.raises(ListenError, match=r"cannot listen on tcp:127\.0\.0\.1") as info:
        listen(first.uri, auth=None)
    assert info.value.errno == errno.EADDRINUSE


def test_connect_errors_say_what_failed(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(ConnectError, match=r"Connection refused.*is the destination listening"):
            connect(f"tcp:127.0.0.1:{port}", timeout=5)
    with pytest.raises(ConnectError, match="is the destination listening"):
        connect(f"unix:{short_tmp(tmp_path) / 'nothing.sock'}")
    with pytest.raises(ConnectError, match="no host"):
        connect("tcp::4444")
    with pytest.raises(ValueError, match="channel name"):
        connect("tcp:127.0.0.1:1", channel="Main Channel")
    with pytest.raises(ValueError, match="16 bytes"):
        connect("tcp:127.0.0.1:1", session=b"short")


def test_silent_peer_hits_handshake_timeout(closing: list[Connection | Listener]) -> None:
    from postcopy.transport import HandshakeError

    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    listener.handshake_timeout = 0.2
    with (
        contextlib.closing(socket.create_connection(("127.0.0.1", listener.uri.port))),
        pytest.raises(HandshakeError, match="did not complete the handshake"),
    ):
        listener.accept(5)


def test_non_postcopy_peer_is_refused(closing: list[Connection | Listener]) -> None:
    from postcopy.transport import HandshakeError

    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    with contextlib.closing(socket.create_connection(("127.0.0.1", listener.uri.port))) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 60)
        with pytest.raises(HandshakeError, match="not a postcopy peer"):
            listener.accept(5)


@pytest.mark.parametrize(
    ("sent", "named"),
    [
        # shorter than a hello, and the peer waits for an answer: named at once
        (b"SSH-2.0-OpenSSH_9.2\r\n", 'its first bytes are "SSH-2.0-" (text)'),
        (bytes(range(0xF0, 0x100)), "its first bytes are f0 f1 f2 f3 f4 f5 f6 f7 (hex)"),
    ],
)
def test_a_stranger_is_named_by_its_first_bytes_in_the_users_terms(
    closing: list[Connection | Listener], sent: bytes, named: str
) -> None:
    from postcopy.transport import HandshakeError

    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    with contextlib.closing(socket.create_connection(("127.0.0.1", listener.uri.port))) as raw:
        raw.sendall(sent)  # and stays open, silent
        with pytest.raises(HandshakeError) as caught:
            listener.accept(5)
    text = str(caught.value)
    assert "not a postcopy peer" in text and named in text, text
    assert "b'" not in text and '"POSTCOPY"' in text, text


def test_a_silent_peer_does_not_hold_back_the_source_behind_it(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    listener.handshake_timeout = 60.0  # the silent peer's handshake outlives the test
    with contextlib.closing(socket.create_connection(("127.0.0.1", listener.uri.port))):
        accepted = pool.submit(listener.accept, 30)
        source = connect(listener.uri, timeout=30)
        closing.append(source)
        destination = accepted.result(30)
        closing.append(destination)
        source.send_all([b"ping"])
        assert destination.recv_exact(4) == b"ping"


def wait_counts(
    read: Callable[[], AcceptorCounts], holds: Callable[[AcceptorCounts], bool]
) -> AcceptorCounts:
    """Until the acceptor's own counters (`read`) say what `holds` asks (they change on its
    threads); fails naming them if they never do."""
    pause = threading.Event()
    for _ in range(3000):
        counts = read()
        if holds(counts):
            return counts
        pause.wait(0.01)
    raise AssertionError(f"the acceptor never got there: {read()}")


def wait_reported(refused: list[Exception], count: int) -> None:
    """Until `count` refusals reached on_refused (each from its peer's own thread, after
    the acceptor counted it)."""
    pause = threading.Event()
    for _ in range(3000):
        if len(refused) >= count:
            return
        pause.wait(0.01)
    raise AssertionError(f"only {len(refused)} of {count} refusals reported: {refused}")


def test_a_crowd_of_silent_peers_cannot_lock_the_door(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    """More silent peers than handshakes in flight: each newcomer drops the oldest."""
    from postcopy.transport.acceptor import MAX_HANDSHAKES

    refused: list[Exception] = []
    listener = listen("tcp:127.0.0.1:0", auth=None, on_refused=refused.append)
    closing.append(listener)
    listener.handshake_timeout = 60.0
    accepted = pool.submit(listener.accept, 30)
    crowd = 2 * MAX_HANDSHAKES
    with contextlib.ExitStack() as stack:
        for _ in range(crowd):
            peer = socket.create_connection(("127.0.0.1", listener.uri.port))
            stack.enter_context(contextlib.closing(peer))
        # the acceptor holds the whole crowd before the source comes (connect() returns
        # before the listener took the peer in, and a source taken in among them, its
        # handshake done before the rest came, would leave one drop fewer): a full door,
        # each silent peer beyond the first MAX_HANDSHAKES having dropped the oldest
        counts = wait_counts(lambda: listener.peer_counts, lambda counts: counts.accepted == crowd)
        assert counts.in_handshake == MAX_HANDSHAKES, counts
        assert counts.dropped == crowd - MAX_HANDSHAKES, counts
        source = connect(listener.uri, timeout=30)
        closing.append(source)
        closing.append(accepted.result(30))
        # the source dropped one more, the oldest silent peer, to get in; its handshake is
        # done and the other silent peers are still waiting, held open here
        counts = listener.peer_counts
        assert counts.accepted == crowd + 1, counts
        assert counts.dropped == crowd - MAX_HANDSHAKES + 1, counts
        assert counts.in_handshake == MAX_HANDSHAKES - 1, counts
        # and each dropped peer is refused with the reason, once its thread has ended
        wait_reported(refused, counts.dropped)
        assert listener.peer_counts.refused == counts.dropped
        dropped = list(refused)
    assert len(dropped) == MAX_HANDSHAKES + 1
    assert all("newer peers were in their handshake" in str(e) for e in dropped), dropped


def test_a_refused_peers_fd_taken_by_the_next_peer_keeps_that_peer_in_the_door(
    closing: list[Connection | Listener],
) -> None:
    """A handshake that closes its socket before it reports back (a refusal does, in
    Listener._handshake_accepted) frees the fd for a peer accepted after it; the first
    peer's report must not end that peer's place in the door. (With the door keyed by fd
    it did: that peer was no longer counted nor ever dropped, so a crowd of 16 silent
    peers and a source dropped 8 of them instead of 9.) Linux gives accept() its fd when
    the call starts, so the freed fd goes to the second peer accepted after the close:
    three come, one at a time."""
    from postcopy.transport.acceptor import Acceptor

    closed = threading.Event()
    report = threading.Event()

    def handshake(sock: socket.socket, address: object) -> Connection:
        if sock.recv(1) == b"q":  # the first peer: refused, its socket closed early
            sock.close()
            closed.set()
            report.wait(30)
            raise ConnectionClosed("refused")
        raise ConnectionClosed("dropped")  # a silent peer, until it is closed

    refused: list[Exception] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        acceptor = Acceptor(server, handshake, name="test", on_refused=refused.append)
        stack.callback(acceptor.close)
        acceptor.start()
        port = server.getsockname()[1]
        peers = [stack.enter_context(socket.socket()) for _ in range(4)]
        peers[0].connect(("127.0.0.1", port))
        peers[0].sendall(b"q")
        assert closed.wait(30)
        for number, peer in enumerate(peers[1:], start=2):
            peer.connect(("127.0.0.1", port))

            def accepted(counts: AcceptorCounts, number: int = number) -> bool:
                return counts.accepted == number

            wait_counts(acceptor.counts, accepted)
        report.set()  # the first peer reports its refusal now
        counts = wait_counts(acceptor.counts, lambda counts: counts.refused == 1)
        assert counts.accepted == 4 and counts.in_handshake == 3, counts
        for peer in peers[1:]:
            peer.sendall(b"x")  # each ends as its own
        counts = wait_counts(acceptor.counts, lambda counts: counts.refused == 4)
        assert counts.in_handshake == 0 and counts.dropped == 0, counts
        assert len(refused) == 4


def test_refusals_go_to_on_refused_and_accept_returns_only_sources(
    pool: ThreadPoolExecutor, closing: list[Connection | Listener]
) -> None:
    refused: list[Exception] = []
    listener = listen("tcp:127.0.0.1:0", auth=None, on_refused=refused.append)
    closing.append(listener)
    accepted = pool.submit(listener.accept, 30)
    with socket.create_connection(("127.0.0.1", listener.uri.port)) as scan:
        scan.close()  # a port scan: connect and close
    with socket.create_connection(("127.0.0.1", listener.uri.port)) as junk:
        junk.sendall(os.urandom(200))
    source = connect(listener.uri, timeout=30)
    closing.append(source)
    closing.append(accepted.result(30))
    wait_reported(refused, 2)  # the two handshakes fail on their own threads
    assert len(refused) == 2 and listener.peer_counts.refused == 2, listener.peer_counts
    assert any("not a postcopy peer" in str(e) for e in refused)
