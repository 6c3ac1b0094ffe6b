"""The service's side of bench results: a table per mode, the worst-gap comparison, and
request latency over time with the migration's phases as bands, modes side by side.

For the kvstore scenarios among the records (those with a "service" part), per scenario:
runs, runs with every request answered exactly once and correctly, the rate, the p50, p99
and max latency of the requests sent during the migration, the longest gap without an
answer (median and worst), and the migration's downtime and blocktime beside them. Then,
for each postcopy scenario against the precopy scenario of the same guest, RAM and vCPUs:
its median and worst longest gap as a fraction of precopy's. The plot puts beside the
modes' timelines the longest gap of every run, mode by mode, with those fractions.
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


def _during(record: dict[str, Any]) -> dict[str, Any]:
    """The service's figures of the requests sent during the migration."""
    windows = (record.get("service") or {}).get("windows") or {}
    return windows.get("migration") or {}


def scenario_figures(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kvstore scenario: the service's and the migration's figures."""
    rows = []
    for name, runs in _service_records(records).items():
        figures = [r.get("figures") or {} for r in runs]
        scenario = runs[0].get("scenario") or {}
        during = [_during(r) for r in runs]

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
                "p50_ms": _ms(_median([d.get("p50_us") for d in during])),
                "p99_ms": _ms(_median(column("service_migration_p99_us"))),
                "max_ms": _ms(_median(column("service_migration_max_us"))),
                "worst_max_ms": _ms(_worst(column("service_migration_max_us"))),
                "p99_whole_run_ms": _ms(_median(column("service_p99_us"))),
                "before_p99_ms": _ms(_median(column("service_before_p99_us"))),
                "gap_ms": _median(column("service_longest_gap_ms")),
                "worst_gap_ms": _worst(column("service_longest_gap_ms")),
                "gaps_ms": [v for v in column("service_longest_gap_ms") if v is not None],
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


def _ratio(value: float | None, against: float | None) -> float | None:
    return None if value is None or not against else round(value / against, 3)


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each postcopy scenario's median and worst longest gap against its precopy twin's
    (ratio: postcopy's / precopy's; shorter_by: 1 - ratio)."""
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
                "ratio": _ratio(row["gap_ms"], precopy["gap_ms"]),
                "shorter_by": round(1 - row["gap_ms"] / precopy["gap_ms"], 3),
                "worst_gap_ms": row["worst_gap_ms"],
                "precopy_worst_gap_ms": precopy["worst_gap_ms"],
                "worst_ratio": _ratio(row["worst_gap_ms"], precopy["worst_gap_ms"]),
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
        title="the service through the migration (medians over runs; migrating: latency of "
        "the requests sent during the migration; gap: longest time with a request waiting "
        "and no answer)"
    )
    for name in (
        "scenario",
        "mode",
        "runs clean",
        "lost/dup/wrong",
        "req/s (min)",
        "p99 before ms",
        "migrating p50/p99/max ms",
        "gap ms (worst)",
        "downtime ms",
        "stop→run ms",
        "blocktime ms",
    ):
        # the scenario's name whole (other columns wrap first): it is what a reader looks
        # up; a figure too wide for its column wraps, never cut short
        table.add_column(
            name,
            justify="left" if name in ("scenario", "mode") else "right",
            overflow="fold",
            no_wrap=name == "scenario",
            min_width=max(len(r["scenario"]) for r in rows) if name == "scenario" else None,
        )
    for row in rows:
        clean = f"{row['clean_runs']}/{row['runs']}"
        table.add_row(
            row["scenario"],
            row["mode"],
            clean if row["clean_runs"] == row["runs"] else f"[red]{clean}[/]",
            f"{row['lost']}/{row['duplicate']}/{row['wrong']}",
            f"{_text(row['rate'], '.0f')} ({_text(row['min_rate'], '.0f')})",
            _text(row["before_p99_ms"]),
            f"{_text(row['p50_ms'])}/{_text(row['p99_ms'])}/{_text(row['max_ms'])}",
            f"{_text(row['gap_ms'])} ({_text(row['worst_gap_ms'])})",
            _text(row["downtime_ms"], ".2f"),
            _text(row["downtime_to_run_ms"], ".1f"),
            _text(row["blocktime_ms"]),
        )
    return table


def _against(ratio: float | None) -> str:
    """0.52 -> "0.52x, 48% shorter"; 1.2 -> "1.20x, 20% longer"."""
    if ratio is None:
        return "-"
    change = "shorter" if ratio <= 1 else "longer"
    return f"{ratio:.2f}x, {abs(1 - ratio) * 100:.0f}% {change}"


def comparison_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for item in comparisons(scenario_figures(records)):
        lines.append(
            f"{item['scenario']} against {item['against']}, the longest gap without an "
            f"answer: median {item['gap_ms']:.1f} vs {item['precopy_gap_ms']:.1f} ms "
            f"({_against(item['ratio'])}), worst {_text(item['worst_gap_ms'])} vs "
            f"{_text(item['precopy_worst_gap_ms'])} ms ({_against(item['worst_ratio'])})"
        )
    return lines


def plot_service(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """service_figure(records) as a PNG at `path` (None: no kvstore scenario)."""
    from postcopy.tools.plot import save_figure

    figure = service_figure(records)
    return None if figure is None else save_figure(figure, path)


def service_figure(records: Sequence[dict[str, Any]]) -> Any:
    """Latency over time per kvstore scenario, side by side: for each, the run with the
    median longest gap; the largest latency per 10 ms of send time; the phases as bands.
    Then the longest gap of every run, scenario by scenario, the median marked, with each
    postcopy scenario's median and worst as a fraction of precopy's. None: no kvstore
    scenario among the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = scenario_figures(records)
    if not rows:
        return None
    grouped = _service_records(records)
    figure = plt.figure(figsize=(max(6 * len(rows), 10) + 3.5, 5.6))
    grid = figure.add_gridspec(1, len(rows) + 1, width_ratios=[6] * len(rows) + [3.5])
    axes = [figure.add_subplot(grid[0, 0])]
    axes += [figure.add_subplot(grid[0, i], sharey=axes[0]) for i in range(1, len(rows))]
    for axis, row in zip(axes, rows, strict=True):
        runs = sorted(
            grouped[row["scenario"]],
            key=lambda r: (r.get("figures") or {}).get("service_longest_gap_ms") or 0.0,
        )
        _plot_timeline(axis, runs[len(runs) // 2], len(runs), first=axis is axes[0])
    axes[0].set_ylabel("request latency (ms, log)")
    _plot_gaps(figure.add_subplot(grid[0, len(rows)]), rows)
    legend: dict[str, Any] = {}
    for axis in axes:  # each mode has its own phases: one legend for all
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    return figure


def _plot_timeline(axis: Any, record: dict[str, Any], runs: int, *, first: bool) -> None:
    """One run's latency over time, its phases as bands, its longest gap hatched; the
    title gives that run's own figures."""
    import numpy as np

    from postcopy.tools.plot import mark_phases

    service = record["service"]
    figures = record.get("figures") or {}
    series = service.get("series") or {}
    mark_phases(axis, bench_run(record), labels=True)
    worst = np.array(series.get("max_us") or [], dtype=float) / 1000
    times = float(series.get("start", 0.0)) + np.arange(worst.size) * float(series.get("bin", 0.01))
    shown = worst > 0
    axis.plot(
        times[shown],
        worst[shown],
        ".",
        markersize=2,
        color="#08306b",
        label="largest latency per 10 ms" if first else None,
    )
    gap_at = service.get("longest_gap_at_s")
    gap = figures.get("service_longest_gap_ms")
    if gap_at is not None and gap:
        axis.axvspan(
            gap_at,
            gap_at + gap / 1000,
            facecolor="none",
            hatch="///",
            edgecolor="#cb181d",
            linewidth=0,
            label="longest gap without an answer" if first else None,
        )
    axis.set_yscale("log")
    axis.set_xlabel("seconds after migrate")
    name = (record.get("scenario") or {}).get("name", "")
    axis.set_title(
        f"{name}: run {record.get('run_id', '').split('#')[-1]} of {runs} (median gap)\n"
        f"p99 migrating {_text(_ms(figures.get('service_migration_p99_us')))} ms, "
        f"gap {_text(gap)} ms, downtime {_text(_ms(figures.get('downtime_us')), '.2f')} ms",
        fontsize=9,
    )
    axis.grid(True, which="both", alpha=0.2)


MODE_COLOURS = {"precopy": "#6baed6", "postcopy": "#41ab5d", "postcopy-preempt": "#238b45"}


def _plot_gaps(axis: Any, rows: Sequence[dict[str, Any]]) -> None:
    """The longest gap of every run per scenario (a dot each, the median a bar), and over
    each postcopy scenario its median and worst as a fraction of precopy's."""
    against = {c["scenario"]: c for c in comparisons(rows)}
    top = max((max(r["gaps_ms"], default=0.0) for r in rows), default=0.0) or 1.0
    for x, row in enumerate(rows):
        gaps = sorted(row["gaps_ms"])
        spread = [x + 0.18 * ((i % 5) - 2) / 2 for i in range(len(gaps))]
        colour = MODE_COLOURS.get(row["mode"], "#737373")
        axis.plot(spread, gaps, "o", markersize=4, color=colour, alpha=0.8)
        if row["gap_ms"] is not None:
            axis.hlines(row["gap_ms"], x - 0.3, x + 0.3, color="black", linewidth=2)
        item = against.get(row["scenario"])
        if item is not None:
            axis.annotate(
                f"median {_text(item['ratio'], '.2f')}x\n"
                f"worst {_text(item['worst_ratio'], '.2f')}x",
                (x, top * 1.04),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axis.set_xticks(range(len(rows)), [r["mode"] for r in rows], fontsize=8, rotation=15)
    axis.set_xlim(-0.6, len(rows) - 0.4)
    axis.set_ylim(0, top * 1.25)
    axis.set_ylabel("longest gap without an answer (ms)")
    axis.set_title(
        "longest gap of each run (bar: median)\nagainst precopy's, as a fraction", fontsize=9
    )
    axis.grid(True, axis="y", alpha=0.3)
