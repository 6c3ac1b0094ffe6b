"""Every user-facing failure is one clear line on stderr and a non-zero exit, with real
processes: a destination that is unreachable, keys that are missing or wrong, a host user
without userfaultfd or KVM permission, VM configurations that do not match, and a
destination that is not waiting for a migration.

Missing permissions are real, not mocked: the command runs as user nobody (setpriv). For
"KVM yes, userfaultfd no" — the usual state of a user in group kvm — the destination runs
as nobody in a private mount namespace where /dev/kvm is a copy of the device node that
nobody may open; the kernel itself then refuses userfaultfd.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unprivileged import ReadableInstall
from tests.vmprocess import VmProcess, free_port

pytestmark = pytest.mark.timeout(120)

POSTCOPY = [sys.executable, "-m", "postcopy"]
REPO = Path(__file__).resolve().parents[1]

needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="dropping privileges needs root and setpriv (util-linux)",
)


@pytest.fixture(scope="module")
def nobody() -> Iterator[ReadableInstall]:
    """The package where user nobody can read it: the checkout may be root's alone."""
    install = ReadableInstall()
    try:
        if install.python is None:
            pytest.skip(f"no python{sys.version_info[0]}.{sys.version_info[1]} that nobody can run")
        yield install
    finally:
        install.close()


def postcopy_cli(
    *args: str, as_user: ReadableInstall | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [*POSTCOPY, *args] if as_user is None else [*as_user.command(), *args]
    env = None if as_user is None else as_user.env()
    return subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=cwd, env=env)


def one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The failure's single stderr line (and nothing on stdout, nothing else on stderr)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"postcopy {command}: "), lines[0]
    assert result.stdout == "", result.stdout
    return lines[0]


def refused_count(destination: VmProcess, expected: int) -> int:
    """The destination's x-refused-connections once it reaches `expected` (a refusal is
    counted on the handshake's thread, maybe just after the source heard of it)."""
    for _ in range(200):
        count = int(destination.cmd("query-migrate")["x-refused-connections"])
        if count >= expected:
            return count
        time.sleep(0.05)
    return count


def memtouch(ram: str = "64M") -> tuple[str, ...]:
    return ("--guest", "memtouch", "--ram", ram)


def key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


# -- the destination cannot be reached --------------------------------------------------------


def test_destination_unreachable(tmp_path: Path, vms: list[VmProcess]) -> None:
    source = VmProcess(tmp_path, "src", *memtouch())
    vms.append(source)
    uri = f"tcp:127.0.0.1:{free_port()}"  # nothing listens there
    line = one_line(postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri), "migrate")
    assert line.startswith("postcopy migrate: migration failed: cannot connect to " + uri)
    assert "refused" in line
    assert source.cmd("query-status")["running"]  # nothing happened to the source


def test_source_socket_missing(tmp_path: Path) -> None:
    """A socket that never appears: after --qmp-wait seconds, one line that says so."""
    path = str(tmp_path / "nothing.qmp")
    result = postcopy_cli("migrate", "--qmp", path, "--to", "tcp:127.0.0.1:1", "--qmp-wait", "1")
    line = one_line(result, "migrate")
    assert f"no source QMP socket at {path}" in line and "waited 1 s" in line


# -- keys -------------------------------------------------------------------------------------


@pytest.fixture
def keyed_pair(tmp_path: Path, vms: list[VmProcess]) -> tuple[VmProcess, VmProcess, str, Path]:
    """A destination that demands key A, and a source without one of its own."""
    key_a = key_file(tmp_path / "a.key", os.urandom(32))
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", *memtouch(), "--incoming", uri, "--key", str(key_a))
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *memtouch())
    vms.append(source)
    return source, destination, uri, key_a


def test_missing_key(keyed_pair: tuple[VmProcess, VmProcess, str, Path]) -> None:
    source, destination, uri, _ = keyed_pair
    line = one_line(postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri), "migrate")
    assert "migration failed" in line and "requires authentication" in line
    assert "--key" in line  # the fix
    assert source.cmd("query-status")["running"]
    # the destination refused that peer and goes on waiting for the real source
    assert destination.process.poll() is None
    assert refused_count(destination, 1) == 1


def test_wrong_key(tmp_path: Path, keyed_pair: tuple[VmProcess, VmProcess, str, Path]) -> None:
    source, destination, uri, _ = keyed_pair
    key_b = key_file(tmp_path / "b.key", os.urandom(32))
    line = one_line(
        postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri, "--key", str(key_b)),
        "migrate",
    )
    assert "migration failed" in line and "wrong key" in line
    assert source.cmd("query-status")["running"]
    assert destination.process.poll() is None  # still waiting for the real source
    assert refused_count(destination, 1) == 1
    assert "wrong key" in destination.stderr()


def test_unusable_key_files_are_refused_before_anything_starts(
    tmp_path: Path, keyed_pair: tuple[VmProcess, VmProcess, str, Path]
) -> None:
    source, destination, uri, key_a = keyed_pair
    missing = tmp_path / "missing.key"
    line = one_line(
        postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri, "--key", str(missing)),
        "migrate",
    )
    assert line == f"postcopy migrate: cannot read key file {missing}: No such file or directory"
    readable = key_file(tmp_path / "shared.key", key_a.read_bytes(), mode=0o644)
    line = one_line(
        postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri, "--key", str(readable)),
        "migrate",
    )
    assert f"chmod 600 {readable}" in line
    # nothing was started: the destination still waits, and the right key then works
    assert source.cmd("query-migrate") == {}
    result = postcopy_cli(
        "migrate", "--qmp", source.qmp_path, "--to", uri, "--key", str(key_a), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert destination.wait_migration({"completed"})["status"] == "completed"


# -- permissions ------------------------------------------------------------------------------


@needs_setpriv
def test_demo_as_a_user_without_kvm_or_userfaultfd(nobody: ReadableInstall) -> None:
    if stat.S_IMODE(os.stat("/dev/kvm").st_mode) & 0o006:
        pytest.skip("/dev/kvm is open to everybody here")
    line = one_line(postcopy_cli("demo", "--ram", "64M", as_user=nobody, cwd="/"), "demo")
    assert "postcopy migration is NOT possible" in line
    assert "userfaultfd: not available" in line
    assert "fix: run as root, or `sysctl vm.unprivileged_userfaultfd=1`" in line
    assert "KVM: cannot open /dev/kvm: Permission denied" in line
    assert "usermod -aG kvm" in line


@needs_setpriv
def test_vm_run_as_a_user_without_kvm(nobody: ReadableInstall) -> None:
    workdir = tempfile.mkdtemp(prefix="postcopy-nobody-")
    try:
        os.chmod(workdir, 0o777)
        line = one_line(
            postcopy_cli(
                "vm",
                "run",
                *memtouch(),
                "--qmp",
                f"{workdir}/vm.qmp",
                as_user=nobody,
                cwd="/",
            ),
            "vm run",
        )
        assert "/dev/kvm" in line and "Permission denied" in line
        assert "usermod -aG kvm" in line
    finally:
        shutil.rmtree(workdir)


HIDE_SCRIPT = """
set -e
mount -t tmpfs -o mode=700 postcopy-test "$1"
shift
exec "$@"
"""


@needs_setpriv
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_the_unprivileged_runs_read_nothing_of_the_checkout(nobody: ReadableInstall) -> None:
    # the checkout (with its .venv) behind a root-only directory, as in a clone under /root
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            HIDE_SCRIPT,
            "sh",
            str(REPO),
            *nobody.command(),
            "vm",
            "guests",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=nobody.env(),
    )
    assert result.returncode == 0, result.stderr
    assert "memtouch" in result.stdout


NAMESPACE_SCRIPT = """
set -e
mount -t tmpfs -o mode=755 postcopy-test "$1"
mknod -m 666 "$1/kvm" c {major} {minor}
mount --bind "$1/kvm" /dev/kvm
shift
exec "$@"
"""


@needs_setpriv
@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("mknod") is None,
    reason="needs unshare and mknod (util-linux, coreutils)",
)
def test_postcopy_to_a_destination_without_userfaultfd(
    nobody: ReadableInstall, vms: list[VmProcess]
) -> None:
    # the destination: user nobody, KVM reachable (a private copy of the device node), but
    # no userfaultfd: the kernel refuses it (vm.unprivileged_userfaultfd=0, /dev/userfaultfd
    # root-only), so the destination refuses postcopy at ADVISE
    with open("/proc/sys/vm/unprivileged_userfaultfd") as file:
        if file.read().strip() != "0":
            pytest.skip("unprivileged userfaultfd is allowed on this host")
    if stat.S_IMODE(os.stat("/dev/userfaultfd").st_mode) & 0o006:
        pytest.skip("/dev/userfaultfd is open to everybody here")
    workdir = Path(tempfile.mkdtemp(prefix="postcopy-nobody-"))
    destination: subprocess.Popen[bytes] | None = None
    try:
        workdir.chmod(0o777)
        (workdir / "dev").mkdir()
        device = os.stat("/dev/kvm").st_rdev
        uri = f"tcp:127.0.0.1:{free_port()}"
        qmp = workdir / "dst.qmp"
        script = NAMESPACE_SCRIPT.format(major=os.major(device), minor=os.minor(device))
        stderr_path = workdir / "dst.stderr"
        with stderr_path.open("wb") as stderr:
            destination = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "sh",
                    str(workdir / "dev"),
                    *nobody.command(),
                    "vm",
                    "run",
                    *memtouch(),
                    "--qmp",
                    str(qmp),
                    "--incoming",
                    uri,
                    "--migrate-capability",
                    "postcopy-ram",
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd="/",
                env=nobody.env(),
            )
        deadline = time.monotonic() + 30
        while not qmp.exists():
            assert destination.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "the destination offered no QMP socket"
            time.sleep(0.05)
        source = VmProcess(workdir, "src", *memtouch())
        vms.append(source)
        result = postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri, "--postcopy")
        line = one_line(result, "migrate")
        assert "postcopy is not possible on the destination" in line
        assert "userfaultfd: not available" in line
        assert "postcopy check" in line  # where to read the whole fix
        destination.wait(10)
        assert destination.returncode == 1
        assert "vm.unprivileged_userfaultfd=1" in stderr_path.read_text()  # the fix, in full
        assert source.cmd("query-status")["running"]
    finally:
        if destination is not None and destination.poll() is None:
            destination.send_signal(signal.SIGTERM)
            try:
                destination.wait(10)
            except subprocess.TimeoutExpired:
                destination.kill()
                destination.wait(10)
        shutil.rmtree(workdir)


# -- configuration mismatch -------------------------------------------------------------------


def test_configuration_mismatch(tmp_path: Path, vms: list[VmProcess]) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", *memtouch("128M"), "--incoming", uri)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *memtouch("64M"))
    vms.append(source)
    line = one_line(postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri), "migrate")
    assert "migration failed" in line
    assert "67108864" in line and "134217728" in line  # both configurations
    assert source.cmd("query-status")["running"]


def test_guest_mismatch_is_refused_before_any_ram_moves(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    # the guest is named in the Handshake: memtouch's memory must not be checked by the
    # scan verifier (it would say ok about memory it does not understand)
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", "--guest", "scan", "--ram", "64M", "--incoming", uri)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *memtouch())
    vms.append(source)
    line = one_line(postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri), "migrate")
    assert (
        "guest mismatch: the source runs memtouch(passes=0), this destination expects "
        "scan(passes=0)"
    ) in line
    assert source.cmd("query-status")["running"]
    assert source.cmd("query-migrate")["ram"]["transferred"] == 0
    destination.process.wait(10)
    assert destination.process.returncode == 1
    assert "guest mismatch" in destination.stderr()


# -- a destination that is not waiting for a migration ----------------------------------------


def test_destination_not_in_incoming_mode(tmp_path: Path, vms: list[VmProcess]) -> None:
    running = VmProcess(tmp_path, "other", *memtouch())
    vms.append(running)
    source = VmProcess(tmp_path, "src", *memtouch())
    vms.append(source)
    line = one_line(
        postcopy_cli(
            "migrate",
            "--qmp",
            source.qmp_path,
            "--to",
            f"tcp:127.0.0.1:{free_port()}",
            "--dest-qmp",
            running.qmp_path,
        ),
        "migrate",
    )
    assert line == (
        f"postcopy migrate: the destination at {running.qmp_path} is not waiting "
        "for a migration (its status is running); start it with "
        "`postcopy vm run ... --incoming URI`"
    )
    assert source.cmd("query-migrate") == {}  # nothing was started


def test_source_socket_of_a_destination(tmp_path: Path, vms: list[VmProcess]) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "dst", *memtouch(), "--incoming", uri)
    vms.append(destination)
    line = one_line(postcopy_cli("migrate", "--qmp", destination.qmp_path, "--to", uri), "migrate")
    assert "is itself waiting for an incoming migration" in line
