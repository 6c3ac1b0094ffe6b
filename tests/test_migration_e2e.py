"""Whole migrations between two real `postcopy vm run` processes, over loopback TCP.

Real KVM guests, real userfaultfd, real sockets; driven with qemu.qmp like a user would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.hold import HOLD_RATE
from tests.vmprocess import QmpCommandError, VmProcess, free_port

pytestmark = pytest.mark.timeout(240)


def start_pair(
    tmp_path: Path,
    vms: list[VmProcess],
    *,
    guest: str = "memtouch",
    ram: str = "256M",
    vcpus: int = 1,
    caps: tuple[str, ...] = (),
    dest_args: tuple[str, ...] = (),
    src_args: tuple[str, ...] = (),
) -> tuple[VmProcess, VmProcess, str]:
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ("--guest", guest, "--ram", ram, "--vcpus", str(vcpus))
    cap_args = tuple(arg for cap in caps for arg in ("--migrate-capability", cap))
    destination = VmProcess(tmp_path, "dst", *common, "--incoming", uri, *cap_args, *dest_args)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *common, *src_args)
    vms.append(source)
    if caps:
        source.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": c, "state": True} for c in caps],
        )
    return source, destination, uri


def stop_and_verify(vm: VmProcess) -> dict:
    vm.cmd("stop")
    result = vm.cmd("x-verify")
    assert result["ok"], result["detail"]
    return dict(result)


def test_precopy_memtouch_moves_and_keeps_running(tmp_path: Path, vms: list[VmProcess]) -> None:
    source, destination, uri = start_pair(tmp_path, vms, vcpus=2)
    source.wait_passes(b"B", 2)
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"completed", "failed"})
    assert info["status"] == "completed", info
    assert source.cmd("query-status")["status"] == "postmigrate"
    assert info["ram"]["transferred"] >= info["ram"]["normal-bytes"] > 0
    assert info["ram"]["dirty-sync-count"] >= 1
    assert destination.wait_migration({"completed"})["status"] == "completed"
    assert destination.cmd("query-status")["running"]
    before = destination.console().count(b"B")
    destination.wait_passes(b"B", before + 2)
    stop_and_verify(destination)


def test_postcopy_after_one_round_with_preempt(tmp_path: Path, vms: list[VmProcess]) -> None:
    caps = ("postcopy-ram", "postcopy-preempt", "postcopy-blocktime")
    source, destination, uri = start_pair(tmp_path, vms, vcpus=2, caps=caps)
    source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 1})
    source.wait_passes(b"B", 2)
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"completed", "failed"})
    assert info["status"] == "completed", info
    ram = info["ram"]
    assert ram["postcopy-bytes"] > 0
    assert ram["x-pages-pushed"] + ram["x-pages-requested"] > 0
    dest_info = destination.wait_migration({"completed"})
    assert len(dest_info["postcopy-vcpu-blocktime"]) == 2
    # every page the destination lacked at switchover crossed once, plus the copies sent
    # again because a request raced the push (counted on both ends): none lost
    counts = info["x-postcopy"]
    assert counts["pushed-pages"] + counts["requested-pages"] == counts["needed-pages"]
    assert dest_info["x-duplicate-pages"] <= counts["resent-pages"]
    # a resent copy may still be on the urgent channel when the destination completes
    placed = dest_info["x-pages-placed"]
    assert counts["needed-pages"] <= placed <= counts["needed-pages"] + counts["resent-pages"]
    assert counts["discarded-pages"] <= counts["needed-pages"]
    before = destination.console().count(b"B")
    destination.wait_passes(b"B", before + 2)
    stop_and_verify(destination)


def test_postcopy_from_the_start_without_preempt(tmp_path: Path, vms: list[VmProcess]) -> None:
    source, destination, uri = start_pair(tmp_path, vms, caps=("postcopy-ram",))
    source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 0})
    source.wait_passes(b"B", 1)
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"completed", "failed"})
    assert info["status"] == "completed", info
    assert info["ram"]["precopy-bytes"] == 0
    assert info["ram"]["postcopy-requests"] > 0
    destination.wait_migration({"completed"})
    stop_and_verify(destination)


def test_randwrite_digest_matches_on_a_paused_destination(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    source, destination, uri = start_pair(
        tmp_path, vms, guest="randwrite", caps=("postcopy-ram",), dest_args=("-S",)
    )
    source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 1})
    source.wait_passes(b"W", 1)
    source.cmd("migrate", uri=uri)
    assert source.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.wait_migration({"completed"})
    assert not destination.cmd("query-status")["running"]
    assert source.cmd("x-verify")["digest"] == destination.cmd("x-verify")["digest"]


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_a_paused_source_arrives_paused(
    tmp_path: Path, vms: list[VmProcess], postcopy: bool
) -> None:
    """QEMU's global state: a guest the user stopped on the source stays stopped on the
    destination (no -S there), whole, until `cont`; in postcopy too."""
    caps = ("postcopy-ram",) if postcopy else ()
    source, destination, uri = start_pair(tmp_path, vms, ram="64M", caps=caps)
    if postcopy:
        source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 0})
    source.wait_passes(b"B", 1)
    source.cmd("stop")
    source.cmd("migrate", uri=uri)
    assert source.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.wait_migration({"completed"})
    assert destination.cmd("query-status") == {
        "status": "paused",
        "running": False,
        "singlestep": False,
    }
    assert destination.cmd("x-verify")["ok"]
    before = destination.console().count(b"B")
    destination.cmd("cont")
    destination.wait_passes(b"B", before + 1)


def test_killed_destination_leaves_source_running(tmp_path: Path, vms: list[VmProcess]) -> None:
    source, destination, uri = start_pair(tmp_path, vms)
    # 1 MiB/s: the first round of 256 MiB lasts minutes, so it is still active when we kill
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    source.cmd("migrate", uri=uri)
    source.wait_migration({"active"})
    destination.process.kill()
    destination.process.wait(10)
    info = source.wait_migration({"failed"})
    assert info["error-desc"]
    assert source.cmd("query-status")["running"]
    before = source.console().count(b"B")
    source.wait_passes(b"B", before + 1)
    stop_and_verify(source)


def test_bandwidth_cap_keeps_precopy_iterating(tmp_path: Path, vms: list[VmProcess]) -> None:
    # The cap must be well below the guest's dirty rate, or precopy converges after all:
    # memtouch dirties ~40-70 MB/s here (each first write after a sync is a protection
    # fault), so at 4 MiB/s its 16 MiB are all dirty again within each four-second round;
    # downtime-limit 0: only a round in which the guest wrote nothing could end it, and a
    # round that long holds that state on a loaded host too (one-second rounds did not:
    # a guest starved of CPU for a whole round let precopy complete, 1 run in 4)
    source, _destination, uri = start_pair(tmp_path, vms, ram="16M")
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20, "downtime-limit": 0})
    # a guest that has not begun to write dirties nothing, and its untouched RAM crosses
    # as zero markers in no time: that round would converge
    source.wait_passes(b"B", 1)
    source.cmd("migrate", uri=uri)
    deadline = time.monotonic() + 60
    # the setup's sync, then three rounds: expected-downtime (QEMU's) exists once a
    # dirty-pages-rate does, which takes a sync period of over a second
    while source.cmd("query-migrate")["ram"]["dirty-sync-count"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    info = source.cmd("query-migrate")
    assert info["status"] == "active"
    assert info["expected-downtime"] > 1
    source.cmd("migrate_cancel")
    assert source.wait_migration({"cancelled", "failed"})["status"] == "cancelled"
    assert source.cmd("query-status")["running"]


def test_configuration_mismatch_is_refused_with_both_configurations(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(
        tmp_path, "dst", "--guest", "memtouch", "--ram", "128M", "--incoming", uri
    )
    vms.append(destination)
    source = VmProcess(tmp_path, "src", "--guest", "memtouch", "--ram", "64M")
    vms.append(source)
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"failed"})
    assert "pc.ram:67108864@4096" in info["error-desc"]
    assert "pc.ram:134217728@4096" in info["error-desc"]
    assert source.cmd("query-status")["running"]
    destination.process.wait(10)
    assert destination.process.returncode == 1
    assert "pc.ram:67108864@4096" in destination.stderr()


def test_migrate_while_migrating_is_refused(tmp_path: Path, vms: list[VmProcess]) -> None:
    source, _destination, uri = start_pair(tmp_path, vms, ram="64M")
    # 1 MiB/s: the first migration cannot have ended when the second migrate arrives
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    source.cmd("migrate", uri=uri)
    with pytest.raises(QmpCommandError, match="in progress"):
        source.cmd("migrate", uri=uri)
    source.cmd("migrate_cancel")
    source.wait_migration({"cancelled"})


def test_postcopy_mismatch_reports_the_destination_reason(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(
        tmp_path,
        "dst",
        "--guest",
        "memtouch",
        "--ram",
        "128M",
        "--incoming",
        uri,
        "--migrate-capability",
        "postcopy-ram",
    )
    vms.append(destination)
    source = VmProcess(tmp_path, "src", "--guest", "memtouch", "--ram", "64M")
    vms.append(source)
    source.cmd(
        "migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}]
    )
    source.cmd("migrate", uri=uri)
    info = source.wait_migration({"failed"})
    assert "pc.ram:134217728@4096" in info["error-desc"], info["error-desc"]
    assert source.cmd("query-status")["running"]


def test_destination_guest_makes_progress_during_postcopy(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """randwrite touches a tenth of its RAM: those pages fault in at once, while the push of
    the rest is held back; the guest must keep writing. The push is held at 1 MiB/s while
    we watch, its zero pages sent as data (zero-page-detection none: a sparse guest's
    push would otherwise cost next to nothing on the wire and end under our eyes), then
    uncapped; requested pages are never throttled."""
    caps = ("postcopy-ram", "postcopy-preempt")
    source, destination, uri = start_pair(tmp_path, vms, guest="randwrite", caps=caps)
    source.cmd(
        "migrate-set-parameters",
        **{
            "x-postcopy-after-rounds": 0,
            "max-postcopy-bandwidth": HOLD_RATE,
            "zero-page-detection": "none",
        },
    )
    source.wait_passes(b"W", 1)
    source.cmd("migrate", uri=uri)
    destination.wait_migration({"postcopy-active"})
    before = destination.console().count(b"W")
    destination.wait_passes(b"W", before + 3, timeout=60)
    assert destination.cmd("query-migrate")["status"] == "postcopy-active"
    source.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert source.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.wait_migration({"completed"})
    stop_and_verify(destination)


def test_migration_over_tls_with_a_key(tmp_path: Path, vms: list[VmProcess]) -> None:
    """TLS with certificate verification plus the HMAC key, on a network-style URI."""
    from tests.test_transport_tls import make_ca, make_leaf

    ca = make_ca(tmp_path, "ca")
    make_leaf(tmp_path, "dst", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    key = tmp_path / "key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    key.chmod(0o600)
    tls_dest = ("--tls-cert", str(tmp_path / "dst.pem"), "--tls-key", str(tmp_path / "dst.key"))
    common = ("--key", str(key))
    source, destination, uri = start_pair(
        tmp_path,
        vms,
        ram="64M",
        caps=("postcopy-ram",),
        dest_args=(*tls_dest, *common),
        src_args=("--tls-ca", str(ca[0]), *common),
    )
    source.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": 1})
    source.cmd("migrate", uri=uri)
    assert source.wait_migration({"completed", "failed"})["status"] == "completed"
    destination.wait_migration({"completed"})
    stop_and_verify(destination)


def test_a_migrated_vm_migrates_again_in_a_chain(tmp_path: Path, vms: list[VmProcess]) -> None:
    """A -> B -> C -> D: each destination, once its incoming migration has completed, is
    the next source (QEMU and every cloud rely on this); precopy, postcopy with preempt and
    postcopy from the start in turn, the guest making passes at every hop."""
    caps = ("postcopy-ram", "postcopy-preempt")
    common = ("--guest", "memtouch", "--ram", "256M", "--vcpus", "1")
    cap_args = tuple(arg for cap in caps for arg in ("--migrate-capability", cap))
    current = VmProcess(tmp_path, "hop0", *common, *cap_args)
    vms.append(current)
    passes = current.wait_passes(b"B", 2)
    for hop, rounds in enumerate((None, 1, 0), start=1):
        uri = f"tcp:127.0.0.1:{free_port()}"
        following = VmProcess(tmp_path, f"hop{hop}", *common, *cap_args, "--incoming", uri)
        vms.append(following)
        if rounds is None:
            current.cmd(
                "migrate-set-capabilities",
                capabilities=[
                    {"capability": "postcopy-ram", "state": False},
                    {"capability": "postcopy-preempt", "state": False},
                ],
            )
        else:
            current.cmd("migrate-set-parameters", **{"x-postcopy-after-rounds": rounds})
        current.cmd("migrate", uri=uri)
        info = current.wait_migration({"completed", "failed"})
        assert info["status"] == "completed", (hop, info)
        assert current.cmd("query-status")["status"] == "postmigrate"
        arrived = following.wait_migration({"completed", "failed"})
        assert arrived["status"] == "completed", (hop, arrived)
        assert following.cmd("query-status")["running"]
        # the console count travels with the VM: the guest goes on where it was
        passes = following.wait_passes(b"B", max(passes, following.console().count(b"B")) + 1)
        current = following
    stop_and_verify(current)
