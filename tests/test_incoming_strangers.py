"""A waiting destination survives strangers: a port scan, garbage, a wrong key and a
connection that says nothing are each dropped with one log line and counted
(x-refused-connections), and the real source then migrates; migrate-incoming's
exit-on-error decides what a failure after the handshake does. Real processes, real
sockets."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest

from postcopy.transport import connect
from postcopy.wire import MAIN_MAGIC, PROTOCOL_VERSION
from tests.hold import PRECOPY_HELD
from tests.vmprocess import VmProcess, free_port

pytestmark = pytest.mark.timeout(180)

GUEST = ("--guest", "memtouch", "--ram", "64M")


def refused_lines(vm: VmProcess) -> list[str]:
    return [line for line in vm.stderr().splitlines() if "refused a connection" in line]


def wait_refused(vm: VmProcess, count: int) -> None:
    """Until the destination has counted `count` strangers (each is reported from its
    own handshake thread)."""
    for _ in range(400):
        if vm.cmd("query-migrate").get("x-refused-connections", 0) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"only {vm.cmd('query-migrate')} strangers counted")


def migrate_and_verify(source: VmProcess, destination: VmProcess, uri: str) -> None:
    source.cmd("migrate", uri=uri)
    assert source.wait_migration({"completed", "failed"})["status"] == "completed"
    assert destination.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.cmd("stop")
    assert destination.cmd("x-verify")["ok"]


def test_port_scans_and_garbage_are_dropped_and_the_source_then_migrates(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", uri)
    vms.append(destination)
    for _ in range(3):  # a port scan: connect and close
        socket.create_connection(("127.0.0.1", port)).close()
    with socket.create_connection(("127.0.0.1", port)) as junk:  # garbage
        junk.sendall(os.urandom(4096))
    with socket.create_connection(("127.0.0.1", port)) as http:  # a health check
        http.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_refused(destination, 5)
    assert destination.process.poll() is None
    status = destination.cmd("query-migrate")
    assert status["status"] == "none" and status["x-refused-connections"] == 5
    lines = refused_lines(destination)
    assert len(lines) == 5, destination.stderr()  # one line each, no traceback
    assert "Traceback" not in destination.stderr()
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    migrate_and_verify(source, destination, uri)
    assert destination.cmd("query-migrate")["x-refused-connections"] == 5


def test_a_silent_connection_does_not_block_the_real_source(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", uri)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    # held open and silent for the whole migration, connected before the source
    with socket.create_connection(("127.0.0.1", port)):
        migrate_and_verify(source, destination, uri)
        # the silent peer was never refused: the source did not wait for its handshake to
        # time out (10 s; a 64 MiB migration takes about one), and once the migration
        # had its source the listener closed without a word about it
        assert destination.cmd("query-migrate")["x-refused-connections"] == 0
    assert refused_lines(destination) == []


def test_peers_that_fail_the_streams_part_are_dropped_and_do_not_hold_back_the_source(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """Peers that pass the transport's hello (anyone can: no key here) and then fail the
    stream's part: a stream of another protocol version, garbage, and one that says
    nothing more, held open for the whole migration. The first two are dropped and
    named; the silent one does not hold back the source behind it (it was: 10 s of
    setup, then it was refused, while the source waited)."""
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", uri)
    vms.append(destination)
    # the source is up before the silent peer comes: the peer's handshake limit (10 s)
    # must not also cover a process start on a loaded host, or it is refused (a third)
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    newer = connect(uri)
    newer.send_all([struct.pack(">8sII", MAIN_MAGIC, PROTOCOL_VERSION + 1, 0)])
    garbage = connect(uri)
    garbage.send_all([bytes(range(0x80, 0x90)) * 4])
    silent = connect(uri)
    try:
        wait_refused(destination, 2)
        lines = refused_lines(destination)
        assert any(
            f"StreamHeader.version={PROTOCOL_VERSION + 1} is not supported" in line
            for line in lines
        )
        assert any("StreamHeader.magic=80 81 82 83 84 85 86 87 (hex)" in line for line in lines)
        migrate_and_verify(source, destination, uri)
        # the silent peer was never refused: the source did not wait out its handshake
        assert destination.cmd("query-migrate")["x-refused-connections"] == 2
    finally:
        for peer in (newer, garbage, silent):
            peer.close()
    assert len(refused_lines(destination)) == 2, destination.stderr()
    assert "Traceback" not in destination.stderr()


def test_a_second_source_while_a_migration_runs_is_told_so(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """A source that comes while another's migration runs here (held in precopy) fails at
    once with the reason, is counted, and the first migration completes (the second used
    to wait in setup until the first had ended, then fail without a reason)."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", uri)
    vms.append(destination)
    first = VmProcess(tmp_path, "first", *GUEST)
    vms.append(first)
    second = VmProcess(tmp_path, "second", *GUEST)
    vms.append(second)
    first.cmd("migrate-set-parameters", **PRECOPY_HELD)
    first.cmd("migrate", uri=uri)
    first.wait_migration({"active"})
    second.cmd("migrate", uri=uri)
    failed = second.wait_migration({"failed", "completed"})
    assert failed["status"] == "failed"
    assert "already receiving a migration from tcp:127.0.0.1:" in failed["error-desc"], failed
    assert second.cmd("query-status")["running"]
    wait_refused(destination, 1)
    [line] = refused_lines(destination)
    assert "came while a migration from tcp:127.0.0.1:" in line
    assert first.cmd("query-migrate")["status"] == "active"  # held: it was running all along
    first.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    assert first.wait_migration({"completed", "failed"})["status"] == "completed"
    assert destination.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.cmd("stop")
    assert destination.cmd("x-verify")["ok"]


def test_a_wrong_key_is_refused_and_the_right_one_then_migrates(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    for path in (right, wrong):
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", uri, "--key", str(right))
    vms.append(destination)
    impostor = VmProcess(tmp_path, "impostor", *GUEST, "--key", str(wrong))
    vms.append(impostor)
    impostor.cmd("migrate", uri=uri)
    failed = impostor.wait_migration({"completed", "failed"})
    assert failed["status"] == "failed" and "wrong key" in failed["error-desc"]
    wait_refused(destination, 1)
    assert destination.process.poll() is None
    [line] = refused_lines(destination)
    assert "wrong key" in line
    source = VmProcess(tmp_path, "src", *GUEST, "--key", str(right))
    vms.append(source)
    migrate_and_verify(source, destination, uri)


@pytest.mark.parametrize("exit_on_error", [True, False])
def test_exit_on_error_decides_what_a_failed_migration_does(
    tmp_path: Path, vms: list[VmProcess], exit_on_error: bool
) -> None:
    """QEMU 9.1's migrate-incoming exit-on-error (default true): a source that passed the
    handshake with the wrong VM fails the migration; the destination exits 1, or with
    false stays up with the failure in query-migrate."""
    port = free_port()
    destination = VmProcess(
        tmp_path, "dst", "--guest", "memtouch", "--ram", "128M", "--incoming", "defer"
    )
    vms.append(destination)
    destination.cmd(
        "migrate-incoming", uri=f"tcp:127.0.0.1:{port}", **{"exit-on-error": exit_on_error}
    )
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert source.wait_migration({"completed", "failed"})["status"] == "failed"
    if exit_on_error:
        destination.process.wait(30)
        assert destination.process.returncode == 1
        assert "VM configuration mismatch" in destination.stderr()
        return
    failed = destination.wait_migration({"failed"})
    assert "VM configuration mismatch" in failed["error-desc"]
    assert destination.process.poll() is None
    assert destination.cmd("query-status")["status"] == "inmigrate"
