"""The terminal summary of bench runs: one row per run, each figure beside its ratio.

A ratio that misses its target is shown red, one that meets it green. With repetitions,
a second table gives each scenario's median over its completed runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from postcopy.bench.analysis import TARGETS

MB = 1e6
MIB = 1 << 20


def _styled(text: str, record_or_targets: dict[str, Any], target: str) -> str:
    verdict = (record_or_targets.get(target) or {}).get("met")
    if verdict is None:
        return text
    return f"[green]{text}[/]" if verdict else f"[red]{text}[/]"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def _pair(value: str, ratio: float | None) -> str:
    return value if ratio is None else f"{value} ({ratio:.2f}x)"


Column = tuple[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], str]]

COLUMNS: list[Column] = [
    ("total s", lambda f, r, t: _num(f["total_time_ms"], ".2f", 1000)),
    (
        "throughput MB/s (÷limit)",
        lambda f, r, t: _styled(
            _pair(_num(f["throughput_bytes_per_s"], ".0f", MB), r["throughput_vs_limit"]),
            t,
            "throughput_vs_limit",
        ),
    ),
    (
        "bulk round MB/s (÷line)",
        lambda f, r, t: _styled(
            _pair(
                _num(f.get("bulk_round_bytes_per_s"), ".0f", MB), r.get("bulk_round_vs_line_rate")
            ),
            t,
            "bulk_round_vs_line_rate",
        ),
    ),
    (
        "downtime ms (÷5ms)",
        lambda f, r, t: _styled(
            _pair(_num(f["downtime_us"], ".2f", 1000), r["downtime_vs_target"]),
            t,
            "downtime_vs_target",
        ),
    ),
    (
        "req p50 µs (÷fault rtt)",
        lambda f, r, t: _styled(
            _pair(_num(f["request_latency_p50_us"], ".0f"), r["latency_p50_vs_fault_rtt"]),
            t,
            "latency_p50_vs_fault_rtt",
        ),
    ),
    (
        "req p99/max µs",
        lambda f, r, t: (
            "-"
            if f["request_latency_p99_us"] is None
            else f"{f['request_latency_p99_us']:.0f}/{f['request_latency_max_us']:.0f}"
        ),
    ),
    ("blocktime ms", lambda f, r, t: _num(f["blocktime_us"], ".1f", 1000)),
    ("requests", lambda f, r, t: _num(f["postcopy_requests"], ".0f")),
    (
        "dst RSS+ MiB (÷RAM)",
        lambda f, r, t: _styled(
            _pair(
                _num(f["destination_overhead_bytes"], ".0f", MIB), r["rss_overhead_vs_guest_ram"]
            ),
            t,
            "rss_overhead_vs_guest_ram",
        ),
    ),
    ("verify", lambda f, r, t: {True: "ok", False: "[red]BAD[/]", None: "-"}[f["verify_ok"]]),
]


def _limits_text(limits: dict[str, Any]) -> str:
    if not limits:
        return "-"
    return (
        f"line {limits['line_rate'] / MB:.0f}, fill {limits['fill_rate'] / MB:.0f} MB/s; "
        f"rtt {limits['fault_rtt_p50_us']:.0f} µs"
    )


def runs_table(records: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="postcopy bench: each figure (ratio to its limit)", show_lines=False)
    table.add_column("run", no_wrap=True)
    table.add_column("link")
    table.add_column("status")
    for name, _ in COLUMNS:
        table.add_column(name, justify="right")
    table.add_column("cores busy (others)", justify="right")
    table.add_column("limits (same run, same link)", no_wrap=True)
    for record in records:
        status = record.get("status", "?")
        style = "" if status == "completed" else "[red]"
        row = [
            record.get("run_id", "?"),
            record.get("link", "?"),
            f"{style}{status}[/]" if style else status,
        ]
        figures = record.get("figures") or {}
        ratios = record.get("ratios") or {}
        targets = record.get("targets") or {}
        if figures:
            row += [cell(figures, ratios, targets) for _, cell in COLUMNS]
        else:
            row += ["-"] * len(COLUMNS)
        host = (record.get("cpu") or {}).get("host") or {}
        row.append(f"{host['busy_cores']:.1f} ({host['others_cores']:.1f})" if host else "-")
        row.append(_limits_text(record.get("limits") or {}))
        table.add_row(*row)
    return table


def medians_table(records: Sequence[dict[str, Any]]) -> Table | None:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("status") == "completed":
            grouped[(record["scenario"]["name"], record["link"])].append(record)
    if not any(len(group) > 1 for group in grouped.values()):
        return None
    table = Table(
        title="median over repetitions (ratio medians; targets: "
        + ", ".join(f"{k} {op} {v}" for k, (op, v) in TARGETS.items())
        + ")"
    )
    for name in (
        "scenario",
        "link",
        "runs",
        "total s",
        "MB/s",
        "÷limit",
        "bulk MB/s",
        "÷line",
        "downtime ms",
        "÷5ms",
        "req p50 µs",
        "÷rtt",
        "blocktime ms",
        "RSS+ ÷RAM",
    ):
        table.add_column(name, justify="left" if name in ("scenario", "link") else "right")

    def median(group: list[dict[str, Any]], kind: str, key: str) -> float | None:
        values = [r[kind][key] for r in group if r[kind].get(key) is not None]
        return statistics.median(values) if values else None

    for (scenario, link), group in grouped.items():
        table.add_row(
            scenario,
            link,
            str(len(group)),
            _num(median(group, "figures", "total_time_ms"), ".2f", 1000),
            _num(median(group, "figures", "throughput_bytes_per_s"), ".0f", MB),
            _num(median(group, "ratios", "throughput_vs_limit"), ".2f"),
            _num(median(group, "figures", "bulk_round_bytes_per_s"), ".0f", MB),
            _num(median(group, "ratios", "bulk_round_vs_line_rate"), ".2f"),
            _num(median(group, "figures", "downtime_us"), ".2f", 1000),
            _num(median(group, "ratios", "downtime_vs_target"), ".2f"),
            _num(median(group, "figures", "request_latency_p50_us"), ".0f"),
            _num(median(group, "ratios", "latency_p50_vs_fault_rtt"), ".2f"),
            _num(median(group, "figures", "blocktime_us"), ".1f", 1000),
            _num(median(group, "ratios", "rss_overhead_vs_guest_ram"), ".3f"),
        )
    return table


def thread_names(record: dict[str, Any], side: str) -> dict[str, str]:
    """Thread id -> name, from the vCPU list and, with --profile, py-spy's thread names."""
    names = dict(((record.get("cpu") or {}).get(side) or {}).get("names") or {})
    threads = ((record.get("profile") or {}).get(side) or {}).get("threads") or {}
    for key in threads:
        name, _, tid = key.rpartition(" (")
        names.setdefault(tid.rstrip(")"), name)
    return names


def cpu_lines(record: dict[str, Any]) -> list[str]:
    """Where the cores went during the migration: each VM thread's CPU seconds, the host."""
    cpu = record.get("cpu") or {}
    if not cpu:
        return []
    lines = [f"{record.get('run_id')}: {cpu['seconds']:.2f} s of migration"]
    host = cpu.get("host") or {}
    if host:
        lines.append(
            f"  host: {host['busy_cores']:.2f} of {host['cpus']:.0f} cores busy "
            f"(ours {host['ours_cores']:.2f}, other processes "
            f"{host['others_cores']:.2f}), stolen by the hypervisor "
            f"{host['steal_cores']:.2f}"
        )
    for side in ("source", "destination"):
        usage = cpu.get(side) or {}
        if not usage:
            continue
        names = thread_names(record, side)
        busiest = sorted(usage["threads"].items(), key=lambda item: -item[1])[:6]
        shown = ", ".join(f"{names.get(tid, tid)} {seconds:.2f}" for tid, seconds in busiest)
        lines.append(f"  {side}: {usage['total']:.2f} CPU s: {shown}")
    profile = record.get("profile") or {}
    for side in ("source", "destination"):
        threads = (profile.get(side) or {}).get("threads") or {}
        for key, thread in list(threads.items())[:4]:
            top = "; ".join(f"{name} {count}" for name, count in thread["top_self"][:4])
            lines.append(f"  py-spy {side} {key}: {thread['samples']} samples: {top}")
    return lines


def print_summary(records: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=220)  # a file or pipe: don't squeeze the columns
    console.print(runs_table(records))
    medians = medians_table(records)
    if medians is not None:
        console.print(medians)
    from postcopy.bench.servicereport import comparison_lines, service_table

    service = service_table(records)
    if service is not None:
        console.print(service)
        for line in comparison_lines(records):
            console.print(line)
    for record in records:
        if record.get("error"):
            console.print(f"[red]{record.get('run_id')}: {record['error']}[/]")
    if any(record.get("profile") for record in records):
        for record in records:
            for line in cpu_lines(record):
                console.print(line, markup=False, highlight=False)
