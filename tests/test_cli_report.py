"""`postcopy report` on the files of a real run: the run file `postcopy migrate
--timeline` writes, and each VM's own --trace file; tables, PNG plots and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postcopy.cli.main import main
from postcopy.cli.report import write_png
from postcopy.tools.plot import draw_run
from postcopy.tools.runfile import Run, load_run
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


def test_the_timeline_is_on_one_clock_in_true_order(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both sides stamp entries with the host's monotonic clock: the report orders them by
    it and shows them as seconds after `migrate`, not by each side's own start."""
    run = load_run(files.run)
    monos = [float(e["mono"]) for e in run.events]
    assert monos == sorted(monos)
    origin = float(run.header["migrate-mono"])
    for event in run.events:
        assert float(event["t"]) == pytest.approx(float(event["mono"]) - origin, abs=1e-5)
    sides = [e["side"] for e in run.events]
    assert sides.index("destination") < len(sides) - 1 - sides[::-1].index("source")
    code, out, err = report_in_process(capsys, str(files.run))
    assert code == 0, err
    table = out[out.index("timeline") : out.index("progress samples")]
    shown = [float(m) for m in re.findall(r"^│\s*(\d+\.\d{3}) │", table, re.MULTILINE)]
    assert len(shown) == len(run.events) and shown == sorted(shown)
    # cells in words: no clock fields repeated, no Python notation
    for python in ("mono=", "['", "True", "False", "swap_ram="):
        assert python not in out, python


def _synthetic_run(latencies: list[float]) -> Run:
    """A postcopy run as the plotter sees it: samples from setup (where the source reports
    0 remaining) to completed, both sides' steps, both sides' figures."""
    total = 1 << 30
    records: list[dict[str, Any]] = [{"event": "header", "migrate-mono": 100.0}]
    statuses = ["setup"] * 2 + ["active"] * 20 + ["postcopy-active"] * 10 + ["completed"]
    for index, status in enumerate(statuses):
        t = index * 0.1
        sent = min(index, 22) * total // 20
        remaining = 0 if status in ("setup", "completed") else max(total - sent, total // 10)
        records.append(
            {
                "event": "sample",
                "t": t,
                "mono": 100.0 + t,
                "status": status,
                "transferred": sent,
                "remaining": remaining,
                "total": total,
                "rate": 5e8 if index else None,
                "bytes-received": sent,
                "vcpu-faults": max(index - 22, 0) * 100,
                "requests-sent": max(index - 22, 0) * 3,
            }
        )
    for side, name, t, fields in (
        ("source", "status", 0.0, {"status": "setup"}),
        ("source", "status", 0.2, {"status": "active"}),
        ("source", "round-end", 2.2, {"round": 1, "remaining": total // 10}),
        ("source", "status", 2.2, {"status": "postcopy-active"}),
        ("source", "stop", 2.21, {"phase": "postcopy"}),
        ("destination", "listen", 2.215, {}),
        ("destination", "run", 2.22, {}),
        ("destination", "completed", 3.2, {}),
    ):
        records.append({"event": name, "side": side, "mono": 100.0 + t, **fields})
    records.append({"event": "summary", "side": "source", "status": "completed", "ram": {}})
    records.append(
        {
            "event": "summary",
            "side": "destination",
            "status": "completed",
            "x-postcopy-blocktime-us": 360.0,
            "x-postcopy-vcpu-blocktime-us": [211324.3, 234445.9],
        }
    )
    records.append({"event": "latency-samples", "side": "destination", "us": latencies})
    return Run.from_records(records)


def _boxes_overlap(a: Any, b: Any, slack: float = 1.0) -> bool:
    return (
        a.x0 + slack < b.x1 and b.x0 + slack < a.x1 and a.y0 + slack < b.y1 and b.y0 + slack < a.y1
    )


@pytest.mark.parametrize(
    "latencies",
    [
        [1718.6],  # one requested page: it drew a crowd of overlapping log-scale labels
        [950.0, 1010.0, 1035.0, 1036.8],  # a narrow range
        [80.0 + 13 * i for i in range(300)] + [25_000.0],  # three decades
    ],
)
def test_plots_keep_labels_apart_legends_off_the_data_and_no_false_jump(
    latencies: list[float],
) -> None:
    import matplotlib.pyplot as plt

    figure = draw_run(_synthetic_run(latencies))
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        for axis in figure.axes:
            for ticks in (axis.get_xticklabels(), axis.get_yticklabels()):
                boxes = [
                    label.get_window_extent(renderer)
                    for label in ticks
                    if label.get_visible() and label.get_text()
                ]
                for i, first in enumerate(boxes):
                    for second in boxes[i + 1 :]:
                        assert not _boxes_overlap(first, second), [t.get_text() for t in ticks]
            legend = axis.get_legend()
            if legend is not None:
                for other in figure.axes:  # its own data, or a neighbour's
                    assert not _boxes_overlap(
                        legend.get_window_extent(renderer), other.get_window_extent(renderer)
                    ), f"the legend of {axis.get_title()!r} lies over {other.get_title()!r}"
        timeline = figure.axes[0]
        [remaining] = [line for line in timeline.get_lines() if line.get_label() == "still to send"]
        values = [float(v) for v in remaining.get_ydata() if v == v]  # finite ones
        assert values and values[0] > 0.5 * values[0] >= 0  # it starts where the count does
        assert values[0] == max(values)  # from all it still has to send, no climb from 0
    finally:
        plt.close(figure)
