"""A bench invocation: the link set up once, every scenario run N times, a JSON line each.

The link (and its namespaces) lives for the whole invocation; each run has its own
limits, processes and files. Lines are appended and flushed as runs finish, so an
interrupted bench keeps the runs it completed, and a bench run in pieces into one file
numbers each scenario's runs on from those already there (`make service-bench`). SIGINT
and SIGTERM interrupt the current run; its processes, then the link, are cleaned up
before the bench exits.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postcopy.bench.cleanup import Cleanup
from postcopy.bench.link import open_link
from postcopy.bench.runner import RunOptions, run_scenario
from postcopy.bench.scenarios import Scenario
from postcopy.tools.signals import interruptible

DEFAULT_OUT_DIR = Path("runs")


def output_path(out: Path | None, now: dt.datetime | None = None) -> Path:
    """--out as given if it names a .jsonl file; else bench-<timestamp>.jsonl inside it."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    if out is not None and out.suffix == ".jsonl":
        return out
    return (out or DEFAULT_OUT_DIR) / f"bench-{stamp}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_so_far(out: Path) -> dict[str, int]:
    """The highest repetition of each scenario already in `out` (none: an empty dict)."""
    found: dict[str, int] = {}
    if not out.exists():
        return found
    for record in read_records(out):
        scenario = record.get("scenario")
        name = scenario.get("name") if isinstance(scenario, dict) else None
        repetition = record.get("repetition")
        if isinstance(name, str) and isinstance(repetition, int):
            found[name] = max(found.get(name, 0), repetition)
    return found


@dataclass
class SuiteOptions:
    link: str = "loopback"
    repeat: int = 1
    poll_interval: float = 0.05
    verify: bool = True
    fault_probes: int = 2000
    keep_workdir: bool = False
    profile: bool = False
    wait_idle: float = 0.0


def run_suite(
    scenarios: Sequence[Scenario],
    out: Path,
    options: SuiteOptions,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run each scenario `options.repeat` times on one link; append each record to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    cleanup = Cleanup()
    with interruptible():
        try:
            workdir = Path(tempfile.mkdtemp(prefix="postcopy-bench-"))
            if not options.keep_workdir:
                cleanup.push(f"directory {workdir}", lambda: shutil.rmtree(workdir, True))
            link = open_link(options.link, cleanup)
            run_options = RunOptions(
                link=link,
                workdir=workdir,
                poll_interval=options.poll_interval,
                verify=options.verify,
                fault_probes=options.fault_probes,
                keep_workdir=options.keep_workdir,
                profile_prefix=out.with_suffix("") if options.profile else None,
                wait_idle=options.wait_idle,
            )
            before = runs_so_far(out)
            with out.open("a") as stream:
                for scenario in scenarios:
                    first = before.get(scenario.name, 0) + 1
                    for repetition in range(first, first + options.repeat):
                        record = run_scenario(scenario, repetition, run_options)
                        stream.write(json.dumps(record) + "\n")
                        stream.flush()
                        records.append(record)
                        if on_record is not None:
                            on_record(record)
        finally:
            cleanup.close()
    return records
