"""The kvstore guest for real: a micro-VM with the request device behind a service front,
its answers, its table's verifier (and the corruptions it must catch), and the VM saved
and loaded into another VM under load with every answer checked."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from postcopy.service.front import Front
from postcopy.service.load import LoadGenerator, LoadOptions
from postcopy.vm import kvstore as kv
from postcopy.vm import reqframe
from postcopy.vm.guests import GUESTS
from postcopy.vm.machine import MicroVM, copy_ram
from postcopy.vm.reqframe import FrameReader
from postcopy.vm.requestdev import RequestDevice

RAM = 64 << 20
KVSTORE = GUESTS["kvstore"]


@dataclass
class Service:
    front: Front
    thread: threading.Thread
    backends: str

    def client(self) -> socket.socket:
        sock = socket.create_connection((self.front.address.host, self.front.address.port))
        sock.settimeout(10)
        return sock


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    front = Front("tcp:127.0.0.1:0", f"unix:{tmp_path}/kv.sock")
    thread = threading.Thread(target=front.run, daemon=True)
    thread.start()
    try:
        yield Service(front, thread, f"unix:{tmp_path}/kv.sock")
    finally:
        front.stop()
        thread.join(5)
        front.close()


def _vm(service: Service, *, incoming: bool = False, params: list[int] | None = None) -> MicroVM:
    console = bytearray()
    vm = MicroVM(
        ram_size=RAM,
        image=KVSTORE.image,
        params=KVSTORE.default_params if params is None else params,
        incoming=incoming,
        devices=[RequestDevice(service.backends)],
        console=console.extend,
    )
    vm.console_log = console  # type: ignore[attr-defined]
    return vm


def _wait_ready(vm: MicroVM) -> None:
    deadline = time.monotonic() + 60
    while b"R" not in vm.console_log:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the kvstore guest did not fill its table in 60 s"
        time.sleep(0.01)


def _ask(sock: socket.socket, frames: list[bytes]) -> dict[int, tuple[int, bytes]]:
    sock.sendall(b"".join(frames))
    reader = FrameReader()
    answers: dict[int, tuple[int, bytes]] = {}
    while len(answers) < len(frames):
        reader.feed(sock.recv(65536))
        for frame in reader.frames():
            assert frame.kind == reqframe.KIND_ANSWER and frame.id not in answers
            answers[frame.id] = (frame.flags, frame.body)
    return answers


def test_the_guest_answers_get_put_delete_info(service: Service) -> None:
    with _vm(service) as vm:
        vm.cont()
        _wait_ready(vm)
        slots, preloaded = kv.geometry(RAM)
        sock = service.client()
        info = _ask(sock, [kv.request(kv.INFO, 1, 0)])[1]
        assert info[0] == kv.OK
        assert kv.decode_info(info[1]) == kv.Info(slots, preloaded, preloaded, 0)
        long_value = bytes(range(48))
        answers = _ask(
            sock,
            [
                kv.request(kv.GET, 10, 7),
                kv.request(kv.GET, 11, preloaded + 1),
                kv.request(kv.PUT, 12, 7, b"seven"),
                kv.request(kv.GET, 13, 7),
                kv.request(kv.PUT, 14, preloaded + 1, long_value),
                kv.request(kv.GET, 15, preloaded + 1),
                kv.request(kv.DELETE, 16, 7),
                kv.request(kv.GET, 17, 7),
                kv.request(kv.DELETE, 18, 7),
                # malformed: key 0, a GET with a value, an unknown operation
                reqframe.encode(kv.GET, 0, 19, (0).to_bytes(8, "little")),
                reqframe.encode(kv.GET, 0, 20, (5).to_bytes(8, "little") + b"x"),
                reqframe.encode(9, 0, 21, (5).to_bytes(8, "little")),
            ],
        )
        assert answers == {
            10: (kv.OK, kv.preload_value(7)),
            11: (kv.NOT_FOUND, b""),
            12: (kv.OK, kv.preload_value(7)),
            13: (kv.OK, b"seven"),
            14: (kv.NOT_FOUND, b""),
            15: (kv.OK, long_value),
            16: (kv.OK, b"seven"),
            17: (kv.NOT_FOUND, b""),
            18: (kv.NOT_FOUND, b""),
            19: (kv.BAD, b""),
            20: (kv.BAD, b""),
            21: (kv.BAD, b""),
        }
        sock.close()
        vm.stop()
        report = kv.verify_kvstore(_ram(vm), RAM, KVSTORE.default_params)
        assert report.ok, report.detail
        assert report.header["entries"] == preloaded  # one key added, one deleted
        assert report.header["bad"] == 3


def _ram(vm: MicroVM) -> np.ndarray:
    block = vm.ram[0]
    return np.frombuffer(block.view, dtype=np.uint8, count=block.length)


def _slot_of(ram: np.ndarray, key: int, slots: int) -> int:
    words = ram[kv.SLOTS_ADDRESS : kv.SLOTS_ADDRESS + slots * 64].view(np.uint64).reshape(-1, 8)
    return int(np.flatnonzero(words[:, 0] == key)[0])


def test_the_verifier_catches_a_corrupt_table(service: Service) -> None:
    # a small table (1% of RAM, half full) keeps runs of occupied slots long
    params = KVSTORE.pack_params(table_ppm=10_000, fill_ppm=500_000)
    with _vm(service, params=params) as vm:
        vm.cont()
        _wait_ready(vm)
        vm.stop()
        ram = _ram(vm)
        slots, _preloaded = kv.geometry(RAM, 10_000, 500_000)
        assert kv.verify_kvstore(ram, RAM, params).ok
        # one value byte flipped
        slot = kv.SLOTS_ADDRESS + _slot_of(ram, 5, slots) * 64
        ram[slot + 16] ^= 1
        report = kv.verify_kvstore(ram, RAM, params)
        assert not report.ok and "checksum" in report.detail
        ram[slot + 16] ^= 1
        # a byte beyond the value's 16 bytes
        ram[slot + 16 + 20] = 7
        report = kv.verify_kvstore(ram, RAM, params)
        assert not report.ok and "beyond its value's length" in report.detail
        ram[slot + 16 + 20] = 0
        # a key emptied without the header knowing
        saved = ram[slot : slot + 64].copy()
        ram[slot : slot + 64] = 0
        report = kv.verify_kvstore(ram, RAM, params)
        assert not report.ok and "entries" in report.detail
        ram[slot : slot + 64] = saved
        # the last entry of a run moved two slots on, past an empty slot: no longer
        # reachable from its home (nothing else changes: count, checksums, keys)
        words = ram[kv.SLOTS_ADDRESS : kv.SLOTS_ADDRESS + slots * 64].view(np.uint64)
        occupied = words.reshape(-1, 8)[:, 0] != 0
        last = int(np.flatnonzero(occupied[:-2] & ~occupied[1:-1] & ~occupied[2:])[0])
        table = ram[kv.SLOTS_ADDRESS :]
        table[(last + 2) * 64 : (last + 3) * 64] = table[last * 64 : (last + 1) * 64]
        table[last * 64 : (last + 1) * 64] = 0
        report = kv.verify_kvstore(ram, RAM, params)
        assert not report.ok and "not reachable" in report.detail
        # a table stopped mid-update is named as such, not blamed
        ram[kv.HEADER_ADDRESS + 32] = 1
        assert "busy" in kv.verify_kvstore(ram, RAM, params).detail


def test_the_vm_moves_under_load_and_every_answer_is_right(service: Service) -> None:
    """Save the running kvstore VM (stopped) and load it into another VM, as a migration
    does with its vCPU and device state, while clients keep many requests in flight."""
    source = _vm(service)
    destination = _vm(service, incoming=True)
    try:
        source.cont()
        _wait_ready(source)
        options = LoadOptions(
            address=str(service.front.address),
            clients=4,
            rate=0,
            depth=16,
            duration=None,
            keys=20_000,
            read=0.5,
            delete=0.05,
            grace=10,
        )
        load = LoadGenerator(options)
        outcome: dict[str, object] = {}
        thread = threading.Thread(target=lambda: outcome.update(summary=load.run()))
        thread.start()
        deadline = time.monotonic() + 30
        while load.checker is None or len(load.checker.order) < 2000:
            assert time.monotonic() < deadline and thread.is_alive(), "the load did not start"
            time.sleep(0.01)
        source.stop()
        state = source.save_state()
        in_flight = state["devices"]["request-device"]
        copy_ram(source, destination)
        destination.load_state(state)
        destination.cont()
        before = len(load.checker.order)
        while len(load.checker.order) < before + 2000:
            assert time.monotonic() < deadline, "no requests answered after the move"
            time.sleep(0.01)
        load.stop()
        thread.join(30)
        summary = outcome["summary"]
        assert summary.clean, summary.as_json()  # type: ignore[attr-defined]
        assert service.front.stats()["switches"] == 2
        stats = destination.devices[0].stats()  # type: ignore[attr-defined]
        assert stats["generation"] == 1
        assert stats["accepted-tag"] >= in_flight["accepted"]
        destination.stop()
        report = kv.verify_kvstore(_ram(destination), RAM, KVSTORE.default_params)
        assert report.ok, report.detail
    finally:
        source.close()
        destination.close()


def test_a_vm_refuses_state_whose_devices_differ(service: Service) -> None:
    with _vm(service) as source, MicroVM(ram_size=RAM, incoming=True) as bare:
        source.stop()
        with pytest.raises(ValueError, match="needs --service on both sides"):
            bare.load_state(source.save_state())
