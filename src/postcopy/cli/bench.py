"""`postcopy bench`: migration benchmarks, each figure set against its limit in the same run.

    postcopy bench --list
    postcopy bench                                  # the default set, loopback
    postcopy bench memtouch-1g-1cpu-postcopy1 --repeat 5 --plot
    postcopy bench 'randwrite-*' --link 1gbit --out runs/
    postcopy bench --from runs/bench-20250101-120000.jsonl --plot

Benchmarks measure; they assert nothing. Results are JSON lines (see benchmarks/README.md
for every field); --plot draws a PNG timeline per run next to the output file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    from postcopy.bench.link import LINK_RATES

    bench = subparsers.add_parser(
        "bench",
        help="run migration benchmarks and report each figure against its limit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="scenario names, set names (default, smoke, all, ...) or glob "
        "patterns; default: the set 'default'",
    )
    bench.add_argument(
        "--repeat", type=int, default=3, metavar="N", help="runs of each scenario (default 3)"
    )
    bench.add_argument(
        "--link",
        choices=list(LINK_RATES),
        default="loopback",
        help="loopback, or two network namespaces joined by a veth pair "
        "shaped to 1 or 10 Gbit/s (root only)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="a .jsonl file, or a directory for bench-<timestamp>.jsonl (default runs/)",
    )
    bench.add_argument(
        "--plot", action="store_true", help="draw a PNG timeline per run next to the output file"
    )
    bench.add_argument("--list", action="store_true", help="list scenarios and sets, then exit")
    bench.add_argument(
        "--from",
        dest="from_file",
        type=Path,
        metavar="FILE.jsonl",
        help="run nothing: summarise (and with --plot, draw) earlier results",
    )
    bench.add_argument(
        "--scenario-dir",
        type=Path,
        action="append",
        metavar="DIR",
        help="read *.toml scenario files from DIR (default: benchmarks/)",
    )
    bench.add_argument(
        "--poll-ms",
        type=float,
        default=50.0,
        help="query-migrate interval on both sides during a run (default 50)",
    )
    bench.add_argument(
        "--fault-probes",
        type=int,
        default=2000,
        metavar="N",
        help="faults timed by the raw fault round-trip probe (default 2000)",
    )
    bench.add_argument(
        "--no-verify",
        action="store_true",
        help="skip x-verify of the destination's guest after each run",
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="sample both VM processes with py-spy during each migration; "
        "per-thread summary in the JSON line, raw stacks beside it",
    )
    bench.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to SECONDS for the host's cores to be "
        "idle (other processes move every figure on 2 shared cores)",
    )
    bench.add_argument(
        "--wide",
        action="store_true",
        help="show every column of the summary, however wide (by default the table "
        "fits the terminal)",
    )
    bench.add_argument(
        "--keep",
        action="store_true",
        help="keep each run's directory (sockets, consoles, traces, stderr)",
    )
    bench.set_defaults(func=run_bench)


def _list(catalogue: Any) -> int:
    from postcopy.bench.scenarios import GRID_GUESTS, GRID_MODES, GRID_RAM, GRID_VCPUS

    print("Sets:")
    for name, members in catalogue.sets.items():
        shown = members if name != "all" else [f"{len(members)} scenarios: the grid below"]
        print(f"  {name}: {', '.join(shown)}")
    print("\nScenario names: <guest>-<ram>-<N>cpu-<precopy|postcopyN>[-preempt][-cpl0]")
    print(
        f"  grid ('all'): guests {', '.join(GRID_GUESTS)}; RAM {', '.join(GRID_RAM)}; "
        f"vCPUs {', '.join(map(str, GRID_VCPUS))}; modes {', '.join(GRID_MODES)}"
    )
    print(
        "  precopy = postcopy off; postcopy0 = postcopy from the start; "
        "postcopyN = after N precopy rounds; -cpl0 = the guest at CPL0 (emulated here, "
        "slow, like QEMU's own test guest)"
    )
    default = set(catalogue.sets.get("default", []))
    for name in catalogue.known_names():
        scenario = catalogue.scenario(name)
        mark = "*" if name in default else " "
        note = f"  {scenario.description}" if scenario.description else ""
        print(f"  {mark} {name}{note}")
    print("\n  * in the default set")
    if catalogue.sources:
        print("Scenario files: " + ", ".join(str(p) for p in catalogue.sources))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from postcopy.bench.link import LinkError
    from postcopy.bench.scenarios import ScenarioError, load_catalogue
    from postcopy.bench.suite import SuiteOptions, output_path, read_records, run_suite
    from postcopy.bench.table import print_summary

    try:
        catalogue = load_catalogue(args.scenario_dir)
    except ScenarioError as error:
        print(f"postcopy bench: {error}", file=sys.stderr)
        return 2
    if args.list:
        return _list(catalogue)
    if args.from_file is not None:
        records = read_records(args.from_file)
        print_summary(records, wide=args.wide)
        if args.plot:
            _plot(records, args.from_file)
        return 0
    if args.repeat < 1:
        print("postcopy bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        scenarios = catalogue.resolve(args.scenarios or ["default"])
    except ScenarioError as error:
        print(f"postcopy bench: {error}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "postcopy bench: --plot needs matplotlib (pip install 'postcopy[plot]')",
                file=sys.stderr,
            )
            return 2
    out = output_path(args.out)
    options = SuiteOptions(
        link=args.link,
        repeat=args.repeat,
        poll_interval=args.poll_ms / 1000,
        verify=not args.no_verify,
        fault_probes=args.fault_probes,
        keep_workdir=args.keep,
        profile=args.profile,
        wait_idle=args.wait_idle,
    )
    total = len(scenarios) * args.repeat
    print(
        f"postcopy bench: {total} run(s) of {len(scenarios)} scenario(s) on {args.link}, "
        f"results in {out}",
        file=sys.stderr,
    )

    def progress(record: dict[str, Any]) -> None:
        figures = record.get("figures") or {}
        total_ms = figures.get("total_time_ms")
        summary = f"{total_ms / 1000:.2f} s" if total_ms is not None else ""
        print(
            f"  {record['run_id']}: {record['status']} {summary} "
            f"{record.get('error', '')}".rstrip(),
            file=sys.stderr,
        )

    try:
        records = run_suite(scenarios, out, options, on_record=progress)
    except LinkError as error:
        print(f"postcopy bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("postcopy bench: interrupted; everything it started is cleaned up", file=sys.stderr)
        return 130
    print_summary(records, wide=args.wide)
    if args.plot:
        _plot(records, out)
    return 0 if all(r["status"] == "completed" for r in records) else 1


def _plot(records: list[dict[str, Any]], out: Path) -> None:
    from postcopy.bench.plot import plot_runs
    from postcopy.bench.servicereport import plot_service

    for path in plot_runs(records, out):
        print(f"plot: {path}", file=sys.stderr)
    service = plot_service(records, out.with_name(f"{out.stem}-service.png"))
    if service is not None:
        print(f"plot of the service: {service}", file=sys.stderr)
