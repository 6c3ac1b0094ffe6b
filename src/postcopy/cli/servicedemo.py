"""`postcopy demo --service`: a key-value service under load, migrated three ways, compared.

For each mode (precopy, postcopy after one precopy round, the same with postcopy-preempt)
one bench run of the kvstore guest (postcopy.bench.runner, with postcopy.bench.service):
a service front that clients connect to once, a source and a destination VM process
behind it, `postcopy load` sending 5,250 requests/s (every answer checked against a
model of the store), the migration, and x-verify of the guest's table on the
destination. Then the service's figures per mode (p99 latency and the longest gap
without an answer beside the migration's downtime and blocktime, lost, duplicate and
wrong answers), by how much each postcopy mode shortens the worst gap against precopy,
and service.png: request latency over time with the migration's phases as bands, the
modes side by side. The runs are kept as bench records (service.jsonl: `postcopy bench
--from` reads them). Everything started is ended, also on Ctrl-C.

Exit status 0 only if every run completed, every request was answered exactly once and
correctly, and every table verified.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from postcopy.units import parse_size

MODES = {"precopy": "precopy", "postcopy": "postcopy1", "postcopy-preempt": "postcopy1-preempt"}
GiB = 1 << 30
MiB = 1 << 20


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--service",
        action="store_true",
        help="instead: a kvstore service under load (--rate) migrated by precopy, postcopy "
        "and postcopy-preempt in turn, its latency compared (1 vCPU; writes service.jsonl "
        "and service.png)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        metavar="LIST",
        help=f"with --service: the modes, comma-separated (default {','.join(MODES)})",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="with --service: requests per second (default the bench's, 5250: above the "
        "5,000 answered/s it must hold)",
    )


def _ram_name(ram: int) -> str:
    if ram % GiB == 0:
        return f"{ram // GiB}g"
    if ram % MiB == 0:
        return f"{ram // MiB}m"
    raise ValueError(f"--ram {ram}: a whole number of MiB")


def run_service_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from postcopy.bench.scenarios import ScenarioError, parse_name
    from postcopy.bench.servicereport import comparison_lines, plot_service, service_table
    from postcopy.bench.suite import SuiteOptions, run_suite
    from postcopy.migration.hostcheck import check_host

    try:
        ram = parse_size(args.ram)
        modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
        unknown = [mode for mode in modes if mode not in MODES]
        if unknown or not modes:
            raise ValueError(f"--modes: {', '.join(unknown) or 'none'}; known: {', '.join(MODES)}")
        if args.rate is not None and args.rate <= 0:
            raise ValueError(f"--rate {args.rate}: above 0")
        scenarios = []
        for mode in modes:
            scenario = parse_name(f"kvstore-{_ram_name(ram)}-1cpu-{MODES[mode]}")
            if args.rate is None:
                args.rate = float(scenario.load["rate"])
            load = {**scenario.load, "rate": float(args.rate)}
            scenarios.append(dataclasses.replace(scenario, load=load))
    except (ValueError, ScenarioError) as error:
        print(f"postcopy demo: {error}", file=sys.stderr)
        return 2
    report = check_host()
    if not report.postcopy_possible:
        print(f"postcopy demo: {report.summary()}", file=sys.stderr)
        return 1
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a file or pipe: don't squeeze the table
    console.print(
        f"[bold]postcopy demo --service[/]: a {args.ram} kvstore guest answers "
        f"{args.rate:.0f} requests/s through a service front while it migrates by "
        f"{', '.join(modes)} in turn; every answer is checked."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "service.jsonl"
    out.unlink(missing_ok=True)

    def progress(record: dict[str, Any]) -> None:
        figures = record.get("figures") or {}
        if record.get("status") != "completed":
            console.print(
                f"  {record['run_id']}: [red]{record['status']}[/] {record.get('error', '')}"
            )
            return
        console.print(
            f"  {record['scenario']['name']}: {figures.get('service_requests')} requests, "
            f"{figures.get('service_lost')} lost, {figures.get('service_duplicate')} duplicate, "
            f"{figures.get('service_wrong')} wrong; longest gap "
            f"{figures.get('service_longest_gap_ms')} ms; table "
            f"{'verified' if figures.get('verify_ok') else '[red]NOT verified[/]'}"
        )

    try:
        records = run_suite(
            scenarios, out, SuiteOptions(repeat=1, fault_probes=200), on_record=progress
        )
    except KeyboardInterrupt:
        print("postcopy demo: interrupted; everything it started is removed", file=sys.stderr)
        return 130
    table = service_table(records)
    if table is not None:
        console.print(table)
    for line in comparison_lines(records):
        console.print(line)
    console.print(f"runs written to {out} (`postcopy bench --from {out} --plot`)")
    try:
        png = plot_service(records, args.out / "service.png")
        if png is not None:
            console.print(f"latency over time, the modes side by side: {png}")
    except ImportError:
        console.print("no plot: matplotlib is not installed (pip install 'postcopy[plot]')")
    good = all(
        r.get("status") == "completed"
        and (r.get("figures") or {}).get("service_clean")
        and (r.get("figures") or {}).get("verify_ok")
        for r in records
    )
    if not good:
        print(
            "postcopy demo: a run failed, lost or misanswered a request, or did not verify",
            file=sys.stderr,
        )
    return 0 if good and len(records) == len(scenarios) else 1
