"""Whole migrations of guests on each RAM backend, between two `postcopy vm run` processes.

Real KVM guests on memfd, hugetlb memfd and hugetlbfs files, real userfaultfd, loopback
TCP; each ends with x-verify on the stopped destination. Tests that need huge pages take
them from the pool for themselves and give them back (tests/hugepages.py), and check that
none of those pages is still in use and the mount holds no files once both VMs are gone.
The full grid (both guests, every backend and mode, 1 and 2 vCPUs, 20 runs per mode on
hugetlb) is `make backends-soak`, not part of this suite.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from postcopy.bench.procinfo import memory_figures
from tests.hold import HOLD_RATE
from tests.hugepages import huge_pages, hugetlbfs_mount
from tests.vmprocess import VmProcess, free_port

pytestmark = pytest.mark.timeout(300)

RAM = "256M"
RAM_HUGE_PAGES = 128  # of one 256 MiB VM


@pytest.fixture
def pool() -> Iterator[ExitStack]:
    """Huge pages for a source and a destination, a hugetlbfs mount on request; when the
    test ends (after its VMs are gone), every page it took must leave the pool, none still
    in use (tests.hugepages.huge_pages checks it: what the test itself reserved, not the
    machine-wide count, which others change while they reserve pages)."""
    with ExitStack() as stack:
        yield stack


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
    share: str | None = None,
) -> tuple[VmProcess, VmProcess, str]:
    uri = f"tcp:127.0.0.1:{free_port()}"
    common: tuple[str, ...] = ("--guest", guest, "--ram", RAM, "--vcpus", str(vcpus))
    if share is not None:
        common += ("--share", share)
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
    destination.wait_passes(marker, destination.console().count(marker) + 1)
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
        ("hugetlbfs", "memtouch", 1, 1, True),  # a shared file: minor mode maps it twice
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
        share = "on" if minor and backend == "hugetlbfs" else None
        source, destination, uri = start_pair(
            tmp_path, vms, text, guest=guest, vcpus=vcpus, share=share
        )
        if minor:
            destination.cmd("migrate-set-parameters", **{"x-postcopy-minor-faults": True})
        marker = b"B" if guest == "memtouch" else b"W"
        source.wait_passes(marker, vcpus)
        info, dest_info = migrate_and_verify(
            source, destination, uri, after_rounds=after_rounds, marker=marker
        )
        if after_rounds is not None:
            placement = dest_info["x-placement"]["pc.ram"]
            expected = "copy" if backend == "memfd" else "copy-huge"
            assert placement == ("continue" if minor else expected)
            assert info["x-postcopy"]["needed-pages"] > 0
            if backend != "memfd":  # pages are huge pages: discarded and re-sent whole
                assert info["x-postcopy"]["needed-pages"] <= RAM_HUGE_PAGES
            if backend != "memfd":  # each COPY (or CONTINUE, minor) of a huge page timed
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


# -- a second process sharing guest RAM ------------------------------------------------------


def read_process_memory(pid: int, mapping_name: str, offsets: list[int], size: int) -> list[bytes]:
    """Pages of another process's mapping (found by name in its maps) via /proc/PID/mem."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            if mapping_name in line:
                start = int(line.split("-", 1)[0], 16)
                break
        else:
            raise AssertionError(f"no {mapping_name} mapping in process {pid}")
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        pages = []
        for offset in offsets:
            memory.seek(start + offset)
            pages.append(memory.read(size))
    return pages


@pytest.mark.parametrize(
    ("backend", "minor"), [("memfd", False), ("memfd-hugetlb", False), ("memfd", True)]
)
def test_a_second_process_reads_unreceived_pages_through_the_request_path(
    tmp_path: Path, pool: ExitStack, backend: str, minor: bool
) -> None:
    """vhost-user's case: a second process maps the same memfd and hands its userfaultfd
    to the destination; during postcopy it reads 1,000 random pages that have not arrived
    (the push is held at 1 MiB/s; the guest stays paused on the destination). Each read
    faults in the second process, is served through the destination's page requests, and
    is woken after placement; every page must equal the source's."""
    import hashlib
    import json
    import random
    import subprocess
    import sys

    from tests.hold import HOLD_RATE

    text = backend_arg(backend, pool)
    socket_path = tmp_path / "memory.sock"
    with VmsClosed() as vms:
        source, destination, uri = start_pair(
            tmp_path,
            vms,
            text,
            dest_args=("-S", "--x-memory-socket", str(socket_path)),
        )
        if minor:
            destination.cmd("migrate-set-parameters", **{"x-postcopy-minor-faults": True})
        helper = subprocess.Popen(
            [sys.executable, "-m", "tests.memclient", str(socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        try:
            assert helper.stdin is not None and helper.stdout is not None
            hello = json.loads(helper.stdout.readline())
            assert hello["mode"] == ("minor" if minor else "missing")
            source.wait_passes(b"B", 1)
            source.cmd(
                "migrate-set-parameters",
                **{"x-postcopy-after-rounds": 0, "max-postcopy-bandwidth": HOLD_RATE},
            )
            source.cmd("migrate", uri=uri)
            destination.wait_migration({"postcopy-active"})
            pages = random.Random(16).sample(range(256, hello["size"] // 4096), 1000)
            helper.stdin.write(json.dumps({"read": pages}) + "\n")
            helper.stdin.flush()
            answer = json.loads(helper.stdout.readline())
            during = destination.cmd("query-migrate")
            assert during["status"] == "postcopy-active"  # the reads happened in postcopy
            source.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
            assert source.wait_migration({"completed", "failed"})["status"] == "completed"
            info = destination.wait_migration({"completed", "failed"})
            assert info["status"] == "completed", info
            helper.stdin.write(json.dumps({"wait_end": 30}) + "\n")
            helper.stdin.flush()
            assert json.loads(helper.stdout.readline()) == {"ended": True}
            expected = read_process_memory(
                source.process.pid, "memfd:pc.ram", [page * 4096 for page in pages], 4096
            )
            wrong = [
                page
                for page, digest, data in zip(pages, answer["digests"], expected, strict=True)
                if hashlib.sha256(data).hexdigest() != digest
            ]
            assert wrong == [], f"{len(wrong)} of 1000 pages differ from the source's"
            assert answer["longest"] < 5.0
            # nearly every read was of a page not yet here: it faulted and was requested
            huge = hello["page_size"] // 4096
            distinct = len({page // huge for page in pages})
            assert info["x-shared-faults"] >= 0.9 * distinct
            assert info["x-postcopy-requests-sent"] >= 0.9 * distinct
            assert any(data.strip(b"\0") for data in expected)  # memtouch wrote these pages
        finally:
            if helper.stdin is not None:
                helper.stdin.close()
            helper.wait(30)


@pytest.mark.parametrize(
    ("backend", "prealloc", "kept"),
    [
        ("ram", True, True),  # anonymous RAM swaps at LISTEN: zeros need no emptying
        ("ram", False, False),  # nothing populated, nothing to keep
        ("memfd", True, False),  # in place: emptied at ADVISE, as QEMU does
    ],
)
def test_preallocated_ram_stays_populated_through_the_postcopy_advise(
    tmp_path: Path, vms: list[VmProcess], backend: str, prealloc: bool, kept: bool
) -> None:
    """--mem-prealloc populates all guest RAM at start-up. ADVISE empties the destination's
    RAM unless RAM swap makes that needless (all zeros, and LISTEN moves every page aside):
    held in the first round after a few runs, the destination still holds all its RAM, and
    the guest arrives whole."""
    args = ("--mem-prealloc",) if prealloc else ()
    source, destination, uri = start_pair(
        tmp_path, vms, backend, dest_args=args, share=None if backend == "ram" else "on"
    )
    ram_bytes = 256 << 20

    def guest_rss() -> int:
        return int(memory_figures(destination.process.pid, ram_bytes)["guest_rss"] or 0)

    assert (guest_rss() >= ram_bytes) == prealloc
    source.wait_passes(b"B", 1)
    source.cmd(
        "migrate-set-parameters",
        **{"max-bandwidth": HOLD_RATE, "zero-page-detection": "none", "x-postcopy-after-rounds": 1},
    )
    source.cmd("migrate", uri=uri)
    deadline = time.monotonic() + 60
    while destination.cmd("query-migrate").get("x-bytes-received", 0) < 1 << 20:
        assert time.monotonic() < deadline, destination.cmd("query-migrate")
        time.sleep(0.05)
    # past ADVISE (it comes before any page), a few MiB received, the rest held back
    assert (guest_rss() >= ram_bytes) == kept
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    info = source.wait_migration({"completed", "failed"})
    assert info["status"] == "completed", (info.get("error-desc"), destination.stderr())
    assert info["x-postcopy"]["needed-pages"] > 0  # postcopy really happened
    assert destination.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.wait_passes(b"B", destination.console().count(b"B") + 1)
    destination.cmd("stop")
    result = destination.cmd("x-verify")
    assert result["ok"], result["detail"]
