"""The link proxy that recovery tests break links with: forward, reset, freeze, drop, cut.

Real sockets on loopback; the far ends are plain sockets of the test, so what each end
sees (bytes, EOF, ECONNRESET, silence) is asserted directly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from postcopy.bench.linkproxy import Cut, LinkProxy
from postcopy.transport.uri import parse_uri
from postcopy.wire import BlockInfo, Direction, Encoder, FrameType, Handshake, RamRun

PAGE = 4096


@contextlib.contextmanager
def proxied() -> Iterator[tuple[LinkProxy, socket.socket, socket.socket]]:
    """A proxy in front of a listening socket; yields (proxy, client end, server end)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with LinkProxy(f"tcp:127.0.0.1:{port}") as proxy:
            uri = parse_uri(proxy.uri)
            client = socket.create_connection((uri.host, uri.port), timeout=5)
            server.settimeout(5)
            accepted, _ = server.accept()
            accepted.settimeout(5)
            try:
                yield proxy, client, accepted
            finally:
                client.close()
                accepted.close()


def recv_all(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the stream ends; returns the bytes and how it ended."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return bytes(data), "reset"
        except TimeoutError:
            return bytes(data), "silence"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def test_forwards_both_ways_and_passes_eof_on() -> None:
    with proxied() as (proxy, client, server):
        client.sendall(b"hello " * 1000)
        server.sendall(b"world")
        assert client.recv(5) == b"world"
        client.shutdown(socket.SHUT_WR)
        data, end = recv_all(server)
        assert data == b"hello " * 1000 and end == "eof"
        assert proxy.connections[0].forwarded == {"down": 6000, "up": 5}


def test_the_relay_sends_small_frames_at_once_as_the_ends_do() -> None:
    # Nagle on the proxy's sockets held a small frame behind an unacknowledged one for the
    # peer's delayed ACK (~40 ms): the bench's reconnect-to-active read 5 or 47 ms by chance
    with proxied() as (proxy, client, server):
        client.sendall(b"x")
        assert server.recv(1) == b"x"
        connection = proxy.connections[0]
        assert connection.server is not None
        for sock in (connection.client, connection.server):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_reset_gives_both_ends_a_connection_reset() -> None:
    with proxied() as (proxy, client, server):
        client.sendall(b"x")
        assert server.recv(1) == b"x"
        proxy.reset()
        assert recv_all(server)[1] == "reset"
        assert recv_all(client)[1] == "reset"


def test_freeze_is_silence_until_thaw() -> None:
    with proxied() as (proxy, client, server):
        proxy.freeze()
        client.sendall(b"held")
        server.settimeout(0.3)
        assert recv_all(server) == (b"", "silence")
        proxy.thaw()
        server.settimeout(5)
        assert server.recv(4) == b"held"


def test_drop_loses_one_direction_only() -> None:
    with proxied() as (proxy, client, server):
        proxy.drop("up")
        server.sendall(b"lost")
        client.sendall(b"kept")
        assert server.recv(4) == b"kept"
        client.settimeout(0.3)
        assert recv_all(client) == (b"", "silence")


def test_cut_after_n_bytes_delivers_exactly_n_then_resets() -> None:
    with proxied() as (proxy, client, server):
        client.sendall(b"a" * 10)
        assert server.recv(10) == b"a" * 10
        proxy.arm(Cut(after=123_457, direction="down"))
        sender = threading.Thread(target=lambda: _send_ignoring_errors(client, 1 << 20))
        sender.start()
        report = proxy.wait_cut()
        data, end = recv_all(server)
        sender.join(10)
        assert (len(data), end) == (123_457, "reset")
        assert report.forwarded == 10 + 123_457


def test_refuse_and_hold_new_connections() -> None:
    with proxied() as (proxy, _client, _server):
        uri = parse_uri(proxy.uri)
        proxy.refuse_new()
        try:
            with socket.create_connection((uri.host, uri.port), timeout=5) as refused:
                assert recv_all(refused)[1] in ("reset", "eof")
        except ConnectionResetError:
            pass  # the RST came before connect() returned (loopback, a loaded host)
        proxy.refuse_new(False)
        proxy.hold_new()
        with socket.create_connection((uri.host, uri.port), timeout=5) as held:
            held.settimeout(0.3)
            held.sendall(b"anyone?")
            assert recv_all(held) == (b"", "silence")
        assert len(proxy.connections) == 3


def _stream(runs: int) -> tuple[bytes, list[int]]:
    """A plain connection's bytes as the source sends them: hello, stream header,
    Handshake, then RAM_RUN frames of 8 pages with one zero page; returns the bytes and
    the offset of each RAM_RUN frame."""
    hello = b"POSTCOPY" + bytes(68)
    encoder = Encoder(Direction.MAIN)
    blocks = (BlockInfo("pc.ram", 1 << 20, PAGE),)
    out = bytearray(hello + encoder.stream_header())
    out += encoder.encode(Handshake(frozenset({"postcopy-ram"}), blocks, 1))
    starts = []
    zero = np.zeros(8, dtype=np.bool_)
    zero[3] = True
    for index in range(runs):
        starts.append(len(out))
        out += encoder.encode(RamRun(0, index * 8, zero, bytes([index + 1]) * (7 * PAGE)))
    return bytes(out), starts


def test_cut_inside_the_data_of_a_chosen_frame() -> None:
    stream, starts = _stream(6)
    with proxied() as (proxy, client, server):
        proxy.arm(Cut(frame=FrameType.RAM_RUN, offset=20_000, direction="down"))
        sender = threading.Thread(target=lambda: _send_ignoring_errors(client, 0, stream))
        sender.start()
        report = proxy.wait_cut()
        data, end = recv_all(server)
        sender.join(10)
    assert end == "reset"
    assert report.frame_type == FrameType.RAM_RUN and report.frame_offset == 20_000
    assert report.frame_length == 8 + 14 + 1 + 7 * PAGE
    # the first RAM_RUN after arming: the cut is 20 000 bytes into it
    assert len(data) == starts[0] + 20_000
    assert data == stream[: len(data)]


def _send_ignoring_errors(sock: socket.socket, size: int, data: bytes | None = None) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data if data is not None else b"z" * size)


@pytest.mark.parametrize("offset", [0, 5, 10_000_000])
def test_frame_offsets_are_clipped_into_the_frame(offset: int) -> None:
    stream, starts = _stream(3)
    with proxied() as (proxy, client, server):
        proxy.arm(Cut(frame=FrameType.RAM_RUN, offset=offset, direction="down"))
        sender = threading.Thread(target=lambda: _send_ignoring_errors(client, 0, stream))
        sender.start()
        report = proxy.wait_cut()
        data, _ = recv_all(server)
        sender.join(10)
    length = starts[1] - starts[0]
    assert report.frame_offset == min(offset, length - 1)
    assert len(data) == starts[0] + min(offset, length - 1)
