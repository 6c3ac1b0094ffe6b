"""Fuzzing the QMP server and the VM's commands: every input gets a QMP answer, with one of
QEMU's error classes when it is refused, and no command handler ever fails with anything
but a QmpError (an "escape": the server would log a traceback and answer with Python's
text). Nothing may write outside guest RAM.

White-box and in process, for speed: a real `VmMonitor` (a real 16 MiB micro-VM with the
memtouch guest, its real commands) on a `QmpServer` that is never started; inputs go
through the server's own framing (`JsonStreamSplitter`, fed in random chunks) and
dispatch (`QmpServer._execute`). Half the inputs are requests built from each command's
argument schema and then mutated (wrong types, missing and unknown members, boundary
integers, long and odd strings), half are byte streams (mutated requests, deep nesting,
control bytes, truncations, raw garbage). `migrate` only ever sees URIs that fail at once
(a reserved loopback port nobody listens on, a unix path in a private directory, or
text that is no URI): on a shared machine a fuzzer must not migrate into someone's VM.
Canary mappings made just before and after the VM's RAM must be intact at the end.

Iterations default to 10k (the suite); FUZZ_ITERATIONS and FUZZ_SEED override, e.g.
``FUZZ_ITERATIONS=1000000 pytest tests/test_qmp_fuzz.py -s`` (`make fuzz`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.qmp import server as server_module
from postcopy.qmp.errors import ErrorClass
from postcopy.qmp.framing import JsonStreamSplitter
from postcopy.qmp.monitor import VmMonitor
from postcopy.qmp.schema import Struct
from postcopy.qmp.server import QmpServer
from postcopy.vm.guests import GUESTS
from postcopy.vm.machine import MicroVM

ITERATIONS = int(os.environ.get("FUZZ_ITERATIONS", "10000"))
SEED = int(os.environ.get("FUZZ_SEED", "7"))
RAM = 16 << 20
CANARY = 1 << 20
ERROR_CLASSES = {c.value for c in ErrorClass}

INTEGERS: tuple[int, ...] = (0, 1, -1, 2, 7, 255, 4096, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1)
INTEGERS += (-(2**63), 2**63, 2**64 - 1, 2**64, -(2**64), 10**30)
ODD_STRINGS = (
    "",
    " ",
    "\u00e9t\u00e9",
    "\u0000",
    "\n",
    "'\"\\",
    "x" * 300,
    "x" * 70_000,
    "\ud83d\ude00",
    "none",
    "legacy",
    "multifd",
    "postcopy-ram",
    "postcopy-preempt",
    "xbzrle",
    "events",
    "/nonexistent/key",
    "../../etc/passwd",
)


class Escape(AssertionError):
    pass


class EscapeLog(logging.Handler):
    """Collects what the server logs with a traceback: a handler that escaped."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class Target:
    """The VM, its monitor and a server that is never started, plus canaries."""

    def __init__(self, workdir: Path) -> None:
        info = GUESTS["memtouch"]
        self.canaries: list[tuple[Mapping, bytes]] = []
        self._canary()
        self.vm = MicroVM(ram_size=RAM, image=info.image, params=info.pack_params())
        self._canary()
        self.server = QmpServer(str(workdir / "never-started.qmp"))
        self.quits = 0
        self.monitor = VmMonitor(
            self.vm,
            self.server,
            guest="memtouch",
            guest_params=info.pack_params(),
            on_quit=self._quit,
        )
        self.negotiated, other = socket.socketpair()
        other.close()
        self.client = server_module._Client(self.server, self.negotiated, 1)
        self.client.negotiated = True
        self.fresh = server_module._Client(self.server, self.negotiated, 2)

    def _quit(self) -> None:
        self.quits += 1

    def _canary(self) -> None:
        mapping = Mapping.anonymous(CANARY)
        content = os.urandom(CANARY)
        mapping.view[:] = content
        self.canaries.append((mapping, content))

    def canaries_intact(self) -> bool:
        return all(bytes(m.view) == content for m, content in self.canaries)

    def close(self) -> None:
        outgoing = self.monitor.outgoing
        if outgoing is not None:
            outgoing.cancel()
            outgoing.join(30)
        self.vm.close()
        self.negotiated.close()
        for mapping, _ in self.canaries:
            mapping.close()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="pcqf-", dir="/tmp") as workdir:
        made = Target(Path(workdir))
        try:
            yield made
        finally:
            made.close()


LONG = b"1" + b"0" * 4400  # more digits than Python's int() converts


class Generator:
    """Requests from the commands' schemas, mutated; and byte streams."""

    def __init__(self, rng: random.Random, target: Target, workdir: str) -> None:
        self.rng = rng
        self.commands = {name: cmd.arguments for name, cmd in target.server._commands.items()}
        # a port that is bound (so nobody else gets it) and never listened on: refused
        self._reserved = socket.socket()
        self._reserved.bind(("127.0.0.1", 0))
        port = self._reserved.getsockname()[1]
        self.uris = (
            f"tcp:127.0.0.1:{port}",
            f"tcp:localhost:{port}",
            f"unix:{workdir}/nothing.sock",
            "tcp:127.0.0.1",
            "tcp::",
            "unix:",
            "exec:true",
            "fd:3",
            "rdma:1.2.3.4:5",
            "tcp://127.0.0.1:1",
            "tcp:[::1:1",
        )

    def close(self) -> None:
        self._reserved.close()

    # -- values -------------------------------------------------------------------------

    def string(self, name: str) -> str:
        rng = self.rng
        if name == "uri":
            if rng.random() < 0.7:
                return rng.choice(self.uris)
            # never a URI that could reach anything: it starts with no scheme we know
            return "x" + "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
        roll = rng.random()
        if roll < 0.5:
            return rng.choice(ODD_STRINGS)
        if roll < 0.8:
            return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(20)))
        return rng.choice(list(self.commands))

    def wrong(self) -> object:
        rng = self.rng
        return rng.choice(
            (None, True, False, 0, -1, 1.5, float(2**70), "", "1", [], [1, "a"], {}, {"a": 1})
        )

    def value(self, check: object, name: str, depth: int = 0) -> object:
        rng = self.rng
        if rng.random() < 0.08 or depth > 4:
            return self.wrong()
        if isinstance(check, Struct):
            return self.struct(check, depth + 1)
        item = getattr(check, "item", None)
        if item is not None:  # an array
            return [self.value(item, name, depth + 1) for _ in range(rng.choice((0, 1, 1, 2, 5)))]
        kind = getattr(check, "qapi_name", None)
        if kind == "string":
            return self.string(name)
        if kind == "integer":
            return rng.choice(INTEGERS) if rng.random() < 0.7 else rng.randrange(-1000, 10**7)
        if kind == "boolean":
            return rng.random() < 0.5
        return self.wrong()

    def struct(self, struct: Struct, depth: int = 0) -> dict[str, object]:
        rng = self.rng
        result: dict[str, object] = {}
        for name, check, optional in struct.members:
            if optional and rng.random() < 0.6:
                continue
            if not optional and rng.random() < 0.03:
                continue  # a required member missing
            result[name] = self.value(check, name, depth)
        if rng.random() < 0.05:
            result[self.string("")[:20] or "extra"] = self.wrong()
        return result

    # -- inputs -------------------------------------------------------------------------

    def request(self) -> dict[str, object]:
        rng = self.rng
        name = rng.choice(list(self.commands)) if rng.random() < 0.95 else self.string("")
        request: dict[str, object] = {"execute": name}
        schema = self.commands.get(name)
        if schema is not None and (schema.members or rng.random() < 0.1):
            request["arguments"] = self.struct(schema)
        if rng.random() < 0.3:
            request["id"] = self.wrong() if rng.random() < 0.5 else rng.randrange(10**6)
        if rng.random() < 0.03:
            request[rng.choice(("exec-oob", "control", "Execute", ""))] = self.wrong()
        if rng.random() < 0.02:
            request["execute"] = self.wrong()
        if rng.random() < 0.02:
            request["arguments"] = self.wrong()
        return request

    def stream(self) -> bytes:
        rng = self.rng
        parts: list[bytes] = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            text = json.dumps(self.request()).encode()
            parts.append(self.mutate(text) if rng.random() < 0.7 else text)
        if rng.random() < 0.1:
            depth = rng.choice((10, 300, 5000))
            parts.append(b"[" * depth + b"1" + b"]" * rng.choice((0, depth)))
        if rng.random() < 0.1:
            parts.append(rng.randbytes(rng.randrange(1, 200)))
        return b"".join(parts)

    def mutate(self, text: bytes) -> bytes:
        rng = self.rng
        data = bytearray(text)
        for _ in range(rng.choice((1, 1, 2, 4))):
            if not data:
                break
            at = rng.randrange(len(data))
            how = rng.randrange(6)
            if how == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif how == 1:
                del data[at:]
            elif how == 2:
                data[at:at] = rng.choice((b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\x00"))
            elif how == 3:
                data[at:at] = rng.choice((b"\xff", b"\x1b", b"\xc0\x80", b"NaN", b"1e999", LONG))
            elif how == 4:
                del data[at : at + rng.randrange(1, 8)]
            else:
                data[at:at] = data[rng.randrange(len(data)) :][:20]
        return bytes(data)


def check_response(response: dict[str, object]) -> str:
    """A well-formed QMP answer; returns its error class or "return"."""
    try:
        json.dumps(response, allow_nan=False)  # what the server sends must be JSON, as sent
    except ValueError as error:
        raise Escape(f"an answer that cannot be sent ({error}): {response}") from None
    keys = set(response) - {"id"}
    if keys == {"return"}:
        return "return"
    if keys != {"error"}:
        raise Escape(f"response with members {sorted(keys)}: {response}")
    member = response["error"]
    assert isinstance(member, dict) and set(member) == {"class", "desc"}, response
    if member["class"] not in ERROR_CLASSES or not isinstance(member["desc"], str):
        raise Escape(f"error outside QEMU's classes: {member}")
    if "Traceback" in member["desc"]:
        raise Escape(f"a traceback in an error: {member}")
    return str(member["class"])


@pytest.mark.timeout(600 + ITERATIONS // 200)  # long campaigns get time in proportion
def test_fuzz_qmp_answers_everything_and_no_handler_escapes(target: Target) -> None:
    rng = random.Random(SEED)
    escapes = EscapeLog()
    watched = logging.getLogger("postcopy.qmp.server")
    watched.addHandler(escapes)
    saved_level = watched.level
    watched.setLevel(logging.ERROR)
    quiet = logging.getLogger("postcopy.migration")
    quiet_level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # fuzzed migrations that fail say so: not news here
    outcomes: collections.Counter[str] = collections.Counter()
    commands: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="pcqf-", dir="/tmp") as workdir:
        generator = Generator(rng, target, workdir)
        started = time.perf_counter()
        try:
            for index in range(ITERATIONS):
                as_bytes = rng.random() < 0.5
                data = generator.stream() if as_bytes else json.dumps(generator.request()).encode()
                client = target.fresh if rng.random() < 0.01 else target.client
                target.fresh.negotiated = False
                splitter = JsonStreamSplitter()
                texts: list[Any] = []
                view = memoryview(data)
                while view:
                    size = rng.randrange(1, max(2, len(view) + 1))
                    texts += splitter.feed(bytes(view[:size]))
                    view = view[size:]
                if not as_bytes and len(texts) != 1:
                    raise Escape(f"one request framed as {len(texts)} texts: {data[:200]!r}")
                for text in texts:
                    response, command = target.server._execute(client, text)
                    outcome = check_response(response)
                    outcomes[outcome] += 1
                    if command is not None:
                        commands[command.name] += 1
                if escapes.records:
                    record = escapes.records[0]
                    assert record.exc_info is not None
                    raise Escape(
                        f"input {index} (seed {SEED}): a handler escaped: "
                        f"{record.getMessage()}: {record.exc_info[1]!r}; input {data[:300]!r}"
                    )
        finally:
            generator.close()
            watched.removeHandler(escapes)
            watched.setLevel(saved_level)
            quiet.setLevel(quiet_level)
        elapsed = time.perf_counter() - started
    outgoing = target.monitor.outgoing
    if outgoing is not None:
        outgoing.join(30)
    # the VM is whole: it answers, and its RAM's neighbours were never written
    assert target.vm.status in ("prelaunch", "running", "paused", "postmigrate"), target.vm.status
    assert target.canaries_intact()
    assert bool(np.asarray(target.vm.ram[0].view[:16]).size)
    print(
        f"\nqmp fuzz: {ITERATIONS} inputs in {elapsed:.1f} s (seed {SEED}), 0 escapes; "
        f"answers: {dict(outcomes)}; commands run: {len(commands)} kinds, "
        f"{sum(commands.values())} calls"
    )
    if ITERATIONS >= 5000:
        # the campaign reaches every command and both kinds of answer
        assert set(commands) == set(target.server._commands), set(target.server._commands) - set(
            commands
        )
        assert outcomes["return"] > 0 and outcomes["GenericError"] > 0
        assert outcomes["CommandNotFound"] > 0


def test_the_escape_oracle_sees_an_escape(target: Target) -> None:
    """A handler that fails with a Python error is what the fuzzer must catch."""
    escapes = EscapeLog()
    watched = logging.getLogger("postcopy.qmp.server")
    watched.addHandler(escapes)
    try:
        missing: dict[str, object] = {}
        target.server.register("x-broken", lambda args: missing["missing"])
        response, _ = target.server._execute(target.client, b'{"execute": "x-broken"}')
    finally:
        target.server.unregister("x-broken")
        watched.removeHandler(escapes)
    assert check_response(response) == "GenericError"
    assert escapes.records, "the oracle would miss an escaped handler"


def test_a_thread_count_does_not_grow_with_the_campaign(target: Target) -> None:
    """Fuzzed migrations end: no thread is left behind by the fuzzer's inputs."""
    outgoing = target.monitor.outgoing
    if outgoing is not None:
        outgoing.join(30)
    names = [t.name for t in threading.enumerate()]
    assert sum(name == "migration" for name in names) == 0, names
