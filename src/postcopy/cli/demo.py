"""`postcopy demo`: one whole postcopy migration on this machine, shown and verified.

With --cut-link the link goes through a proxy that breaks it (a TCP reset of every
connection) in the middle of postcopy: both sides pause, keeping every page, the source
reconnects by itself (x-postcopy-auto-recover) and the migration goes on from what the
destination has received.

It starts two `postcopy vm run` processes — a source running the memtouch guest and a
destination waiting on a free loopback port with postcopy-ram, postcopy-preempt and
postcopy-blocktime enabled — lets the guest make a few passes over its memory, migrates
it with one precopy round and then postcopy (the same live display as `postcopy
migrate`), checks that the guest kept running on the destination, stops it there and
verifies every page of its memory (x-verify), prints both sides' figures and writes the
run and its timeline PNG. Every process (ended by PID), socket and temporary file it
created is removed at the end, also after a failure, Ctrl-C or SIGTERM.

Exit status 0 only when the migration completed and the verification passed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from postcopy.cli.migrate import MigrateError, MigrateOptions, Migration, failure_line
from postcopy.cli.report import ReportError, summary_table, write_png
from postcopy.tools.qmpclient import QmpClientError
from postcopy.tools.runfile import RunFileError, RunWriter, load_run
from postcopy.tools.signals import interruptible, signals_ignored
from postcopy.tools.vmchild import VmChild, VmChildError, free_port
from postcopy.units import format_bytes, parse_rate, parse_size

DEMO_CAPABILITIES = ("postcopy-ram", "postcopy-preempt", "postcopy-blocktime")
SERVICE_GUEST = "kvstore"  # a service, not a guest that makes passes: `demo --service`
PASSES_TIMEOUT = 60.0  # seconds for the guest to make the passes we wait for
CUT_AFTER_PACKAGE = 4 << 20  # --cut-link: bytes of the postcopy push before the cut


class DemoError(Exception):
    """The demo cannot go on; the message is the user's one line."""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start two VMs, migrate one to the other with postcopy, verify it",
        description="Start a source VM and a destination, migrate the running guest with one "
        "precopy round then postcopy, verify its memory on the destination, and "
        "clean everything up. Exit status 0 when the migration completed and the "
        "guest's memory verified.",
    )
    parser.add_argument("--ram", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--vcpus", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument(
        "--guest",
        default="memtouch",
        help="built-in guest (default memtouch; see `postcopy vm guests`; the kvstore "
        "service: --service)",
    )
    parser.add_argument(
        "--max-bandwidth",
        metavar="RATE",
        help="cap the link, e.g. 100M (bytes per second, precopy and postcopy "
        "alike), to watch a slow migration",
    )
    parser.add_argument(
        "--cut-link",
        action="store_true",
        help="break the link (a TCP reset) in the middle of postcopy and watch the "
        "migration pause and recover by itself",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("postcopy-demo"),
        metavar="DIR",
        help="where to write run.jsonl and timeline.png (default ./postcopy-demo)",
    )
    parser.add_argument(
        "--keep-dir",
        action="store_true",
        help="keep the working directory (consoles, logs, traces) at the end",
    )
    from postcopy.cli.servicedemo import add_arguments

    add_arguments(parser)  # --service: the kvstore service under load, three ways
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from postcopy.migration.hostcheck import check_host

    if args.service:
        from postcopy.cli.servicedemo import run_service_demo

        return run_service_demo(args)

    try:
        ram = parse_size(args.ram)
        bandwidth = parse_rate(args.max_bandwidth) if args.max_bandwidth else None
    except ValueError as error:
        print(f"postcopy demo: {error}", file=sys.stderr)
        return 2
    if args.vcpus < 1:
        print("postcopy demo: --vcpus must be at least 1", file=sys.stderr)
        return 2
    from postcopy.vm.guests import GUESTS

    if args.guest not in GUESTS:
        print(
            f"postcopy demo: unknown guest {args.guest!r}; built-in guests: {', '.join(GUESTS)}",
            file=sys.stderr,
        )
        return 2
    if args.guest == SERVICE_GUEST:
        # it makes no passes of its own: the demo would wait for them, then fail
        print(
            f"postcopy demo: the {SERVICE_GUEST} guest answers requests and makes no passes "
            "over its memory by itself: `postcopy demo --service` migrates it under load",
            file=sys.stderr,
        )
        return 2
    report = check_host()
    if not report.postcopy_possible:
        print(f"postcopy demo: {report.summary()}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="postcopy-demo-"))
    children: list[VmChild] = []
    try:
        # SIGTERM and SIGHUP end the demo like Ctrl-C does: through the cleanup below
        with interruptible((signal.SIGTERM, signal.SIGHUP)):
            return _demo(args, ram, bandwidth, workdir, children)
    except KeyboardInterrupt:
        print("postcopy demo: interrupted; everything it started is removed", file=sys.stderr)
        return 130
    except (DemoError, MigrateError, QmpClientError, VmChildError) as error:
        print(f"postcopy demo: {error}", file=sys.stderr)
        return 1
    finally:
        with signals_ignored((signal.SIGINT,)):  # let the cleanup finish
            for child in reversed(children):
                child.end()
            if args.keep_dir:
                print(f"working directory kept: {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _demo(
    args: argparse.Namespace,
    ram: int,
    bandwidth: int | None,
    workdir: Path,
    children: list[VmChild],
) -> int:
    from rich.console import Console

    from postcopy.cli.display import LiveProgress, ProgressView
    from postcopy.vm.guests import GUESTS

    console = Console()
    console.print(
        f"[bold]postcopy demo[/]: a {format_bytes(ram)} {args.guest} guest with "
        f"{args.vcpus} vCPUs moves to another VM process over loopback TCP: one "
        "precopy round, then postcopy."
    )
    console.print(f"working directory: {workdir}")
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ["--guest", args.guest, "--ram", str(ram), "--vcpus", str(args.vcpus)]
    capabilities = [arg for name in DEMO_CAPABILITIES for arg in ("--migrate-capability", name)]
    destination = VmChild(
        "destination", workdir, [*common, "--incoming", uri, *capabilities], trace=True
    )
    children.append(destination)
    source = VmChild("source", workdir, common, trace=True)
    children.append(source)
    console.print(
        f"started the source VM (PID {source.pid}) and the destination VM "
        f"(PID {destination.pid}, waiting on {uri})"
    )
    source_qmp = source.connect()
    destination_qmp = destination.connect()

    guest = args.guest
    # scan reports a pass from vCPU 0 only; the other guests, one marker per vCPU per pass
    per_pass = 1 if GUESTS[guest].pass_marker == b"\n" else args.vcpus
    wanted = 2 * per_pass
    deadline = time.monotonic() + PASSES_TIMEOUT
    while source.passes(guest) < wanted:
        if source.process.poll() is not None:
            raise DemoError(f"the source VM exited: {source.last_error()}")
        if time.monotonic() > deadline:
            raise DemoError(f"the guest made fewer than {wanted} passes in {PASSES_TIMEOUT:g} s")
        time.sleep(0.05)
    console.print(
        f"the guest runs on the source: {source.passes(guest)} passes so far "
        f"({GUESTS[guest].pass_help})"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    run_path = args.out / "run.jsonl"
    passes = {"source": source.passes(guest), "destination": 0}
    at_switch: dict[str, int] = {}
    at_end: dict[str, int] = {}

    def guest_rows() -> list[tuple[str, str]]:
        rows = [
            ("guest passes on the source", str(passes["source"])),
            ("guest passes on the destination", str(passes["destination"])),
        ]
        if "destination" in at_switch:
            rows.append(
                ("  of them during postcopy", str(passes["destination"] - at_switch["destination"]))
            )
        return rows

    proxy = None
    if args.cut_link:
        from postcopy.bench.linkproxy import Cut, LinkProxy
        from postcopy.wire import FrameType

        proxy = LinkProxy(uri)
        # 4 MiB into the push that follows the PACKAGE: the guest already runs there
        proxy.arm(Cut(frame=FrameType.PACKAGE, offset=CUT_AFTER_PACKAGE, clip=False))
        console.print(
            f"the link goes through a proxy on {proxy.uri}: it will reset every connection "
            f"{format_bytes(CUT_AFTER_PACKAGE)} into postcopy"
        )
    view = ProgressView(f"migrating to {uri}", extra_rows=guest_rows)
    live = LiveProgress(view, console)

    def on_sample(sample: dict[str, Any]) -> None:
        passes["source"] = source.passes(guest)
        passes["destination"] = destination.passes(guest)
        if sample["status"] == "postcopy-active" and "destination" not in at_switch:
            at_switch["destination"] = passes["destination"]
        if sample["status"] == "completed":
            at_switch.setdefault("destination", passes["destination"])
            at_end["destination"] = passes["destination"]
        live.update(sample)

    def note(text: str) -> None:
        view.note = text
        live.refresh()

    options = MigrateOptions(
        uri=uri,
        postcopy=True,
        preempt=True,
        switch_after_rounds=1,
        max_bandwidth=bandwidth,
        max_postcopy_bandwidth=bandwidth,
        auto_recover=args.cut_link,
    )
    if proxy is not None:
        options.uri = proxy.uri
    with RunWriter(run_path) as recorder, proxy or contextlib.nullcontext():
        migration = Migration(
            source_qmp,
            destination_qmp,
            options,
            on_sample=on_sample,
            on_note=note,
            recorder=recorder,
            command="demo",
            catch_interrupts=False,
        )
        migration.prepare()
        with live:
            outcome = migration.run()
        if not outcome.completed:
            if outcome.source.get("ram", {}).get("transferred"):
                console.print(summary_table(outcome.source, outcome.destination))
            raise DemoError(failure_line(outcome))

        # the guest must keep running on the destination: wait for a few more passes
        completed_passes = destination.passes(guest)
        deadline = time.monotonic() + PASSES_TIMEOUT
        while destination.passes(guest) < completed_passes + per_pass:
            if time.monotonic() > deadline:
                raise DemoError(
                    "the guest made no progress on the destination after the "
                    f"migration ({completed_passes} passes, still)"
                )
            time.sleep(0.05)
        after = destination.passes(guest)
        destination_qmp.execute("stop")
        verdict = destination_qmp.execute("x-verify")
        during_postcopy = at_end["destination"] - at_switch["destination"]
        recorder.write(
            {
                "event": "verify",
                "side": "destination",
                **verdict,
                "passes-during-postcopy": during_postcopy,
                "passes-at-completion": completed_passes,
                "passes-at-stop": after,
            }
        )

    console.print(summary_table(outcome.source, outcome.destination))
    if args.cut_link:
        recoveries = outcome.source.get("x-recoveries", 0)
        console.print(
            f"the link was cut in postcopy: both sides paused and recovered {recoveries} "
            f"time(s), {outcome.source.get('x-paused-ms', 0)} ms paused, "
            f"{outcome.source.get('x-recovery-resent-pages', 0)} pages sent again"
            if recoveries
            else "the link was to be cut in postcopy, but the migration ended first"
        )
    console.print(
        f"the guest kept running on the destination: {during_postcopy} passes while "
        f"its memory was still arriving (postcopy), {after} passes in all there"
    )
    if verdict["ok"]:
        console.print(
            f"[bold green]verified[/]: the destination's memory is what the guest "
            f"wrote ({verdict['detail']})"
        )
    else:
        console.print(f"[bold red]verification FAILED[/]: {verdict['detail']}")
    console.print(f"run written to {run_path} (`postcopy report {run_path}`)")
    try:
        png = write_png(load_run(run_path), args.out / "timeline.png")
        console.print(f"timeline written to {png}")
    except (ReportError, RunFileError) as error:
        console.print(f"no timeline PNG: {error}")
    if not verdict["ok"]:
        print(
            f"postcopy demo: the guest's memory on the destination is wrong: {verdict['detail']}",
            file=sys.stderr,
        )
        return 1
    return 0
