"""The run record: one migration as JSON lines, written by `migrate --timeline`, `demo` and
`bench`, read by `report` and `bench --from`.

One object per line, each with an "event" key:

    {"event": "header", "format": "postcopy-run/2", "command": "migrate", "uri": ...,
     "started": ISO time, "migrate-mono": the host's monotonic clock when `migrate` was sent,
     "options": {...}, "source": {"qmp", "capabilities", "parameters"}, "destination": ...}
    {"event": "sample", "t": 0.42, "mono": ..., "status": "active", "transferred": ...}
        one per poll of both sides (SAMPLE_FIELDS), as `migrate --json` prints it
    {"event": "round-end", "side": "source", "t": ..., "mono": ..., ...}
        both VMs' timeline entries (migration/trace_points.py), with their side
    {"event": "summary", "side": "source", ...query-migrate}   each side's final figures
    {"event": "latency-samples", "side": "destination", "us": [...]}   request latencies
    {"event": "verify", ...}, {"event": "end", "status": ..., "t": ...}

A VM's `--trace` file is read too: one side's timeline entries (no "side") followed by that
side's {"event": "summary"}, which tells the side (the source's query-migrate has "ram").

One clock: the VM processes of a run share the host's monotonic clock, and every entry
carries it ("mono"), so `Run` places samples and both sides' entries on it, in seconds
after `migrate` was sent (or, in a trace file, after the first entry), in their true order.
"""

from __future__ import annotations

import collections
import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from postcopy.migration import trace_points as tp
from postcopy.tools.qmpclient import QmpClient, QmpClientError
from postcopy.tools.watch import FINAL_STATUSES, Poll

RUN_FORMAT = "postcopy-run/2"
# records that are not timeline entries
RECORD_KINDS = frozenset({"header", "sample", "summary", "latency-samples", "verify", "end"})
# a sample's fields: (name, side, where in that side's query-migrate)
SAMPLE_SOURCE_FIELDS = {
    "transferred": ("ram", "transferred"),
    "remaining": ("ram", "remaining"),
    "total": ("ram", "total"),
    "dirty-pages-rate": ("ram", "dirty-pages-rate"),
    "page-size": ("ram", "page-size"),
    "dirty-sync-count": ("ram", "dirty-sync-count"),
    "precopy-bytes": ("ram", "precopy-bytes"),
    "postcopy-bytes": ("ram", "postcopy-bytes"),
    "postcopy-requests": ("ram", "postcopy-requests"),
    "pages-pushed": ("ram", "x-pages-pushed"),
    "pages-requested": ("ram", "x-pages-requested"),
    "rounds": (None, "x-rounds"),
    "expected-downtime": (None, "expected-downtime"),
    "pauses": (None, "x-pauses"),
    "recoveries": (None, "x-recoveries"),
    "paused-ms": (None, "x-paused-ms"),
    "error": (None, "error-desc"),
}
SAMPLE_DESTINATION_FIELDS = {
    "destination-status": "status",
    "bytes-received": "x-bytes-received",
    "requests-sent": "x-postcopy-requests-sent",
    "vcpu-faults": "x-postcopy-vcpu-faults",
    "pages-placed": "x-pages-placed",
    "pages-moved": "x-pages-moved",
    "blocktime-us": "x-postcopy-blocktime-us",
}
LIVE_RATE_WINDOW = 1.0  # seconds: the live rate is over the last second or so


class RunFileError(Exception):
    """A run file cannot be read; the message is the user's one line."""


class RunWriter:
    """Keeps run records (`records`) and, with a path, appends each to a JSON-lines file at
    once, flushed, so that a run that dies half-way still leaves what it had."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        self._file: IO[str] | None = (
            self.path.open("w", encoding="utf-8") if self.path is not None else None
        )

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing --------------------------------------------------------------------------------


class Sampler:
    """Turns each poll of both sides into a sample record, with the live sending rate."""

    def __init__(self) -> None:
        self._history: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, poll: Poll) -> dict[str, Any]:
        source = poll.source or {}
        ram = source.get("ram") or {}
        status = str(source.get("status", "none"))
        sample: dict[str, Any] = {
            "event": "sample",
            "t": round(poll.t, 3),
            "mono": round(poll.mono, 6),
            "status": status,
        }
        for name, (group, key) in SAMPLE_SOURCE_FIELDS.items():
            value = (ram if group == "ram" else source).get(key)
            if value is not None:
                sample[name] = value
        transferred = int(ram.get("transferred", 0))
        history = self._history
        history.append((poll.t, transferred))
        while len(history) > 2 and poll.t - history[1][0] >= LIVE_RATE_WINDOW:
            history.popleft()
        rate: float | None = None
        if len(history) >= 2 and poll.t > history[0][0]:
            rate = (transferred - history[0][1]) / (poll.t - history[0][0])
        sample["rate"] = None if rate is None else round(rate)
        eta: float | None = None
        remaining = int(ram.get("remaining", 0))
        if status in ("active", "postcopy-active", "device") and rate:
            eta = remaining / rate
        elif status == "completed":
            eta = 0.0
        sample["eta"] = None if eta is None else round(eta, 2)
        if poll.destination is not None:
            for name, key in SAMPLE_DESTINATION_FIELDS.items():
                if key in poll.destination:
                    sample[name] = poll.destination[key]
        return sample


def describe_side(client: QmpClient | None) -> dict[str, Any] | None:
    """A side for the header: its QMP socket, enabled capabilities and parameters."""
    if client is None:
        return None
    try:
        caps = client.execute("query-migrate-capabilities")
        parameters = dict(client.execute("query-migrate-parameters"))
    except QmpClientError:
        return {"qmp": client.path}
    parameters.pop("x-key-file", None)  # a path, but still nobody's business
    return {
        "qmp": client.path,
        "capabilities": [c["capability"] for c in caps if c["state"]],
        "parameters": parameters,
    }


def header_record(
    command: str,
    uri: str,
    options: dict[str, Any],
    source: QmpClient,
    destination: QmpClient | None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "event": "header",
        "format": RUN_FORMAT,
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "uri": uri,
        "options": options,
        "source": describe_side(source),
        "destination": describe_side(destination),
        **extra,
    }


def latency_samples(client: QmpClient | None) -> list[float]:
    """The destination's raw request latencies in µs, if its QMP offers them."""
    if client is None:
        return []
    try:
        result = client.execute("x-request-latency-samples")
    except QmpClientError:
        return []
    return [float(value) for value in result.get("us", [])]


def end_records(
    writer: RunWriter,
    sides: dict[str, QmpClient | None],
    summaries: dict[str, dict[str, Any] | None],
    status: str,
    t: float,
) -> None:
    """After the migration: both sides' timelines, final figures, the destination's
    request latencies and the end."""
    for side, client in sides.items():
        if client is None:
            continue
        try:
            timeline = client.execute("x-migration-timeline")
        except QmpClientError:
            continue
        for entry in timeline:
            writer.write({**entry, "side": side})
    for side, info in summaries.items():
        if info:
            writer.write({"event": "summary", "side": side, **info})
    latency = latency_samples(sides.get("destination"))
    if latency:
        writer.write({"event": "latency-samples", "side": "destination", "us": latency})
    writer.write({"event": "end", "status": status, "t": round(t, 3)})


# -- reading --------------------------------------------------------------------------------


def side_of_summary(summary: dict[str, Any]) -> str:
    return "source" if "ram" in summary else "destination"


@dataclass
class Run:
    """Everything one run says, sorted by kind, on one clock (see the module doc)."""

    header: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_us: list[float] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    end: dict[str, Any] | None = None

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> Run:
        run = cls()
        unsided: list[dict[str, Any]] = []  # a trace file's entries, until its summary
        for record in records:
            kind = record["event"]
            if kind == "header":
                run.header = record
            elif kind == "sample":
                run.samples.append(record)
            elif kind == "summary":
                side = str(record.get("side") or side_of_summary(record))
                run.summaries[side] = {
                    k: v for k, v in record.items() if k not in ("event", "side")
                }
                for event in unsided:
                    event["side"] = side
                unsided = []
            elif kind == "latency-samples":
                run.latency_us.extend(float(value) for value in record.get("us", []))
            elif kind == "verify":
                run.verify = record
            elif kind == "end":
                run.end = record
            else:
                event = dict(record)
                run.events.append(event)
                if "side" not in event:
                    unsided.append(event)
        run._one_clock()
        return run

    def _one_clock(self) -> None:
        """Every timeline entry's "t" becomes seconds on the run's clock (its "mono" minus
        the moment `migrate` was sent, or the first entry's), and the entries are sorted."""
        origin = self.header.get("migrate-mono")
        monos = [float(e["mono"]) for e in self.events if "mono" in e]
        if origin is None and monos:
            origin = min(monos)
        for event in self.events:
            if origin is not None and "mono" in event:
                event["t"] = round(float(event["mono"]) - float(origin), 6)
        self.events.sort(key=lambda e: float(e.get("t", 0.0)))

    @property
    def source(self) -> dict[str, Any]:
        return self.summaries.get("source", {})

    @property
    def destination(self) -> dict[str, Any]:
        return self.summaries.get("destination", {})

    @property
    def status(self) -> str | None:
        if self.end is not None and self.end.get("status"):
            return str(self.end["status"])
        for side in ("source", "destination"):
            if side in self.summaries:
                return str(self.summaries[side].get("status"))
        return str(self.samples[-1]["status"]) if self.samples else None

    def events_of(self, side: str, point: tp.TracePoint | None = None) -> list[dict[str, Any]]:
        return [
            event
            for event in self.events
            if event.get("side") == side and (point is None or event["event"] == point.name)
        ]

    def first(self, side: str, point: tp.TracePoint) -> float | None:
        """When `point` was first reached on `side`, on the run's clock."""
        found = self.events_of(side, point)
        return float(found[0]["t"]) if found else None

    def phases(self) -> list[tuple[str, float, float]]:
        """(status, start, end) spans of the source, from its status entries or samples."""
        changes = [(str(e["status"]), float(e["t"])) for e in self.events_of("source", tp.STATUS)]
        if not changes:
            for sample in self.samples:
                if not changes or changes[-1][0] != sample["status"]:
                    changes.append((str(sample["status"]), float(sample["t"])))
        spans = []
        for index, (status, start) in enumerate(changes):
            if status in FINAL_STATUSES:
                break
            if index + 1 < len(changes):
                end = changes[index + 1][1]
            elif self.samples:
                end = float(self.samples[-1]["t"])
            else:
                end = start
            spans.append((status, start, end))
        return spans

    def switchover(self) -> float | None:
        for event in self.events_of("source", tp.STATUS):
            if event.get("status") == "postcopy-active":
                return float(event["t"])
        for sample in self.samples:
            if sample.get("status") == "postcopy-active":
                return float(sample["t"])
        return None


def load_run(path: str | Path) -> Run:
    """Read a run file (or a VM's --trace file); RunFileError says what is wrong."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RunFileError(f"{path} is a directory, not a run file") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not a text file") from None
    except OSError as error:
        raise RunFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RunFileError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise RunFileError(f'{path}:{number}: not a run record (no "event" key)')
        records.append(record)
    run = Run.from_records(records)
    if not (run.samples or run.events or run.summaries):
        raise RunFileError(f"{path}: holds no migration data (samples, events or summaries)")
    return run
