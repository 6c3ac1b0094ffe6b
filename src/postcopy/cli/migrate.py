"""`postcopy migrate`: drive one migration through the source VM's QMP socket and watch it.

    postcopy migrate --qmp /tmp/src.qmp --to tcp:127.0.0.1:4444 --postcopy \\
        --dest-qmp /tmp/dst.qmp --timeline run.jsonl

It does what a management tool does with QEMU: checks both ends (the destination, when its
socket is given, must be waiting for a migration), sets the capabilities and parameters,
issues `migrate`, polls `query-migrate` for the live display, switches to postcopy when
asked, and prints both sides' figures at the end. Exit status 0 means completed; 1 means
failed or cancelled (with the reason as one line on stderr). Ctrl-C cancels a migration
still in precopy (`migrate_cancel`: the source keeps running); once in postcopy the guest
already runs on the destination and the migration can only finish.

`Migration` is the engine, shared with `postcopy demo`: prepare(), then run() with a
callback per progress sample.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from postcopy.cli.report import summary_table
from postcopy.tools.qmpclient import QmpClient, QmpClientError, QmpCommandError
from postcopy.tools.runfile import RunWriter, Sampler, end_records, header_record
from postcopy.tools.signals import InterruptCounter
from postcopy.tools.watch import FINAL_STATUSES, Poll, watch_until_final
from postcopy.units import parse_rate

CANCELLABLE_STATUSES = frozenset({"setup", "active", "device"})
QMP_WAIT = 30.0  # seconds `migrate` waits for a QMP socket to appear by default

SampleSink = Callable[[dict[str, Any]], None]
NoteSink = Callable[[str], None]


class MigrateError(Exception):
    """The migration cannot be started or ended badly; the message is one line for the user."""


@dataclass
class MigrateOptions:
    uri: str
    postcopy: bool = False
    preempt: bool = False
    switch_after_rounds: int | None = None
    switch_when_stalled: bool = False
    max_bandwidth: int | None = None
    max_postcopy_bandwidth: int | None = None
    downtime_limit: int | None = None
    key_file: str | None = None
    poll_interval: float = 0.1
    auto_recover: bool = False

    @property
    def uses_postcopy(self) -> bool:
        return (
            self.postcopy
            or self.preempt
            or self.switch_after_rounds is not None
            or self.switch_when_stalled
        )

    @property
    def manual_switch(self) -> bool:
        """--postcopy alone: postcopy after the first round. The source switches by itself
        (x-postcopy-after-rounds 1): a migrate-start-postcopy sent when a poll sees the
        round end can come after a fast precopy has already converged and completed."""
        return (
            self.uses_postcopy and self.switch_after_rounds is None and not self.switch_when_stalled
        )


@dataclass
class MigrationOutcome:
    status: str
    source: dict[str, Any]
    destination: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def error(self) -> str | None:
        desc = self.source.get("error-desc")
        if desc is None and self.destination:
            desc = self.destination.get("error-desc")
        return None if desc is None else " ".join(str(desc).split())


class Migration:
    """One migration driven over QMP: the source's client, optionally the destination's."""

    def __init__(
        self,
        source: QmpClient,
        destination: QmpClient | None,
        options: MigrateOptions,
        *,
        on_sample: SampleSink | None = None,
        on_note: NoteSink | None = None,
        recorder: RunWriter | None = None,
        command: str = "migrate",
        catch_interrupts: bool = True,
    ) -> None:
        self.source = source
        self.destination = destination
        self.options = options
        self.on_sample = on_sample or (lambda sample: None)
        self.on_note = on_note or (lambda text: None)
        self.recorder = recorder
        self.command = command
        self.samples: list[dict[str, Any]] = []
        self._sampler = Sampler()
        # True: Ctrl-C cancels a precopy and is refused in postcopy (`postcopy migrate`);
        # False: KeyboardInterrupt goes straight to the caller (the demo tears all down)
        self.catch_interrupts = catch_interrupts
        self._interrupts = InterruptCounter()

    # -- before the start ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Check both ends and configure them; MigrateError says what is wrong."""
        options = self.options
        status = self.source.execute("query-status")
        if status.get("status") == "inmigrate":
            raise MigrateError(
                f"the VM at {self.source.path} is itself waiting for an incoming "
                "migration: --qmp must name the source VM's socket"
            )
        current = self.source.execute("query-migrate").get("status", "none")
        if current not in FINAL_STATUSES and current != "none":
            raise MigrateError(
                f"a migration is already in progress on the source (status {current})"
            )
        if status.get("status") in ("postmigrate", "shutdown", "internal-error") or (
            current == "completed" and not status.get("running")
        ):
            raise MigrateError(
                f"the source VM is in state {status.get('status')}: "
                "it has already migrated away or stopped for good"
            )
        if self.destination is not None:
            dest_status = self.destination.execute("query-status").get("status")
            if dest_status != "inmigrate":
                raise MigrateError(
                    f"the destination at {self.destination.path} is not waiting for a "
                    f"migration (its status is {dest_status}); start it with "
                    "`postcopy vm run ... --incoming URI`"
                )
            dest_migration = self.destination.execute("query-migrate").get("status", "none")
            if dest_migration != "none":
                raise MigrateError(
                    f"the destination at {self.destination.path} is already "
                    f"receiving a migration (status {dest_migration})"
                )
        if options.key_file is not None:
            from postcopy.transport import AuthConfig
            from postcopy.transport.errors import KeyFileError

            try:
                AuthConfig.from_file(options.key_file)
            except KeyFileError as error:
                raise MigrateError(str(error)) from None
        capabilities = [
            {"capability": "postcopy-ram", "state": options.uses_postcopy},
            {"capability": "postcopy-preempt", "state": options.preempt},
        ]
        self._execute(
            self.source, "migrate-set-capabilities", {"capabilities": capabilities}, "source"
        )
        if self.destination is not None and options.uses_postcopy:
            wanted = ["postcopy-ram", "postcopy-blocktime"]
            if options.preempt:
                wanted.append("postcopy-preempt")
            self._execute(
                self.destination,
                "migrate-set-capabilities",
                {"capabilities": [{"capability": name, "state": True} for name in wanted]},
                "destination",
            )
        parameters: dict[str, Any] = {
            "x-postcopy-after-rounds": (
                options.switch_after_rounds
                if options.switch_after_rounds is not None
                else 1
                if options.manual_switch
                else -1
            ),
            "x-postcopy-when-stalled": options.switch_when_stalled,
        }
        if options.max_bandwidth is not None:
            parameters["max-bandwidth"] = options.max_bandwidth
        if options.max_postcopy_bandwidth is not None:
            parameters["max-postcopy-bandwidth"] = options.max_postcopy_bandwidth
        if options.downtime_limit is not None:
            parameters["downtime-limit"] = options.downtime_limit
        # a broken link pauses postcopy; with this the source reconnects by itself
        parameters["x-postcopy-auto-recover"] = options.auto_recover
        # without --key, the source uses the key it was started with (if any), not one a
        # previous `postcopy migrate --key` left in its parameters
        parameters["x-key-file"] = (
            str(Path(options.key_file).resolve()) if options.key_file is not None else ""
        )
        self._execute(self.source, "migrate-set-parameters", parameters, "source")

    def _execute(
        self, client: QmpClient, command: str, arguments: dict[str, Any], side: str
    ) -> Any:
        try:
            return client.execute(command, arguments)
        except QmpCommandError as error:
            raise MigrateError(f"the {side} refused {command}: {error.desc}") from None

    # -- while it runs -------------------------------------------------------------------------

    def run(self) -> MigrationOutcome:
        """Start the migration and watch it to its end (the caller called prepare())."""
        catching = (
            self._interrupts.catching() if self.catch_interrupts else contextlib.nullcontext()
        )
        with catching:
            if self.recorder is not None:
                options = {k: v for k, v in asdict(self.options).items() if k != "uri"}
                self.recorder.write(
                    header_record(
                        self.command,
                        self.options.uri,
                        options,
                        self.source,
                        self.destination,
                        **{"migrate-mono": round(time.monotonic(), 6)},
                    )
                )
            self.start_time = time.monotonic()
            self._execute(self.source, "migrate", {"uri": self.options.uri}, "source")
            self._cancel_sent = False
            self._postcopy_warned = False
            self._destination_info: dict[str, Any] | None = None
            last = watch_until_final(
                self.source,
                self.destination,
                started=self.start_time,
                interval=self.options.poll_interval,
                on_poll=self._on_poll,
            )
        if last.source is None:
            raise MigrateError(
                f"the source VM at {self.source.path} went away during the migration"
            )
        status = last.status
        destination = self._destination_info if self.destination is not None else None
        self._record_end(status, last.source, destination)
        return MigrationOutcome(status, last.source, destination, self.samples, self._cancel_sent)

    def _on_poll(self, poll: Poll) -> None:
        if poll.destination is not None:
            # a destination whose incoming migration failed exits: keep its last word
            self._destination_info = poll.destination
        if poll.source is None:
            return
        status = poll.status
        sample = self._sampler.sample(poll)
        self.samples.append(sample)
        if self.recorder is not None:
            self.recorder.write(sample)
        self.on_sample(sample)
        if status in FINAL_STATUSES:
            return
        interrupted = self._interrupts.count > 0
        if interrupted and not self._cancel_sent and status in CANCELLABLE_STATUSES:
            self._cancel_sent = True
            self.on_note("interrupted: cancelling the migration (the source keeps running)")
            try:
                self.source.execute("migrate_cancel")
            except QmpCommandError as error:
                self.on_note(f"could not cancel: {error.desc}")
        elif interrupted and status.startswith("postcopy") and not self._postcopy_warned:
            # postcopy-paused too: the guest runs on the destination, the source must stay
            self._postcopy_warned = True
            self.on_note(
                "interrupted, but postcopy cannot be cancelled: the guest already "
                "runs on the destination; waiting for the last pages "
                "(Ctrl-C twice more to stop watching)"
            )

    def _record_end(
        self, status: str, source: dict[str, Any], destination: dict[str, Any] | None
    ) -> None:
        if self.recorder is not None:
            end_records(
                self.recorder,
                {"source": self.source, "destination": self.destination},
                {"source": source, "destination": destination},
                status,
                time.monotonic() - self.start_time,
            )


def connect(path: str, name: str, wait: float, note: NoteSink) -> QmpClient:
    """Connect to a QMP socket, waiting up to `wait` seconds for one that is not there
    yet (a VM started a moment ago: the tour starts both VMs and migrates at once)."""
    try:
        return QmpClient.connect_to(path, name=name)
    except QmpClientError:
        if wait <= 0:
            raise
    note(f"waiting up to {wait:g} s for the {name} socket {path} (a VM still starting?)")
    return QmpClient.connect_to(path, name=name, wait=wait)


# -- the command ----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="migrate a running VM through its QMP socket, with live progress",
        description="Migrate the VM behind --qmp to a destination started with "
        "`postcopy vm run --incoming URI`. Exit status 0 when the migration "
        "completed, 1 when it failed or was cancelled.",
    )
    parser.add_argument(
        "--qmp", required=True, metavar="SRC.sock", help="the source VM's QMP socket"
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="URI",
        help="the destination's migration URI: tcp:HOST:PORT or unix:PATH",
    )
    parser.add_argument(
        "--dest-qmp",
        metavar="DST.sock",
        help="the destination's QMP socket: checked before the start, given "
        "the postcopy capabilities, and asked for its figures at the end",
    )
    parser.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to postcopy after the first precopy round "
        "(the source does it: x-postcopy-after-rounds 1)",
    )
    parser.add_argument(
        "--preempt",
        action="store_true",
        help="send requested pages on a channel of their own "
        "(postcopy-preempt; implies --postcopy)",
    )
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument(
        "--switch-after-rounds",
        type=int,
        metavar="N",
        help="switch to postcopy automatically after N precopy rounds "
        "(0: postcopy from the start; implies --postcopy)",
    )
    switch.add_argument(
        "--switch-when-stalled",
        action="store_true",
        help="switch to postcopy when precopy rounds stop shrinking the dirty "
        "set (implies --postcopy)",
    )
    parser.add_argument(
        "--max-bandwidth", metavar="RATE", help="cap the precopy rate, e.g. 100M (bytes per second)"
    )
    parser.add_argument(
        "--max-postcopy-bandwidth",
        metavar="RATE",
        help="cap the background push after the switch to postcopy, e.g. 100M",
    )
    parser.add_argument(
        "--downtime-limit",
        type=int,
        metavar="MS",
        help="the longest the guest may be stopped at a precopy switchover",
    )
    parser.add_argument(
        "--key", metavar="FILE", help="authentication key file (the destination must use the same)"
    )
    parser.add_argument(
        "--auto-recover",
        action="store_true",
        help="if the link breaks in postcopy (both sides pause, keeping every page), "
        "reconnect to --to by itself, again and again with a growing delay (0.5 s up to "
        "30 s), until the migration resumes (x-postcopy-auto-recover)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per progress sample and a final summary instead of the display",
    )
    parser.add_argument(
        "--timeline",
        metavar="FILE.jsonl",
        help="write the whole run (samples, both sides' events and figures) for `postcopy report`",
    )
    parser.add_argument(
        "--qmp-wait",
        type=float,
        default=QMP_WAIT,
        metavar="SECONDS",
        help="how long to wait for a QMP socket that is not there yet, e.g. a VM "
        f"started a moment ago (default {QMP_WAIT:g})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="how often to poll query-migrate (default 0.1)",
    )
    parser.set_defaults(func=run_migrate)


def options_from_args(args: argparse.Namespace) -> MigrateOptions:
    if args.switch_after_rounds is not None and args.switch_after_rounds < 0:
        raise MigrateError("--switch-after-rounds must be 0 or more")
    if args.downtime_limit is not None and args.downtime_limit < 0:
        raise MigrateError("--downtime-limit must be 0 or more")
    bandwidth = _rate_option("--max-bandwidth", args.max_bandwidth)
    postcopy_bandwidth = _rate_option("--max-postcopy-bandwidth", args.max_postcopy_bandwidth)
    return MigrateOptions(
        uri=args.to,
        postcopy=args.postcopy,
        preempt=args.preempt,
        switch_after_rounds=args.switch_after_rounds,
        switch_when_stalled=args.switch_when_stalled,
        max_bandwidth=bandwidth,
        max_postcopy_bandwidth=postcopy_bandwidth,
        downtime_limit=args.downtime_limit,
        key_file=args.key,
        poll_interval=max(args.interval, 0.01),
        auto_recover=args.auto_recover,
    )


def _rate_option(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_rate(text)
    except ValueError as error:
        raise MigrateError(f"{name}: {error}") from None


def failure_line(outcome: MigrationOutcome) -> str:
    if outcome.status == "cancelled":
        why = "interrupted" if outcome.interrupted else "cancelled through QMP"
        return f"migration cancelled ({why}); the source VM keeps running"
    reason = outcome.error or "no reason given"
    if "not possible on the destination" in reason:
        # the destination's reason may arrive cut short; the check prints it whole
        reason += " (run `postcopy check` on the destination host for the whole report)"
    return f"migration failed: {reason}"


def run_migrate(args: argparse.Namespace) -> int:
    """The command: a live display on a terminal (its final state once elsewhere), or with
    --json nothing but JSON: samples and the summary on stdout, notes and errors as JSON
    objects on stderr."""
    from rich.console import Console

    from postcopy.cli.display import LiveProgress, ProgressView

    def json_line(record: dict[str, Any], stream: Any = sys.stdout) -> None:
        print(json.dumps(record), file=stream, flush=True)

    def fail(text: str) -> int:
        if args.json:
            json_line({"event": "error", "error": text}, sys.stderr)
        else:
            print(f"postcopy migrate: {text}", file=sys.stderr)
        return 1

    console = Console(stderr=False)
    view: ProgressView | None = None
    live: LiveProgress | None = None

    def note(text: str) -> None:
        if args.json:
            json_line({"event": "note", "note": text}, sys.stderr)
        elif live is not None and view is not None:
            view.note = text
            live.refresh()
        elif sys.stderr.isatty():  # elsewhere a failure stays one line
            print(f"postcopy migrate: {text}", file=sys.stderr)

    clients: list[QmpClient] = []
    recorder: RunWriter | None = None
    try:
        options = options_from_args(args)
        source = connect(args.qmp, "source QMP", args.qmp_wait, note)
        clients.append(source)
        destination = None
        if args.dest_qmp:
            destination = connect(args.dest_qmp, "destination QMP", args.qmp_wait, note)
            clients.append(destination)
        if args.timeline:
            recorder = RunWriter(args.timeline)
        if args.json:
            on_sample: SampleSink = json_line
        else:
            view = ProgressView(f"migrating to {options.uri}")
            live = LiveProgress(view, console)
            on_sample = live.update
        migration = Migration(
            source, destination, options, on_sample=on_sample, on_note=note, recorder=recorder
        )
        migration.prepare()
        with live if live is not None else contextlib.nullcontext():
            outcome = migration.run()
        if args.json:
            json_line(
                {
                    "event": "summary",
                    "status": outcome.status,
                    "source": outcome.source,
                    "destination": outcome.destination,
                }
            )
        else:
            if outcome.completed or outcome.source.get("ram", {}).get("transferred"):
                console.print(summary_table(outcome.source, outcome.destination))
            if args.timeline:
                console.print(
                    f"run written to {args.timeline} "
                    f"(`postcopy report {args.timeline} --png run.png`)"
                )
    except (MigrateError, QmpClientError) as error:
        return fail(str(error))
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        return fail(f"{where}{error.strerror or error}")
    finally:
        if recorder is not None:
            recorder.close()
        for client in clients:
            client.close()
    if outcome.completed:
        return 0
    return fail(failure_line(outcome))
