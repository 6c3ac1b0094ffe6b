"""The terminal summary of bench runs: one row per run, each figure beside its ratio to
the limit it is bounded by, and a line under the table saying what each column is.

The table fits the terminal: columns are dropped, least important first, until it does
(`--wide` shows them all, however wide). A ratio that meets its target is green, one that
misses it red. With repetitions, a second table gives each scenario's medians.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from postcopy.bench.analysis import TARGETS, judge

MB = 1e6
MIB = 1 << 20


@dataclass(frozen=True)
class Figures:
    """What a row shows: a run's (or a median's) figures, ratios and target verdicts."""

    figures: dict[str, Any]
    ratios: dict[str, Any]
    targets: dict[str, Any]


@dataclass(frozen=True)
class Column:
    header: str  # short lines: the name, the unit, the ratio
    meaning: str  # the line under the table: "name: what it is"
    cell: Callable[[Figures], str]
    wide_only: bool = False


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def _against(row: Figures, figure: str, fmt: str, scale: float, ratio: str) -> str:
    """The figure, and under it its ratio to the limit, green or red against the target."""
    text = _num(row.figures.get(figure), fmt, scale)
    value = row.ratios.get(ratio)
    if value is None:
        return text
    verdict = (row.targets.get(ratio) or {}).get("met")
    style = "" if verdict is None else ("green" if verdict else "red")
    shown = f"{value:.2f}x"
    return f"{text}\n[{style}]{shown}[/]" if style else f"{text}\n{shown}"


def _bound(ratio: str, unit: str = "") -> str:
    """The target of a ratio in words: 'the target: at least 0.7x'."""
    op, value = TARGETS[ratio]
    return f"the target: {'at least' if op == '>=' else 'at most'} {value:g}x{unit}"


COLUMNS: list[Column] = [
    Column(
        "total\ntime\ns",
        "total time: from `migrate` to completed, as the source counts it",
        lambda r: _num(r.figures.get("total_time_ms"), ".2f", 1000),
    ),
    Column(
        "through-\nput MB/s\nx limit",
        "throughput: bytes sent / total time; x limit: against min(line rate, fill rate) "
        "measured on this link before the run (a -prealloc run: the warm fill rate) "
        f"({_bound('throughput_vs_limit')})",
        lambda r: _against(r, "throughput_bytes_per_s", ".0f", MB, "throughput_vs_limit"),
    ),
    Column(
        "downtime\nms\nx 5 ms",
        "downtime: how long the guest was stopped; x 5 ms: against 5 ms "
        f"({_bound('downtime_vs_target')})",
        lambda r: _against(r, "downtime_us", ".2f", 1000, "downtime_vs_target"),
    ),
    Column(
        "request\np50 µs\nx rtt",
        "request p50: median time from a vCPU's fault to its page in place; x rtt: against "
        f"a raw userfaultfd round trip on this link ({_bound('latency_p50_vs_fault_rtt')})",
        lambda r: _against(r, "request_latency_p50_us", ",.0f", 1, "latency_p50_vs_fault_rtt"),
    ),
    Column(
        "block-\ntime\nms",
        "blocktime: how long all vCPUs waited for pages at once (QEMU's postcopy-blocktime)",
        lambda r: _num(r.figures.get("blocktime_us"), ".1f", 1000),
    ),
    Column(
        "1st round\nMB/s\nx line",
        "first round: the precopy round that sends all of RAM; x line: against the line "
        f"rate ({_bound('bulk_round_vs_line_rate')})",
        lambda r: _against(r, "bulk_round_bytes_per_s", ".0f", MB, "bulk_round_vs_line_rate"),
    ),
    Column(
        "memory+\nMiB\nx RAM",
        "memory+: the destination's memory beyond its guest RAM; x RAM: against the guest "
        f"RAM ({_bound('rss_overhead_vs_guest_ram')})",
        lambda r: _against(
            r, "destination_overhead_bytes", ".0f", MIB, "rss_overhead_vs_guest_ram"
        ),
    ),
    Column(
        "request\np99/max\nµs",
        "request p99/max: the 99th percentile and the slowest fault-to-page time",
        lambda r: (
            "-"
            if r.figures.get("request_latency_p99_us") is None
            else f"{r.figures['request_latency_p99_us']:,.0f}/"
            f"{r.figures['request_latency_max_us']:,.0f}"
        ),
        wide_only=True,
    ),
    Column(
        "2 MiB\nplace\np50 µs",
        "2 MiB place p50: huge pages, the median placement ioctl (COPY; CONTINUE in "
        "minor-fault mode, the data already in the page cache)",
        lambda r: _num(r.figures.get("huge_page_placement_p50_us"), ",.0f"),
        wide_only=True,
    ),
    Column(
        "page\nrequests",
        "page requests: the destination's requests the source served",
        lambda r: _num(r.figures.get("postcopy_requests"), ",.0f"),
        wide_only=True,
    ),
    Column(
        "cores busy\n(others)",
        "cores busy: of the host during the run (others: processes not of this run)",
        lambda r: (
            "-"
            if r.figures.get("host_busy_cores") is None
            else f"{r.figures['host_busy_cores']:.1f} "
            f"({r.figures.get('host_other_processes_cores') or 0:.1f})"
        ),
        wide_only=True,
    ),
]


def _named(name: str, link: str) -> str:
    return name if link == "loopback" else f"{name} ({link})"


def _result(record: dict[str, Any]) -> str:
    status = str(record.get("status", "?"))
    if status != "completed":
        return f"[red]{status}[/]"
    verified = (record.get("figures") or {}).get("verify_ok")
    result = {True: "verified", False: "[red]BAD memory[/]", None: "completed"}[verified]
    return f"{result}, [yellow]not cut[/]" if never_cut(record) else result


def never_cut(record: dict[str, Any]) -> bool:
    """A -cut run whose postcopy ended before its cut point: it shows no recovery."""
    cut_after = (record.get("scenario") or {}).get("cut_after")
    return cut_after is not None and (record.get("figures") or {}).get("pauses") is None


def _table(
    title: str,
    first: str,
    rows: Sequence[tuple[str, str, Figures | None]],
    columns: Sequence[Column],
) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column(first, overflow="fold", max_width=24)
    table.add_column("result")
    for column in columns:
        table.add_column(column.header, justify="right")
    for name, result, row in rows:
        cells = [column.cell(row) for column in columns] if row else ["-"] * len(columns)
        table.add_row(name, result, *cells)
    return table


def _width(console: Console, table: Table) -> int:
    """The width `table` needs to show every cell unsqueezed (whatever the console's)."""
    return Measurement.get(console, console.options.update_width(100_000), table).maximum


def _fitted(
    console: Console, build: Callable[[Sequence[Column]], Table], wide: bool
) -> tuple[Table, list[Column]]:
    """The table with every column that fits the console (all of them with `wide`)."""
    columns = [c for c in COLUMNS if wide or not c.wide_only]
    while True:
        table = build(columns)
        width = _width(console, table)
        if wide or width <= console.width or len(columns) <= 2:
            return table, columns
        columns = columns[:-1]


def runs_table(
    records: Sequence[dict[str, Any]], console: Console, wide: bool = False
) -> tuple[Table, list[Column]]:
    rows = [
        (
            str(record.get("run_id", "?"))
            + (f" ({record['link']})" if record.get("link") != "loopback" else ""),
            _result(record),
            Figures(record["figures"], record.get("ratios") or {}, record.get("targets") or {})
            if record.get("figures")
            else None,
        )
        for record in records
    ]
    return _fitted(
        console, lambda columns: _table("postcopy bench: each run", "run", rows, columns), wide
    )


def _median_figures(group: list[dict[str, Any]]) -> Figures:
    def medians(kind: str) -> dict[str, Any]:
        keys = {key for record in group for key in (record.get(kind) or {})}
        found = {}
        for key in keys:
            values = [
                record[kind][key]
                for record in group
                if isinstance(record[kind].get(key), int | float)
                and not isinstance(record[kind].get(key), bool)
            ]
            found[key] = statistics.median(values) if values else None
        return found

    ratios = medians("ratios")
    return Figures(medians("figures"), ratios, judge(ratios))


def medians_table(
    records: Sequence[dict[str, Any]], console: Console, wide: bool = False
) -> tuple[Table, list[Column]] | None:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("status") == "completed":
            grouped[(record["scenario"]["name"], record["link"])].append(record)
    if not any(len(group) > 1 for group in grouped.values()):
        return None
    rows = [
        (
            _named(scenario, link),
            f"{len(group)} run" + ("s" if len(group) > 1 else ""),
            _median_figures(group),
        )
        for (scenario, link), group in grouped.items()
    ]
    return _fitted(
        console,
        lambda columns: _table("medians over the repetitions", "scenario", rows, columns),
        wide,
    )


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


def recovery_line(record: dict[str, Any]) -> str | None:
    """A -cut run: where the link broke and what the recovery cost."""
    figures = record.get("figures") or {}
    if never_cut(record):
        cut_after = record["scenario"]["cut_after"]
        return (
            f"{record.get('run_id')}: the link was never cut: postcopy ended before "
            f"{cut_after:,} bytes after the PACKAGE (give the scenario a smaller cut_after)"
        )
    if figures.get("pauses") is None:
        return None
    frame = figures.get("cut_frame_type")
    where = (
        f"cut {figures.get('cut_frame_offset')} bytes into a frame of type {frame:#04x}"
        if isinstance(frame, int)
        else "cut"
    )
    return (
        f"{record.get('run_id')}: {where}; paused {figures.get('pauses')} time(s), "
        f"{figures.get('paused_ms')} ms; reconnect to postcopy-active "
        f"{figures.get('reconnect_to_active_ms')} ms; {figures.get('recovery_resent_pages')} "
        f"pages sent again; {figures.get('pending_pages_at_resume')} pending requests served "
        f"{figures.get('pending_pages_served_ms')} ms after the resume; blocktime "
        f"{figures.get('blocktime_ms')} ms, {figures.get('outage_blocktime_ms')} ms of it in "
        f"the {figures.get('outage_window_ms')} ms from the pause to 1 s after the resume "
        f"({figures.get('before_outage_blocktime_ms')} ms in the "
        f"{figures.get('before_outage_window_ms')} ms before)"
    )


def _limits_line(record: dict[str, Any]) -> str | None:
    limits = record.get("limits") or {}
    if not limits:
        return None
    return (
        f"{record.get('run_id')}: limits on this link: line rate {limits['line_rate'] / MB:,.0f} "
        f"MB/s, fill rate {limits['fill_rate'] / MB:,.0f} MB/s, raw fault round trip "
        f"{limits['fault_rtt_p50_us']:,.0f} µs"
    )


def print_summary(
    records: Sequence[dict[str, Any]], console: Console | None = None, *, wide: bool = False
) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=160)  # a file or a pipe: room for most columns
    table, shown = runs_table(records, console, wide)
    medians = medians_table(records, console, wide)
    if wide:  # as wide as the widest table needs, whatever the terminal
        needed = max(_width(console, t) for t in [table, *([medians[0]] if medians else [])])
        console = Console(
            file=console.file,
            width=max(needed, console.width),
            force_terminal=console.is_terminal,
            no_color=console.no_color,
        )
    console.print(table)
    if medians is not None:
        console.print(medians[0])
    legend = Table.grid(padding=(0, 1))
    legend.add_column(no_wrap=True, style="bold")
    legend.add_column()
    for column in shown:
        name, _, what = column.meaning.partition(": ")
        legend.add_row(f" {name}", what)
    hidden = [c for c in COLUMNS if c not in shown]
    if hidden:
        names = ", ".join(c.meaning.partition(":")[0] for c in hidden)
        legend.add_row(" --wide", f"shows {len(hidden)} more: {names}")
    console.print(legend, highlight=False)
    from postcopy.bench.servicereport import comparison_lines, service_table

    service = service_table(records)
    if service is not None:
        console.print(service)
        for comparison in comparison_lines(records):
            console.print(comparison)
    for record in records:
        recovery = recovery_line(record)
        if recovery:
            console.print(f"  {recovery}", highlight=False)
        limits = _limits_line(record)
        if limits and wide:
            console.print(f"  {limits}", highlight=False)
        if record.get("error"):
            console.print(f"[red]{record.get('run_id')}: {record['error']}[/]")
    if any(record.get("profile") for record in records):
        for record in records:
            for line in cpu_lines(record):
                console.print(line, markup=False, highlight=False)
