"""The `postcopy` command: one subcommand per module of this package, dispatched here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module defines add_parser(subparsers) which registers its subcommand with
# `func=<callable(args) -> int>` as a default.
SUBCOMMAND_MODULES = (
    "postcopy.cli.check",
    "postcopy.cli.vmcmd",
    "postcopy.cli.migrate",
    "postcopy.cli.demo",
    "postcopy.cli.report",
    "postcopy.cli.bench",
    "postcopy.cli.service",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postcopy",
        description="Live migration of KVM micro-VMs with userfaultfd-based postcopy.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("postcopy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
