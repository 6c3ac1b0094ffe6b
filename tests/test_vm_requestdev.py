"""The request device's exactly-once state: requests queued, requests in the guest, half an
answer record and unsent answers all move in save()/load(), and through the real service
front every request is answered exactly once. The guest's side of the exits is played by
the test (registers built here, as KVM would report them), so each kind of in-flight
state is held where the test wants it; tests/test_vm_kvstore.py does it with the real
guest. Also: the device state from a stream is checked before use, and the VM refuses a
state whose devices do not match its own."""

from __future__ import annotations

import base64
import ctypes
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postcopy.linux.kvm import IoDirection, IoExit, KvmFpu, KvmRegs
from postcopy.service.front import Front
from postcopy.vm import kvstore as kv
from postcopy.vm import reqframe
from postcopy.vm.reqframe import FrameReader
from postcopy.vm.requestdev import (
    ANSWER_PORT,
    BATCH_TARGET_SECONDS,
    BLOCK_SIZE,
    EXCHANGE_PORT,
    REGISTER_BYTES,
    STATE_FORMAT,
    RequestDevice,
)


class Registers:
    """The vCPU as the device sees it at an exit: answer bytes in rbx, rbp, rsi, r8..r15,
    xmm0..15 and their count in rax (the layout of guests/kvstore.c)."""

    def __init__(self, answers: bytes, rcx: int = 0) -> None:
        assert len(answers) <= REGISTER_BYTES
        padded = answers.ljust(REGISTER_BYTES, b"\0")
        gprs = struct.unpack("<11Q", padded[:88])
        self.regs = KvmRegs(rax=len(answers), rcx=rcx)
        for name, value in zip(
            ("rbx", "rbp", "rsi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"),
            gprs,
            strict=True,
        ):
            setattr(self.regs, name, value)
        self.fpu = KvmFpu()
        ctypes.memmove(ctypes.addressof(self.fpu.xmm), padded[88:], 256)

    def get_regs(self) -> KvmRegs:
        return self.regs

    def get_fpu(self) -> KvmFpu:
        return self.fpu


def exchange(device: RequestDevice, answers: bytes = b"") -> list[bytes]:
    """One exchange exit: answers in, the request frames of the 1 KiB block out."""
    exit = IoExit(IoDirection.IN, 1, EXCHANGE_PORT, BLOCK_SIZE, 0, b"")
    block = device.io(Registers(answers, rcx=BLOCK_SIZE), exit)  # type: ignore[arg-type]
    assert len(block) == BLOCK_SIZE
    frames, offset = [], 0
    while offset + 2 <= BLOCK_SIZE and (
        length := int.from_bytes(block[offset : offset + 2], "little")
    ):
        frames.append(block[offset : offset + length])
        offset += length
    assert not any(block[offset:])
    return frames


def answer_exit(device: RequestDevice, answers: bytes) -> None:
    exit = IoExit(IoDirection.OUT, 4, ANSWER_PORT, 1, 0, b"\0" * 4)
    device.io(Registers(answers), exit)  # type: ignore[arg-type]


def record(tag: int, value: bytes) -> bytes:
    return reqframe.RECORD_HEADER.pack(tag & 0xFFFF, kv.OK, len(value)) + value


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    front = Front("tcp:127.0.0.1:0", f"unix:{tmp_path}/kv.sock")
    thread = threading.Thread(target=front.run, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        front.stop()
        thread.join(5)
        front.close()


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_everything_in_flight_moves_and_is_answered_once(front: Front) -> None:
    client = socket.create_connection((front.address.host, front.address.port))
    client.settimeout(10)
    source = RequestDevice(str(front.backend_address))
    destination = RequestDevice(str(front.backend_address))
    try:
        source.start()
        destination.start()
        source.resume()
        _wait(lambda: front.stats()["current"] is not None, "the source is live")
        # 60 requests of 24 bytes: a 1 KiB block holds 42, so 18 stay queued
        client.sendall(b"".join(kv.request(kv.GET, 1000 + i, i + 1) for i in range(60)))
        _wait(lambda: source.stats()["accepted"] == 60, "the source took 60 requests")
        delivered = exchange(source)
        assert len(delivered) == 42
        tags = [reqframe.frame_id(frame) for frame in delivered]
        # the guest answers ten, and half of the eleventh record
        answered = b"".join(record(tag, b"v%d" % tag) for tag in tags[:10])
        eleventh = record(tags[10], b"v%d" % tags[10])
        answer_exit(source, answered + eleventh[:3])
        # the VM stops; a vCPU finishes its exit: the rest of the eleventh and four more,
        # which the paused device keeps unsent
        source.pause()
        answer_exit(source, eleventh[3:] + b"".join(record(t, b"v%d" % t) for t in tags[11:15]))
        # requests keep coming while nothing runs: they stay in the front (or the old socket)
        client.sendall(b"".join(kv.request(kv.GET, 2000 + i, i + 1) for i in range(5)))
        _wait(lambda: front.stats()["requests"] == 65, "the front has 65 requests")
        state = source.save()
        stats = source.stats()
        assert stats["queued-requests"] == 18
        assert stats["requests-in-guest"] == 42 - 15
        assert stats["unsent-answer-bytes"] > 0
        # the migration: the destination takes the state and runs
        destination.load(state)
        destination.resume()
        _wait(lambda: front.stats()["generation"] == 1, "the front switched")
        # the guest goes on where it was: the answers it owes, then what is queued
        owed = b"".join(record(t, b"v%d" % t) for t in tags[15:])
        chunks = [owed[i : i + REGISTER_BYTES] for i in range(0, len(owed), REGISTER_BYTES)]
        for chunk in chunks:
            answer_exit(destination, chunk)
        rest: list[bytes] = []
        previous = b""
        while len(rest) < 18 + 5:
            more = exchange(destination, previous)
            previous = b"".join(record(reqframe.frame_id(f), b"w") for f in more)
            rest += more
        exchange_done = threading.Thread(target=exchange, args=(destination, previous))
        exchange_done.start()  # hands the last answers over (then waits a moment: idle)
        reader, got = FrameReader(), list[Any]()
        while len(got) < 65:
            reader.feed(client.recv(65536))
            got += list(reader.frames())
        exchange_done.join()
        ids = sorted(frame.id for frame in got)
        assert ids == [*range(1000, 1060), *range(2000, 2005)]
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)  # and nothing more: no answer came twice
        counters = front.stats()
        assert (counters["duplicates"], counters["waiting"], counters["resent"]) == (0, 0, 5)
    finally:
        client.close()
        source.close()
        destination.close()


def test_a_device_with_no_front_lets_the_guest_wait_and_stops_promptly() -> None:
    device = RequestDevice(None)
    device.resume()
    started = time.monotonic()
    assert exchange(device) == []  # waited a while (WAIT_SECONDS), then an empty block
    device.pause()
    assert time.monotonic() - started < 1.0
    waiter = threading.Thread(target=exchange, args=(device,))
    device.resume()
    waiter.start()
    device.pause()  # a stop ends the wait at once
    waiter.join(0.5)
    assert not waiter.is_alive()
    device.close()


def test_a_broken_exchange_takes_no_answers() -> None:
    device = RequestDevice(None)
    device.resume()
    device.pause()
    exit = IoExit(IoDirection.IN, 1, EXCHANGE_PORT, 512, 0, b"")
    # a `rep insb` of 2 KiB reported as 512 bytes: the registers would come twice
    block = device.io(Registers(record(1, b"x"), rcx=2048), exit)  # type: ignore[arg-type]
    assert block == bytes(512)
    assert device.stats()["guest-errors"] == 1 and device.stats()["answered"] == 0
    device.close()


def _state(**change: Any) -> dict[str, Any]:
    state = {
        "format": STATE_FORMAT,
        "generation": 0,
        "accepted": 3,
        "inbound": "",
        "pending": [2, 3],
        "partial": "",
        "outbound": "",
        "counters": {},
    }
    state.update(change)
    return state


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"format": "other/1"}, "format"),
        ({"accepted": -1}, "accepted"),
        ({"generation": "x"}, "generation"),
        ({"pending": [3, 2]}, "must grow"),
        ({"pending": [2, 9]}, "at most the accepted tag"),
        ({"inbound": "!!"}, "base64"),
        ({"inbound": "AAAA"}, "queued requests"),
        ({"partial": "A" * 400}, "partial"),
        ({"outbound": base64.b64encode(reqframe.encode(kv.GET, 0, 1)).decode()}, "answer frames"),
        ({"counters": {"answered": -1}}, "counters"),
    ],
)
def test_a_bad_device_state_is_refused_by_name(change: dict[str, Any], complaint: str) -> None:
    device = RequestDevice(None)
    try:
        device.load(_state())  # the good one loads
        with pytest.raises(ValueError, match=complaint):
            device.load(_state(**change))
    finally:
        device.close()


def test_after_a_migration_batches_start_small_and_follow_the_guests_pace() -> None:
    """A device whose state came by migration hands one request per exchange, doubles the
    batch while the guest serves it within BATCH_TARGET_SECONDS, and shrinks it in
    proportion when the guest is slower (pages still at the source); then the limit goes
    and a block is as full as it gets (a fresh device's: the test above). The guest's time
    is played by a fake clock."""
    now = [0.0]
    queued = b"".join(kv.request(kv.GET, tag, tag) for tag in range(1, 201))
    device = RequestDevice(None, clock=lambda: now[0])
    answers = b""

    def batch(guest_seconds: float) -> int:
        nonlocal answers
        frames = exchange(device, answers)
        answers = b"".join(record(reqframe.frame_id(f), b"v") for f in frames)
        now[0] += guest_seconds
        return len(frames)

    try:
        device.load(_state(accepted=200, pending=[], inbound=base64.b64encode(queued).decode()))
        device.resume()
        fast = BATCH_TARGET_SECONDS / 4
        assert [batch(fast) for _ in range(4)] == [1, 2, 4, 8]
        # the guest takes 10 target-times over those 8 requests: the next batch is sized
        # to take about one target-time (8 / 10 -> 1 request)
        now[0] += 10 * BATCH_TARGET_SECONDS - fast
        assert [batch(fast) for _ in range(6)] == [1, 2, 4, 8, 16, 32]
        assert batch(fast) == 42  # as many as fit: the limit is gone
        assert device.batch_limit is None
        assert device.stats()["answered"] == 15 + 63  # every batch but the last
    finally:
        device.close()


def test_before_the_switchover_the_guest_finishes_its_batch_and_gets_no_new_one() -> None:
    """quiesce() (the source, just before the stop): the requests the guest holds are
    answered here, where all its memory is, and none is handed over until resume()."""
    queued = b"".join(kv.request(kv.GET, tag, tag) for tag in range(4, 10))
    device = RequestDevice(None)
    try:
        device.load(_state(accepted=9, inbound=base64.b64encode(queued).decode()))
        device.resume()
        assert not device.quiesce(0.01)  # the guest still holds requests 2 and 3
        done: list[bool] = []
        waiter = threading.Thread(target=lambda: done.append(device.quiesce(10.0)))
        waiter.start()
        # the guest hands its answers over in its next exchange and gets nothing new
        assert exchange(device, record(2, b"a") + record(3, b"b")) == []
        waiter.join(10)
        assert done == [True]
        assert device.stats()["queued-requests"] == 6
        device.resume()  # the migration failed: the guest runs on here
        assert [reqframe.frame_id(f) for f in exchange(device)] == [4]
    finally:
        device.close()
