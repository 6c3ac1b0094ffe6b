"""`postcopy report RUN.jsonl [--png OUT.png]`: tables and plots of a finished migration.

A run file is JSON lines, one object per line, each with an "event" key:

    {"event": "header", "format": "postcopy-run/1", "command": "migrate", "uri": ...,
     "started": ISO time, "options": {...}, "source": {...}, "destination": {...}}
    {"event": "sample", "t": 0.42, "status": "active", "transferred": ..., "remaining": ...,
     "total": ..., "rate": bytes/s, "dirty-pages-rate": ..., "rounds": ...,
     "postcopy-requests": ..., ...}                     progress, as `migrate --json` prints it
    {"event": "round-end", "t": 0.61, "side": "source", ...}   a VM's migration timeline
    {"event": "summary", "side": "source", ...query-migrate}  each side's final figures
    {"event": "latency-samples", "side": "destination", "us": [...]}   raw request latencies
    {"event": "verify", ...}, {"event": "end", "status": ..., "t": ...}

`postcopy migrate --timeline FILE` and `postcopy demo` write the whole thing. The `--trace`
file of a `postcopy vm run` process is read too: it holds one side's timeline events (no
"side") followed by that side's {"event": "summary"}, which tells the side (the source's
query-migrate has "ram", the destination's does not). Times ("t") are seconds since the
migration started, as seen by the side that recorded them.

The PNG has three panels: bytes sent and remaining over time with the phases shaded and
the switchover marked; the request latency histogram (or its p50/p99/max when only the
summary is known); the time each vCPU was blocked waiting for pages.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from postcopy.units import format_bytes

RUN_FORMAT = "postcopy-run/1"

# Statuses in the order a migration goes through them, with the colour of their span.
PHASE_COLOURS = {
    "setup": "#d9d9d9",
    "active": "#c6dbef",
    "device": "#fdd0a2",
    "postcopy-active": "#c7e9c0",
    "cancelling": "#fcbba1",
}
PHASE_NAMES = {
    "setup": "setup",
    "active": "precopy",
    "device": "stop-and-copy",
    "postcopy-active": "postcopy",
    "cancelling": "cancelling",
}
FINAL_STATUSES = ("completed", "failed", "cancelled")


class ReportError(Exception):
    """A run file cannot be read or plotted; the message is the user's one line."""


class RunWriter:
    """Appends run records to a JSON-lines file, flushed line by line so a run that dies
    half-way still leaves what it had."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"run file {self.path} is closed")
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def side_of_summary(summary: dict[str, Any]) -> str:
    return "source" if "ram" in summary else "destination"


@dataclass
class Run:
    """Everything one run file says, sorted by kind."""

    header: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_us: list[float] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    end: dict[str, Any] | None = None

    @property
    def source(self) -> dict[str, Any]:
        return self.summaries.get("source", {})

    @property
    def destination(self) -> dict[str, Any]:
        return self.summaries.get("destination", {})

    @property
    def status(self) -> str | None:
        if self.end is not None and self.end.get("status"):
            return str(self.end["status"])
        for side in ("source", "destination"):
            if side in self.summaries:
                return str(self.summaries[side].get("status"))
        return str(self.samples[-1]["status"]) if self.samples else None

    def events_of(self, side: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("side") == side]

    def phases(self) -> list[tuple[str, float, float]]:
        """(status, start, end) spans of the source, from its status events or samples."""
        changes = [
            (str(e["status"]), float(e["t"]))
            for e in self.events_of("source")
            if e.get("event") == "status" and "t" in e
        ]
        if not changes:
            changes = []
            for sample in self.samples:
                if not changes or changes[-1][0] != sample["status"]:
                    changes.append((str(sample["status"]), float(sample["t"])))
        spans = []
        for index, (status, start) in enumerate(changes):
            if status in FINAL_STATUSES:
                break
            if index + 1 < len(changes):
                end = changes[index + 1][1]
            elif self.samples:
                end = float(self.samples[-1]["t"])
            else:
                end = start
            spans.append((status, start, end))
        return spans

    def switchover(self) -> float | None:
        for event in self.events_of("source"):
            if event.get("event") == "status" and event.get("status") == "postcopy-active":
                return float(event["t"])
        for sample in self.samples:
            if sample.get("status") == "postcopy-active":
                return float(sample["t"])
        return None


def load_run(path: str | Path) -> Run:
    """Read a run file (or a VM's --trace file); ReportError says what is wrong."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: cannot read it ({error})") from None
    run = Run()
    unsided: list[dict[str, Any]] = []  # a trace file's events, until its summary names the side
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ReportError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise ReportError(f'{path}:{number}: not a run record (no "event" key)')
        kind = record["event"]
        if kind == "header":
            run.header = record
        elif kind == "sample":
            run.samples.append(record)
        elif kind == "summary":
            side = str(record.get("side") or side_of_summary(record))
            run.summaries[side] = {k: v for k, v in record.items() if k not in ("event", "side")}
            for event in unsided:
                event["side"] = side
            unsided = []
        elif kind == "latency-samples":
            run.latency_us.extend(float(value) for value in record.get("us", []))
        elif kind == "verify":
            run.verify = record
        elif kind == "end":
            run.end = record
        else:
            run.events.append(record)
            if "side" not in record:
                unsided.append(record)
    if not (run.samples or run.events or run.summaries):
        raise ReportError(f"{path}: holds no migration data (samples, events or summaries)")
    return run


# -- tables ---------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value} ms"


def _us(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.1f} µs"


def _bytes(value: Any) -> str:
    return "-" if value is None else format_bytes(float(value))


def source_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The source's query-migrate as (label, value) rows, in the order people read them."""
    ram = info.get("ram", {})
    rows = [
        ("status", str(info.get("status", "-"))),
        ("total time", _ms(info.get("total-time"))),
        ("setup time", _ms(info.get("setup-time"))),
        (
            "downtime",
            _ms(info.get("downtime"))
            + (f" ({info['x-downtime-us']:,.0f} µs)" if "x-downtime-us" in info else ""),
        ),
        ("precopy rounds", str(info.get("x-rounds", "-"))),
        ("RAM", _bytes(ram.get("total"))),
        ("transferred", _bytes(ram.get("transferred"))),
        ("  in precopy", _bytes(ram.get("precopy-bytes"))),
        ("  while stopped", _bytes(ram.get("downtime-bytes"))),
        ("  in postcopy", _bytes(ram.get("postcopy-bytes"))),
        ("pages with data / zero", f"{ram.get('normal', '-')} / {ram.get('duplicate', '-')}"),
        ("throughput", f"{ram['mbps']:,.0f} Mbit/s" if "mbps" in ram else "-"),
        ("dirty syncs", str(ram.get("dirty-sync-count", "-"))),
        ("postcopy requests", str(ram.get("postcopy-requests", "-"))),
        (
            "pages pushed / requested",
            f"{ram.get('x-pages-pushed', '-')} / {ram.get('x-pages-requested', '-')}",
        ),
    ]
    if info.get("error-desc"):
        rows.append(("error", str(info["error-desc"])))
    return rows


def destination_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("status", str(info.get("status", "-"))), ("total time", _ms(info.get("total-time")))]
    if "postcopy-blocktime" in info:
        total_us = info.get("x-postcopy-blocktime-us")
        rows.append(
            (
                "blocktime (all vCPUs)",
                _ms(info["postcopy-blocktime"])
                + (f" ({total_us:,.0f} µs)" if total_us is not None else ""),
            )
        )
        per_vcpu = info.get("x-postcopy-vcpu-blocktime-us") or [
            ms * 1000 for ms in info.get("postcopy-vcpu-blocktime", [])
        ]
        for index, value in enumerate(per_vcpu):
            rows.append((f"  vCPU {index}", _us(value)))
        if "x-postcopy-vcpu-faults" in info:
            rows.append(("vCPU faults", str(info["x-postcopy-vcpu-faults"])))
    latency = info.get("x-request-latency")
    if latency and latency.get("count"):
        rows.append(
            (
                "request latency",
                f"p50 {_us(latency['p50-us'])}, "
                f"p99 {_us(latency['p99-us'])}, max {_us(latency['max-us'])} "
                f"({latency['count']} pages)",
            )
        )
    for key, label in (
        ("x-postcopy-requests-sent", "requests sent"),
        ("x-pages-placed", "pages placed by the fault path"),
        ("x-duplicate-pages", "duplicate pages"),
        ("x-bytes-received", "bytes received"),
    ):
        if key in info:
            value = info[key]
            rows.append((label, _bytes(value) if key == "x-bytes-received" else str(value)))
    if info.get("error-desc"):
        rows.append(("error", str(info["error-desc"])))
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
    for side, rows in (
        ("source", source_rows(source) if source else []),
        ("destination", destination_rows(destination) if destination else []),
    ):
        for index, (label, value) in enumerate(rows):
            table.add_row(
                side if index == 0 else "", label, value, end_section=index == len(rows) - 1
            )
    return table


def _event_detail(event: dict[str, Any]) -> str:
    skip = {"t", "event", "side"}
    parts = []
    for key, value in event.items():
        if key in skip:
            continue
        if key in ("remaining", "bandwidth") and isinstance(value, int | float):
            value = format_bytes(value) + ("/s" if key == "bandwidth" else "")
        parts.append(f"{key}={value}")
    return ", ".join(parts)


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
            config.add_row(key, json.dumps(value) if not isinstance(value, str) else value)
        for side in ("source", "destination"):
            info = header.get(side) or {}
            if info.get("capabilities") is not None:
                config.add_row(f"{side} capabilities", ", ".join(info["capabilities"]) or "-")
        console.print(config)
    if run.events:
        timeline = Table(title="timeline", title_justify="left")
        timeline.add_column("t (s)", justify="right")
        timeline.add_column("side")
        timeline.add_column("event")
        timeline.add_column("detail", overflow="fold")
        for event in sorted(run.events, key=lambda e: (float(e.get("t", 0)), e.get("side", ""))):
            timeline.add_row(
                f"{float(event.get('t', 0)):.3f}",
                str(event.get("side", "?")),
                str(event["event"]),
                _event_detail(event),
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
            f"request latency over {values.size} pages: p50 {p50:,.1f} µs, "
            f"p90 {p90:,.1f} µs, p99 {p99:,.1f} µs, max {values.max():,.1f} µs"
        )
    if run.verify is not None:
        console.print(
            f"verification: {'passed' if run.verify.get('ok') else 'FAILED'} "
            f"({run.verify.get('detail', '')})"
        )
    if run.status is not None:
        console.print(f"result: {run.status}")


# -- plots ----------------------------------------------------------------------------------


def write_png(run: Run, path: str | Path) -> Path:
    """The three panels as one PNG; ReportError if matplotlib is missing or nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "plots need matplotlib: pip install 'postcopy[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    figure = plt.figure(figsize=(12, 8), layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=(3, 2))
    timeline = figure.add_subplot(grid[0, :])
    latency = figure.add_subplot(grid[1, 0])
    blocktime = figure.add_subplot(grid[1, 1])
    title = f"postcopy migration: {run.status or 'unknown'}"
    if run.header.get("uri"):
        title += f" to {run.header['uri']}"
    figure.suptitle(title)

    # timeline: bytes sent and remaining; phase spans; switchover and round ends
    mib = float(1 << 20)
    for status, start, end in run.phases():
        if end > start:
            timeline.axvspan(
                start,
                end,
                color=PHASE_COLOURS.get(status, "#eeeeee"),
                alpha=0.7,
                label=PHASE_NAMES.get(status, status),
                linewidth=0,
            )
    if run.samples:
        t = np.array([float(s["t"]) for s in run.samples])
        timeline.plot(
            t, [s.get("transferred", 0) / mib for s in run.samples], color="#08519c", label="sent"
        )
        timeline.plot(
            t,
            [s.get("remaining", 0) / mib for s in run.samples],
            color="#a50f15",
            linestyle="--",
            label="remaining",
        )
        total = run.samples[-1].get("total")
        if total:
            timeline.axhline(
                total / mib, color="#777777", linewidth=0.8, linestyle=":", label="guest RAM"
            )
    else:
        rounds = [e for e in run.events_of("source") if e.get("event") == "round-end"]
        if rounds:
            timeline.plot(
                [float(e["t"]) for e in rounds],
                [float(e.get("remaining", 0)) / mib for e in rounds],
                "o-",
                color="#a50f15",
                label="remaining after round",
            )
    for event in run.events_of("source"):
        if event.get("event") == "round-end":
            timeline.axvline(float(event["t"]), color="#6baed6", linewidth=0.6)
    switch = run.switchover()
    if switch is not None:
        timeline.axvline(switch, color="#238b45", linewidth=2, label="switchover")
    timeline.set_xlabel("time since the migration started (s)")
    timeline.set_ylabel("MiB")
    timeline.set_title("bytes sent and remaining (blue ticks: precopy round ends)")
    handles, labels = timeline.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        timeline.legend(unique.values(), unique.keys(), loc="upper left", fontsize="small")

    # request latency
    summary = run.destination.get("x-request-latency") or {}
    if run.latency_us:
        values = np.asarray(run.latency_us)
        low, high = max(values.min(), 1.0), max(values.max(), 2.0)
        bins = np.logspace(np.log10(low), np.log10(high * 1.01), 40).tolist()
        latency.hist(values, bins=bins, color="#6a51a3")
        latency.set_xscale("log")
        for q, style in ((50, "-"), (99, "--")):
            value = float(np.percentile(values, q))
            latency.axvline(
                value, color="black", linestyle=style, linewidth=0.8, label=f"p{q} {value:,.0f} µs"
            )
        latency.legend(fontsize="small")
        latency.set_xlabel("fault to page placed (µs)")
        latency.set_ylabel("pages")
        latency.set_title(f"request latency ({values.size} requested pages)")
    elif summary.get("count"):
        names = ["p50", "p99", "max"]
        latency.bar(
            names, [summary["p50-us"], summary["p99-us"], summary["max-us"]], color="#6a51a3"
        )
        latency.set_yscale("log")
        latency.set_ylabel("µs (log scale)")
        latency.set_title(f"request latency ({summary['count']} pages; summary only)")
    else:
        latency.text(
            0.5,
            0.5,
            "no page requests recorded",
            ha="center",
            va="center",
            transform=latency.transAxes,
        )
        latency.set_title("request latency")
        latency.set_axis_off()

    # blocktime per vCPU
    per_vcpu = run.destination.get("x-postcopy-vcpu-blocktime-us")
    if per_vcpu is None and "postcopy-vcpu-blocktime" in run.destination:
        per_vcpu = [ms * 1000 for ms in run.destination["postcopy-vcpu-blocktime"]]
    if per_vcpu:
        blocktime.bar(
            [f"vCPU {i}" for i in range(len(per_vcpu))],
            [value / 1000 for value in per_vcpu],
            color="#d94801",
        )
        total_us = run.destination.get("x-postcopy-blocktime-us")
        if total_us is not None:
            blocktime.axhline(
                total_us / 1000,
                color="black",
                linestyle="--",
                linewidth=0.8,
                label=f"all vCPUs at once: {total_us / 1000:,.2f} ms",
            )
            blocktime.legend(fontsize="small")
        blocktime.set_ylabel("ms blocked on missing pages")
        blocktime.set_title("postcopy blocktime per vCPU")
    else:
        blocktime.text(
            0.5,
            0.5,
            "no blocktime (no postcopy, or no destination figures)",
            ha="center",
            va="center",
            transform=blocktime.transAxes,
        )
        blocktime.set_title("postcopy blocktime")
        blocktime.set_axis_off()

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# -- the command ----------------------------------------------------------------------------


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
    except ReportError as error:
        print(f"postcopy report: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"postcopy report: {error}", file=sys.stderr)
        return 1
    return 0
