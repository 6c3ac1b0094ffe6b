"""Smoke test of `postcopy bench`: the smallest scenario through the real code path.

No timing is asserted (benchmarks measure, they don't test): the checks are that a run
produces every figure, limit and ratio, and that everything a run starts (processes,
network namespaces, veth pairs) is gone afterwards, also when the bench is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from postcopy.bench.analysis import limits_for
from postcopy.bench.cleanup import pid_alive
from postcopy.bench.link import our_namespaces
from postcopy.bench.runner import _vm_args
from postcopy.bench.scenarios import ScenarioError, load_catalogue, parse_name
from postcopy.cli.main import main
from postcopy.migration import trace_points as tp
from postcopy.tools.runfile import RUN_FORMAT, Run

SMOKE = "memtouch-256m-1cpu-postcopy1"

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="network namespaces need root and iproute2",
)

FIGURES_OF_A_POSTCOPY_RUN = (
    "total_time_ms",
    "setup_time_ms",
    "downtime_ms",
    "downtime_us",
    "transferred_bytes",
    "throughput_bytes_per_s",
    "precopy_bytes",
    "postcopy_bytes",
    "postcopy_requests",
    "blocktime_ms",
    "vcpu_blocktime_ms",
    "request_latency_p50_us",
    "request_latency_p99_us",
    "request_latency_max_us",
    "destination_rss_bytes",
    "destination_overhead_bytes",
    "verify_ok",
    "bulk_round_bytes",
    "bulk_round_bytes_per_s",
)
LIMITS = (
    "line_rate",
    "fill_rate_4k",
    "fill_rate_thp",
    "fault_rtt_p50_us",
    "fault_rtt_p99_us",
    "throughput_limit",
)
RATIOS = (
    "throughput_vs_limit",
    "throughput_vs_line_rate",
    "throughput_vs_fill_rate",
    "bulk_round_vs_line_rate",
    "latency_p50_vs_fault_rtt",
    "downtime_vs_target",
    "rss_overhead_vs_guest_ram",
)


def test_scenario_names_parse_and_sets_resolve() -> None:
    scenario = parse_name("randwrite-4g-2cpu-postcopy1-preempt")
    assert (scenario.guest, scenario.ram, scenario.vcpus) == ("randwrite", 4 << 30, 2)
    assert scenario.capabilities == ["postcopy-ram", "postcopy-blocktime", "postcopy-preempt"]
    assert scenario.migration_parameters["x-postcopy-after-rounds"] == 1
    assert scenario.guest_params == {"working_set_ppm": 100_000}
    assert parse_name("scan-1g-1cpu-precopy").capabilities == []
    assert parse_name("memtouch-1g-1cpu-postcopy1-cpl0").cpl == 0
    assert parse_name("memtouch-1g-1cpu-postcopy1-preempt-cpl0").preempt
    assert parse_name("memtouch-1g-1cpu-postcopy1").cpl == 3
    huge = parse_name("memtouch-1g-1cpu-postcopy1-preempt-hugetlb-minor")
    assert (huge.backend, huge.hugetlb, huge.minor, huge.preempt) == (
        "memfd-hugetlb",
        True,
        True,
        True,
    )
    assert huge.destination_parameters == {"x-postcopy-minor-faults": True}
    assert parse_name("randwrite-1g-2cpu-precopy-hugetlbfs").backend == "hugetlbfs"
    # minor-fault mode maps a hugetlbfs file twice: both VMs map it shared (QEMU's share=on)
    shared = _vm_args(
        parse_name("memtouch-1g-1cpu-postcopy1-hugetlbfs-minor"), Path("k"), Path("t")
    )
    assert shared[shared.index("--share") + 1] == "on"
    private = _vm_args(parse_name("memtouch-1g-1cpu-postcopy1-hugetlbfs"), Path("k"), Path("t"))
    assert "--share" not in private
    assert "--mem-prealloc" not in private
    prealloc = parse_name("memtouch-4g-1cpu-postcopy1-libvirt-prealloc")
    assert (prealloc.prealloc, prealloc.switch_by_tool, prealloc.as_json()["prealloc"]) == (
        True,
        True,
        True,
    )
    assert "--mem-prealloc" in _vm_args(prealloc, Path("k"), Path("t"))
    # its destination never writes to fresh memory: the limit is the warm fill rate
    limits = {"line_rate": 4e9, "fill_rate": 4e8, "warm_fill_rate": 2e9, "throughput_limit": 4e8}
    assert limits_for({"scenario": prealloc.as_json(), "limits": limits})["throughput_limit"] == 2e9
    cold = parse_name("memtouch-4g-1cpu-postcopy1-libvirt").as_json()
    assert limits_for({"scenario": cold, "limits": limits})["throughput_limit"] == 4e8
    assert parse_name("randwrite-1g-2cpu-postcopy0-memfd").backend == "memfd"
    assert parse_name("memtouch-1g-1cpu-postcopy1").backend == "ram"
    for bad in (
        "memtouch-1g-1cpu",
        "nosuch-1g-1cpu-precopy",
        "memtouch-1g-1cpu-precopy-preempt",
        "memtouch-1g-1cpu-precopy-memfd-minor",  # minor needs postcopy
        "memtouch-1g-1cpu-postcopy1-minor",  # and a memfd or hugetlb backend
        "memtouch-1g-1cpu-postcopy1-prealloc-memfd",  # the backend comes first
        "memtouch-3m-1cpu-postcopy1-hugetlb",  # not whole huge pages
    ):
        with pytest.raises(ScenarioError):
            parse_name(bad)
    catalogue = load_catalogue()
    assert len(catalogue.resolve(["all"])) == 36
    assert [s.name for s in catalogue.resolve(["smoke", SMOKE])] == [SMOKE]
    assert {s.guest for s in catalogue.resolve(["*-1g-1cpu-postcopy0"])} == {
        "memtouch",
        "randwrite",
        "scan",
    }


def _run_bench(out: Path, *args: str, scenario: str = SMOKE) -> dict[str, Any]:
    main(["bench", scenario, "--repeat", "1", "--fault-probes", "300", "--out", str(out), *args])
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    record: dict[str, Any] = json.loads(lines[0])
    assert record["status"] == "completed", record.get("error")
    for pid in record["pids"].values():
        assert not pid_alive(pid), f"VM process {pid} outlived the bench"
    return record


HELD = "smoke-held"  # SMOKE with its push held until a page is requested (a short name:
# its run directory holds the VMs' QMP sockets, and AF_UNIX paths end at 107 bytes)


def _lift_the_push_once_a_page_is_requested(workdirs: Path, finished: threading.Event) -> None:
    """The bench's source starts its push at 1 byte/s (HELD's parameters): the guest, now
    on the destination, must ask for a page it lacks; once the source has served one
    request, the push goes on at full speed. (With the push free, on a loaded host the
    destination's vCPU could wait for a core until the push had brought every page it
    lacked: a run with no request, and so no request latency.)"""
    client: QEMUMonitorProtocol | None = None
    try:
        while client is None:  # the source VM's QMP, once it listens
            if finished.wait(0.05):
                return
            qmp = next(workdirs.glob(f"postcopy-bench-*/{HELD}-*/source.qmp"), None)
            if qmp is not None:
                client = QEMUMonitorProtocol(str(qmp))
                try:
                    client.connect(negotiate=True)
                except (OSError, QMPError):
                    with contextlib.suppress(Exception):
                        client.close()
                    client = None
        while not finished.is_set():
            info = client.cmd_raw("query-migrate")["return"]
            if info.get("ram", {}).get("postcopy-requests", 0) > 0 or info.get("status") in (
                "completed",
                "failed",
                "cancelled",
            ):
                break
            time.sleep(0.05)
        client.cmd_raw("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
    except (OSError, QMPError):  # the bench ended the source: its record says why
        pass
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


@pytest.mark.timeout(240)
def test_smoke_run_on_loopback_reports_every_figure_and_ratio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    (scenarios / "held.toml").write_text(
        f'[[scenario]]\nname = "{HELD}"\nbase = "{SMOKE}"\n'
        'parameters = { "max-postcopy-bandwidth" = 1 }\n'
    )
    # the bench's run directories, where the thread finds the source's QMP (not under
    # tmp_path: too long a path for a socket)
    workdirs = Path(tempfile.mkdtemp(prefix="smoke-"))
    monkeypatch.setattr(tempfile, "tempdir", str(workdirs))
    finished = threading.Event()
    lifter = threading.Thread(
        target=_lift_the_push_once_a_page_is_requested, args=(workdirs, finished)
    )
    lifter.start()
    try:
        record = _run_bench(
            tmp_path / "smoke.jsonl", "--plot", "--scenario-dir", str(scenarios), scenario=HELD
        )
    finally:
        finished.set()
        lifter.join()
        shutil.rmtree(workdirs, ignore_errors=True)
    figures, limits, ratios = record["figures"], record["limits"], record["ratios"]
    missing = [name for name in FIGURES_OF_A_POSTCOPY_RUN if figures.get(name) is None]
    assert not missing, f"figures missing: {missing}"
    assert figures["verify_ok"] is True
    assert figures["postcopy_bytes"] > 0 and figures["precopy_bytes"] > 0
    assert len(figures["vcpu_blocktime_ms"]) == 1
    assert [name for name in LIMITS if not limits.get(name)] == []
    assert [name for name in RATIOS if ratios.get(name) is None] == []
    assert set(record["targets"]) == {
        "throughput_vs_limit",
        "latency_p50_vs_fault_rtt",
        "downtime_vs_target",
        "rss_overhead_vs_guest_ram",
        "bulk_round_vs_line_rate",
    }
    # the bulk round is the first part of what crossed, and it carried page data
    assert 0 < figures["bulk_round_bytes"] <= figures["precopy_bytes"]
    # the migration is kept as a run record, the format `postcopy report` reads: both
    # sides' full query-migrate, the samples the plot is drawn from, both timelines
    run = Run.from_records(record["run"])
    assert run.header["format"] == RUN_FORMAT and run.header["command"] == "bench"
    assert run.source["ram"]["postcopy-requests"] == figures["postcopy_requests"]
    assert "x-request-latency" in run.destination
    assert len(run.samples) >= 2 and "bytes-received" in run.samples[-1]
    assert run.first("source", tp.STOP) is not None
    assert len(record["cpu_series"]["source"][next(iter(record["cpu_series"]["source"]))]) == len(
        run.samples
    )
    assert list(tmp_path.glob("smoke-loopback-*.png"))


@needs_namespaces
@pytest.mark.timeout(240)
def test_namespace_run_removes_its_namespaces_and_veth(tmp_path: Path) -> None:
    record = _run_bench(tmp_path / "ns.jsonl", "--link", "10gbit", "--no-verify")
    assert record["link"] == "10gbit" and record["limits"]["line_rate"] > 0
    assert our_namespaces(os.getpid()) == []
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert f"pcb{os.getpid()}" not in links


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@needs_namespaces
@pytest.mark.timeout(180)
def test_sigterm_during_a_run_ends_processes_and_namespaces(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "postcopy",
            "bench",
            SMOKE,
            "--repeat",
            "1",
            "--link",
            "10gbit",
            "--fault-probes",
            "300",
            "--out",
            str(tmp_path / "interrupted.jsonl"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        # interrupt once both VM processes run inside the namespaces
        while time.monotonic() < deadline and bench.poll() is None:
            started |= _descendants(bench.pid)
            vms = [p for p in started if " vm run " in _cmdline(p)]
            if len(vms) == 2:
                break
            time.sleep(0.1)
        assert bench.poll() is None, bench.stderr.read().decode() if bench.stderr else ""
        assert our_namespaces(bench.pid), "the bench made no namespaces"
        started |= _descendants(bench.pid)
        bench.send_signal(signal.SIGTERM)
        _, stderr = bench.communicate(timeout=60)
        assert bench.returncode == 130, stderr.decode()
        assert our_namespaces(bench.pid) == []
        assert [pid for pid in started if pid_alive(pid) and _cmdline(pid)] == []
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
