"""`postcopy check`: the host capability report, as a table or one JSON object.

The checks themselves live in postcopy.migration.hostcheck, because the destination runs
the same report at ADVISE and refuses postcopy with its failing items.
"""

from __future__ import annotations

import argparse
import json
import sys

from postcopy.linux import memory
from postcopy.migration.hostcheck import HostReport, check_host
from postcopy.units import parse_size

# -- the command ------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="can this host be a postcopy destination?",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--hugepages",
        metavar="SIZE",
        action="append",
        default=[],
        help="also check RAM on huge pages of SIZE (e.g. 2M, 1G)",
    )
    parser.add_argument(
        "--shared-ram", action="store_true", help="check for RAM that is shared (memfd/MAP_SHARED)"
    )
    parser.add_argument(
        "--memory-backend",
        metavar="BACKEND",
        action="append",
        default=[],
        help="check for RAM on this backend, as `vm run` takes it: ram, memfd, memfd-hugetlb, "
        "file:PATH (the huge page pool, the mount, the userfaultfd features it needs)",
    )
    parser.add_argument(
        "--ram", metavar="SIZE", help="the RAM size, to check the huge page pool holds it"
    )
    parser.add_argument(
        "--minor-faults",
        action="store_true",
        help="check for x-postcopy-minor-faults (MINOR_SHMEM/MINOR_HUGETLBFS + CONTINUE)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="say what every check is for, not only the failing ones",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from postcopy.migration.backendcheck import memory_type_of_backend
    from postcopy.ram import BackendError, MemoryBackend

    try:
        huge = [parse_size(size) for size in getattr(args, "hugepages", [])]
    except ValueError as error:
        print(f"postcopy check: --hugepages {error}", file=sys.stderr)
        return 2
    sizes = [memory.page_size(), *huge]
    types: list[str] = []
    hugetlbfs_file = bool(getattr(args, "hugepages", []))
    try:
        for text in getattr(args, "memory_backend", []):
            backend = MemoryBackend.parse(text)
            kind, page_size = memory_type_of_backend(backend.kind, backend.path, backend.shared)
            types.append(kind)
            sizes.append(page_size)
            hugetlbfs_file |= backend.kind == "file" and kind == "hugetlb"
        ram = getattr(args, "ram", None)
        ram_bytes = parse_size(ram) if ram else None
    except (BackendError, ValueError, OSError) as error:
        print(f"postcopy check: {error}", file=sys.stderr)
        return 2
    report = check_host(
        ram_page_sizes=tuple(sorted(set(sizes))),
        shared_ram=getattr(args, "shared_ram", False),
        memory_types=tuple(types),
        minor=getattr(args, "minor_faults", False),
        ram_bytes=ram_bytes,
        hugetlbfs_file=hugetlbfs_file,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=None, sort_keys=False))
    else:
        _print_human(report, explain=getattr(args, "explain", False))
    return 0 if report.postcopy_possible else 1


def _print_human(report: HostReport, *, explain: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title="postcopy: host capabilities", show_lines=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("result")
    for item in report.items:
        if item.ok:
            mark = Text("ok", style="green")
        elif item.required:
            mark = Text("FAIL", style="bold red")
        else:
            mark = Text("warn", style="yellow")
        result = Text(item.detail)
        if item.why and (explain or not item.ok):
            result.append(f"\n{item.why}", style="dim")
        table.add_row(mark, item.name, result)
    console.print(table)
    for item in report.failures + report.warnings:
        if item.fix:
            label = "fix" if item.required else "hint"
            console.print(
                Text.assemble((f"{label} ", "bold"), (f"{item.name}: ", "bold"), item.fix),
                soft_wrap=True,
            )
    verdict = (
        report.summary()
        if report.postcopy_possible
        else (
            "postcopy migration is NOT possible on this host: "
            + ", ".join(item.name for item in report.failures)
        )
    )
    console.print(Text(verdict, style="bold green" if report.postcopy_possible else "bold red"))
