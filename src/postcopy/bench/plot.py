"""PNG timeline of a bench run: bytes and faults over time, phases and switchover marked.

Top: bytes sent by the source and received by the destination (GiB), with the sending
rate (MB/s) on the right axis. Bottom: page requests and vCPU faults of the postcopy
phase, cumulative. The x axis is seconds after `migrate`; the migration's own timeline
events (rounds, stop, LISTEN, RUN, completion) are drawn as vertical lines, the
downtime (source stop to destination RUN) and the postcopy phase as shaded spans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from postcopy.bench.analysis import event_times

GIB = 1 << 30
MB = 1e6

# event -> (label, colour); events not named here are not drawn
SOURCE_EVENTS = {
    "round-start": ("round {round}", "0.6"),
    "stop": ("source stops", "red"),
    "package-sent": ("package sent", "darkorange"),
    "push-done": ("push done", "purple"),
}
DESTINATION_EVENTS = {
    "listen": ("LISTEN", "teal"),
    "run": ("destination runs", "green"),
    "completed": ("all RAM in", "black"),
}


def _events(record: dict[str, Any], side: str) -> list[tuple[float, dict[str, Any]]]:
    """A side's timeline on the bench's clock (seconds after `migrate`)."""
    return event_times(record, side)


def _rate(t: Any, sent: Any, window: float = 0.1) -> tuple[Any, Any]:
    """Sending rate over a sliding `window` seconds (one poll interval alone is too jumpy)."""
    import numpy as np

    earlier = np.searchsorted(t, t - window, side="left")
    span = t - t[earlier]
    valid = span > 0
    rate = np.full(t.shape, np.nan)
    rate[valid] = (sent[valid] - sent[earlier][valid]) / span[valid]
    return t, rate


def _first(events: list[tuple[float, dict[str, Any]]], name: str) -> float | None:
    return next((t for t, entry in events if entry.get("event") == name), None)


def _values(series: dict[str, list[Any]], key: str) -> list[float]:
    return [float("nan") if v is None else float(v) for v in series.get(key, [])]


def plot_run(record: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = record.get("series") or {}
    t = np.asarray(series.get("t", []), dtype=float)
    cpu_series = record.get("cpu_series") or {}
    panels = 3 if cpu_series else 2
    figure, axes = plt.subplots(
        panels,
        1,
        sharex=True,
        figsize=(11, 3 + 2.2 * panels),
        gridspec_kw={"height_ratios": [3, 2, 2][:panels]},
    )
    top, bottom = axes[0], axes[1]
    sent = np.asarray(_values(series, "src_transferred"))
    received = np.asarray(_values(series, "dst_bytes_received"))
    if t.size:
        top.plot(t, sent / GIB, label="source: bytes sent", color="tab:blue")
        top.plot(
            t, received / GIB, label="destination: bytes received", color="tab:cyan", linestyle="--"
        )
        rate_axis = top.twinx()
        if t.size > 1:
            rate_t, rate = _rate(t, sent)
            rate_axis.plot(
                rate_t,
                rate / MB,
                color="tab:gray",
                alpha=0.6,
                linewidth=0.8,
                label="send rate (100 ms window)",
            )
        limits = record.get("limits") or {}
        if limits.get("throughput_limit"):
            rate_axis.axhline(
                limits["throughput_limit"] / MB,
                color="tab:gray",
                linestyle=":",
                linewidth=0.8,
                label="limit: min(line, fill)",
            )
        rate_axis.set_ylabel("MB/s")
        rate_axis.legend(loc="lower right", fontsize="small")
        for key, label, colour in (
            ("dst_requests_sent", "destination: page requests", "tab:red"),
            ("dst_vcpu_faults", "destination: vCPU faults", "tab:orange"),
            ("src_pages_requested", "source: pages sent on request", "tab:purple"),
        ):
            values = _values(series, key)
            if any(v == v and v > 0 for v in values):  # skip all-NaN or all-zero series
                bottom.plot(t, values, label=label, color=colour)
    if cpu_series and t.size > 1:
        _plot_cpu(axes[2], record, t, cpu_series)
    top.set_ylabel("GiB")
    bottom.set_ylabel("count (cumulative)")
    axes[-1].set_xlabel("seconds after migrate")

    source_events = _events(record, "source")
    destination_events = _events(record, "destination")
    heights = iter([1.0, 0.75, 0.5] * 1000)  # stagger labels: switchover events crowd
    for events, styles in (
        (source_events, SOURCE_EVENTS),
        (destination_events, DESTINATION_EVENTS),
    ):
        for when, entry in events:
            style = styles.get(entry.get("event", ""))
            if style is None:
                continue
            label, colour = style
            for axis in axes:
                axis.axvline(when, color=colour, linewidth=0.8, linestyle="-.")
            try:
                text = label.format(**entry)
            except (KeyError, IndexError):
                text = label
            top.annotate(
                text,
                (when, next(heights)),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize="x-small",
                va="top",
                ha="right",
                color=colour,
            )
    stop = _first(source_events, "stop")
    run = _first(destination_events, "run")
    done = _first(destination_events, "completed")
    if stop is not None and run is not None:
        for axis in axes:
            axis.axvspan(stop, max(run, stop), color="red", alpha=0.25, label=None)
    if (
        run is not None
        and done is not None
        and record["scenario"].get("postcopy_after_rounds") is not None
    ):
        for axis in axes:
            axis.axvspan(run, done, color="green", alpha=0.06)
    top.legend(loc="upper left", fontsize="small")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper left", fontsize="small")
    figures = record.get("figures") or {}
    ratios = record.get("ratios") or {}

    def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, spec)

    figure.suptitle(
        f"{record.get('run_id')} on {record.get('link')} ({record.get('status')}): "
        f"total {fmt(figures.get('total_time_ms'), '.2f', 1000)} s, "
        f"{fmt(figures.get('throughput_bytes_per_s'), '.0f', MB)} MB/s "
        f"({fmt(ratios.get('throughput_vs_limit'), '.2f')}x limit), "
        f"downtime {fmt(figures.get('downtime_us'), '.2f', 1000)} ms, "
        f"req p50 {fmt(figures.get('request_latency_p50_us'), '.0f')} µs "
        f"({fmt(ratios.get('latency_p50_vs_fault_rtt'), '.2f')}x rtt)",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _thread_label(record: dict[str, Any], side: str, tid: str) -> str:
    names = dict(((record.get("cpu") or {}).get(side) or {}).get("names") or {})
    threads = ((record.get("profile") or {}).get(side) or {}).get("threads") or {}
    for key in threads:
        name, _, number = key.rpartition(" (")
        names.setdefault(number.rstrip(")"), name)
    short = "src" if side == "source" else "dst"
    return f"{short} {names.get(tid, 'thread ' + tid)}"


def _plot_cpu(axis: Any, record: dict[str, Any], t: Any, cpu_series: dict[str, Any]) -> None:
    """Cores used by the busiest threads of both VMs, and the host's other processes."""
    import numpy as np

    lines = []
    for side, threads in cpu_series.items():
        for tid, values in threads.items():
            used = np.asarray([np.nan if v is None else v for v in values], dtype=float)
            if used.size != t.size or np.nanmax(used, initial=0.0) < 0.05:
                continue
            lines.append((float(np.nanmax(used)), side, tid, used))
    for _, side, tid, used in sorted(lines, key=lambda line: -line[0])[:7]:
        _, cores = _rate(t, used)
        axis.plot(t, cores, linewidth=0.9, label=_thread_label(record, side, tid))
    host = (record.get("cpu") or {}).get("host") or {}
    if host:
        axis.axhline(host.get("cpus", 2.0), color="black", linewidth=0.6, linestyle=":")
        axis.set_title(
            f"host over the run: {host['busy_cores']:.2f} cores busy, other "
            f"processes {host['others_cores']:.2f}",
            fontsize="x-small",
            loc="right",
        )
    axis.set_ylabel("cores (100 ms window)")
    axis.legend(loc="upper left", fontsize="x-small", ncol=2)


def plot_runs(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per run with a series, named <out stem>-<run id>.png beside `out`."""
    paths = []
    for record in records:
        if not (record.get("series") or {}).get("t"):
            continue
        run_id = re.sub(r"[^A-Za-z0-9._-]+", "-", str(record.get("run_id", "run")))
        link = record.get("link", "link")
        path = out.with_name(f"{out.stem}-{link}-{run_id}.png")
        paths.append(plot_run(record, path))
    return paths
