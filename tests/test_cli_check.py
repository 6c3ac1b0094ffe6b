"""Tests of `postcopy check` and check_host(): the real host report on this machine, the
command in-process and as a subprocess, and the policy when pieces are missing (simulated
by making the userfaultfd openers or /dev/kvm fail)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from postcopy.cli import check as check_command
from postcopy.linux import userfaultfd
from postcopy.migration import hostcheck as check
from postcopy.migration.hostcheck import CheckItem, HostReport, check_host

pytestmark = pytest.mark.timeout(120, method="thread")

POSTCOPY = os.path.join(os.path.dirname(sys.executable), "postcopy")
MiB = 1 << 20


def run_check(argv: list[str]) -> int:
    """`postcopy check ARGS` through check's own parser (independent of other commands)."""
    parser = argparse.ArgumentParser(prog="postcopy")
    check_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["check", *argv])
    return int(args.func(args))


@pytest.fixture
def no_userfaultfd(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An unprivileged host: the syscall says EPERM, the device EACCES."""

    def refuse_syscall(flags: int) -> int:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    def refuse_device(flags: int) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(userfaultfd, "_open_syscall", refuse_syscall)
    monkeypatch.setattr(userfaultfd, "_open_device", refuse_device)
    yield


# -- this machine ----------------------------------------------------------------------


def test_this_host_can_be_a_postcopy_destination() -> None:
    report = check_host()
    assert report.postcopy_possible, report.summary()
    assert report.failures == []
    names = [item.name for item in report.items]
    for expected in (
        "userfaultfd",
        "userfaultfd API",
        "RAM backend ram",
        "RAM backend memfd",
        "RAM backend memfd-hugetlb",
        "RAM backend file",
        "huge pages",
        "page sizes",
        "target page size",
        "KVM",
        "KVM_CAP_USER_MEMORY",
        "KVM_CAP_SYNC_MMU",
        "KVM_CAP_IMMEDIATE_EXIT",
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        "KVM_CAP_DIRTY_LOG_RING",
    ):
        assert expected in names
    facts = report.facts
    assert {"COPY", "ZEROPAGE", "WAKE"} <= set(facts["anonymous_register_ioctls"])
    assert {"COPY", "ZEROPAGE", "WAKE"} <= set(facts["shmem_register_ioctls"])
    assert {"THREAD_ID", "MISSING_HUGETLBFS", "MISSING_SHMEM"} <= set(facts["userfaultfd_features"])
    assert facts["userfaultfd_ways"] == {"syscall": "ok", "/dev/userfaultfd": "ok"}
    assert facts["kvm_api_version"] == 12
    assert facts["kvm_capabilities"]["USER_MEMORY"] > 0
    assert facts["base_page_size"] == os.sysconf("SC_PAGE_SIZE")
    assert "opened via syscall" in report.item("userfaultfd").detail
    assert report.summary() == "postcopy migration is possible on this host"


def test_check_host_does_not_need_rich() -> None:
    code = (
        "import sys; from postcopy.migration.hostcheck import check_host; "
        "report = check_host(); assert report.postcopy_possible; "
        "assert 'rich' not in sys.modules, 'rich was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_json_output_is_one_object_and_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(["--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["postcopy_possible"] is True
    first = document["items"][0]
    assert set(first) == {"name", "ok", "detail", "fix", "required", "why"}
    assert first["name"] == "userfaultfd" and first["ok"] is True
    assert document["facts"]["kvm_api_version"] == 12


def test_human_output_is_a_table_with_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(["--explain"]) == 0
    out = capsys.readouterr().out
    assert "RAM backend ram" in out and "KVM_CAP_SYNC_MMU" in out
    assert "postcopy migration is possible on this host" in out


def test_through_the_postcopy_main(capsys: pytest.CaptureFixture[str]) -> None:
    from postcopy.cli.main import main

    assert main(["check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["postcopy_possible"] is True


def test_as_the_installed_command() -> None:
    result = subprocess.run(
        [POSTCOPY, "check", "--json"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["postcopy_possible"] is True
    result = subprocess.run(
        [POSTCOPY, "check"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "postcopy migration is possible on this host" in result.stdout


# -- missing pieces --------------------------------------------------------------------------


@pytest.mark.usefixtures("no_userfaultfd")
def test_without_userfaultfd_the_check_fails_with_a_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_check([]) == 1
    out = " ".join(capsys.readouterr().out.split())  # undo the table's wrapping
    assert "fix userfaultfd:" in out
    assert "sysctl vm.unprivileged_userfaultfd=1" in out
    assert "postcopy migration is NOT possible on this host: userfaultfd" in out

    report = check_host()
    assert not report.postcopy_possible
    item = report.item("userfaultfd")
    assert not item.ok and item.required and item.fix is not None
    assert "run as root" in item.fix and "UFFD_USER_MODE_ONLY is not enough" in item.fix
    assert "Operation not permitted" in item.detail and "Permission denied" in item.detail


@pytest.mark.usefixtures("no_userfaultfd")
def test_without_userfaultfd_json_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(["--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["postcopy_possible"] is False
    failed = [item for item in document["items"] if not item["ok"] and item["required"]]
    assert [item["name"] for item in failed] == ["userfaultfd", "userfaultfd API"]
    assert all(item["fix"] for item in failed)


def test_userfaultfd_by_device_only_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_syscall(flags: int) -> int:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(userfaultfd, "_open_syscall", refuse_syscall)
    report = check_host()
    assert report.postcopy_possible, report.summary()
    assert report.item("userfaultfd").detail.startswith("opened via /dev/userfaultfd")


def test_without_kvm_the_fix_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "KVM_DEVICE", "/nonexistent/kvm")
    report = check_host()
    assert not report.postcopy_possible
    item = report.item("KVM")
    assert item.fix is not None and "modprobe kvm_intel" in item.fix
    assert report.facts["kvm_api_version"] is None


def test_the_destinations_check_at_advise_needs_no_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The migration uses only userfaultfd: a destination (or the in-process harness) on a
    host without /dev/kvm may still take postcopy."""
    monkeypatch.setattr(check, "KVM_DEVICE", "/nonexistent/kvm")
    report = check_host(kvm=False)
    assert report.postcopy_possible, report.summary()
    assert all(item.name != "KVM" for item in report.items)


def test_kvm_permission_denied_suggests_the_kvm_group(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def deny_kvm(path: str, flags: int, mode: int = 0o777) -> int:
        if path == check.KVM_DEVICE:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(check.os, "open", deny_kvm)
    report = check_host()
    item = report.item("KVM")
    assert not item.ok and item.fix is not None
    assert "chmod 666 /dev/kvm" in item.fix and "group kvm" in item.fix


def test_large_target_pages_are_refused_and_shared_ram_is_fine() -> None:
    report = check_host(shared_ram=True, target_page_size=64 * 1024)
    assert not report.postcopy_possible
    assert {item.name for item in report.failures} == {"target page size"}
    memfd = report.item("RAM backend memfd")
    assert memfd.required and memfd.ok and "MISSING_SHMEM" in memfd.detail


def test_each_backend_says_what_it_needs_and_minor_mode_adds_continue() -> None:
    report = check_host(memory_types=("shmem", "hugetlb"), minor=True)
    assert not report.item("RAM backend ram").required  # not in use
    memfd = report.item("RAM backend memfd")
    assert memfd.required and "MINOR_SHMEM" in memfd.detail and "CONTINUE" in memfd.detail
    huge = report.item("RAM backend memfd-hugetlb")
    assert huge.required and "MISSING_HUGETLBFS" in huge.detail
    assert "ZEROPAGE" not in huge.detail.split(";")[0]  # hugetlb has none: not needed
    other = check_host(memory_types=("other",))
    assert other.failures == [other.item("RAM backend file")]
    assert "hugetlbfs or tmpfs" in (other.item("RAM backend file").fix or "")


def test_the_pool_must_hold_the_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check.hugepages, "hugepages_reserved", lambda size=0: (600, 100))
    monkeypatch.setattr(check.hugepages, "hugepages_available", lambda size=0: 100)
    report = check_host(memory_types=("hugetlb",), ram_bytes=1 << 30)
    item = report.item("huge pages")
    assert not item.ok and "100 free 2 MiB pages, the RAM needs 512" in item.detail
    assert item.fix is not None and "echo 1012 > " in item.fix
    assert "mount" not in item.fix  # a hugetlb memfd needs no mount


def test_command_line_memory_backend_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(["--json", "--memory-backend", "memfd", "--minor-faults"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["facts"]["memory_types"] == ["shmem"]
    assert run_check(["--memory-backend", "disk"]) == 2
    assert "unknown memory backend 'disk'" in capsys.readouterr().err  # an error goes to stderr


def test_huge_page_ram_needs_a_pool_and_a_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check.hugepages, "hugetlbfs_mounts", lambda: [])
    monkeypatch.setattr(check.hugepages, "hugepages_reserved", lambda size=0: (0, 0))
    report = check_host(ram_page_sizes=(4096, 2 * MiB), hugetlbfs_file=True)
    assert not report.postcopy_possible
    item = report.item("huge pages")
    assert item.required and item.fix is not None
    assert "nr_hugepages" in item.fix and "mount -t hugetlbfs -o pagesize=2M" in item.fix
    unknown = check_host(ram_page_sizes=(4096, 3 * 4096)).item("huge pages")
    assert not unknown.ok and "not offered" in unknown.detail


def test_huge_page_ram_is_fine_with_a_pool_and_a_mount(hugetlbfs_2m: str) -> None:
    report = check_host(ram_page_sizes=(4096, 2 * MiB))
    assert report.postcopy_possible, report.summary()
    pools = {pool["size"]: pool for pool in report.facts["huge_page_pools"]}
    assert hugetlbfs_2m in pools[2 * MiB]["mounts"] and pools[2 * MiB]["total"] > 0


def test_command_line_hugepages_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check.hugepages, "hugetlbfs_mounts", lambda: [])
    assert run_check(["--hugepages", "2M"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "fix huge pages:" in out
    # a size it cannot read is the user's one line, not a traceback
    assert run_check(["--hugepages", "lots"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == 'postcopy check: --hugepages "lots" is not a size (examples: 4096, 256M, 1G)\n'
    )


# -- the report policy -------------------------------------------------------------------


def test_only_required_items_decide() -> None:
    report = HostReport(
        [
            CheckItem("needed", True, "fine"),
            CheckItem("nice to have", False, "absent", "get it", required=False),
        ]
    )
    assert report.postcopy_possible
    assert report.failures == [] and [item.name for item in report.warnings] == ["nice to have"]
    report.items.append(CheckItem("also needed", False, "broken", "mend it"))
    assert not report.postcopy_possible
    assert report.summary() == (
        "postcopy migration is NOT possible: also needed: broken (fix: mend it)"
    )
    assert report.to_dict()["postcopy_possible"] is False
    with pytest.raises(KeyError):
        report.item("absent")
