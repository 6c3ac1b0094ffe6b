"""The memory socket (vm/memshare.py) on the real kernel: a client maps the VM's memfd RAM
and hands over its userfaultfd; malformed clients are refused with a reason."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.linux.memory import Mapping
from postcopy.migration.shared import SharedClients
from postcopy.ram import RamBlock, RamList
from postcopy.vm.memshare import MemoryShareClient, MemoryShareServer

pytestmark = pytest.mark.timeout(60, method="thread")

PAGE = 4096


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[MemoryShareServer, SharedClients, RamList]]:
    ram = RamList([RamBlock("pc.ram", Mapping.memfd(16 * PAGE, "pc.ram"))])
    clients = SharedClients(list(ram))
    server = MemoryShareServer(str(tmp_path / "memory.sock"), ram, clients, lambda: "missing")
    try:
        yield server, clients, ram
    finally:
        server.close()
        clients.close()
        ram.close()


def test_a_client_maps_the_same_memory_and_its_userfaultfd_is_adopted(
    server: tuple[MemoryShareServer, SharedClients, RamList],
) -> None:
    memshare, clients, ram = server
    ram[0].view[5 * PAGE] = 0x42  # present: the client's mapping sees it, no fault
    client = MemoryShareClient(memshare.path, name="backend")
    try:
        mapping = client.mappings[0]
        assert mapping is not None and mapping.address != ram[0].host_address
        assert mapping.view[5 * PAGE] == 0x42
        (adopted,) = clients.clients()
        assert adopted.name == "backend" and adopted.bases == [mapping.address]
        assert adopted.locate(mapping.address + 5 * PAGE + 7) == (0, 5)
        assert adopted.locate(ram[0].host_address) is None  # not the client's address
        clients.end()  # unregisters the client's range through its fd, tells it
        assert client.wait_end(10)
    finally:
        client.close()


def _raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    offer = b""
    while not offer.endswith(b"\n"):
        data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        for _, _, payload in ancillary:  # the RAM's fds: not used here
            for index in range(0, len(payload) - len(payload) % 4, 4):
                os.close(int.from_bytes(payload[index : index + 4], "little"))
        offer += data
    assert json.loads(offer)["blocks"][0]["name"] == "pc.ram"
    return sock


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"not json\n", "not a JSON object"),
        (b'{"name": "x", "bases": [4096]}\n', "expected one userfaultfd, got 0"),
    ],
)
def test_a_malformed_client_is_refused_with_a_reason(
    server: tuple[MemoryShareServer, SharedClients, RamList], reply: bytes, reason: str
) -> None:
    memshare, clients, _ = server
    sock = _raw_client(memshare.path)
    try:
        sock.sendall(reply)
        answer = sock.makefile("rb").readline()
        assert reason in json.loads(answer)["error"]
        assert clients.clients() == []
    finally:
        sock.close()
