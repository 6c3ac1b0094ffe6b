"""`postcopy report` on the files of a real run: the run file `postcopy migrate
--timeline` writes, and each VM's own --trace file; tables, PNG plots and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postcopy.cli.main import main
from postcopy.cli.report import write_png
from postcopy.tools.runfile import load_run
from tests.hold import migrate_holding_postcopy
from tests.vmprocess import VmProcess, free_port

pytestmark = pytest.mark.timeout(120)

POSTCOPY = [sys.executable, "-m", "postcopy"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def postcopy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*POSTCOPY, *args], capture_output=True, text=True, timeout=90)


@dataclass
class Files:
    run: Path
    source_trace: Path
    destination_trace: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    """One postcopy migration of a 256 MiB, 2-vCPU memtouch guest, recorded three ways."""
    workdir = tmp_path_factory.mktemp("report")
    found = Files(workdir / "run.jsonl", workdir / "src.trace", workdir / "dst.trace")
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ("--guest", "memtouch", "--ram", "256M", "--vcpus", "2")
    started: list[VmProcess] = []
    try:
        destination = VmProcess(
            workdir, "dst", *common, "--incoming", uri, "--trace", str(found.destination_trace)
        )
        started.append(destination)
        source = VmProcess(workdir, "src", *common, "--trace", str(found.source_trace))
        started.append(source)
        deadline = time.monotonic() + 60
        while source.console().count(b"B") < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # held in postcopy until a sample shows it: the report's phases must include it
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
                "--preempt",
                "--dest-qmp",
                destination.qmp_path,
                "--timeline",
                str(found.run),
                "--json",
            ],
            found.run,
        )
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 30  # each VM writes its trace when its side ends
        while not (
            found.source_trace.exists()
            and found.destination_trace.exists()
            and "summary" in found.destination_trace.read_text()
            and "summary" in found.source_trace.read_text()
        ):
            assert time.monotonic() < deadline, "no trace files"
            time.sleep(0.05)
        yield found
    finally:
        for vm in started:
            vm.close()


def report_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command through postcopy's own main(), without a new interpreter per call."""
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_file_tables(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = report_in_process(capsys, str(files.run))
    assert code == 0, err
    for text in (
        "run",
        "migrate",
        "postcopy-preempt",
        "timeline",
        "round-end",
        "postcopy-active",
        "migration summary",
        "blocktime",
        "vCPU 1",
        "request latency",
        "request latency over",
        "result: completed",
    ):
        assert text in out, text
    assert "phases:" in out and "postcopy" in out


def test_run_file_png(files: Files, tmp_path: Path) -> None:
    png = tmp_path / "plots" / "run.png"
    result = postcopy_cli("report", str(files.run), "--png", str(png))
    assert result.returncode == 0, result.stderr
    assert f"plots written to {png}" in result.stdout
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_run_file_contents(files: Files) -> None:
    run = load_run(files.run)
    assert run.header["format"] == "postcopy-run/2"
    assert run.header["options"]["preempt"] is True
    phases = [status for status, _, _ in run.phases()]
    assert "active" in phases and "postcopy-active" in phases
    switch = run.switchover()
    assert switch is not None and 0 < switch < float(run.samples[-1]["t"])
    assert run.source["status"] == run.destination["status"] == "completed"
    assert run.end is not None and run.end["status"] == "completed"
    # the raw latencies for the histogram: one per requested page, as the summary counts
    assert len(run.latency_us) == run.destination["x-request-latency"]["count"] > 0
    assert max(run.latency_us) == pytest.approx(
        run.destination["x-request-latency"]["max-us"], abs=0.2
    )


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_vm_trace_file_is_a_run_of_one_side(
    files: Files, side: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = files.source_trace if side == "source" else files.destination_trace
    run = load_run(path)
    assert list(run.summaries) == [side]
    assert run.events and {e["side"] for e in run.events} == {side}
    assert run.status == "completed"
    code, out, err = report_in_process(capsys, str(path), "--png", str(tmp_path / "trace.png"))
    assert code == 0, err
    assert "migration summary" in out
    assert (tmp_path / "trace.png").read_bytes().startswith(PNG_MAGIC)


def test_the_two_traces_together_make_a_run(files: Files, tmp_path: Path) -> None:
    both = tmp_path / "both.jsonl"
    both.write_text(files.source_trace.read_text() + files.destination_trace.read_text())
    run = load_run(both)
    assert set(run.summaries) == {"source", "destination"}
    assert run.switchover() is not None
    assert write_png(run, tmp_path / "both.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_and_malformed_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = postcopy_cli("report", str(tmp_path / "nothing.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"postcopy report: {tmp_path / 'nothing.jsonl'}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"event": "sample", "t": 0}) + "\nnot json\n")
    code, out, err = report_in_process(capsys, str(bad))
    assert code == 1 and out == ""
    assert err.strip() == f"postcopy report: {bad}:2: not a JSON line"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, out, err = report_in_process(capsys, str(empty))
    assert code == 1 and "no migration data" in err
    assert len(err.strip().splitlines()) == 1
