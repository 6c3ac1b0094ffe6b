"""Whole migrations of guests on each RAM backend, between two `postcopy vm run` processes.

Real KVM guests on memfd, hugetlb memfd and hugetlbfs files, real userfaultfd, loopback
TCP; each ends with x-verify on the stopped destination. Tests that need huge pages take
them from the pool for themselves and give them back (tests/hugepages.py), and check that
the pool is back where it was and the mount holds no files once both VMs are gone.
The full grid (both guests, every backend and mode, 1 and 2 vCPUs, 20 runs per mode on
hugetlb) is `make backends-soak`, not part of this suite.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from postcopy.linux import hugepages
from tests.hugepages import huge_pages, hugetlbfs_mount
from tests.vmprocess import VmProcess, free_port

pytestmark = pytest.mark.timeout(300)

RAM = "256M"
RAM_HUGE_PAGES = 128  # of one 256 MiB VM


@pytest.fixture
def pool() -> Iterator[ExitStack]:
    """Huge pages for a source and a destination, a hugetlbfs mount on request; the pool
    must be back where it was when the test ends (checked after the VMs are gone)."""
    before = hugepages.hugepages_reserved()
    with ExitStack() as stack:
        yield stack
    assert hugepages.hugepages_reserved() == before


def start_pair(
    tmp_path: Path,
    vms: list[VmProcess],
    backend: str,
    *,
    guest: str = "memtouch",
    vcpus: int = 1,
    caps: tuple[str, ...] = ("postcopy-ram",),
    dest_backend: str | None = None,
    dest_args: tuple[str, ...] = (),
) -> tuple[VmProcess, VmProcess, str]:
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ("--guest", guest, "--ram", RAM, "--vcpus", str(vcpus))
    cap_args = tuple(arg for cap in caps for arg in ("--migrate-capability", cap))
    destination = VmProcess(
        tmp_path,
        "dst",
        *common,
        "--memory-backend",
        dest_backend or backend,
        "--incoming",
        uri,
        *cap_args,
        *dest_args,
    )
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *common, "--memory-backend", backend)
    vms.append(source)
    if caps:
        source.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": c, "state": True} for c in caps],
        )
    return source, destination, uri


def wait_passes(vm: VmProcess, marker: bytes, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while vm.console().count(marker) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"console has {vm.console().count(marker)} of {count} {marker!r}")
        time.sleep(0.05)


def migrate_and_verify(
    source: VmProcess,
    destination: VmProcess,
    uri: str,
    *,
    after_rounds: int | None,
    marker: bytes,
) -> tuple[dict, dict]:
    """Migrate, let the guest run on the destination for a pass more, stop it, x-verify."""
    if after_rounds is not None:
        source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": after_rounds})
    else:
        source.cmd("migrate-set-parameters", **{"x-max-rounds": 5})
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"completed", "failed"})
    assert info["status"] == "completed", (info.get("error-desc"), destination.stderr())
    dest_info = destination.wait_migration({"completed", "failed"})
    assert dest_info["status"] == "completed", dest_info
    wait_passes(destination, marker, destination.console().count(marker) + 1)
    destination.cmd("stop")
    result = destination.cmd("x-verify")
    assert result["ok"], result["detail"]
    return info, dest_info


def backend_arg(name: str, stack: ExitStack) -> str:
    """The --memory-backend for `name`, with the pool (and mount) it needs taken."""
    if name in ("memfd-hugetlb", "hugetlbfs"):
        if name == "hugetlbfs":
            mount = stack.enter_context(hugetlbfs_mount(2 * RAM_HUGE_PAGES))
            return f"file:{mount}"
        stack.enter_context(huge_pages(2 * RAM_HUGE_PAGES))
    return name


@pytest.mark.parametrize(
    ("backend", "guest", "vcpus", "after_rounds", "minor"),
    [
        ("memfd-hugetlb", "memtouch", 2, 1, False),
        ("memfd-hugetlb", "randwrite", 1, 0, False),
        ("hugetlbfs", "memtouch", 1, 0, False),
        ("hugetlbfs", "randwrite", 2, None, False),
        ("memfd", "memtouch", 2, 0, False),
        ("memfd", "randwrite", 1, 1, False),
        ("memfd", "memtouch", 1, 1, True),
        ("memfd-hugetlb", "randwrite", 2, 1, True),
    ],
)
def test_a_guest_on_each_backend_migrates_and_verifies(
    tmp_path: Path,
    pool: ExitStack,
    backend: str,
    guest: str,
    vcpus: int,
    after_rounds: int | None,
    minor: bool,
) -> None:
    with VmsClosed() as vms:
        text = backend_arg(backend, pool)
        source, destination, uri = start_pair(tmp_path, vms, text, guest=guest, vcpus=vcpus)
        if minor:
            destination.cmd("migrate-set-parameters", **{"x-postcopy-minor-faults": True})
        marker = b"B" if guest == "memtouch" else b"W"
        wait_passes(source, marker, vcpus)
        info, dest_info = migrate_and_verify(
            source, destination, uri, after_rounds=after_rounds, marker=marker
        )
        if after_rounds is not None:
            placement = dest_info["x-placement"]["pc.ram"]
            expected = "copy" if backend == "memfd" else "copy-huge"
            assert placement == ("continue" if minor else expected)
            assert info["x-postcopy"]["needed-pages"] > 0
            if placement == "copy-huge":
                assert dest_info["x-huge-page-placement-us"]["count"] > 0


class VmsClosed:
    """A list of VM processes closed (by PID) when the block ends, before the pool goes."""

    def __enter__(self) -> list[VmProcess]:
        self.vms: list[VmProcess] = []
        return self.vms

    def __exit__(self, *exc: object) -> None:
        for vm in self.vms:
            vm.close()


def test_mismatched_backends_are_refused_on_both_sides_in_one_line(
    tmp_path: Path, pool: ExitStack
) -> None:
    pool.enter_context(huge_pages(RAM_HUGE_PAGES))
    with VmsClosed() as vms:
        source, destination, uri = start_pair(
            tmp_path, vms, "memfd-hugetlb", dest_backend="ram", caps=()
        )
        source.cmd("migrate", uri=uri)
        info = source.wait_migration({"failed", "completed"})
        assert info["status"] == "failed"
        line = (
            "RAM backend mismatch: block 'pc.ram' is memfd-hugetlb with 2 MiB pages on the "
            "peer but ram with 4 KiB pages here (start both sides with the same "
            "--memory-backend)"
        )
        assert info["error-desc"] == f"destination gave up: {line}"
        assert "\n" not in info["error-desc"]
        deadline = time.monotonic() + 30
        while destination.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert line in destination.stderr()
        assert source.cmd("query-status")["running"]


def test_a_file_backend_off_hugetlbfs_and_tmpfs_cannot_take_postcopy(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    # tmp_path: not on tmpfs here, or the test says so; each side makes its own file there
    from postcopy.migration.backendcheck import memory_type_of_path

    if memory_type_of_path(str(tmp_path))[0] != "other":
        pytest.skip(f"{tmp_path} is on tmpfs or hugetlbfs: no other file system to try")
    source, destination, uri = start_pair(tmp_path, vms, f"file:{tmp_path}")
    source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 0})
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"failed", "completed"})
    assert info["status"] == "failed"
    assert "RAM backend file" in info["error-desc"] and "tmpfs" in info["error-desc"]
    assert destination.process.wait(30) == 1  # a destination whose migration failed exits
    assert source.cmd("query-status")["running"]
