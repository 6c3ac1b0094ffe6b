"""The service front over real sockets: requests wait while no VM is live, go to the live
backend of the newest generation, and on a switch exactly the requests the old VM never
took are sent again; duplicates are dropped and counted. The backends here are plain
sockets speaking the device's frames, so each step is held where the test wants it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postcopy.service.front import Front
from postcopy.vm import kvstore as kv
from postcopy.vm import reqframe
from postcopy.vm.reqframe import Frame, FrameReader, Hello


class Peer:
    """A connected socket that reads frames with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5.0)
        self.reader = FrameReader()

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def read(self, count: int) -> list[Frame]:
        frames: list[Frame] = []
        while len(frames) < count:
            frames += list(self.reader.frames())
            if len(frames) >= count:
                break
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed after {len(frames)} of {count} frames")
            self.reader.feed(data)
        return frames

    def quiet(self, seconds: float = 0.3) -> bool:
        """Nothing arrives for `seconds`."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(5.0)
        self.reader.feed(data)
        return False


@pytest.fixture
def front(tmp_path: Path) -> Iterator[tuple[Front, list[dict[str, Any]]]]:
    events: list[dict[str, Any]] = []
    front = Front("tcp:127.0.0.1:0", f"unix:{tmp_path}/backends.sock", on_event=events.append)
    thread = threading.Thread(target=front.run, daemon=True)
    thread.start()
    try:
        yield front, events
    finally:
        front.stop()
        thread.join(5)
        front.close()
    assert not Path(f"{tmp_path}/backends.sock").exists()


def _client(front: Front) -> Peer:
    return Peer(socket.create_connection((front.address.host, front.address.port)))


def _backend(front: Front, hello: Hello) -> Peer:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(front.backend_address.path))
    peer = Peer(sock)
    peer.send(hello.encode())
    return peer


def _answer(tag: int, value: bytes = b"", status: int = kv.OK) -> bytes:
    return reqframe.encode(reqframe.KIND_ANSWER, status, tag, value)


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def test_requests_wait_for_a_live_backend_then_go_in_order(front: tuple[Front, Any]) -> None:
    server, events = front
    client = _client(server)
    client.send(*(kv.request(kv.GET, 100 + i, i + 1) for i in range(3)))
    backend = _backend(server, Hello(0, 0, live=False))
    _wait(lambda: server.stats()["waiting"] == 3, "three requests waiting")
    assert backend.quiet()  # not live yet: nothing is sent to it
    backend.send(Hello(0, 0, live=True).encode())
    got = backend.read(3)
    assert [f.id for f in got] == [1, 2, 3]  # the front's tags, in order
    assert [int.from_bytes(f.body[:8], "little") for f in got] == [1, 2, 3]  # the keys
    backend.send(_answer(2, b"two"), _answer(1, b"one"), _answer(3, b"", kv.NOT_FOUND))
    answers = {f.id: (f.flags, f.body) for f in client.read(3)}
    assert answers == {100: (kv.OK, b"one"), 101: (kv.OK, b"two"), 102: (kv.NOT_FOUND, b"")}
    assert [e["event"] for e in events if e["event"] == "switch"] == ["switch"]


def test_a_switch_resends_exactly_what_the_old_vm_never_took(front: tuple[Front, Any]) -> None:
    server, events = front
    client = _client(server)
    source = _backend(server, Hello(0, 0, live=True))
    destination = _backend(server, Hello(0, 0, live=False))
    _wait(lambda: server.stats()["current"] is not None, "a current backend")
    client.send(*(kv.request(kv.GET, i, i) for i in range(1, 6)))
    assert [f.id for f in source.read(5)] == [1, 2, 3, 4, 5]
    source.send(_answer(1, b"1"))
    assert client.read(1)[0].id == 1
    # the source's VM took tags 1..3 (the device state says so) and stopped; 4 and 5
    # sit unread in its socket, and so does 6: for the front the source is still live
    client.send(kv.request(kv.GET, 6, 6))
    assert source.read(1)[0].id == 6
    destination.send(Hello(1, 3, live=True).encode())
    assert [f.id for f in destination.read(3)] == [4, 5, 6]
    assert destination.quiet()
    # the destination answers what it holds (2, 3 from the migrated state) and the rest
    destination.send(*(_answer(tag, bytes([tag])) for tag in (2, 3, 4, 5, 6)))
    assert sorted(f.id for f in client.read(5)) == [2, 3, 4, 5, 6]
    switch = [e for e in events if e["event"] == "switch"][-1]
    assert (switch["generation"], switch["accepted"], switch["resent"]) == (1, 3, 3)
    assert server.stats()["waiting"] == 0
    # the old VM is not live any more: even if it spoke, a stale hello changes nothing
    source.send(Hello(0, 5, live=True).encode())
    client.send(kv.request(kv.GET, 7, 7))
    assert destination.read(1)[0].id == 7
    assert source.quiet()


def test_a_duplicate_answer_is_dropped_and_counted(front: tuple[Front, Any]) -> None:
    server, _events = front
    client = _client(server)
    backend = _backend(server, Hello(0, 0, live=True))
    _wait(lambda: server.stats()["current"] is not None, "a current backend")
    client.send(kv.request(kv.GET, 9, 1))
    backend.read(1)
    backend.send(_answer(1, b"a"), _answer(1, b"a"), _answer(77, b"?"))
    assert client.read(1)[0].id == 9
    assert client.quiet()
    _wait(lambda: server.stats()["duplicates"] == 2, "two duplicates counted")


def test_a_client_sending_an_answer_is_disconnected(front: tuple[Front, Any]) -> None:
    server, events = front
    client = _client(server)
    client.send(_answer(1))
    assert client.sock.recv(100) == b""
    _wait(lambda: any(e.get("error") for e in events if e["event"] == "disconnected"), "error")
    error = next(e["error"] for e in events if e["event"] == "disconnected")
    assert "clients send requests only" in error
    assert server.stats()["errors"] == 1
