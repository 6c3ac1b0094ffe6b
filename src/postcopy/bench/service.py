"""The service under load in a bench run: the front and the load generator of a kvstore
scenario, and the service's figures beside the migration's.

A kvstore scenario's run, around the migration (postcopy.bench.runner):
1. before the VMs, a `postcopy service front` (clients on a free loopback port, VMs on a
   Unix socket in the run's directory, reachable from any network namespace);
2. both VMs get `--service` to it; once the source's guest is up, `postcopy load` starts
   (its options are the scenario's `load` table) and runs `lead` seconds before `migrate`;
3. the migration is watched as any other; `tail` seconds after it ends the load is told
   to stop (SIGTERM), waits up to `grace` seconds for the last answers, and writes every
   request (send and answer time on the host's monotonic clock) and its summary;
4. the record gets "service": the load's summary, latency per 10 ms of send time, the
   front's switches, and per window (before the migration, during it, after it) the
   requests sent, p50/p99/max latency and the longest gap, on the run's clock (seconds
   after `migrate`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from postcopy.bench.cleanup import Cleanup
from postcopy.migration import trace_points as tp
from postcopy.tools.runfile import Run

# The front and the clients stand for other machines: on this host they share the cores
# with both VMs and the migration's bulk threads (nice -5), so they run at nice -10 and
# their own wait for a core does not count as the service's latency (seen: the load
# generator sent nothing for 100 ms during a precopy round at nice 0). Without the
# privilege, `nice` says so on stderr and runs them at nice 0.
CLIENT_NICE = -10
POSTCOPY = ("nice", "-n", str(CLIENT_NICE), sys.executable, "-m", "postcopy")
# 5,250 requests/s from 8 clients, Zipf over 100,000 keys, 90% GET, 1% DELETE. The floor
# is 5,000 answered/s (issue 15); the rate a run reports is answers over first send to
# last answer, which counts the last request's latency too, so an open loop aimed at the
# floor itself reports just under it (4,970-4,999/s at 5,000). 5% above covers a last
# answer up to 0.4 s late on a ~9 s run.
SERVICE_FLOOR = 5000.0
DEFAULT_LOAD: dict[str, Any] = {
    "rate": 5250.0,
    "clients": 8,
    "keys": 100_000,
    "distribution": "zipf",
    "read": 0.9,
    "delete": 0.01,
    "value_size": 16,
    "lead": 3.0,
    "tail": 3.0,
    "grace": 10.0,
}
START_TIMEOUT = 30.0


class ServiceError(RuntimeError):
    pass


def check_load(load: Mapping[str, Any], where: str) -> dict[str, Any]:
    """DEFAULT_LOAD with `load` on top, every key and type checked (it comes from TOML)."""
    merged = dict(DEFAULT_LOAD)
    for key, value in load.items():
        if key not in DEFAULT_LOAD:
            raise ValueError(f"{where}: load has no {key!r} (known: {', '.join(DEFAULT_LOAD)})")
        wanted = type(DEFAULT_LOAD[key])
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise ValueError(f"{where}: load {key} = {value!r} is not a {wanted.__name__}")
        merged[key] = value
    return merged


class ServiceRun:
    """The front, then the load, of one bench run; everything is ended by `cleanup`."""

    def __init__(self, load: Mapping[str, Any], directory: Path, cleanup: Cleanup) -> None:
        self.load = dict(load)
        self.directory = directory
        self.cleanup = cleanup
        self.backends = f"unix:{directory}/kv.sock"
        self.front_events = directory / "front.jsonl"
        self.load_out = directory / "load.jsonl"
        self.front = cleanup.spawn(
            [
                *POSTCOPY,
                "service",
                "front",
                "--listen",
                "tcp:127.0.0.1:0",
                "--backends",
                self.backends,
                "--events",
                str(self.front_events),
            ],
            stderr=(directory / "front.stderr").open("wb"),
            name="service front",
        )
        self.address = self._wait_listening()
        self.load_process: subprocess.Popen[bytes] | None = None

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.front.poll() is not None:
                raise ServiceError(f"the service front exited with {self.front.returncode}")
            for event in _read_jsonl(self.front_events):
                if event.get("event") == "listening":
                    return str(event["address"])
            time.sleep(0.05)
        raise ServiceError(f"the service front did not listen within {START_TIMEOUT:g} s")

    def vm_args(self) -> list[str]:
        return ["--service", self.backends]

    def start_load(self) -> None:
        load = self.load
        self.load_process = self.cleanup.spawn(
            [
                *POSTCOPY,
                "load",
                "--connect",
                self.address,
                "--rate",
                str(load["rate"]),
                "--clients",
                str(load["clients"]),
                "--keys",
                str(load["keys"]),
                "--distribution",
                str(load["distribution"]),
                "--read",
                str(load["read"]),
                "--delete",
                str(load["delete"]),
                "--value-size",
                str(load["value_size"]),
                "--duration",
                "0",
                "--grace",
                str(load["grace"]),
                "--out",
                str(self.load_out),
                "--json",
            ],
            stdout=(self.directory / "load.stdout").open("wb"),
            stderr=(self.directory / "load.stderr").open("wb"),
            name="load generator",
        )
        time.sleep(float(load["lead"]))
        if self.load_process.poll() is not None:
            raise ServiceError(f"the load generator exited: {self._load_error()}")

    def _load_error(self) -> str:
        try:
            lines = (self.directory / "load.stderr").read_text(errors="replace").splitlines()
        except OSError:
            return "no error output"
        return (
            lines[-1] if lines else f"status {self.load_process and self.load_process.returncode}"
        )

    def finish(self, run: Run) -> dict[str, Any]:
        """Let the load run `tail` seconds more, stop it, and read what it saw."""
        process = self.load_process
        if process is None:
            raise ServiceError("the load generator was never started")
        time.sleep(float(self.load["tail"]))
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(float(self.load["grace"]) + 60)
        except subprocess.TimeoutExpired:
            raise ServiceError("the load generator did not finish after SIGTERM") from None
        records = _read_jsonl(self.load_out)
        if not records or records[-1].get("event") != "summary":
            raise ServiceError(f"the load generator wrote no summary: {self._load_error()}")
        self.front.send_signal(signal.SIGTERM)  # it writes its counters, then ends
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.front.wait(10)
        return service_record(records, _read_jsonl(self.front_events), run)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # still being written
    return [json.loads(line) for line in lines if line.strip()]


def _window(sent: np.ndarray, latency: np.ndarray, answered: np.ndarray) -> dict[str, Any]:
    """Figures of the requests sent in one window (times in s, latency in µs; lost: nan)."""
    done = np.isfinite(latency)
    found: dict[str, Any] = {"sent": int(sent.size), "lost": int(np.count_nonzero(~done))}
    if done.any():
        found["p50_us"] = round(float(np.percentile(latency[done], 50)), 1)
        found["p99_us"] = round(float(np.percentile(latency[done], 99)), 1)
        found["max_us"] = round(float(latency[done].max()), 1)
    times = np.sort(answered[np.isfinite(answered)])
    if times.size >= 2:
        found["longest_gap_between_answers_ms"] = round(float(np.diff(times).max()) * 1e3, 3)
    return found


def service_record(
    load: list[dict[str, Any]], front_events: list[dict[str, Any]], run: Run
) -> dict[str, Any]:
    """The service part of a bench record, times on the run's clock (s after migrate)."""
    origin = float(run.header.get("migrate-mono") or 0.0)
    summary = {k: v for k, v in load[-1].items() if k not in ("event", "series", "problems")}
    summary["problems"] = load[-1].get("problems", [])[:10]
    requests = [r for r in load if r.get("event") == "request"]
    sent = np.array([r["sent"] for r in requests]) - origin
    answered = np.array([np.nan if r["answered"] is None else r["answered"] for r in requests])
    answered -= origin
    latency = np.array([np.nan if r["us"] is None else r["us"] for r in requests])
    migration_end = run.first("destination", tp.COMPLETED) or run.first("source", tp.COMPLETED)
    if migration_end is None and run.samples:
        migration_end = float(run.samples[-1]["t"])
    end = migration_end if migration_end is not None else 0.0
    windows = {}
    for name, low, high in (
        ("before", -np.inf, 0.0),
        ("migration", 0.0, end),
        ("after", end, np.inf),
    ):
        chosen = (sent >= low) & (sent < high)
        windows[name] = _window(sent[chosen], latency[chosen], answered[chosen])
    series = load[-1].get("series") or {}
    if series:
        series = {**series, "start": round(float(series["start"]) - origin, 4)}
    gap_at = summary.get("longest-gap-at")
    return {
        "load": {k: v for k, v in load[0].items() if k != "event"},
        "summary": summary,
        "longest_gap_at_s": None if gap_at is None else round(float(gap_at) - origin, 4),
        "migration_end_s": migration_end,
        "windows": windows,
        "series": series,
        "switches": [
            {**e, "t": round(float(e["t"]) - origin, 4)}
            for e in front_events
            if e.get("event") == "switch"
        ],
        "front": next((e for e in reversed(front_events) if e.get("event") == "stats"), {}),
    }


def service_figures(record: dict[str, Any]) -> dict[str, Any]:
    """Flat figures of the service for postcopy.bench.analysis (empty without a load)."""
    service = record.get("service")
    if not service:
        return {}
    summary = service.get("summary") or {}
    during = (service.get("windows") or {}).get("migration") or {}
    before = (service.get("windows") or {}).get("before") or {}
    clean = summary.get("sent", 0) > 0 and all(
        summary.get(k, 0) == 0 for k in ("lost", "duplicate", "wrong", "unknown")
    )
    return {
        "service_requests": summary.get("sent"),
        "service_rate": summary.get("rate"),
        "service_lost": summary.get("lost"),
        "service_duplicate": summary.get("duplicate"),
        "service_wrong": summary.get("wrong"),
        "service_unknown": summary.get("unknown"),
        "service_clean": clean,
        "service_p50_us": summary.get("latency-p50-us"),
        "service_p99_us": summary.get("latency-p99-us"),
        "service_max_us": summary.get("latency-max-us"),
        "service_longest_gap_ms": summary.get("longest-gap-ms"),
        "service_longest_gap_at_s": service.get("longest_gap_at_s"),
        "service_migration_p99_us": during.get("p99_us"),
        "service_migration_max_us": during.get("max_us"),
        "service_before_p99_us": before.get("p99_us"),
        "service_resent": (service.get("front") or {}).get("resent"),
    }
