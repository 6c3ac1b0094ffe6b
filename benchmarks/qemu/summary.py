"""Ours against QEMU 7.2 from one compare.sh session: medians side by side, per setup.

    .venv/bin/python benchmarks/qemu/summary.py OUT_DIR

Reads OUT_DIR/ours.jsonl (postcopy bench records) and OUT_DIR/qemu-*.jsonl (run.py) and
prints, per setup (1g, 1g-cpl0, 4g, hugetlbfs, each maybe -preempt and -prealloc; ours
also in minor-fault mode beside QEMU's setup, e.g. hugetlbfs-minor, from
compare-hugetlbfs.sh's EXTRA): total time, downtime and the worst vCPU's blocktime (QEMU
7.2's all-vCPU total undercounts) on both sides with issue 18's ratios (total <= 1/3 of
QEMU's, downtime <= QEMU's, blocktime <= 1/2 of QEMU's), whether postcopy really happened
in every run, page requests per GiB, and ours' bulk round against min(line rate, fill
rate) and request latency against the raw fault round trip of the same run. Medians of
the completed runs; [min-max] beside them.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def setup_of_ours(record: dict[str, Any]) -> str:
    """The name of QEMU's file it compares with (qemu-<setup>.jsonl), "-minor" added for
    minor-fault mode; huge page runs are named by the backend (compare-hugetlbfs.sh)."""
    scenario = record.get("scenario") or {}
    ram = int(scenario.get("ram") or 0) >> 30
    backend = scenario.get("backend") or "ram"
    if backend in ("hugetlbfs", "memfd-hugetlb"):
        name = "hugetlbfs"  # QEMU's side is always a file on hugetlbfs
    else:
        name = f"{ram}g" + ("-cpl0" if scenario.get("cpl") == 0 else "")
    name += "-preempt" if scenario.get("preempt") else ""
    name += "-prealloc" if scenario.get("prealloc") else ""
    return name + ("-minor" if scenario.get("minor") else "")


def spread(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    middle = statistics.median(present)
    if len(present) == 1:
        return f"{middle:.4g}"
    return f"{middle:.4g} [{min(present):.4g}-{max(present):.4g}]"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    ours: dict[str, list[dict[str, Any]]] = {}
    for record in load(out / "ours.jsonl"):
        if record.get("status") == "completed":
            ours.setdefault(setup_of_ours(record), []).append(record)
    for path in sorted(out.glob("qemu-*.jsonl")):
        setup = path.stem.removeprefix("qemu-")
        qemu = [r for r in load(path) if r.get("status") == "completed"]
        for variant in sorted(v for v in ours if v.removesuffix("-minor") == setup) or [setup]:
            compare(variant, ours.get(variant, []), qemu)
    return 0


def compare(setup: str, mine: list[dict[str, Any]], qemu: list[dict[str, Any]]) -> None:
    fig = [r.get("figures") or {} for r in mine]
    rat = [r.get("ratios") or {} for r in mine]
    print(f"## {setup}: ours {len(mine)} runs, QEMU {len(qemu)} runs")
    print("| | ours | QEMU | ours/QEMU (target) |")
    print("|---|---|---|---|")
    compared = (
        ("total ms", "total_time_ms", 1, "total_time_ms", "<= 0.33"),
        ("downtime ms", "downtime_us", 1000, "downtime_ms", "<= 1"),
        ("worst vCPU blocktime ms", "worst_vcpu_blocktime_us", 1000,
         "worst_vcpu_blocktime_ms", "<= 0.5"),
    )  # fmt: skip
    for label, key, scale, qkey, target in compared:
        mine_values = [f[key] / scale if f.get(key) is not None else None for f in fig]
        theirs = [r.get(qkey) for r in qemu]
        quotient = ratio(median(mine_values), median(theirs))
        print(f"| {label} | {spread(mine_values)} | {spread(theirs)} | {quotient} ({target}) |")
    happened = sum(1 for f in fig if f.get("postcopy_happened"))
    q_happened = sum(1 for r in qemu if r.get("postcopy"))
    print(f"| postcopy happened | {happened}/{len(fig)} | {q_happened}/{len(qemu)} | |")
    for label, key in (
        ("precopy bytes / RAM", "precopy_bytes_vs_ram"),
        ("postcopy requests per GiB", "postcopy_requests_per_gib"),
    ):
        mine_values = [f.get(key) for f in fig]
        print(f"| {label} | {spread(mine_values)} | {spread([r.get(key) for r in qemu])} | |")
    print(f"| vCPU faults per GiB | {spread([f.get('vcpu_faults_per_gib') for f in fig])} | - | |")
    for label, key in (
        ("request p50 µs", "request_latency_p50_us"),
        ("2 MiB placement p50 µs", "huge_page_placement_p50_us"),
        ("2 MiB placement CPU p50 µs", "huge_page_placement_cpu_p50_us"),
    ):
        print(f"| {label} | {spread([f.get(key) for f in fig])} | - | |")
    for label, key, target in (
        ("bulk round / min(line, fill)", "bulk_round_vs_limit", ">= 0.7"),
        ("request p50 / fault RTT p50", "latency_p50_vs_fault_rtt", "<= 2"),
        ("request p99 / fault RTT p99", "latency_p99_vs_fault_rtt_p99", "<= 5"),
    ):
        print(f"| {label} | {spread([r.get(key) for r in rat])} | - | ({target}) |")
    hops: dict[str, list[tuple[float, float]]] = {}
    for record in mine:
        for hop, values in (record.get("request_hops") or {}).items():
            hops.setdefault(hop, []).append((values["p50-us"], values["p99-us"]))
    for hop, values in hops.items():
        p50s, p99s = [v[0] for v in values], [v[1] for v in values]
        print(f"| hop {hop}, p50 / p99 µs | {spread(p50s)} / {spread(p99s)} | - | |")
    print()


if __name__ == "__main__":
    sys.exit(main())
