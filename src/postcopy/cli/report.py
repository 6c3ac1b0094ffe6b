"""`postcopy report RUN.jsonl [--png OUT.png]`: tables and plots of a finished migration.

It reads a run file (`postcopy migrate --timeline`, the demo's run.jsonl; the format is in
postcopy/tools/runfile.py) or a VM's own `--trace` file, and prints the run's
configuration, both sides' timelines on one clock in their true order, the figures, and
with `--png` the plots (postcopy/tools/plot.py).

The figures table (`summary_table`, also printed by `migrate` and `demo`) names each
figure so that the relations between them show: after a switch to postcopy,

    pages needed at the switch   = pushed in the background + sent on request
    pages placed from the stream = pushed in the background + sent on request
    vCPU faults                  = needed a page from the source + resolved on the destination
    page requests                  sent by the destination = received by the source

with times in ms (blocktime and downtime alike) and request latencies in µs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from postcopy.tools.plot import PHASE_NAMES, PlotError, plot_run
from postcopy.tools.runfile import Run, RunFileError, load_run
from postcopy.units import format_bytes


class ReportError(Exception):
    """A run file cannot be read or plotted; the message is the user's one line."""


def write_png(run: Run, path: str | Path) -> Path:
    try:
        return plot_run(run, path)
    except PlotError as error:
        raise ReportError(str(error)) from None


# -- figures ----------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    """Every time in ms (downtime and blocktime alike), with the digits that mean something."""
    if value is None:
        return "-"
    value = float(value)
    decimals = 2 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
    return f"{value:,.{decimals}f} ms"


def _us(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.1f} µs"


def _bytes(value: Any) -> str:
    return "-" if value is None else format_bytes(float(value))


def _count(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e6:,.0f} MB/s ({bytes_per_second * 8 / 1e6:,.0f} Mbit/s)"


def source_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The source's query-migrate as (label, value) rows, in the order people read them."""
    ram = info.get("ram", {})
    downtime = info.get("x-downtime-us")
    rows = [
        ("status", str(info.get("status", "-"))),
        ("total time", _ms(info.get("total-time"))),
        ("setup time", _ms(info.get("setup-time"))),
        (
            "downtime (guest stopped)",
            _ms(downtime / 1000 if downtime is not None else info.get("downtime")),
        ),
        ("precopy rounds", str(info.get("x-rounds", "-"))),
        ("guest RAM", _bytes(ram.get("total"))),
        ("bytes sent", _bytes(ram.get("transferred"))),
        ("├ in precopy", _bytes(ram.get("precopy-bytes"))),
        ("├ while stopped", _bytes(ram.get("downtime-bytes"))),
        ("└ in postcopy", _bytes(ram.get("postcopy-bytes"))),
        (
            "pages with data / zero pages",
            f"{_count(ram.get('normal'))} / {_count(ram.get('duplicate'))}",
        ),
    ]
    total_ms = info.get("total-time")
    if ram.get("transferred") and total_ms:
        rows.append(
            (
                "average throughput (sent / total time)",
                _rate(ram["transferred"] / (total_ms / 1000)),
            )
        )
    rows.append(("dirty syncs", str(ram.get("dirty-sync-count", "-"))))
    if info.get("error-desc"):
        rows.append(("error", str(info["error-desc"])))
    return rows


def destination_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("status", str(info.get("status", "-"))), ("total time", _ms(info.get("total-time")))]
    if "x-postcopy-blocktime-us" in info or "postcopy-blocktime" in info:
        total_us = info.get("x-postcopy-blocktime-us")
        rows.append(
            (
                "blocktime, all vCPUs at once",
                _ms(total_us / 1000 if total_us is not None else info.get("postcopy-blocktime")),
            )
        )
        per_vcpu = info.get("x-postcopy-vcpu-blocktime-us") or [
            ms * 1000 for ms in info.get("postcopy-vcpu-blocktime", [])
        ]
        for index, value in enumerate(per_vcpu):
            rows.append((f"blocktime, vCPU {index}", _ms(value / 1000)))
    latency = info.get("x-request-latency")
    if latency and latency.get("count"):
        rows.append(
            (
                "request latency",
                f"p50 {_us(latency['p50-us'])}, p99 {_us(latency['p99-us'])}, "
                f"max {_us(latency['max-us'])} ({latency['count']:,} pages)",
            )
        )
    if "x-bytes-received" in info:
        rows.append(("bytes received", _bytes(info["x-bytes-received"])))
    if info.get("error-desc"):
        rows.append(("error", str(info["error-desc"])))
    return rows


def postcopy_rows(source: dict[str, Any], destination: dict[str, Any]) -> list[tuple[str, str]]:
    """The pages and requests after the switch, from both sides, so that they add up."""
    ram = source.get("ram", {})
    switch = source.get("x-postcopy") or {}
    if not switch and "x-postcopy-vcpu-faults" not in destination:
        return []
    rows: list[tuple[str, str]] = []
    if switch:
        resent = switch.get("resent-pages") or 0
        rows += [
            ("pages needed at the switch", _count(switch.get("needed-pages"))),
            ("├ pushed in the background", _count(ram.get("x-pages-pushed"))),
            ("└ sent on request", _count(ram.get("x-pages-requested"))),
        ]
        if resent:
            rows.append(("  (and sent again on the preempt channel)", _count(resent)))
        if source.get("x-pauses"):
            rows += [
                (
                    "link broken, paused, recovered",
                    f"{_count(source['x-pauses'])} time(s), "
                    f"{_count(source.get('x-paused-ms'))} ms paused in all, "
                    f"{_count(source.get('x-recoveries'))} recovered",
                ),
                (
                    "  pages on their way at a cut, sent again",
                    _count(source.get("x-recovery-resent-pages")),
                ),
            ]
    faults = destination.get("x-postcopy-vcpu-faults")
    # each vCPU fault counted by its outcome where it was handled (BlocktimeTracker), so
    # the two add up; not the requested pages (x-request-latency's count), which include
    # pages other processes and prefetching asked for, and one page two vCPUs waited on
    from_source = destination.get("x-postcopy-vcpu-faults-from-source")
    resolved_here = destination.get("x-postcopy-vcpu-faults-resolved-here")
    if faults is not None:
        rows.append(("vCPU faults (a vCPU touched a missing page)", _count(faults)))
        if from_source is not None and resolved_here is not None:
            rows += [
                ("├ needed a page from the source", _count(from_source)),
                ("└ resolved on the destination", _count(resolved_here)),
            ]
    sent = destination.get("x-postcopy-requests-sent")
    received = ram.get("postcopy-requests")
    if sent is not None or received is not None:
        rows.append(
            (
                "page requests (neighbouring pages share one)",
                f"{_count(sent)} sent by the destination, "
                f"{_count(received)} received by the source",
            )
        )
    placed = destination.get("x-pages-placed")
    moved = destination.get("x-pages-moved")
    if placed is not None:
        # not summed: both movers count a chunk they move at the same moment, so "moved
        # back" is at most a little high, and a sum could exceed the guest's RAM
        rows.append(("pages placed from the stream (pushed + on request)", _count(placed)))
        if moved is not None:
            rows.append(("pages moved back from precopy (no transfer)", _count(moved)))
    duplicates = destination.get("x-duplicate-pages")
    if duplicates:
        rows.append(("pages that arrived twice (a request raced the push)", _count(duplicates)))
    return rows


def summary_table(
    source: dict[str, Any] | None,
    destination: dict[str, Any] | None,
    title: str = "migration summary",
) -> Any:
    """A rich table of both sides' final figures (either may be missing)."""
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("")
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    sections = (
        ("source", source_rows(source) if source else []),
        ("destination", destination_rows(destination) if destination else []),
        ("postcopy", postcopy_rows(source or {}, destination or {})),
    )
    for side, rows in sections:
        for index, (label, value) in enumerate(rows):
            table.add_row(
                side if index == 0 else "", label, value, end_section=index == len(rows) - 1
            )
    return table


# -- the report -------------------------------------------------------------------------------


def _value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value) or "none"
    if isinstance(value, int | float) and key in ("remaining", "transferred"):
        return format_bytes(value)
    if isinstance(value, int | float) and key == "bandwidth":
        return format_bytes(value) + "/s"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def event_detail(event: dict[str, Any]) -> str:
    """An entry's own fields in words: no clock fields, no Python notation."""
    return ", ".join(
        f"{key.replace('_', ' ')} {_value(key, value)}"
        for key, value in event.items()
        if key not in ("t", "mono", "event", "side")
    )


def print_report(run: Run, out: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = out if out is not None else Console()
    header = run.header
    if header:
        config = Table(title="run", show_header=False, title_justify="left")
        config.add_column("")
        config.add_column("", overflow="fold")
        for key in ("command", "started", "uri"):
            if key in header:
                config.add_row(key, str(header[key]))
        for key, value in header.get("options", {}).items():
            if value is None or value is False:
                continue
            config.add_row(key.replace("_", " "), _value(key, value))
        for side in ("source", "destination"):
            info = header.get(side) or {}
            if info.get("capabilities") is not None:
                config.add_row(f"{side} capabilities", ", ".join(info["capabilities"]) or "none")
        console.print(config)
    if run.events:
        timeline = Table(
            title="timeline (both sides on one clock: seconds after migrate)", title_justify="left"
        )
        timeline.add_column("t (s)", justify="right")
        timeline.add_column("side")
        timeline.add_column("event")
        timeline.add_column("detail", overflow="fold")
        for event in run.events:  # sorted on the run's clock
            timeline.add_row(
                f"{float(event.get('t', 0)):.3f}",
                str(event.get("side", "?")),
                str(event["event"]),
                event_detail(event),
            )
        console.print(timeline)
    if run.samples:
        console.print(
            f"{len(run.samples)} progress samples over "
            f"{float(run.samples[-1]['t']):.2f} s; phases: "
            + ", ".join(
                f"{PHASE_NAMES.get(status, status)} {end - start:.2f} s"
                for status, start, end in run.phases()
            )
        )
    if run.summaries:
        console.print(summary_table(run.summaries.get("source"), run.summaries.get("destination")))
    if run.latency_us:
        import numpy as np

        values = np.asarray(run.latency_us)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        console.print(
            f"request latency over {values.size:,} pages: p50 {p50:,.1f} µs, "
            f"p90 {p90:,.1f} µs, p99 {p99:,.1f} µs, max {values.max():,.1f} µs"
        )
    if run.verify is not None:
        console.print(
            f"verification: {'passed' if run.verify.get('ok') else 'FAILED'} "
            f"({run.verify.get('detail', '')})"
        )
    if run.status is not None:
        console.print(f"result: {run.status}")


# -- the command ------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tables and plots of a finished migration run",
        description="Print the tables of a run file (from `postcopy migrate --timeline`, "
        "`postcopy demo`, or a VM's --trace file) and optionally plot it.",
    )
    parser.add_argument("run", type=Path, metavar="RUN.jsonl", help="the run file")
    parser.add_argument(
        "--png",
        type=Path,
        metavar="OUT.png",
        help="write the timeline, latency and blocktime plots here",
    )
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.run)
        print_report(run)
        if args.png is not None:
            written = write_png(run, args.png)
            print(f"plots written to {written}")
    except (ReportError, RunFileError) as error:
        print(f"postcopy report: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"postcopy report: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    return 0
