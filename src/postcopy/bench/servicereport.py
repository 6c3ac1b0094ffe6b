"""The service's side of bench results: a table per mode, the worst-gap comparison, and
request latency over time with the migration's phases as bands, modes side by side.

For the kvstore scenarios among the records (those with a "service" part), per scenario:
runs, runs with every request answered exactly once and correctly, the rate, the p99
latency during the migration, the longest gap without an answer (median and worst), and
the migration's downtime and blocktime beside them. Then, for each postcopy scenario
against the precopy scenario of the same guest, RAM and vCPUs: by how much its median
longest gap is shorter.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from postcopy.bench.analysis import bench_run

MODE_ORDER = ("precopy", "postcopy", "postcopy-preempt")


def _service_records(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("service") and record.get("status") == "completed":
            grouped[str((record.get("scenario") or {}).get("name"))].append(record)
    return dict(grouped)


def mode_of(scenario: dict[str, Any]) -> str:
    if scenario.get("postcopy_after_rounds") is None:
        return "precopy"
    return "postcopy-preempt" if scenario.get("preempt") else "postcopy"


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _worst(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return max(found) if found else None


def scenario_figures(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kvstore scenario: the service's and the migration's figures."""
    rows = []
    for name, runs in _service_records(records).items():
        figures = [r.get("figures") or {} for r in runs]
        scenario = runs[0].get("scenario") or {}

        def column(key: str, figures: list[dict[str, Any]] = figures) -> list[Any]:
            return [f.get(key) for f in figures]

        rows.append(
            {
                "scenario": name,
                "mode": mode_of(scenario),
                "base": re.sub(r"-(precopy|postcopy\d+)(-preempt)?", "", name),
                "runs": len(runs),
                "clean_runs": sum(1 for f in figures if f.get("service_clean")),
                "lost": sum(f.get("service_lost") or 0 for f in figures),
                "duplicate": sum(f.get("service_duplicate") or 0 for f in figures),
                "wrong": sum(f.get("service_wrong") or 0 for f in figures),
                "rate": _median(column("service_rate")),
                "min_rate": min((v for v in column("service_rate") if v), default=None),
                "p99_ms": _ms(_median(column("service_migration_p99_us"))),
                "p99_whole_run_ms": _ms(_median(column("service_p99_us"))),
                "before_p99_ms": _ms(_median(column("service_before_p99_us"))),
                "gap_ms": _median(column("service_longest_gap_ms")),
                "worst_gap_ms": _worst(column("service_longest_gap_ms")),
                "downtime_ms": _ms(_median(column("downtime_us"))),
                "downtime_to_run_ms": _ms(_median(column("downtime_to_run_us"))),
                "blocktime_ms": _ms(_median(column("blocktime_us"))),
                "total_s": _seconds(_median(column("total_time_ms"))),
            }
        )
    rows.sort(key=lambda r: (r["base"], MODE_ORDER.index(r["mode"]), r["scenario"]))
    return rows


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 2)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 2)


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each postcopy scenario's median longest gap against its precopy twin's."""
    found = []
    for row in rows:
        if row["mode"] == "precopy":
            continue
        twins = [r for r in rows if r["base"] == row["base"] and r["mode"] == "precopy"]
        if not twins or not twins[0]["gap_ms"] or row["gap_ms"] is None:
            continue
        precopy = twins[0]
        found.append(
            {
                "scenario": row["scenario"],
                "against": precopy["scenario"],
                "gap_ms": row["gap_ms"],
                "precopy_gap_ms": precopy["gap_ms"],
                "shorter_by": round(1 - row["gap_ms"] / precopy["gap_ms"], 3),
                "worst_gap_ms": row["worst_gap_ms"],
                "precopy_worst_gap_ms": precopy["worst_gap_ms"],
            }
        )
    return found


def _text(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def service_table(records: Sequence[dict[str, Any]]) -> Table | None:
    rows = scenario_figures(records)
    if not rows:
        return None
    table = Table(
        title="the service through the migration (medians over runs; p99 of requests sent "
        "during the migration; gap: longest time with a request waiting and no answer)"
    )
    for name in (
        "scenario",
        "mode",
        "runs clean",
        "lost/dup/wrong",
        "req/s (min)",
        "p99 before ms",
        "p99 migrating ms",
        "gap ms (worst)",
        "downtime ms",
        "stop→run ms",
        "blocktime ms",
        "total s",
    ):
        table.add_column(name, justify="left" if name in ("scenario", "mode") else "right")
    for row in rows:
        clean = f"{row['clean_runs']}/{row['runs']}"
        table.add_row(
            row["scenario"],
            row["mode"],
            clean if row["clean_runs"] == row["runs"] else f"[red]{clean}[/]",
            f"{row['lost']}/{row['duplicate']}/{row['wrong']}",
            f"{_text(row['rate'], '.0f')} ({_text(row['min_rate'], '.0f')})",
            _text(row["before_p99_ms"]),
            _text(row["p99_ms"]),
            f"{_text(row['gap_ms'])} ({_text(row['worst_gap_ms'])})",
            _text(row["downtime_ms"], ".2f"),
            _text(row["downtime_to_run_ms"], ".1f"),
            _text(row["blocktime_ms"]),
            _text(row["total_s"], ".2f"),
        )
    return table


def comparison_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for item in comparisons(scenario_figures(records)):
        verb = "shortens" if item["shorter_by"] >= 0 else "lengthens"
        lines.append(
            f"{item['scenario']} {verb} the longest gap without an answer by "
            f"{abs(item['shorter_by']) * 100:.0f}% against {item['against']}: median "
            f"{item['gap_ms']:.1f} ms vs {item['precopy_gap_ms']:.1f} ms "
            f"(worst {_text(item['worst_gap_ms'])} vs {_text(item['precopy_worst_gap_ms'])} ms)"
        )
    return lines


def plot_service(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Latency over time per kvstore scenario, side by side: for each, the run with the
    median longest gap; the largest latency per 10 ms of send time; the phases as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from postcopy.tools.plot import mark_phases

    rows = scenario_figures(records)
    if not rows:
        return None
    grouped = _service_records(records)
    figure, axes = plt.subplots(
        1, len(rows), figsize=(max(6 * len(rows), 10), 5.2), sharey=True, squeeze=False
    )
    for axis, row in zip(axes[0], rows, strict=True):
        runs = sorted(
            grouped[row["scenario"]],
            key=lambda r: (r.get("figures") or {}).get("service_longest_gap_ms") or 0.0,
        )
        record = runs[len(runs) // 2]
        service = record["service"]
        series = service.get("series") or {}
        run = bench_run(record)
        mark_phases(axis, run, labels=True)
        worst = np.array(series.get("max_us") or [], dtype=float) / 1000
        times = float(series.get("start", 0.0)) + np.arange(worst.size) * float(
            series.get("bin", 0.01)
        )
        shown = worst > 0
        axis.plot(
            times[shown],
            worst[shown],
            ".",
            markersize=2,
            color="#08306b",
            label="largest latency per 10 ms" if axis is axes[0][0] else None,
        )
        gap_at = service.get("longest_gap_at_s")
        gap = (record.get("figures") or {}).get("service_longest_gap_ms")
        if gap_at is not None and gap:
            axis.axvspan(
                gap_at,
                gap_at + gap / 1000,
                facecolor="none",
                hatch="///",
                edgecolor="#cb181d",
                linewidth=0,
                label="longest gap without an answer" if axis is axes[0][0] else None,
            )
        axis.set_yscale("log")
        axis.set_xlabel("seconds after migrate")
        axis.set_title(
            f"{row['scenario']} ({record.get('run_id', '').split('#')[-1]})\n"
            f"p99 migrating {_text(row['p99_ms'])} ms, gap {_text(gap)} ms, "
            f"downtime {_text(row['downtime_ms'], '.2f')} ms",
            fontsize=9,
        )
        axis.grid(True, which="both", alpha=0.2)
    axes[0][0].set_ylabel("request latency (ms, log)")
    legend: dict[str, Any] = {}
    for axis in axes[0]:  # each mode has its own phases: one legend for all
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
