"""The one plotter of a run (`postcopy report --png`, the demo's timeline.png, `bench --plot`).

Panels, top to bottom, on one time axis:
- bytes sent, received and still to send over time (MiB), the phases shaded, the
  downtime (source stops to destination runs) in red, the switchover and the other steps
  as lines;
- the live sending rate (over the last second), with the bench's throughput limit;
- after a switch to postcopy: vCPU faults, page requests and pages sent on request,
  cumulative;
- the request latency histogram (or its p50/p99/max when only the summary is known) and
  the blocktime of each vCPU, in ms;
- with the bench's CPU series: the cores its busiest threads used.

Legends sit beside their axes, never over the data; the histogram's ticks are few and
plain numbers; "remaining" starts at the first round (the source reports 0 before it
has counted anything, which drew a false jump from 0 to all of RAM).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from postcopy.migration import trace_points as tp
from postcopy.tools.runfile import Run

MIB = float(1 << 20)
MB = 1e6

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
# steps drawn as vertical lines: (side, trace point, label, colour)
STEPS = (
    ("source", tp.PACKAGE_SENT, "package sent (LISTEN, device state, RUN)", "darkorange"),
    ("source", tp.PUSH_DONE, "push done (every needed page sent)", "purple"),
    ("destination", tp.LISTEN, "destination: LISTEN", "teal"),
    ("destination", tp.COMPLETED, "destination: all RAM in place", "black"),
)
# statuses in which the source's "remaining" is a count (before the first round it is 0)
COUNTING = frozenset({"active", "device", "postcopy-active", "completed"})
LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}


class PlotError(Exception):
    """Nothing can be plotted; the message is the user's one line."""


def _series(run: Run, key: str) -> list[float]:
    return [float("nan") if s.get(key) is None else float(s[key]) for s in run.samples]


def plot_run(
    run: Run,
    path: str | Path,
    *,
    title: str | None = None,
    rate_limit: float | None = None,
    cpu_lines: Sequence[tuple[str, Sequence[float | None]]] = (),
    cpu_title: str = "",
) -> Path:
    """Draw `run` into a PNG at `path`; PlotError if matplotlib is missing."""
    figure = draw_run(
        run, title=title, rate_limit=rate_limit, cpu_lines=cpu_lines, cpu_title=cpu_title
    )
    return save_figure(figure, Path(path))


def save_figure(figure: Any, path: Path) -> Path:
    """Write `figure` as a PNG at `path` (its directory made) and free it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path


def draw_run(
    run: Run,
    *,
    title: str | None = None,
    rate_limit: float | None = None,
    cpu_lines: Sequence[tuple[str, Sequence[float | None]]] = (),
    cpu_title: str = "",
) -> Any:
    """The figure of `run` (a matplotlib Figure, for plot_run to save and the tests to
    inspect); PlotError if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "plots need matplotlib: pip install 'postcopy[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    postcopy = any((s.get("vcpu-faults") or s.get("requests-sent")) for s in run.samples)
    rows = [("timeline", 3.0)]
    if any(s.get("rate") for s in run.samples):
        rows.append(("rate", 1.5))
    if postcopy:
        rows.append(("postcopy", 1.8))
    rows.append(("pages", 2.2))
    if cpu_lines:
        rows.append(("cpu", 1.8))
    figure = plt.figure(figsize=(13, 1.2 + 2.3 * len(rows)), layout="constrained")
    grid = figure.add_gridspec(len(rows), 2, height_ratios=[height for _, height in rows])
    axes: dict[str, Any] = {}
    for index, (name, _) in enumerate(rows):
        if name == "pages":
            axes["latency"] = figure.add_subplot(grid[index, 0])
            axes["blocktime"] = figure.add_subplot(grid[index, 1])
        else:
            axes[name] = figure.add_subplot(grid[index, :], sharex=axes.get("timeline"))
    if title is None:
        title = f"postcopy migration: {run.status or 'unknown'}"
        if run.header.get("uri"):
            title += f" to {run.header['uri']}"
    figure.suptitle(title, fontsize="medium")

    _timeline(axes["timeline"], run)
    if "rate" in axes:
        _rate(axes["rate"], run, rate_limit)
    if postcopy:
        _postcopy_counts(axes["postcopy"], run)
    if cpu_lines:
        _cpu(axes["cpu"], run, cpu_lines, cpu_title)
    for name in ("rate", "postcopy", "cpu"):
        if name in axes:
            mark_phases(axes[name], run, labels=False)
    _latency(axes["latency"], run)
    _blocktime(axes["blocktime"], run)
    return figure


def mark_phases(axis: Any, run: Run, *, labels: bool) -> None:
    """Phases shaded, the downtime in red, the switchover and the steps as lines."""
    for status, start, end in run.phases():
        if end > start:
            axis.axvspan(
                start,
                end,
                color=PHASE_COLOURS.get(status, "#eeeeee"),
                alpha=0.6,
                linewidth=0,
                label=PHASE_NAMES.get(status, status) if labels else None,
            )
    stop = run.first("source", tp.STOP)
    running = run.first("destination", tp.RUN)
    if stop is not None and running is not None:
        axis.axvspan(
            stop,
            max(running, stop + 1e-4),
            color="red",
            alpha=0.35,
            linewidth=0,
            label="downtime (source stops to destination runs)" if labels else None,
        )
    for index, event in enumerate(run.events_of("source", tp.ROUND_END)):
        axis.axvline(
            float(event["t"]),
            color="#6baed6",
            linewidth=0.7,
            label="precopy round ends" if labels and index == 0 else None,
        )
    switch = run.switchover()
    if switch is not None:
        axis.axvline(
            switch, color="#238b45", linewidth=2, label="switch to postcopy" if labels else None
        )
    for side, point, label, colour in STEPS:
        when = run.first(side, point)
        if when is not None:
            axis.axvline(
                when, color=colour, linewidth=0.9, linestyle="-.", label=label if labels else None
            )


def _timeline(axis: Any, run: Run) -> None:
    import numpy as np

    mark_phases(axis, run, labels=True)
    if run.samples:
        t = np.array([float(s["t"]) for s in run.samples])
        (line,) = axis.plot(t, np.array(_series(run, "transferred")) / MIB, color="#08519c")
        line.set_label("sent by the source")
        received = np.array(_series(run, "bytes-received"))
        if np.isfinite(received).any():
            axis.plot(
                t,
                received / MIB,
                color="tab:cyan",
                linestyle="--",
                label="received by the destination",
            )
        remaining = np.array(
            [
                float(s.get("remaining") or 0) if s.get("status") in COUNTING else np.nan
                for s in run.samples
            ]
        )
        axis.plot(t, remaining / MIB, color="#a50f15", linestyle=":", label="still to send")
        total = run.samples[-1].get("total")
        if total:
            axis.axhline(
                float(total) / MIB, color="#777777", linewidth=0.8, label="guest RAM", zorder=0
            )
    else:
        rounds = run.events_of("source", tp.ROUND_END)
        if rounds:
            axis.plot(
                [float(e["t"]) for e in rounds],
                [float(e.get("remaining", 0)) / MIB for e in rounds],
                "o-",
                color="#a50f15",
                label="still to send after each round",
            )
    axis.set_ylim(bottom=0)
    axis.set_xlabel("seconds after migrate (both sides on the host's monotonic clock)")
    axis.set_ylabel("MiB")
    axis.set_title("bytes sent, received and still to send", fontsize="medium")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", **LEGEND)


def _rate(axis: Any, run: Run, rate_limit: float | None) -> None:
    t = [float(s["t"]) for s in run.samples]
    axis.plot(
        t,
        [value / MB for value in _series(run, "rate")],
        color="#08519c",
        linewidth=0.9,
        label="live sending rate (last second)",
    )
    if rate_limit:
        axis.axhline(
            rate_limit / MB,
            color="tab:gray",
            linestyle="--",
            linewidth=0.8,
            label="throughput limit: min(line, fill)",
        )
    axis.set_ylim(bottom=0)
    axis.set_ylabel("MB/s")
    axis.set_title("sending rate", fontsize="medium")
    axis.legend(fontsize="small", **LEGEND)


def _postcopy_counts(axis: Any, run: Run) -> None:
    t = [float(s["t"]) for s in run.samples]
    for key, label, colour in (
        ("vcpu-faults", "vCPU faults (a vCPU touched a missing page)", "tab:orange"),
        ("requests-sent", "page requests sent by the destination", "tab:red"),
        ("pages-requested", "pages sent on request by the source", "tab:purple"),
    ):
        values = _series(run, key)
        if any(v == v and v > 0 for v in values):  # skip all-NaN or all-zero series
            axis.plot(t, values, label=label, color=colour)
    axis.set_ylabel("count (cumulative)")
    axis.set_title("postcopy: faults and requests", fontsize="medium")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", **LEGEND)


def _cpu(
    axis: Any, run: Run, lines: Sequence[tuple[str, Sequence[float | None]]], title: str
) -> None:
    t = [float(s["t"]) for s in run.samples]
    for label, cores in lines:
        axis.plot(t, [float("nan") if c is None else c for c in cores], linewidth=0.9, label=label)
    axis.set_ylabel("cores")
    axis.set_title(title or "cores used by the busiest threads", fontsize="medium")
    axis.legend(fontsize="x-small", **LEGEND)


def _latency(axis: Any, run: Run) -> None:
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    summary = run.destination.get("x-request-latency") or {}
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    if run.latency_us:
        values = np.asarray(run.latency_us)
        low, high = float(values.min()), float(values.max())
        if high <= low * 1.2:  # one value, or nearly: a narrow window around it
            low, high = low * 0.8, high * 1.2 + 1.0
        logarithmic = high > 10 * max(low, 1.0)
        if logarithmic:
            bins = np.logspace(np.log10(max(low, 1.0)), np.log10(high * 1.01), 40)
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(LogLocator(base=10))
            axis.xaxis.set_minor_formatter(NullFormatter())
        else:
            bins = np.linspace(low, high, 40)
            axis.xaxis.set_major_locator(MaxNLocator(nbins=5))
        axis.xaxis.set_major_formatter(plain)
        axis.hist(values, bins=bins.tolist(), color="#6a51a3", label="requested pages")
        for q, style in ((50, "-"), (99, "--")):
            value = float(np.percentile(values, q))
            axis.axvline(
                value, color="black", linestyle=style, linewidth=0.8, label=f"p{q} {value:,.0f} µs"
            )
        axis.legend(fontsize="small", **LEGEND)
        axis.set_xlabel("fault read to page placed (µs)")
        axis.set_ylabel("pages")
        axis.set_title(f"request latency ({values.size} requested pages)", fontsize="medium")
    elif summary.get("count"):
        names = ["p50", "p99", "max"]
        axis.bar(names, [summary["p50-us"], summary["p99-us"], summary["max-us"]], color="#6a51a3")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_ylabel("µs (log scale)")
        axis.set_title(
            f"request latency ({summary['count']} pages; summary only)", fontsize="medium"
        )
    else:
        _empty(axis, "request latency", "no page requests recorded")


def _blocktime(axis: Any, run: Run) -> None:
    destination = run.destination
    per_vcpu = destination.get("x-postcopy-vcpu-blocktime-us")
    if per_vcpu is None and "postcopy-vcpu-blocktime" in destination:
        per_vcpu = [ms * 1000 for ms in destination["postcopy-vcpu-blocktime"]]
    if not per_vcpu:
        _empty(
            axis,
            "postcopy blocktime",
            "no blocktime (no postcopy, the postcopy-blocktime\n"
            "capability off, or no destination figures)",
        )
        return
    axis.bar(
        [f"vCPU {i}" for i in range(len(per_vcpu))],
        [value / 1000 for value in per_vcpu],
        color="#d94801",
        label="each vCPU's time waiting",
    )
    total_us = destination.get("x-postcopy-blocktime-us")
    if total_us is not None:
        axis.axhline(
            total_us / 1000,
            color="black",
            linestyle="--",
            linewidth=0.8,
            label=f"all vCPUs at once: {total_us / 1000:,.2f} ms",
        )
    axis.legend(fontsize="small", **LEGEND)
    axis.set_ylabel("ms waiting for missing pages")
    axis.set_title("postcopy blocktime per vCPU", fontsize="medium")


def _empty(axis: Any, title: str, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes)
    axis.set_title(title, fontsize="medium")
    axis.set_axis_off()
