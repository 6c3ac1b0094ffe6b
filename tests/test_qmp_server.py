"""Tests for the QMP server: framing, protocol, validation, threads, and real QMP clients.

The server runs in-process on a Unix socket in a short private directory; clients are a
raw socket (to send exactly the bytes we want), qemu.qmp's asyncio QMPClient, its sync
legacy wrapper and the qmp-shell console script.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from postcopy.qmp import ErrorClass, FrameError, JsonStreamSplitter, QmpError, QmpServer

pytestmark = pytest.mark.timeout(60)

# The console script sits next to the venv interpreter (not resolved: that is pyenv's).
QMP_SHELL = os.path.join(os.path.dirname(sys.executable), "qmp-shell")


class Speed(enum.StrEnum):
    SLOW = "slow"
    FAST = "fast"


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def no_server_threads_left() -> Iterator[None]:
    yield
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("qmp-")])


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # pytest's tmp_path can exceed the 108-byte limit of a Unix socket path.
    directory = tempfile.mkdtemp(prefix="qmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "qmp.sock")


class Gate:
    """Lets a test hold a command handler in the middle of its work."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def wait(self, args: dict[str, Any]) -> str:
        self.entered.set()
        if not self.release.wait(20):
            raise RuntimeError("gate never released")
        return "released"


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


def _boom(args: dict[str, Any]) -> None:
    raise ValueError("the handler broke")


def _device_missing(args: dict[str, Any]) -> None:
    raise QmpError("Device 'x' not found", ErrorClass.DEVICE_NOT_FOUND)


def add_test_commands(server: QmpServer, gate: Gate) -> None:
    server.register("echo", lambda args: args, args={"x": int, "y?": str})
    server.register("nothing", lambda args: None)
    server.register("boom", _boom)
    server.register("device-missing", _device_missing)
    server.register("not-json", lambda args: {"obj": object()})
    server.register("nan", lambda args: float("nan"))
    server.register("wait", gate.wait)
    server.register("emit", lambda args: server.emit_event("FROM_HANDLER", {"n": 1}))
    server.register(
        "types",
        lambda args: {k: repr(v) for k, v in args.items()},
        args={
            "s?": str,
            "i?": int,
            "f?": float,
            "b?": bool,
            "o?": dict,
            "a?": list,
            "any?": object,
            "speed?": Speed,
            "ints?": [int],
            "caps?": [{"capability": Speed, "state": bool}],
            "nested?": {"inner": {"leaf": str}, "*opt": int},
        },
    )


@pytest.fixture
def server(sock_path: str, gate: Gate) -> Iterator[QmpServer]:
    srv = QmpServer(sock_path)
    add_test_commands(srv, gate)
    srv.start()
    try:
        yield srv
    finally:
        gate.release.set()
        srv.close()


class RawClient:
    """A socket speaking QMP by hand, with a timeout on every read."""

    def __init__(self, path: str, negotiate: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()
        if negotiate:
            assert self.execute("qmp_capabilities") == {"return": {}}

    def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.sock.sendall(data)

    def recv_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def recv(self) -> dict[str, Any]:
        line = self.recv_line()
        assert line.endswith(b"\r\n")
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    def recv_reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            message = self.recv()
            if "event" not in message:
                return message

    def execute(
        self, name: str, arguments: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        request.update(extra)
        self.send(request)
        return self.recv_reply()

    def assert_eof(self) -> None:
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                self.recv()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect(server: QmpServer, sock_path: str) -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def make(negotiate: bool = True) -> RawClient:
        client = RawClient(sock_path, negotiate)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def error(desc: str, error_class: str = "GenericError", **extra: Any) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}, **extra}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# ------------------------------------------------------------------------------ framing


def _split_all(splitter: JsonStreamSplitter, data: bytes, chunk: int) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(data), chunk):
        out += splitter.feed(data[start : start + chunk])
    return out


def test_splitter_cuts_messages_without_newlines_at_any_chunking() -> None:
    stream = (
        b'{"execute":"a"}{"execute": "b",\n "arguments": {"s": "}{\\"]["}}'
        b'  \r\n[1, [2]] "top \\" string" 42 true nope '
    )
    expected = [
        b'{"execute":"a"}',
        b'{"execute": "b",\n "arguments": {"s": "}{\\"]["}}',
        b"[1, [2]]",
        b'"top \\" string"',
        b"42",
        b"true",
        b"nope",
    ]
    for chunk in (1, 2, 3, 7, len(stream)):
        assert _split_all(JsonStreamSplitter(), stream, chunk) == expected


def test_splitter_waits_for_the_end_of_a_message() -> None:
    splitter = JsonStreamSplitter()
    assert splitter.feed(b'{"execute": "x", "arguments": {') == []
    assert splitter.pending > 0
    assert splitter.feed(b"}}") == [b'{"execute": "x", "arguments": {}}']
    assert splitter.pending == 0


def test_splitter_answers_a_stray_closing_bracket_at_once() -> None:
    # nothing is open, so nothing can follow it: a client sending "]" and waiting for the
    # answer got none (it waited for a blank, as a number or a keyword would)
    splitter = JsonStreamSplitter()
    assert splitter.feed(b"]") == [b"]"]
    assert splitter.feed(b'}{"a": 1}') == [b"}", b'{"a": 1}']
    assert splitter.pending == 0


def test_splitter_skips_an_oversized_message_without_holding_it() -> None:
    splitter = JsonStreamSplitter(max_message_size=100)
    big = b'{"x": "' + b"a" * 1000 + b'", "y": "}"}'
    out: list[Any] = []
    for start in range(0, len(big), 10):
        out += splitter.feed(big[start : start + 10])
        assert splitter.pending <= 100
    out += splitter.feed(b'{"ok": 1}')
    assert out == [FrameError("JSON message exceeds 100 bytes"), b'{"ok": 1}']


def test_splitter_limits_nesting() -> None:
    splitter = JsonStreamSplitter(max_nesting=8)
    assert splitter.feed(b"[" * 9 + b"]" * 9 + b"[[1]]") == [
        FrameError("JSON nesting depth limit exceeded"),
        b"[[1]]",
    ]
    assert splitter.feed(b"[" * 8 + b"]" * 8) == [b"[" * 8 + b"]" * 8]


@pytest.mark.parametrize("bad", [b"\xff", b"\x00", b"\x1b", b"\xc0"])
def test_splitter_resets_on_a_byte_that_json_cannot_contain(bad: bytes) -> None:
    splitter = JsonStreamSplitter()
    out = splitter.feed(b'{"execute": "a", "s": "abc' + bad + b'{"execute": "b"}')
    assert out == [
        FrameError(f"JSON parse error, invalid byte 0x{bad[0]:02x}"),
        b'{"execute": "b"}',
    ]
    out = splitter.feed(b'{"a": [' + bad + b'{"b": 1}')
    assert out == [FrameError(f"JSON parse error, invalid byte 0x{bad[0]:02x}"), b'{"b": 1}']


def test_splitter_keeps_an_escape_split_across_chunks() -> None:
    splitter = JsonStreamSplitter()
    assert splitter.feed(b'{"s": "a\\') == []
    assert splitter.feed(b'"}"}') == [b'{"s": "a\\"}"}']


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(st.dictionaries(st.text(), json_values, max_size=5), max_size=6),
    separators=st.lists(
        st.sampled_from([b"", b" ", b"\n", b"\r\n", b"\t "]), min_size=6, max_size=6
    ),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 2]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_splitter_recovers_any_stream_of_objects(
    messages: list[dict[str, Any]],
    separators: list[bytes],
    ascii_only: bool,
    indent: int | None,
    cuts: list[int],
) -> None:
    stream = b"".join(
        json.dumps(m, ensure_ascii=ascii_only, indent=indent).encode() + sep
        for m, sep in zip(messages, separators, strict=False)
    )
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    splitter = JsonStreamSplitter()
    texts: list[Any] = []
    for start, stop in itertools.pairwise(points):
        texts += splitter.feed(stream[start:stop])
    assert [json.loads(t) for t in texts] == messages
    assert splitter.pending == 0


# ------------------------------------------------------------------------------ protocol


def test_greeting_offers_no_capabilities(connect: Callable[..., RawClient]) -> None:
    client = connect(negotiate=False)
    assert client.greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "postcopy 0.1.0"},
            "capabilities": [],
        }
    }


def test_only_qmp_capabilities_before_negotiation(connect: Callable[..., RawClient]) -> None:
    client = connect(negotiate=False)
    want = error(
        "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound", id=1
    )
    assert client.execute("query-version", id=1) == want
    assert client.execute("no-such-command", id=1) == want
    # Structural errors keep their own message, as in QEMU.
    assert client.execute("x", extra=1) == error("QMP input member 'extra' is unexpected")
    assert client.execute("qmp_capabilities", {"enable": ["oob"]}) == error(
        "Capability oob not available"
    )
    assert client.execute("qmp_capabilities", {"enable": ["bogus"]}) == error(
        "Parameter 'enable[0]' does not accept value 'bogus'"
    )
    assert client.execute("qmp_capabilities", id="neg") == {"return": {}, "id": "neg"}
    assert client.execute("qmp_capabilities") == error(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
    )
    assert client.execute("query-version")["return"]["qemu"]["major"] == 7


def test_events_reach_only_negotiated_clients(
    server: QmpServer, connect: Callable[..., RawClient]
) -> None:
    client = connect(negotiate=False)
    server.emit_event("EARLY")
    client.send({"execute": "qmp_capabilities", "id": "neg"})
    assert client.recv() == {"return": {}, "id": "neg"}  # no EARLY event before it
    server.emit_event("LATE")
    client.send({"execute": "nothing", "id": "sync"})
    seen = []
    while True:
        message = client.recv()
        seen.append(message.get("event") or message.get("id"))
        if message.get("id") == "sync":
            break
    assert seen == ["LATE", "sync"]


def test_query_commands_lists_every_command(
    server: QmpServer, connect: Callable[..., RawClient]
) -> None:
    names = [c["name"] for c in connect().execute("query-commands")["return"]]
    assert names == sorted(names)
    assert {"qmp_capabilities", "query-version", "query-commands", "echo"} <= set(names)
    assert "quit" not in names  # only once on_quit provides it
    server.on_quit(lambda: None)
    assert "quit" in [c["name"] for c in connect().execute("query-commands")["return"]]


@pytest.mark.parametrize(
    "request_bytes, desc",
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"42", "QMP input must be a JSON object"),
        (b'"execute"', "QMP input must be a JSON object"),
        (b"{}", "QMP input lacks member 'execute'"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "echo", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "echo", "exec-oob": "echo"}', "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "echo", "x": 1}', "QMP input member 'x' is unexpected"),
    ],
)
def test_malformed_requests_are_answered(
    connect: Callable[..., RawClient], request_bytes: bytes, desc: str
) -> None:
    client = connect()
    client.send(request_bytes + b"\n")  # a bare number only ends at a delimiter
    assert client.recv() == error(desc)
    assert client.execute("echo", {"x": 1}) == {"return": {"x": 1}}


@pytest.mark.parametrize(
    "garbage, desc_start",
    [
        (b'{"execute": }', "JSON parse error, "),
        (b"nope", "JSON parse error, "),
        (b"}", "JSON parse error, "),
        (b'{"execute": "echo", "execute": "echo"}', "JSON parse error, duplicate key 'execute'"),
        (
            b'{"execute": "echo", "arguments": {"x": NaN}}',
            "JSON parse error, invalid keyword 'NaN'",
        ),
        (b'{"execute": "\xe9"}', "JSON parse error, invalid UTF-8 sequence"),
        (b'{"execute": "echo" \xff', "JSON parse error, invalid byte 0xff"),
        # more digits than Python converts (its ValueError dropped the connection)
        (
            b'{"execute": "echo", "arguments": {"x": 1' + b"0" * 5000 + b"}}",
            "JSON parse error, a number of 5001 digits (at most 4000)",
        ),
        # inf to Python: an id is echoed, and the answer could not be written (dropped)
        (b'{"execute": "echo", "id": 1e999}', "JSON parse error, the number 1e999 is out"),
    ],
)
def test_bad_json_gets_an_error_and_the_connection_survives(
    connect: Callable[..., RawClient], garbage: bytes, desc_start: str
) -> None:
    client = connect()
    client.send(garbage + b"\n")
    reply = client.recv()
    assert set(reply) == {"error"}
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc_start)
    assert client.execute("echo", {"x": 2}, id=9) == {"return": {"x": 2}, "id": 9}


@pytest.mark.parametrize("request_id", [0, "abc", None, [1, {"a": 2}], {"deep": [True]}, 1.5])
def test_any_id_is_echoed(connect: Callable[..., RawClient], request_id: Any) -> None:
    client = connect()
    assert client.execute("nothing", id=request_id) == {"return": {}, "id": request_id}
    assert client.execute("boom", id=request_id)["id"] == request_id


def test_commands_of_one_client_are_answered_in_order(connect: Callable[..., RawClient]) -> None:
    client = connect()
    client.send(
        b"".join(
            json.dumps({"execute": "echo", "arguments": {"x": i}, "id": i}).encode()
            for i in range(50)
        )
    )
    assert [client.recv()["id"] for _ in range(50)] == list(range(50))


def test_a_command_sent_one_byte_at_a_time(connect: Callable[..., RawClient]) -> None:
    client = connect()
    for byte in b'{"execute": "echo",\n "arguments": {"x": 7}}':
        client.send(bytes([byte]))
    assert client.recv() == {"return": {"x": 7}}


def test_oversized_message_is_refused_and_the_next_one_served(
    connect: Callable[..., RawClient],
) -> None:
    client = connect()
    big = json.dumps({"execute": "echo", "arguments": {"x": 1, "y": "z" * (2 << 20)}})
    client.send(big.encode())
    assert client.recv() == error("JSON message exceeds 1048576 bytes")
    assert client.execute("echo", {"x": 3}) == {"return": {"x": 3}}


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "arguments, desc",
    [
        ({}, "Parameter 'x' is missing"),
        ({"x": 1, "z": 2}, "Parameter 'z' is unexpected"),
        ({"x": "1"}, "Invalid parameter type for 'x', expected: integer"),
        ({"x": True}, "Invalid parameter type for 'x', expected: integer"),
        ({"x": 1.0}, "Invalid parameter type for 'x', expected: integer"),
        ({"x": 1 << 64}, "Invalid parameter type for 'x', expected: integer"),
        ({"x": None}, "Invalid parameter type for 'x', expected: integer"),
        ({"x": 1, "y": 5}, "Invalid parameter type for 'y', expected: string"),
        ({"x": 1, "y": None}, "Invalid parameter type for 'y', expected: string"),
    ],
)
def test_echo_argument_errors(
    connect: Callable[..., RawClient], arguments: dict[str, Any], desc: str
) -> None:
    assert connect().execute("echo", arguments, id="e") == error(desc, id="e")


def test_unexpected_argument_reported_after_member_errors(
    connect: Callable[..., RawClient],
) -> None:
    # QEMU visits the schema's members first, so a missing one wins over a stray one.
    assert connect().execute("echo", {"z": 1}) == error("Parameter 'x' is missing")


@pytest.mark.parametrize(
    "arguments, desc",
    [
        ({"s": 1}, "Invalid parameter type for 's', expected: string"),
        ({"f": "1"}, "Invalid parameter type for 'f', expected: number"),
        ({"f": False}, "Invalid parameter type for 'f', expected: number"),
        ({"b": 0}, "Invalid parameter type for 'b', expected: boolean"),
        ({"o": []}, "Invalid parameter type for 'o', expected: object"),
        ({"a": {}}, "Invalid parameter type for 'a', expected: array"),
        ({"speed": 1}, "Invalid parameter type for 'speed', expected: string"),
        ({"speed": "medium"}, "Parameter 'speed' does not accept value 'medium'"),
        ({"ints": [1, "2"]}, "Invalid parameter type for 'ints[1]', expected: integer"),
        (
            {"caps": [{"capability": "slow", "state": True}, {"capability": "slow"}]},
            "Parameter 'caps[1].state' is missing",
        ),
        (
            {"caps": [{"capability": "slow", "state": True, "x": 1}]},
            "Parameter 'caps[0].x' is unexpected",
        ),
        ({"caps": ["slow"]}, "Invalid parameter type for 'caps[0]', expected: object"),
        (
            {"nested": {"inner": {"leaf": 1}}},
            "Invalid parameter type for 'nested.inner.leaf', expected: string",
        ),
        ({"nested": {"inner": {}}}, "Parameter 'nested.inner.leaf' is missing"),
        (
            {"nested": {"inner": {"leaf": ""}, "opt": "1"}},
            "Invalid parameter type for 'nested.opt', expected: integer",
        ),
    ],
)
def test_typed_argument_errors(
    connect: Callable[..., RawClient], arguments: dict[str, Any], desc: str
) -> None:
    assert connect().execute("types", arguments) == error(desc)


def test_handler_gets_checked_and_converted_arguments(sock_path: str) -> None:
    received: list[dict[str, Any]] = []
    with QmpServer(sock_path) as srv:
        srv.register(
            "take",
            lambda args: received.append(args),
            args={
                "f": float,
                "speed": Speed,
                "caps": [{"capability": Speed, "state": bool}],
                "big": int,
                "neg": int,
                "any?": object,
                "absent?": str,
            },
        )
        client = RawClient(sock_path)
        try:
            reply = client.execute(
                "take",
                {
                    "f": 3,
                    "speed": "fast",
                    "caps": [{"capability": "slow", "state": False}],
                    "big": (1 << 64) - 1,
                    "neg": -(1 << 63),
                    "any": [None, {"k": 1.5}],
                },
            )
        finally:
            client.close()
    assert reply == {"return": {}}
    (args,) = received
    assert args == {
        "f": 3.0,
        "speed": Speed.FAST,
        "caps": [{"capability": Speed.SLOW, "state": False}],
        "big": (1 << 64) - 1,
        "neg": -(1 << 63),
        "any": [None, {"k": 1.5}],
    }
    assert isinstance(args["f"], float)
    assert args["speed"] is Speed.FAST


# ------------------------------------------------------------------------------ handlers


def test_handler_errors_become_qmp_errors(connect: Callable[..., RawClient]) -> None:
    client = connect()
    assert client.execute("boom", id=1) == error("the handler broke", id=1)
    assert client.execute("device-missing") == error("Device 'x' not found", "DeviceNotFound")
    assert client.execute("not-json")["error"]["desc"].startswith(
        "command not-json returned a value that is not JSON"
    )
    assert client.execute("nan")["error"]["desc"].startswith(
        "command nan returned a value that is not JSON"
    )
    assert client.execute("no-such") == error(
        "The command no-such has not been found", "CommandNotFound"
    )
    assert client.execute("nothing") == {"return": {}}


def test_qmp_error_accepts_only_qemu_classes() -> None:
    assert QmpError("x", "DeviceNotActive").to_json() == {"class": "DeviceNotActive", "desc": "x"}
    with pytest.raises(ValueError, match="unknown QMP error class"):
        QmpError("x", "MadeUpError")


def test_registration_api_refuses_mistakes(server: QmpServer) -> None:
    with pytest.raises(ValueError, match="already registered"):
        server.register("echo", lambda args: None)
    with pytest.raises(ValueError, match="already registered"):
        server.register("qmp_capabilities", lambda args: None)
    with pytest.raises(ValueError, match="bad QMP command name"):
        server.register("has space", lambda args: None)
    with pytest.raises(ValueError, match="unsupported argument type"):
        server.register("bad-type", lambda args: None, args={"x": bytes})
    with pytest.raises(ValueError, match="array type"):
        server.register("bad-list", lambda args: None, args={"x": [int, str]})
    with pytest.raises(ValueError, match="repeated member"):
        server.register("bad-dup", lambda args: None, args={"x": int, "x?": int})
    assert "bad-type" not in server.commands

    @server.command("decorated", args={"n": int})
    def decorated(args: dict[str, Any]) -> int:
        return int(args["n"]) * 2

    assert decorated({"n": 2}) == 4
    assert "decorated" in server.commands
    server.unregister("decorated")
    assert "decorated" not in server.commands
    with pytest.raises(ValueError, match="built in"):
        server.unregister("query-version")


def test_commands_registered_while_running_are_served(
    server: QmpServer, connect: Callable[..., RawClient]
) -> None:
    client = connect()
    assert client.execute("late")["error"]["class"] == "CommandNotFound"
    server.register("late", lambda args: "here")
    assert client.execute("late") == {"return": "here"}


# ------------------------------------------------------------------------------ threads


def test_event_from_other_threads_arrive_in_order(
    server: QmpServer, connect: Callable[..., RawClient]
) -> None:
    client = connect()
    per_thread = 200

    def emitter(tid: int) -> None:
        for seq in range(per_thread):
            server.emit_event("TICK", {"tid": tid, "seq": seq})

    threads = [threading.Thread(target=emitter, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen: dict[int, list[int]] = {t: [] for t in range(4)}
    for _ in range(4 * per_thread):
        event = client.recv()
        assert event["event"] == "TICK"
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
        seen[event["data"]["tid"]].append(event["data"]["seq"])
    assert all(seqs == list(range(per_thread)) for seqs in seen.values())


def test_event_without_data_has_no_data_member(
    server: QmpServer, connect: Callable[..., RawClient]
) -> None:
    client = connect()
    server.emit_event("STOP")
    event = client.recv()
    assert set(event) == {"event", "timestamp"}
    with pytest.raises(TypeError):
        server.emit_event("BAD", {"x": object()})


def test_event_emitted_by_a_handler_precedes_its_reply(connect: Callable[..., RawClient]) -> None:
    client = connect()
    client.send({"execute": "emit", "id": 1})
    assert client.recv()["event"] == "FROM_HANDLER"
    assert client.recv() == {"return": {}, "id": 1}


def test_two_clients_one_blocked_in_a_handler(
    server: QmpServer, gate: Gate, connect: Callable[..., RawClient]
) -> None:
    first, second = connect(), connect()
    first.send({"execute": "wait", "id": "a"})
    assert gate.entered.wait(10)
    assert second.execute("echo", {"x": 5}, id="b") == {"return": {"x": 5}, "id": "b"}
    server.emit_event("BOTH")
    assert second.recv()["event"] == "BOTH"
    gate.release.set()
    assert first.recv()["event"] == "BOTH"  # queued while its handler ran
    assert first.recv() == {"return": "released", "id": "a"}


def test_client_disconnecting_mid_command(
    server: QmpServer, gate: Gate, connect: Callable[..., RawClient]
) -> None:
    leaver = connect()
    leaver.send({"execute": "wait"})
    assert gate.entered.wait(10)
    leaver.close()
    gate.release.set()
    wait_until(lambda: server.client_count == 0)
    assert connect().execute("echo", {"x": 1}) == {"return": {"x": 1}}


def test_slow_reader_is_dropped_and_emitters_never_block(sock_path: str) -> None:
    with QmpServer(sock_path, max_pending_output=64 << 10) as srv:
        sleeper = RawClient(sock_path)  # negotiates, then never reads again
        try:
            payload = {"blob": "x" * 1000}
            for _ in range(10_000):  # ~10 MB: far more than the socket buffers hold
                srv.emit_event("FLOOD", payload)
            wait_until(lambda: srv.client_count == 0)
        finally:
            sleeper.close()


def test_many_clients_are_capped(sock_path: str) -> None:
    with QmpServer(sock_path, max_clients=2) as srv:
        clients = [RawClient(sock_path) for _ in range(2)]
        try:
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.settimeout(10)
            extra.connect(sock_path)
            assert extra.recv(100) == b""  # closed without a greeting
            extra.close()
            assert srv.client_count == 2
        finally:
            for client in clients:
                client.close()


# ------------------------------------------------------------------------------ life cycle


def test_socket_is_private_and_removed_on_close(sock_path: str) -> None:
    srv = QmpServer(sock_path)
    srv.start()
    try:
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        with pytest.raises(RuntimeError):
            srv.start()
    finally:
        srv.close()
    assert not os.path.exists(sock_path)
    srv.close()  # idempotent


def test_stale_socket_is_replaced_live_one_refused(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: what a crashed process leaves
    with QmpServer(sock_path):
        second = QmpServer(sock_path)
        with pytest.raises(OSError, match="in use"):
            second.start()
        assert os.path.exists(sock_path)  # the failed start did not remove the live one
        client = RawClient(sock_path)
        client.close()


def test_regular_file_at_the_path_is_not_removed(sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError):
        QmpServer(sock_path).start()
    with open(sock_path) as f:
        assert f.read() == "keep me"


@pytest.mark.timeout(30)
def test_close_with_clients_connected_and_a_handler_running(
    server: QmpServer, gate: Gate, connect: Callable[..., RawClient], sock_path: str
) -> None:
    idle, busy = connect(), connect(negotiate=False)
    busy.execute("qmp_capabilities")
    busy.send({"execute": "wait"})
    assert gate.entered.wait(10)
    server.close(timeout=0.5)
    idle.assert_eof()
    assert not os.path.exists(sock_path)
    gate.release.set()
    wait_until(lambda: server.client_count == 0)


def test_quit_replies_then_calls_back_and_may_close(
    server: QmpServer, connect: Callable[..., RawClient], sock_path: str
) -> None:
    called = threading.Event()

    def shut_down() -> None:
        called.set()
        server.close()

    server.on_quit(shut_down)
    client = connect()
    other = connect()
    assert client.execute("quit", id="q") == {"return": {}, "id": "q"}
    assert called.wait(10)
    client.assert_eof()
    other.assert_eof()
    wait_until(lambda: server.client_count == 0)
    assert not os.path.exists(sock_path)


# ------------------------------------------------------------------------------ real clients


def test_asyncio_qmp_client(server: QmpServer, sock_path: str) -> None:
    async def session() -> None:
        qmp = QMPClient("test")
        await qmp.connect(sock_path)
        try:
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.capabilities == []
            assert await qmp.execute("echo", {"x": 4, "y": "z"}) == {"x": 4, "y": "z"}
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("echo", {"x": "four"})
            assert info.value.error_class == "GenericError"
            assert str(info.value) == "Invalid parameter type for 'x', expected: integer"
            with qmp.listener("MIGRATION") as listener:
                emitter = threading.Thread(
                    target=server.emit_event, args=("MIGRATION", {"status": "active"})
                )
                emitter.start()
                event = await asyncio.wait_for(listener.get(), 10)
                emitter.join()
            assert event["event"] == "MIGRATION"
            assert event["data"] == {"status": "active"}
            # The default listener saw it too.
            default = await asyncio.wait_for(qmp.events.get(), 10)
            assert default["data"] == {"status": "active"}
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(session(), 30))


def test_legacy_sync_client(server: QmpServer, sock_path: str) -> None:
    qmp = QEMUMonitorProtocol(sock_path)
    try:
        greeting = qmp.connect()
        assert greeting is not None
        assert greeting["QMP"]["version"]["package"] == "postcopy 0.1.0"
        assert qmp.cmd("echo", x=9) == {"x": 9}
        assert qmp.cmd_raw("echo", {"x": "no"}) == error(
            "Invalid parameter type for 'x', expected: integer"
        )
        with pytest.raises(ExecuteError):
            qmp.cmd("boom")
        threading.Thread(target=server.emit_event, args=("STOP",)).start()
        event = qmp.pull_event(wait=10.0)
        assert event is not None
        assert event["event"] == "STOP"
    finally:
        qmp.close()
        # the shim runs on this thread's current event loop and leaves it open; closed, it
        # must not stay current, or the next sync client in this process finds it closed
        qmp._aloop.close()
        asyncio.set_event_loop(None)


@pytest.mark.skipif(not os.path.exists(QMP_SHELL), reason="qmp-shell not installed")
def test_qmp_shell_runs_commands_from_stdin(
    server: QmpServer, sock_path: str, sock_dir: str
) -> None:
    # HOME points at a scratch dir: qmp-shell writes ~/.qmp-shell_history.
    env = dict(os.environ, HOME=sock_dir)
    result = subprocess.run(
        [QMP_SHELL, sock_path],
        input="echo x=5 y=hi\nbogus\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Connected to QEMU 7.2.0" in result.stdout
    assert '{"return": {"x": 5, "y": "hi"}}' in result.stdout
    assert '"desc": "The command bogus has not been found"' in result.stdout
