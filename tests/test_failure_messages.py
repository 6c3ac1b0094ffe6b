"""Failures say what really happened and what it means for the guest (migration/failures.py):
a reset connection is not "the destination gave up"; either side told to quit in postcopy
says the guest is lost and exits 1, and the destination, which cannot tell a source gone
from a broken link, pauses (postcopy recovery) naming what its socket saw; a connection
killed on the source's host is named so; a trace file that cannot be written costs the
trace only; a live VM's QMP path is refused in one line and left alone; a bad `migrate`
URI is refused at once. Real processes, real sockets."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hold import HOLD_RATE, PRECOPY_HELD
from tests.vmprocess import QmpCommandError, VmProcess, free_port

pytestmark = pytest.mark.timeout(180)

GUEST = ("--guest", "memtouch", "--ram", "64M")
CAPS = ("--migrate-capability", "postcopy-ram")


class ResettingProxy:
    """Forwards TCP connections to `target`; `reset()` closes both sides of each with
    SO_LINGER 0, so both peers get a TCP RST (ECONNRESET), as a dropped link does."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)

    def reset(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()

    def close(self) -> None:
        self._listener.close()
        self.reset()


def test_a_reset_connection_is_named_not_blamed_on_the_destination(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    port = free_port()
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", f"tcp:127.0.0.1:{port}")
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    proxy = ResettingProxy(port)
    try:
        source.cmd("migrate-set-parameters", **PRECOPY_HELD)  # held active
        source.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        source.wait_migration({"active"})
        proxy.reset()
        # plain precopy has no return path: the source learns of the reset when it sends
        source.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        failed = source.wait_migration({"failed", "completed"})
    finally:
        proxy.close()
    assert failed["status"] == "failed"
    assert "gave up" not in failed["error-desc"]
    assert "was reset (ECONNRESET)" in failed["error-desc"], failed["error-desc"]
    assert source.cmd("query-status")["running"]


def test_a_connection_killed_on_this_host_is_named_so(tmp_path: Path, vms: list[VmProcess]) -> None:
    """An operator's `ss -K` (or a firewall rule) aborts the source's sockets on its own
    host: ECONNABORTED, named as that, not as a generic failure; both sides say why."""
    port = free_port()
    destination = VmProcess(tmp_path, "dst", *GUEST, "--incoming", f"tcp:127.0.0.1:{port}")
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    source.cmd("migrate-set-parameters", **PRECOPY_HELD)  # held active
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    source.wait_migration({"active"})
    # the source's ends of this migration's connections (no one else's: the port is ours)
    killed = subprocess.run(
        ["ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"127.0.0.1:{port}" in killed.stdout, (killed.stdout, killed.stderr)
    # plain precopy has no return path: the source learns of the abort when it sends
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    failed = source.wait_migration({"failed", "completed"})
    assert failed["status"] == "failed"
    assert "aborted on this host (ECONNABORTED)" in failed["error-desc"], failed["error-desc"]
    assert source.cmd("query-status")["running"]
    destination.process.wait(30)
    assert destination.process.returncode == 1
    assert "incoming migration failed: the connection to the source" in destination.stderr()


def postcopy_held(tmp_path: Path, vms: list[VmProcess]) -> tuple[VmProcess, VmProcess]:
    """A pair in postcopy whose push is held at 1 MiB/s (zero pages sent as data):
    most of the guest's RAM is still only on the source."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", *GUEST, *CAPS, "--incoming", uri)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *GUEST, *CAPS)
    vms.append(source)
    source.cmd(
        "migrate-set-parameters",
        **{
            "x-postcopy-after-rounds": 0,
            "max-postcopy-bandwidth": HOLD_RATE,
            "zero-page-detection": "none",
        },
    )
    source.cmd("migrate", uri=uri)
    source.wait_migration({"postcopy-active"})
    destination.wait_migration({"postcopy-active"})
    return source, destination


def test_a_source_told_to_quit_in_postcopy_says_the_guest_is_lost_and_exits_1(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    source, destination = postcopy_held(tmp_path, vms)
    source.process.send_signal(signal.SIGTERM)
    source.process.wait(30)
    assert source.process.returncode == 1
    lines = [line for line in source.stderr().splitlines() if "postcopy vm run:" in line]
    assert len(lines) == 1, source.stderr()
    assert "terminated in postcopy: the guest runs on the destination and" in lines[0]
    assert "of its RAM were still only here: the guest there is lost" in lines[0]
    # the destination cannot tell a source gone from a broken link: it pauses, as QEMU's,
    # keeps every page it has, and says what its socket saw
    info = destination.wait_migration({"postcopy-paused"}, 30)
    # (a process that exits with unread bytes in its socket resets the connection)
    reason = info["error-desc"]
    assert "closed the connection" in reason or "its process died" in reason, reason
    assert destination.process.poll() is None
    said = destination.stderr()
    assert f"Migration paused: {reason}" in said, said
    assert "Traceback" not in said


def test_a_destination_told_to_quit_in_postcopy_says_the_guest_is_lost_and_exits_1(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    source, destination = postcopy_held(tmp_path, vms)
    destination.process.send_signal(signal.SIGTERM)
    destination.process.wait(30)
    assert destination.process.returncode == 1  # it used to exit 0 without a word
    lines = [line for line in destination.stderr().splitlines() if "postcopy vm run:" in line]
    assert len(lines) == 1, destination.stderr()
    assert "terminated in postcopy: the guest ran here and" in lines[0]
    assert "of its RAM had not yet arrived: the guest is lost" in lines[0]
    assert "Traceback" not in destination.stderr()
    # the source cannot tell a destination gone from a broken link either: it pauses, as
    # QEMU's, and keeps the only full copy of the guest's RAM for a recovery
    paused = source.wait_migration({"postcopy-paused", "failed"}, 30)
    assert paused["status"] == "postcopy-paused", paused
    reason = paused["error-desc"]
    assert "closed the connection" in reason or "its process died" in reason, reason


def test_a_destination_killed_in_postcopy_leaves_the_source_paused_with_every_page(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """SIGKILL to the destination in postcopy: the source cannot tell a dead destination
    from a broken link, so it pauses (postcopy recovery, as QEMU's), says what its socket
    saw, and keeps the guest stopped with every page (it said only that the connection
    was reset)."""
    source, destination = postcopy_held(tmp_path, vms)
    destination.process.kill()
    destination.process.wait(30)
    paused = source.wait_migration({"postcopy-paused", "failed", "completed"})
    assert paused["status"] == "postcopy-paused", paused
    said = paused["error-desc"]
    assert "was reset (ECONNRESET)" in said or "closed the connection" in said, said
    assert paused["x-postcopy"]["needed-pages"] > 0  # what the destination lacked is here
    assert source.cmd("query-status")["status"] != "running"
    assert source.process.poll() is None


def test_a_trace_file_on_a_full_disk_costs_the_trace_not_the_migration(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """/dev/full answers every write with ENOSPC, as a full disk does: both sides complete,
    and each says in one line that its trace was not written (it was a traceback from the
    watcher thread)."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    trace = ("--trace", "/dev/full")
    destination = VmProcess(tmp_path, "dst", *GUEST, *trace, "--incoming", uri)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *GUEST, *trace)
    vms.append(source)
    source.cmd("migrate", uri=uri)
    assert source.wait_migration({"completed", "failed"})["status"] == "completed"
    assert destination.wait_migration({"completed", "failed"})["status"] == "completed"
    expected = "the migration's trace was not written to /dev/full: No space left on device"
    for vm in (source, destination):
        for _ in range(100):  # written by the watcher thread once the migration ended
            if expected in vm.stderr():
                break
            time.sleep(0.05)
        said = vm.stderr()
        assert said.count(expected) == 1 and "(ENOSPC)" in said, said
        assert "Traceback" not in said, said
    destination.cmd("stop")
    assert destination.cmd("x-verify")["ok"]


def test_a_live_vms_qmp_path_is_refused_in_one_line_and_left_alone(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    live = VmProcess(tmp_path, "live", *GUEST)
    vms.append(live)
    before = Path(live.qmp_path).stat().st_ino
    result = subprocess.run(
        [sys.executable, "-m", "postcopy", "vm", "run", *GUEST, "--qmp", live.qmp_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("postcopy vm run: "), result.stderr
    assert live.qmp_path in lines[0] and "in use" in lines[0]
    # the live VM keeps its socket: same file, still answering
    assert Path(live.qmp_path).stat().st_ino == before
    assert live.cmd("query-status")["running"]


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("foo:bar", "unknown scheme 'foo'"),
        ("tcp:127.0.0.1", "no port"),
        ("tcp:127.0.0.1:99999", "outside 0..65535"),
        ("unix:", "empty socket path"),
        ("exec:cat > /dev/null", "not supported"),
    ],
)
def test_a_bad_migrate_uri_is_refused_at_once(
    tmp_path: Path, vms: list[VmProcess], uri: str, problem: str
) -> None:
    source = VmProcess(tmp_path, "src", *GUEST)
    vms.append(source)
    with pytest.raises(QmpCommandError, match="expects a valid migration URI") as error:
        source.cmd("migrate", uri=uri)
    assert problem in error.value.desc
    assert source.cmd("query-migrate") == {}  # nothing was started
    assert source.cmd("query-status")["running"]
