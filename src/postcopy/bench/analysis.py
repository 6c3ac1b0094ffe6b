"""Figures of a run, each set against its limit, and the issue's targets judged.

From a run record's raw material (both sides' final query-migrate, the destination's
memory, the limits measured on the same link, the timelines) come:

- `figures`: flat, named, in base units (bytes, bytes per second, microseconds, ms);
- `ratios`: throughput / min(line rate, fill rate), and against each of the two; request
  latency p50 / raw fault round trip p50 (and / the handler's part of it); downtime / the
  5 ms target (QEMU's downtime: stop to device state sent; and the stricter stop to the
  destination's confirmation that the guest runs); destination memory beyond guest RAM /
  guest RAM;
- `targets`: each ratio's bound from the issue and whether this run met it (None when
  the figure does not exist in this run, e.g. request latency in precopy).

Throughput is bytes on the wire over the source's total time (setup included), the
figure QEMU's reference numbers for this machine kind describe.
"""

from __future__ import annotations

from typing import Any

from postcopy.bench.service import service_figures
from postcopy.migration import trace_points as tp
from postcopy.tools.runfile import Run

DOWNTIME_TARGET_US = 5000.0
OUTAGE_TAIL = 1.0  # s: "around the outage" runs from the first pause to this after the resume
TARGETS: dict[str, tuple[str, float]] = {
    "throughput_vs_limit": (">=", 0.70),
    "bulk_round_vs_line_rate": (">=", 0.50),  # issue 5
    "latency_p50_vs_fault_rtt": ("<=", 2.0),
    "downtime_vs_target": ("<=", 1.0),
    "rss_overhead_vs_guest_ram": ("<=", 0.05),
}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def bench_run(record: dict[str, Any]) -> Run:
    """The migration of a bench record: its run records (schema 3), on one clock."""
    return Run.from_records(record.get("run") or [])


def bulk_round(run: Run) -> tuple[int, float] | None:
    """Bytes sent in the first precopy round (all of RAM) and its seconds, from the
    source's round-start/round-end timeline entries. A round that postcopy cut short (a
    management tool's switch on the sync inside it) has no end: up to that sync, then,
    which comes with most of RAM sent."""
    start = end = None
    for entry in run.events_of("source", tp.ROUND_START):
        if entry.get("round") == 1:
            start = (float(entry["t"]), entry.get("transferred"))
    for point in (tp.ROUND_END, tp.ROUND_SYNC):
        for entry in run.events_of("source", point):
            if entry.get("round") == 1 and end is None:
                end = (float(entry["t"]), entry.get("transferred"))
    if start is None or end is None or start[1] is None or end[1] is None or end[0] <= start[0]:
        return None
    return int(end[1]) - int(start[1]), end[0] - start[0]


def figures(record: dict[str, Any]) -> dict[str, Any]:
    run = bench_run(record)
    src, dst = run.source, run.destination
    ram = src.get("ram") or {}
    latency = dst.get("x-request-latency") or {}
    placement = dst.get("x-huge-page-placement-us") or {}
    total_ms = src.get("total-time")
    transferred = ram.get("transferred")
    throughput = transferred / (total_ms / 1000) if transferred is not None and total_ms else None
    downtime_us = src.get("x-downtime-us")
    if downtime_us is None and src.get("downtime") is not None:
        downtime_us = float(src["downtime"]) * 1000
    memory = record.get("destination_memory") or {}
    source_memory = record.get("source_memory") or {}
    switchover = run.first("source", tp.STOP)
    run_at = run.first("destination", tp.RUN)
    postcopy = src.get("x-postcopy") or {}
    verify = record.get("verify") or {}
    bulk = bulk_round(run)
    migration_overhead = None
    if memory.get("overhead") is not None and source_memory.get("overhead") is not None:
        migration_overhead = memory["overhead"] - source_memory["overhead"]
    return {
        "guest_ram_bytes": (record.get("scenario") or {}).get("ram"),
        "total_time_ms": total_ms,
        "setup_time_ms": src.get("setup-time"),
        "downtime_ms": src.get("downtime"),
        "downtime_us": downtime_us,
        "downtime_to_run_us": src.get("x-downtime-to-run-us"),
        "stop_to_destination_run_us": (
            round((run_at - switchover) * 1e6, 1)
            if run_at is not None and switchover is not None
            else None
        ),
        "switchover_at_ms": round(switchover * 1000, 1) if switchover is not None else None,
        "postcopy_phase_ms": (
            round(total_ms - switchover * 1000, 1)
            if switchover is not None
            and total_ms is not None
            and src.get("ram", {}).get("postcopy-bytes")
            else None
        ),
        "discarded_pages": postcopy.get("discarded-pages"),
        "needed_pages_at_switchover": postcopy.get("needed-pages"),
        "rounds": src.get("x-rounds"),
        "transferred_bytes": transferred,
        "throughput_bytes_per_s": round(throughput) if throughput is not None else None,
        "bulk_round_bytes": bulk[0] if bulk else None,
        "bulk_round_ms": round(bulk[1] * 1000, 1) if bulk else None,
        "bulk_round_bytes_per_s": round(bulk[0] / bulk[1]) if bulk else None,
        # guest RAM covered per second: zero pages cross as markers, so for a sparse guest
        # this is far above the bytes on the wire
        "bulk_round_ram_bytes_per_s": (
            round(int((record.get("scenario") or {}).get("ram") or 0) / bulk[1]) if bulk else None
        ),
        "mbps": ram.get("mbps"),
        "precopy_bytes": ram.get("precopy-bytes"),
        "downtime_bytes": ram.get("downtime-bytes"),
        "postcopy_bytes": ram.get("postcopy-bytes"),
        "normal_pages": ram.get("normal"),
        "zero_pages": ram.get("duplicate"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "postcopy_requests": ram.get("postcopy-requests"),
        "pages_pushed": ram.get("x-pages-pushed"),
        "pages_requested": ram.get("x-pages-requested"),
        "destination_requests_sent": dst.get("x-postcopy-requests-sent"),
        "destination_duplicate_pages": dst.get("x-duplicate-pages"),
        "destination_local_zero_faults": dst.get("x-local-zero-faults"),
        "destination_total_time_ms": dst.get("total-time"),
        "blocktime_ms": dst.get("postcopy-blocktime"),
        "blocktime_us": dst.get("x-postcopy-blocktime-us"),
        "vcpu_blocktime_ms": dst.get("postcopy-vcpu-blocktime"),
        "vcpu_blocktime_us": dst.get("x-postcopy-vcpu-blocktime-us"),
        "vcpu_faults": dst.get("x-postcopy-vcpu-faults"),
        "vcpu_slept_us": dst.get("x-vcpu-slept-us"),
        **_per_run_figures(record, src, dst),
        "request_latency_count": latency.get("count"),
        "request_latency_p50_us": latency.get("p50-us") if latency.get("count") else None,
        "request_latency_p99_us": latency.get("p99-us") if latency.get("count") else None,
        "request_latency_max_us": latency.get("max-us") if latency.get("count") else None,
        # huge pages: each placement's ioctl (2 MiB COPY, or CONTINUE in minor-fault mode)
        "huge_page_placement_count": placement.get("count"),
        "huge_page_placement_p50_us": placement.get("p50"),
        "huge_page_placement_p99_us": placement.get("p99"),
        "huge_page_placement_cpu_p50_us": placement.get("cpu-p50"),
        "placement": "/".join(sorted(set((dst.get("x-placement") or {}).values()))) or None,
        "destination_rss_bytes": memory.get("rss"),
        "destination_peak_rss_bytes": memory.get("peak_rss"),
        "destination_guest_rss_bytes": memory.get("guest_rss"),
        "destination_overhead_bytes": memory.get("overhead"),
        "destination_peak_overhead_bytes": memory.get("peak_overhead"),
        "destination_anon_overhead_bytes": memory.get("anon_overhead"),
        "destination_rss_minus_guest_ram_bytes": memory.get("rss_minus_guest_ram"),
        "source_overhead_bytes": source_memory.get("overhead"),
        "migration_memory_overhead_bytes": migration_overhead,
        "destination_console_passes": record.get("destination_console_passes"),
        "verify_ok": verify.get("ok"),
        **_cpu_figures(record, dst.get("x-bytes-received")),
        **service_figures(record),
        **_recovery_figures(record, run),
    }


def _recovery_figures(record: dict[str, Any], run: Run) -> dict[str, Any]:
    """A -cut scenario: where the link broke, how long the migration stayed paused, how
    long a reconnect took to be active again, and what crossed twice."""
    src, dst = run.source, run.destination
    if not src.get("x-pauses") and "cut" not in record:
        return {}
    connected = run.first("source", tp.RECOVER_CONNECT)
    resumed = [float(e["t"]) for e in run.events_of("source", tp.RESUMED)]
    after = [t for t in resumed if connected is not None and t >= connected]
    cut = record.get("cut") or {}
    return {
        "cut_frame_type": cut.get("frame_type"),
        "cut_frame_offset": cut.get("frame_offset"),
        "pauses": src.get("x-pauses"),
        "recoveries": src.get("x-recoveries"),
        "recovery_attempts": src.get("x-recovery-attempts"),
        "paused_ms": src.get("x-paused-ms"),
        "reconnect_to_active_ms": (
            round((after[0] - connected) * 1000, 1) if after and connected is not None else None
        ),
        "recovery_resent_pages": src.get("x-recovery-resent-pages"),
        "pending_pages_at_resume": dst.get("x-pending-pages"),
        "pending_pages_served_ms": dst.get("x-pending-pages-ms"),
        **outage_blocktime(run),
    }


def outage_blocktime(run: Run) -> dict[str, Any]:
    """The destination's blocktime (all vCPUs blocked at once, QEMU's postcopy-blocktime)
    that accrued around the outage, from the first pause on either side to OUTAGE_TAIL
    after the last resume, and in a window as long just before the pause (from the
    switchover at most), from the samples' live x-postcopy-blocktime-us: a vCPU blocked
    through the outage counts when its page comes, after the resume."""
    pauses = [t for side in ("source", "destination") if (t := run.first(side, tp.PAUSED))]
    resumed = [float(e["t"]) for e in run.events_of("destination", tp.RESUMED)]
    samples = [
        (float(s["t"]), float(s["blocktime-us"])) for s in run.samples if "blocktime-us" in s
    ]
    if not pauses or not resumed or not samples:
        return {}
    start, end = min(pauses), max(resumed) + OUTAGE_TAIL
    final = run.destination.get("x-postcopy-blocktime-us")

    def at(t: float, after: bool) -> float:
        """The blocktime at the sample just before `t` (or just after it, or the final
        figure if the migration ended first)."""
        if after:
            later = [value for when, value in samples if when >= t]
            return later[0] if later else float(final if final is not None else samples[-1][1])
        earlier = [value for when, value in samples if when <= t]
        return earlier[-1] if earlier else 0.0

    before_start = max(start - (end - start), run.switchover() or 0.0)
    return {
        "outage_window_ms": round((end - start) * 1000, 1),
        "outage_blocktime_ms": round((at(end, True) - at(start, False)) / 1000, 1),
        "before_outage_window_ms": round((start - before_start) * 1000, 1),
        "before_outage_blocktime_ms": round((at(start, False) - at(before_start, False)) / 1000, 1),
    }


def _per_run_figures(
    record: dict[str, Any], src: dict[str, Any], dst: dict[str, Any]
) -> dict[str, Any]:
    """What the comparison with QEMU reads: the worst vCPU's blocktime (QEMU 7.2's
    all-vCPU total undercounts), whether postcopy really happened, faults and requests per
    GiB, the precopy bytes against RAM (passes before the switch), and the switch itself."""
    ram = src.get("ram") or {}
    per_vcpu = dst.get("postcopy-vcpu-blocktime") or []
    per_vcpu_us = dst.get("x-postcopy-vcpu-blocktime-us") or []
    gib = int((record.get("scenario") or {}).get("ram") or 0) / (1 << 30)
    requests, faults = ram.get("postcopy-requests"), dst.get("x-postcopy-vcpu-faults")
    switch = record.get("switch") or {}
    return {
        "worst_vcpu_blocktime_ms": max(per_vcpu) if per_vcpu else None,
        "worst_vcpu_blocktime_us": max(per_vcpu_us) if per_vcpu_us else None,
        "postcopy_happened": bool(ram.get("postcopy-bytes")) and "x-postcopy" in src,
        "postcopy_requests_per_gib": round(requests / gib, 1) if requests and gib else None,
        "vcpu_faults_per_gib": round(faults / gib, 1) if faults and gib else None,
        "precopy_bytes_vs_ram": (
            round(ram["precopy-bytes"] / (gib * (1 << 30)), 3)
            if ram.get("precopy-bytes") is not None and gib
            else None
        ),
        "switch_requested_at_ms": (
            round(switch["requested_at_s"] * 1000, 1)
            if switch.get("requested_at_s") is not None
            else None
        ),
        "switch_dirty_sync_count": switch.get("count_at_switch"),
    }


def _cpu_figures(record: dict[str, Any], received: int | None) -> dict[str, Any]:
    """CPU the migration itself cost each side (the process minus its vCPU threads) and
    the host's load: on two shared cores the first figure explains most rates."""
    cpu = record.get("cpu") or {}
    found: dict[str, Any] = {}
    for side, short in (("source", "source"), ("destination", "destination")):
        usage = cpu.get(side) or {}
        if not usage:
            continue
        vcpus = {
            tid
            for tid, name in (usage.get("names") or {}).items()
            if name.startswith(("vcpu", "kvm"))
        }  # guest and KVM kernel threads
        migration = sum(s for tid, s in usage["threads"].items() if tid not in vcpus)
        found[f"{short}_cpu_seconds"] = usage.get("total")
        found[f"{short}_migration_cpu_seconds"] = round(migration, 3)
        found[f"{short}_vcpu_cpu_seconds"] = round(usage["total"] - migration, 3)
    if received and found.get("destination_migration_cpu_seconds"):
        found["destination_bytes_per_cpu_second"] = round(
            received / found["destination_migration_cpu_seconds"]
        )
    host = cpu.get("host") or {}
    found["host_busy_cores"] = host.get("busy_cores")
    found["host_other_processes_cores"] = host.get("others_cores")
    return found


def ratios(figures: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    throughput = figures["throughput_bytes_per_s"]
    latency = figures["request_latency_p50_us"]
    guest_ram = figures["guest_ram_bytes"]
    return {
        "throughput_vs_limit": _ratio(throughput, limits.get("throughput_limit")),
        "throughput_vs_line_rate": _ratio(throughput, limits.get("line_rate")),
        "throughput_vs_fill_rate": _ratio(throughput, limits.get("fill_rate")),
        "bulk_round_vs_line_rate": _ratio(
            figures.get("bulk_round_bytes_per_s"), limits.get("line_rate")
        ),
        # issue 18's target: the bulk round against min(line rate, first-touch fill rate)
        "bulk_round_vs_limit": _ratio(
            figures.get("bulk_round_bytes_per_s"), limits.get("throughput_limit")
        ),
        "latency_p50_vs_fault_rtt": _ratio(latency, limits.get("fault_rtt_p50_us")),
        "latency_p50_vs_handler_rtt": _ratio(latency, limits.get("handler_rtt_p50_us")),
        "latency_p50_vs_one_cpu_fault_rtt": _ratio(latency, limits.get("fault_rtt_one_cpu_p50_us")),
        "latency_p99_vs_fault_rtt_p99": _ratio(
            figures["request_latency_p99_us"], limits.get("fault_rtt_p99_us")
        ),
        "downtime_vs_target": _ratio(figures["downtime_us"], DOWNTIME_TARGET_US),
        "downtime_to_run_vs_target": _ratio(figures["downtime_to_run_us"], DOWNTIME_TARGET_US),
        "rss_overhead_vs_guest_ram": _ratio(figures["destination_overhead_bytes"], guest_ram),
        "peak_rss_overhead_vs_guest_ram": _ratio(
            figures["destination_peak_overhead_bytes"], guest_ram
        ),
        "migration_overhead_vs_guest_ram": _ratio(
            figures["migration_memory_overhead_bytes"], guest_ram
        ),
    }


def judge(ratios: dict[str, Any]) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    for name, (op, bound) in TARGETS.items():
        value = ratios.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        verdicts[name] = {"bound": f"{op} {bound}", "value": value, "met": met}
    return verdicts


def limits_for(record: dict[str, Any]) -> dict[str, Any]:
    """The run's limits as its ratios take them. A `-prealloc` run's destination writes to
    memory populated before the run, never to fresh memory: its throughput limit is
    min(line rate, warm fill rate), not the first-touch fill rate."""
    limits = dict(record.get("limits") or {})
    if (record.get("scenario") or {}).get("prealloc") and limits.get("warm_fill_rate"):
        line, warm = limits.get("line_rate"), limits["warm_fill_rate"]
        limits["throughput_limit"] = min(line, warm) if line else warm
    return limits


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    """{"figures", "ratios", "targets"} for a run record."""
    found = figures(record)
    found_ratios = ratios(found, limits_for(record))
    return {"figures": found, "ratios": found_ratios, "targets": judge(found_ratios)}
