"""Tests for the pre-stream handshake: keys, refusals on both ends, replay, preempt pairing."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy.transport import (
    PREEMPT_CHANNEL,
    AuthConfig,
    AuthenticationError,
    Connection,
    ConnectionClosed,
    HandshakeError,
    InsecureListenError,
    KeyFileError,
    connect,
    listen,
    new_session,
    parse_uri,
)
from postcopy.transport.auth import HELLO_SIZE, client_handshake, server_handshake
from postcopy.transport.connection import check_listen_security
from tests.handshakes import Closing, handshake_both_ends

pytestmark = pytest.mark.timeout(60)

KEY = AuthConfig(b"k" * 32)
OTHER_KEY = AuthConfig(b"o" * 32)


def attempt(
    destination_auth: AuthConfig | None,
    source_auth: AuthConfig | None,
    pool: ThreadPoolExecutor,
    closing: Closing,
) -> tuple[Connection | BaseException, Connection | BaseException]:
    """Run one handshake; each side's connection or exception."""
    return handshake_both_ends(
        pool, closing, destination_auth=destination_auth, source_auth=source_auth
    )


def test_no_key_on_either_side_works_on_loopback(
    pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(None, None, pool, closing)
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    assert not source.authenticated and not destination.authenticated
    source.send_all([b"page"])
    assert destination.recv_exact(4) == b"page"


def test_same_key_on_both_sides_works(pool: ThreadPoolExecutor, closing: Closing) -> None:
    source, destination = attempt(KEY, AuthConfig(b"k" * 32), pool, closing)
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    assert source.authenticated and destination.authenticated
    destination.send_all([b"reply"])
    assert source.recv_exact(5) == b"reply"


def test_wrong_key_is_refused_on_both_ends(pool: ThreadPoolExecutor, closing: Closing) -> None:
    source, destination = attempt(KEY, OTHER_KEY, pool, closing)
    for outcome in (source, destination):
        assert isinstance(outcome, AuthenticationError), outcome
        assert "authentication failed: wrong key" in str(outcome)


def test_key_on_destination_only_is_refused_on_both_ends(
    pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(KEY, None, pool, closing)
    for outcome in (source, destination):
        assert isinstance(outcome, AuthenticationError), outcome
        assert "destination requires authentication: give --key FILE" in str(outcome)


def test_key_on_source_only_is_refused_on_both_ends(
    pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(None, KEY, pool, closing)
    for outcome in (source, destination):
        assert isinstance(outcome, AuthenticationError), outcome
        assert "the destination has none" in str(outcome)


def test_listener_keeps_serving_after_a_refusal(pool: ThreadPoolExecutor, closing: Closing) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=KEY)
    closing.append(listener)
    refused = pool.submit(listener.accept, 10)
    with pytest.raises(AuthenticationError):
        connect(listener.uri, auth=OTHER_KEY)
    assert isinstance(refused.exception(10), AuthenticationError)
    accepted = pool.submit(listener.accept, 10)
    source = connect(listener.uri, auth=KEY)
    closing += [source, accepted.result(10)]


class Relay:
    """A man in the middle: forwards bytes between a source and a destination.

    It records what the source sent, and may rewrite the first `HELLO_SIZE` bytes of
    each direction (the hellos).
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rewrite_source_hello: Callable[[bytes], bytes] = lambda hello: hello,
        rewrite_destination_hello: Callable[[bytes], bytes] = lambda hello: hello,
    ) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target
        self.rewrites = (rewrite_source_hello, rewrite_destination_hello)
        self.from_source = bytearray()
        self.sockets: list[socket.socket] = [self.server]
        self.threads: list[threading.Thread] = []
        self.ready = threading.Thread(target=self._accept, daemon=True)
        self.ready.start()

    def _accept(self) -> None:
        source_side, _ = self.server.accept()
        destination_side = socket.create_connection(self.target)
        self.sockets += [source_side, destination_side]
        for reader, writer, record, rewrite in (
            (source_side, destination_side, True, self.rewrites[0]),
            (destination_side, source_side, False, self.rewrites[1]),
        ):
            thread = threading.Thread(
                target=self._pump, args=(reader, writer, record, rewrite), daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def _pump(
        self,
        reader: socket.socket,
        writer: socket.socket,
        record: bool,
        rewrite: Callable[[bytes], bytes],
    ) -> None:
        head = bytearray()
        try:
            while True:
                data = reader.recv(65536)
                if not data:
                    break
                if record:
                    self.from_source += data
                if len(head) < HELLO_SIZE:
                    head += data
                    if len(head) < HELLO_SIZE:
                        continue
                    data = rewrite(bytes(head[:HELLO_SIZE])) + bytes(head[HELLO_SIZE:])
                writer.sendall(data)
            writer.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps blocked in recv
            sock.close()
        self.ready.join(5)
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for relay in made:
        relay.close()


def read_frames(sock: socket.socket) -> list[int]:
    """Kinds of the handshake frames a destination sent after its hello, until it closed."""
    data = bytearray()
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        data += chunk
    kinds = []
    offset = HELLO_SIZE
    while offset + 3 <= len(data):
        kind, length = struct.unpack_from(">BH", data, offset)
        kinds.append(kind)
        offset += 3 + length
    return kinds


def test_replayed_handshake_is_refused(
    pool: ThreadPoolExecutor, closing: Closing, relays: list[Relay]
) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=KEY)
    closing.append(listener)
    relay = Relay(("127.0.0.1", listener.uri.port or 0))
    relays.append(relay)
    accepted = pool.submit(listener.accept, 10)
    original = connect(f"tcp:127.0.0.1:{relay.port}", auth=KEY)
    closing += [original, accepted.result(10)]
    recorded = bytes(relay.from_source)
    assert len(recorded) == HELLO_SIZE + 3 + 32  # the hello and the proof frame

    replayed_accept = pool.submit(listener.accept, 10)
    attacker = socket.create_connection(("127.0.0.1", listener.uri.port or 0))
    closing.append(attacker)
    attacker.sendall(recorded)
    error = replayed_accept.exception(10)
    assert isinstance(error, AuthenticationError)
    assert "authentication failed: wrong key" in str(error)
    proof, refuse = 1, 3
    assert read_frames(attacker) == [proof, refuse]


def test_rewritten_session_breaks_both_proofs(
    pool: ThreadPoolExecutor, closing: Closing, relays: list[Relay]
) -> None:
    """A man in the middle who moves a connection to another session is caught."""
    session_offset = 28
    forged = bytes(16)

    def forge(hello: bytes) -> bytes:
        return hello[:session_offset] + forged + hello[session_offset + 16 :]

    listener = listen("tcp:127.0.0.1:0", auth=KEY)
    closing.append(listener)
    original_session = new_session()

    def restore(hello: bytes) -> bytes:
        return hello[:session_offset] + original_session + hello[session_offset + 16 :]

    relay = Relay(
        ("127.0.0.1", listener.uri.port or 0),
        rewrite_source_hello=forge,
        rewrite_destination_hello=restore,
    )
    relays.append(relay)
    accepted = pool.submit(listener.accept, 10)
    with pytest.raises(AuthenticationError, match="wrong key"):
        connect(f"tcp:127.0.0.1:{relay.port}", auth=KEY, session=original_session)
    error = accepted.exception(10)
    assert isinstance(error, AuthenticationError)


def test_insecure_listen_on_any_address_without_key_is_refused() -> None:
    for uri in ("tcp:0.0.0.0:0", "tcp::0", "tcp:[::]:0", "tcp:buildhost.example:0"):
        with pytest.raises(InsecureListenError) as info:
            listen(uri, auth=None)
        message = str(info.value)
        assert "key file" in message
        assert "loopback" in message and "unix:" in message
        # the option the user has, not the Python keyword behind it
        assert "--allow-insecure-network" in message and "=True" not in message


@pytest.mark.parametrize(
    ("uri", "key", "allow", "refused"),
    [
        ("tcp:10.1.2.3:4444", None, False, True),
        ("tcp:10.1.2.3:4444", KEY, False, False),
        ("tcp:10.1.2.3:4444", None, True, False),
        ("tcp:[2001:db8::1]:4444", None, False, True),
        ("tcp:127.0.0.1:4444", None, False, False),
        ("tcp:[::1]:4444", None, False, False),
        ("unix:/run/x.sock", None, False, False),
    ],
)
def test_listen_security_decision(
    uri: str, key: AuthConfig | None, allow: bool, refused: bool
) -> None:
    # The pure decision, so the allowed network cases need not bind a network address.
    try:
        check_listen_security(parse_uri(uri), auth=key, tls=None, allow_insecure_network=allow)
    except InsecureListenError:
        assert refused
    else:
        assert not refused


def test_loopback_and_unix_listen_without_key(tmp_path: Path, closing: Closing) -> None:
    closing.append(listen("tcp:127.0.0.1:0", auth=None))
    closing.append(listen(f"unix:{os.path.relpath(tmp_path / 'k.sock')}", auth=None))


def write_key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_key_file_strips_trailing_newline(tmp_path: Path) -> None:
    key = b"0123456789abcdef0123456789abcdef"
    for ending in (b"", b"\n", b"\r\n", b"\n\n"):
        path = write_key_file(tmp_path / "key", key + ending)
        assert AuthConfig.from_file(path).key == key


def test_key_file_refusals(tmp_path: Path) -> None:
    empty = write_key_file(tmp_path / "empty", b"\n")
    with pytest.raises(KeyFileError, match="is empty"):
        AuthConfig.from_file(empty)
    open_file = write_key_file(tmp_path / "open", b"x" * 32, 0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {open_file}"):
        AuthConfig.from_file(open_file)
    assert AuthConfig.from_file(open_file, check_permissions=False).key == b"x" * 32
    group = write_key_file(tmp_path / "group", b"x" * 32, 0o640)
    with pytest.raises(KeyFileError, match="group or other"):
        AuthConfig.from_file(group)
    with pytest.raises(KeyFileError, match="cannot read key file"):
        AuthConfig.from_file(tmp_path / "missing")
    with pytest.raises(KeyFileError, match="empty key"):
        AuthConfig(b"")


def test_short_key_warns_and_repr_hides_key() -> None:
    with pytest.warns(UserWarning, match="at least 16"):
        short = AuthConfig(b"secret")
    assert "secret" not in repr(short)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AuthConfig.generate()


def test_generated_key_written_private_and_read_back(tmp_path: Path) -> None:
    key = AuthConfig.generate()
    path = tmp_path / "new.key"
    key.write(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert AuthConfig.from_file(path) == key
    with pytest.raises(FileExistsError):
        key.write(path)


def connect_in_order(
    uri: str, specs: list[tuple[str, str]], sessions: dict[str, bytes]
) -> list[Connection]:
    """Connect (name, channel) pairs one after another; name picks the session."""
    made = []
    for name, channel in specs:
        made.append(connect(uri, channel=channel, session=sessions[name]))
    return made


def test_preempt_connections_pair_with_their_main_connection(
    pool: ThreadPoolExecutor, closing: Closing
) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=None)
    closing.append(listener)
    sessions = {"a": new_session(), "b": new_session()}
    # The second migration's connections arrive while the first waits for its preempt.
    order = [("a", "main"), ("b", "main"), ("b", PREEMPT_CHANNEL), ("a", PREEMPT_CHANNEL)]
    sources: Future[list[Connection]] = pool.submit(
        connect_in_order, str(listener.uri), order, sessions
    )
    main_a = listener.accept(10)
    closing.append(main_a)
    preempt_a = listener.accept_channel(main_a.session, PREEMPT_CHANNEL, 10)
    closing.append(preempt_a)
    main_b = listener.accept(10)
    closing.append(main_b)
    preempt_b = listener.accept_channel(main_b.session, PREEMPT_CHANNEL, 10)
    closing.append(preempt_b)
    source_connections = sources.result(10)
    closing += source_connections

    assert (main_a.session, main_a.channel) == (sessions["a"], "main")
    assert (preempt_a.session, preempt_a.channel) == (sessions["a"], PREEMPT_CHANNEL)
    assert (main_b.session, main_b.channel) == (sessions["b"], "main")
    assert (preempt_b.session, preempt_b.channel) == (sessions["b"], PREEMPT_CHANNEL)
    # Bytes sent on the source's preempt connection come out of the paired one.
    source_preempt_a = source_connections[3]
    source_preempt_a.send_all([b"urgent"])
    assert preempt_a.recv_exact(6) == b"urgent"


def test_accept_channel_skips_refused_peers_and_times_out(
    pool: ThreadPoolExecutor, closing: Closing
) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=KEY)
    closing.append(listener)
    session = new_session()

    def intruder_then_preempt() -> Connection:
        with pytest.raises(AuthenticationError):
            connect(listener.uri, auth=OTHER_KEY, channel=PREEMPT_CHANNEL, session=session)
        return connect(listener.uri, auth=KEY, channel=PREEMPT_CHANNEL, session=session)

    source = pool.submit(intruder_then_preempt)
    preempt = listener.accept_channel(session, PREEMPT_CHANNEL, 10)
    closing += [preempt, source.result(10)]
    assert preempt.session == session and preempt.authenticated
    with pytest.raises(TimeoutError, match=f"no preempt connection for session {session.hex()}"):
        listener.accept_channel(session, PREEMPT_CHANNEL, 0.05)
    with pytest.raises(TimeoutError, match="no preempt connection"):
        listener.accept_channel(session, PREEMPT_CHANNEL, 0)


def test_queued_connections_are_closed_with_the_listener(pool: ThreadPoolExecutor) -> None:
    listener = listen("tcp:127.0.0.1:0", auth=None)
    wanted, unclaimed = new_session(), new_session()
    order = [("unclaimed", "main"), ("wanted", PREEMPT_CHANNEL)]
    sessions = {"wanted": wanted, "unclaimed": unclaimed}
    try:
        sources = pool.submit(connect_in_order, str(listener.uri), order, sessions)
        with listener.accept_channel(wanted, PREEMPT_CHANNEL, 10):
            pass
        queued_source, wanted_source = sources.result(10)
    finally:
        listener.close()
    with queued_source, wanted_source:
        # The destination end of the unclaimed connection was closed with the listener.
        assert queued_source.recv_into(memoryview(bytearray(1))) == 0


def test_handshake_error_hierarchy() -> None:
    assert issubclass(AuthenticationError, HandshakeError)


class ScriptedStream:
    """A fake socket for the handshake: reads from fixed bytes, records what is sent."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = incoming
        self.sent = bytearray()

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv_into(self, buffer: memoryview, nbytes: int = 0) -> int:
        count = min(len(buffer), len(self.incoming), 5)  # trickle: a few bytes per call
        buffer[:count] = self.incoming[:count]
        self.incoming = self.incoming[count:]
        return count


@settings(max_examples=300, deadline=None)
@given(
    flags=st.sampled_from([0, 1, 2, 3, 4, 0x8000]) | st.integers(0, 0xFFFF),
    channel=st.binary(min_size=16, max_size=16) | st.sampled_from([b"main".ljust(16, b"\0")]),
    tail=st.binary(max_size=80),
    with_key=st.booleans(),
)
def test_destination_handshake_survives_garbage(
    flags: int, channel: bytes, tail: bytes, with_key: bool
) -> None:
    hello = b"POSTCOPY" + struct.pack(">HH", 1, flags) + channel + bytes(48)
    stream = ScriptedStream(hello + tail)
    try:
        result = server_handshake(stream, KEY if with_key else None, tls=False, peer="fuzz")
    except (HandshakeError, ConnectionClosed):
        return
    # Accepted: only possible without keys on either side and with a well-formed hello.
    assert not with_key and not flags & 0x1 and result.channel == "main"
    assert stream.sent[-3:] == b"\x02\x00\x00"  # ACCEPT


def test_source_handshake_rejects_a_destination_that_accepts_without_proof() -> None:
    session = new_session()
    destination_hello = (
        b"POSTCOPY" + struct.pack(">HH", 1, 0x4) + b"main".ljust(16, b"\0") + session + bytes(32)
    )
    accept = b"\x02\x00\x00"
    stream = ScriptedStream(destination_hello + accept)
    with pytest.raises(AuthenticationError, match="destination has none"):
        client_handshake(stream, KEY, channel="main", session=session, tls=False, peer="fake")
    assert stream.sent[HELLO_SIZE] == 3  # a REFUSE frame follows our hello


def test_key_files_that_are_not_keys_are_refused_in_one_line(tmp_path: Path) -> None:
    """Found by the QMP fuzzer (x-key-file takes any string): none of these may hang,
    read without end or escape as a Python error."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    big = tmp_path / "big"
    big.write_bytes(b"k" * (64 * 1024 + 1))
    big.chmod(0o600)
    for path, problem in (
        ("key\0file", "contains a NUL byte"),
        (str(fifo), "is not a regular file"),
        (str(tmp_path), "is not a regular file"),
        (str(big), "is larger than 65536 bytes"),
        ("/dev/zero", "is not a regular file"),
    ):
        with pytest.raises(KeyFileError, match=problem):
            AuthConfig.from_file(path)
