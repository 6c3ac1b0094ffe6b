"""`bench --plot`: a PNG per run, drawn by the one plotter of a run (postcopy/tools/plot.py)
with what only the bench knows: the throughput limit measured on the same link beside the
sending rate, the run's figures against their limits in the title, and the cores the
busiest threads of both VMs used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from postcopy.bench.analysis import bench_run
from postcopy.bench.procinfo import cores_used
from postcopy.bench.table import thread_names
from postcopy.tools.plot import plot_run

MB = 1e6
CPU_LINES = 7  # the busiest threads drawn


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def _title(record: dict[str, Any]) -> str:
    figures = record.get("figures") or {}
    ratios = record.get("ratios") or {}
    return (
        f"{record.get('run_id')} on {record.get('link')} ({record.get('status')}): "
        f"total {_fmt(figures.get('total_time_ms'), '.2f', 1000)} s, "
        f"{_fmt(figures.get('throughput_bytes_per_s'), '.0f', MB)} MB/s "
        f"({_fmt(ratios.get('throughput_vs_limit'), '.2f')}x limit), "
        f"downtime {_fmt(figures.get('downtime_us'), '.2f', 1000)} ms, "
        f"req p50 {_fmt(figures.get('request_latency_p50_us'), '.0f')} µs "
        f"({_fmt(ratios.get('latency_p50_vs_fault_rtt'), '.2f')}x rtt)"
    )


def cpu_lines(
    record: dict[str, Any], times: Sequence[float]
) -> list[tuple[str, list[float | None]]]:
    """(label, cores used per sample) of the busiest threads of both VMs."""
    found = []
    for side, threads in (record.get("cpu_series") or {}).items():
        names = thread_names(record, side)
        short = "src" if side == "source" else "dst"
        for tid, seconds in threads.items():
            if len(seconds) != len(times):
                continue
            cores = cores_used(times, seconds)
            peak = max((c for c in cores if c is not None), default=0.0)
            if peak >= 0.05:
                found.append((peak, f"{short} {names.get(tid, 'thread ' + tid)}", cores))
    found.sort(key=lambda line: -line[0])
    return [(label, cores) for _, label, cores in found[:CPU_LINES]]


def plot_runs(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per run with samples, named <out stem>-<link>-<run id>.png beside `out`."""
    paths = []
    for record in records:
        run = bench_run(record)
        if not run.samples:
            continue
        run_id = re.sub(r"[^A-Za-z0-9._-]+", "-", str(record.get("run_id", "run")))
        path = out.with_name(f"{out.stem}-{record.get('link', 'link')}-{run_id}.png")
        host = (record.get("cpu") or {}).get("host") or {}
        paths.append(
            plot_run(
                run,
                path,
                title=_title(record),
                rate_limit=(record.get("limits") or {}).get("throughput_limit"),
                cpu_lines=cpu_lines(record, [float(s["t"]) for s in run.samples]),
                cpu_title=(
                    f"cores used by the busiest threads (the host: {host['busy_cores']:.2f} "
                    f"cores busy, other processes {host['others_cores']:.2f})"
                    if host
                    else ""
                ),
            )
        )
    return paths
