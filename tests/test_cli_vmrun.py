"""`postcopy vm run` as a user meets it: one ready line once it can be used, a --pidfile,
errors in the user's terms (an ELF image, a RAM size, a capability, a guest parameter, a
guest that triple-faults), capabilities that tell the truth, and `x-verify` on a guest of
one's own answering the digest of its RAM. Real processes, real KVM."""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.tools.qmpclient import QmpClient
from postcopy.tools.vmchild import end_process, free_port
from tests.vmprocess import QmpCommandError, VmProcess

pytestmark = pytest.mark.timeout(120)

POSTCOPY = [sys.executable, "-m", "postcopy"]
REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"^postcopy vm run: ready \(PID (\d+)\): QMP (\S+), (.+)$")


def listening_on(port: int) -> bool:
    """Whether a TCP socket listens on `port` (from /proc/net/tcp: state 0A is LISTEN)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
    return False


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        end_process(process)  # type: ignore[arg-type]


def vm_run(started: list[subprocess.Popen[str]], *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start `vm run` and wait for its first line on stdout (the ready line)."""
    process = subprocess.Popen(
        [*POSTCOPY, "vm", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(process)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 60)
    assert ready, "no ready line within 60 s"
    return process, process.stdout.readline().rstrip("\n")


def run_error(*args: str) -> str:
    """A `vm run` that must refuse to start: its one line on stderr."""
    result = subprocess.run(
        [*POSTCOPY, "vm", "run", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("postcopy vm run: ")
    return lines[0]


# -- ready line and pidfile -------------------------------------------------------------------


def test_destination_prints_one_ready_line_when_it_can_be_used(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    qmp, pidfile, port = tmp_path / "dst.qmp", tmp_path / "dst.pid", free_port()
    process, line = vm_run(
        started,
        *("--guest", "memtouch", "--ram", "64M", "--qmp", str(qmp)),
        *("--incoming", f"tcp:127.0.0.1:{port}", "--pidfile", str(pidfile)),
    )
    match = READY.match(line)
    assert match, line
    assert int(match.group(1)) == process.pid and match.group(2) == str(qmp)
    assert match.group(3) == f"waiting for a migration on tcp:127.0.0.1:{port}"
    # at that line both the QMP socket and the migration port already accept
    assert listening_on(port)
    with QmpClient.connect_to(str(qmp)) as client:
        assert client.execute("query-status")["status"] == "inmigrate"
    assert pidfile.read_text().strip() == str(process.pid)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out == "" and err == ""  # one line in its life, and a quiet end
    assert not pidfile.exists() and not qmp.exists()


def test_source_ready_line_says_the_guest_runs(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    qmp = tmp_path / "src.qmp"
    process, line = vm_run(started, "--guest", "memtouch", "--ram", "64M", "--qmp", str(qmp))
    assert line == f"postcopy vm run: ready (PID {process.pid}): QMP {qmp}, guest running"
    _, paused = vm_run(
        started, "--guest", "memtouch", "--ram", "64M", "--qmp", str(tmp_path / "p.qmp"), "-S"
    )
    assert paused.endswith("guest paused (-S: `cont` starts it)")


# -- errors in the user's terms ---------------------------------------------------------------


def test_an_elf_guest_image_is_refused_with_the_fix(tmp_path: Path) -> None:
    elf = tmp_path / "guest.elf"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(200))
    line = run_error("--guest-image", str(elf), "--qmp", str(tmp_path / "q.qmp"))
    assert line.startswith(f"postcopy vm run: --guest-image {elf}: this is an ELF file")
    assert "objcopy -O binary" in line and "0x10000" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--ram", "3M"), "--ram 3M: a RAM size of 3.0 MiB is not possible: it must be a "),
        (("--ram", "lots"), '--ram lots: "lots" is not a size'),
        (("--vcpus", "64"), "--vcpus 64: a VM has 1 to 32 vCPUs"),
        (("--migrate-capability", "bogus"), "--migrate-capability bogus: "),
        (("--guest-param", "seed=x"), "--guest-param seed=x: the value must be a number"),
        (("--guest-param", "nosuch=1"), "the guest memtouch has no parameter nosuch"),
    ],
)
def test_bad_options_are_one_line_without_python_names(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    line = run_error("--guest", "memtouch", "--qmp", str(tmp_path / "q.qmp"), *args)
    assert expected in line
    for python in ("ram_size", "3145728", "KeyError", "Error(", "['", "=True"):
        assert python not in line, line


def test_a_guest_that_triple_faults_is_explained(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    image = tmp_path / "hlt.bin"
    image.write_bytes(b"\xf4")  # HLT: #GP at CPL3, and with no IDT a triple fault
    qmp = tmp_path / "q.qmp"
    process, _ = vm_run(started, "--guest-image", str(image), "--qmp", str(qmp))
    with QmpClient.connect_to(str(qmp)) as client:
        deadline = time.monotonic() + 30
        while client.execute("query-status")["status"] != "internal-error":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert err.strip().splitlines() == [
        "postcopy vm run: internal error: vCPU 0: the guest triple-faulted at RIP 0x10000 "
        "(CPL3): any exception does (there is no IDT); check that the image is a flat "
        "binary linked at 0x10000 that keeps to the guest ABI (README, `The guest ABI`)"
    ]


# -- capabilities tell the truth --------------------------------------------------------------


def test_return_path_is_reported_on_and_cannot_be_turned_off(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    vm = VmProcess(tmp_path, "vm", "--guest", "memtouch", "--ram", "64M")
    vms.append(vm)
    states = {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}
    assert states["return-path"] is True
    with pytest.raises(QmpCommandError, match="the return path is always on here"):
        vm.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": "return-path", "state": False}],
        )


def _postcopy_pair(
    tmp_path: Path, vms: list[VmProcess], *destination_caps: str
) -> tuple[VmProcess, VmProcess]:
    tmp_path.mkdir()
    uri = f"tcp:127.0.0.1:{free_port()}"
    caps = [arg for cap in destination_caps for arg in ("--migrate-capability", cap)]
    common = ("--guest", "memtouch", "--ram", "64M")
    destination = VmProcess(tmp_path, "dst", *common, "--incoming", uri, *caps)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *common, "--migrate-capability", "postcopy-ram")
    vms.append(source)
    source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 0})
    source.cmd("migrate", uri=uri)
    destination.wait_migration({"completed", "failed"})
    return source, destination


def test_blocktime_figures_only_with_the_capability(tmp_path: Path, vms: list[VmProcess]) -> None:
    _, without = _postcopy_pair(tmp_path / "a", vms, "postcopy-ram")
    info = without.cmd("query-migrate")
    assert info["status"] == "completed"
    assert not {k for k in info if "blocktime" in k}, info
    _, with_it = _postcopy_pair(tmp_path / "b", vms, "postcopy-ram", "postcopy-blocktime")
    info = with_it.cmd("query-migrate")
    assert {"postcopy-blocktime", "postcopy-vcpu-blocktime", "x-postcopy-blocktime-us"} <= set(info)


# -- x-verify on a guest of one's own ---------------------------------------------------------


def test_x_verify_on_a_guest_of_ones_own_answers_a_digest_equal_on_both_sides(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    image = tmp_path / "hello.bin"
    built = subprocess.run(
        ["make", "-s", "guest", "SRC=guests/examples/hello.S", f"OUT={image}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ("--guest-image", str(image), "--ram", "64M", "--vcpus", "2")
    destination = VmProcess(tmp_path, "dst", *common, "-S", "--incoming", uri)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *common)
    vms.append(source)
    deadline = time.monotonic() + 30
    while source.console().count(b".") < 10:  # both vCPUs said hello and made passes
        assert time.monotonic() < deadline, source.console()
        time.sleep(0.05)
    assert source.console().count(b"hello\n") == 2
    source.cmd("migrate", uri=uri)
    assert destination.wait_migration({"completed", "failed"})["status"] == "completed"
    assert source.wait_migration({"completed"})["status"] == "completed"
    answers = [vm.cmd("x-verify") for vm in (source, destination)]
    assert answers[0]["digest"] == answers[1]["digest"]
    assert re.fullmatch(r"[0-9a-f]{64}", answers[0]["digest"])
    assert "ok" not in answers[0] and "no verifier" in answers[0]["detail"]


def test_the_console_shows_a_byte_at_once_even_when_none_follows(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    """A guest that prints once and then computes: its byte is in the console file at
    once, not when (if ever) the next one comes."""
    image = tmp_path / "once.bin"
    # mov dx, 0x3f8; mov al, 'A'; out dx, al; jmp $
    image.write_bytes(bytes.fromhex("66baf803b041eeebfe"))
    console = tmp_path / "once.console"
    vm_run(
        started,
        *("--guest-image", str(image), "--qmp", str(tmp_path / "q.qmp")),
        *("--console", str(console)),
    )
    deadline = time.monotonic() + 10
    while not (console.exists() and console.read_bytes() == b"A"):
        assert time.monotonic() < deadline, "the guest's one byte never reached the console"
        time.sleep(0.05)
