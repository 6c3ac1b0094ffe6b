"""`postcopy migrate` as the user runs it: a subprocess driving two real VM processes.

Precopy with JSON progress lines, postcopy with the destination's socket (capabilities set
there, blocktime in the summary, figures that add up, the run file), postcopy from the
start with nothing but JSON on stdout and stderr, a migrate started before its VMs (it
waits for their sockets), and Ctrl-C cancelling a precopy that the source survives.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from postcopy.cli.report import postcopy_rows
from postcopy.tools.runfile import load_run
from tests.hold import migrate_holding_postcopy
from tests.vmprocess import VmProcess, free_port

pytestmark = pytest.mark.timeout(120)

POSTCOPY = [sys.executable, "-m", "postcopy"]


def postcopy_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*POSTCOPY, *args], capture_output=True, text=True, timeout=timeout)


def start_pair(
    tmp_path: Path,
    vms: list[VmProcess],
    *,
    ram: str = "256M",
    vcpus: int = 2,
    dest_args: tuple[str, ...] = (),
) -> tuple[VmProcess, VmProcess, str]:
    """A destination listening on a free loopback port (started first, so it listens by
    the time the source's QMP answers), then the source."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ("--guest", "memtouch", "--ram", ram, "--vcpus", str(vcpus))
    destination = VmProcess(tmp_path, "dst", *common, "--incoming", uri, *dest_args)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *common)
    vms.append(source)
    return source, destination, uri


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_precopy_prints_json_progress_and_a_summary(tmp_path: Path, vms: list[VmProcess]) -> None:
    source, destination, uri = start_pair(tmp_path, vms, vcpus=1)
    source.wait_passes(b"B", 2)
    result = postcopy_cli("migrate", "--qmp", source.qmp_path, "--to", uri, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    records = json_lines(result.stdout)
    samples = [r for r in records if r["event"] == "sample"]
    summary = records[-1]
    assert summary["event"] == "summary" and summary["status"] == "completed"
    # every page crossed at least once: with data, or as a zero marker (a few bytes)
    ram = summary["source"]["ram"]
    assert ram["normal"] + ram["duplicate"] >= ram["total"] // ram["page-size"]
    assert ram["transferred"] >= ram["normal-bytes"]
    assert summary["destination"] is None
    assert samples and samples[-1]["status"] == "completed"
    assert {s["status"] for s in samples} <= {"setup", "active", "device", "completed"}
    sent = [s["transferred"] for s in samples]
    assert sent == sorted(sent)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    assert all(s["total"] == 256 << 20 for s in samples if s["status"] != "setup")
    assert destination.wait_migration({"completed"})["status"] == "completed"
    assert not source.cmd("query-status")["running"]


def test_postcopy_with_the_destination_socket_shows_blocktime_and_writes_the_run(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    source, destination, uri = start_pair(tmp_path, vms)
    source.wait_passes(b"B", 4)
    timeline = tmp_path / "run.jsonl"
    result = migrate_holding_postcopy(
        source.qmp_path,
        [
            *POSTCOPY,
            "migrate",
            "--qmp",
            source.qmp_path,
            "--to",
            uri,
            "--postcopy",
            "--dest-qmp",
            destination.qmp_path,
            "--timeline",
            str(timeline),
        ],
        timeline,
    )
    assert result.returncode == 0, result.stderr
    # the summary table, both sides
    for text in (
        "migration summary",
        "completed",
        "postcopy requests",
        "blocktime, all vCPUs at once",
        "blocktime, vCPU 0",
        "blocktime, vCPU 1",
        "request latency",
        "average throughput",
        "pages needed at the switch",
        "pages placed from the stream",
        "run written to",
    ):
        assert text in result.stdout, text
    out = result.stdout
    assert out.count("switched to postcopy") == 1, out  # the display's row, no echo
    assert "live rate" not in out  # the final state: the average is the summary's
    for line in out.splitlines():
        if "blocktime" in line:  # one unit, ms, for all blocktime figures
            assert line.rstrip(" │").endswith(" ms") and "µs" not in line, line
    # migrate set the postcopy capabilities on the destination itself
    enabled = {c["capability"] for c in destination.cmd("query-migrate-capabilities") if c["state"]}
    assert {"postcopy-ram", "postcopy-blocktime"} <= enabled
    # the switch came after the first round: precopy bytes, then postcopy bytes
    info = source.cmd("query-migrate")
    assert info["ram"]["precopy-bytes"] > 0 and info["ram"]["postcopy-bytes"] > 0
    assert info["ram"]["dirty-sync-count"] >= 1
    run = load_run(timeline)
    assert run.header["command"] == "migrate" and run.header["uri"] == uri
    assert "postcopy-ram" in run.header["destination"]["capabilities"]
    assert "postcopy-active" in {s["status"] for s in run.samples}
    assert run.status == "completed"
    assert run.switchover() is not None
    assert run.source["ram"]["postcopy-bytes"] == info["ram"]["postcopy-bytes"]
    assert len(run.destination["postcopy-vcpu-blocktime"]) == 2
    assert {"source", "destination"} <= {e["side"] for e in run.events}
    assert any(e["event"] == "round-end" for e in run.events_of("source"))
    # the figures add up as the summary's names say
    resent = run.source["x-postcopy"].get("resent-pages", 0)
    rows = dict(postcopy_rows(run.source, run.destination))
    number = {
        label: int(value.replace(",", ""))
        for label, value in rows.items()
        if re.fullmatch(r"[0-9,]+", value)
    }
    assert number["pages needed at the switch"] == (
        number["├ pushed in the background"] + number["└ sent on request"]
    )
    assert number["vCPU faults (a vCPU touched a missing page)"] == (
        number["├ needed a page from the source"] + number["└ resolved on the destination"]
    )
    assert number["pages placed from the stream (pushed + on request)"] == (
        number["├ pushed in the background"] + number["└ sent on request"] + resent
    )
    ram = run.source["ram"]
    assert run.destination["x-pages-placed"] == (
        ram["x-pages-pushed"] + ram["x-pages-requested"] + resent
    )
    assert run.destination["x-postcopy-requests-sent"] == ram["postcopy-requests"]
    # and the guest is intact on the destination
    destination.cmd("stop")
    verdict = destination.cmd("x-verify")
    assert verdict["ok"], verdict["detail"]


def test_switch_after_zero_rounds_is_postcopy_from_the_start(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    source, destination, uri = start_pair(tmp_path, vms, vcpus=1)
    source.wait_passes(b"B", 1)
    result = postcopy_cli(
        "migrate",
        "--qmp",
        source.qmp_path,
        "--to",
        uri,
        "--switch-after-rounds",
        "0",
        "--dest-qmp",
        destination.qmp_path,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    # --json: nothing but JSON on stdout and on stderr
    json_lines(result.stdout)
    json_lines(result.stderr)
    summary = json_lines(result.stdout)[-1]
    assert summary["status"] == "completed"
    assert summary["source"]["ram"]["precopy-bytes"] == 0
    assert summary["source"]["ram"]["postcopy-requests"] > 0
    assert summary["destination"]["status"] == "completed"
    assert source.cmd("query-migrate-parameters")["x-postcopy-after-rounds"] == 0


def test_ctrl_c_cancels_a_precopy_and_the_source_keeps_running(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    source, _destination, uri = start_pair(tmp_path, vms, vcpus=1)
    process = subprocess.Popen(
        [
            *POSTCOPY,
            "migrate",
            "--qmp",
            source.qmp_path,
            "--to",
            uri,
            "--max-bandwidth",
            "1M",  # the first round lasts minutes: still active when Ctrl-C comes
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        while True:
            line = process.stdout.readline()
            assert line, "migrate ended before the migration became active"
            if json.loads(line).get("status") == "active":
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, err
    assert "cancelled" in err and "keeps running" in err
    assert "Traceback" not in err
    assert json_lines(out)[-1]["status"] == "cancelled"
    assert source.cmd("query-migrate")["status"] == "cancelled"
    assert source.cmd("query-status")["running"]
    before = source.console().count(b"B")
    source.wait_passes(b"B", before + 1)


def test_json_errors_are_json_too(tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing.qmp")
    result = postcopy_cli(
        "migrate", "--qmp", missing, "--to", "tcp:127.0.0.1:1", "--json", "--qmp-wait", "0.5"
    )
    assert result.returncode == 1 and result.stdout == ""
    *notes, error = json_lines(result.stderr)  # a note that it waits, then the error
    assert [note["event"] for note in notes] == ["note"]
    assert error["event"] == "error" and f"no source QMP socket at {missing}" in error["error"]


def test_migrate_waits_for_vms_that_are_still_starting(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """The tour starts both VMs in the background and migrates at once: `migrate` waits
    for sockets that are about to appear instead of failing."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    source_qmp, destination_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    migrate = subprocess.Popen(
        [
            *POSTCOPY,
            "migrate",
            "--qmp",
            str(source_qmp),
            "--dest-qmp",
            str(destination_qmp),
            "--to",
            uri,
            "--postcopy",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        assert migrate.poll() is None, migrate.communicate()
        common = ("--guest", "memtouch", "--ram", "64M")
        vms.append(VmProcess(tmp_path, "dst", *common, "--incoming", uri))
        vms.append(VmProcess(tmp_path, "src", *common))
        out, err = migrate.communicate(timeout=90)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.wait()
    assert migrate.returncode == 0, err
    assert json_lines(out)[-1]["status"] == "completed"
