"""Soak: one guest through a chain of migrations, and one VM through hundreds of failures.

    .venv/bin/python benchmarks/soak.py [--hops 50] [--failures 200] [--ram 256M]
        [--vcpus 2] [--out FILE.jsonl]

(`make soak`; not part of the test suite.) Two checks that the reliability issue asks of
the whole system, over real processes on loopback:

1. Chain: one memtouch guest migrates `--hops` times, each time into a fresh destination
   process, alternating precopy, postcopy after one round and postcopy-preempt from the
   start. Every hop: both sides complete, the source ends postmigrate, the guest makes a
   new pass on the destination and its progress (console bytes, which travel with the
   VM) is larger than at any hop before, then it is stopped, checked whole with x-verify
   and continued. The old process quits.
2. Failures: one long-lived VM is migrated `--failures` times to destinations that fail
   it in turn: nobody listening, a stranger that hangs up in the handshake, a destination
   that drops the connection in the middle of precopy, and a migration cancelled in
   precopy (the fake destinations run in this process, on the package's own transport
   and wire code). After each, the VM must still run; its open fds, threads and RSS are
   sampled (before the first failure too, as at_start), and after a warm-up must stay
   flat: fds and threads exactly, RSS within `--rss-slack`.

One JSON line per hop and per sample; the last line is the summary; the exit status is 1
if anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postcopy.migration.channel import StreamReader, StreamWriter
from postcopy.tools.qmpclient import QmpClient
from postcopy.tools.vmchild import VmChild, free_port
from postcopy.transport import Listener, listen
from postcopy.units import parse_size
from postcopy.wire import Direction, Ping, Pong, RamRunHeader, StreamContext

FINAL = {"completed", "failed", "cancelled"}
MODES = ("precopy", "postcopy", "preempt")
CAPABILITIES = ("postcopy-ram", "postcopy-preempt")
FAILURES = ("refused", "stranger", "dropped", "cancelled")


class SoakError(RuntimeError):
    pass


def wait(condition: Callable[[], bool], timeout: float, what: str, *vms: VmChild) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for vm in vms:
            if not vm.alive():
                raise SoakError(f"{vm.name} exited: {vm.last_error()}")
        if time.monotonic() > deadline:
            raise SoakError(f"no {what} after {timeout:g} s")
        time.sleep(0.05)


def status(client: QmpClient) -> str:
    return str(client.execute("query-migrate").get("status", "none"))


# -- 1. the chain ----------------------------------------------------------------------


def set_mode(client: QmpClient, mode: str) -> None:
    postcopy, preempt = mode != "precopy", mode == "preempt"
    client.execute(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "postcopy-ram", "state": postcopy},
                {"capability": "postcopy-preempt", "state": preempt},
            ]
        },
    )
    client.execute("migrate-set-parameters", {"x-postcopy-after-rounds": 0 if preempt else 1})


def progress(client: QmpClient) -> int:
    """The guest's console bytes: one per pass and vCPU, counted across every hop."""
    return int(client.execute("x-console")["bytes"])


def chain(
    workdir: Path, hops: int, common: list[str], emit: Callable[[dict[str, Any]], None]
) -> int:
    caps = [arg for cap in CAPABILITIES for arg in ("--migrate-capability", cap)]
    current = VmChild("hop0", workdir, [*common, *caps])
    failures = 0
    try:
        client = current.connect(60)
        wait(lambda: current.console().count(b"B") >= 1, 60, "first pass", current)
        best = progress(client)
        for hop in range(1, hops + 1):
            mode = MODES[(hop - 1) % len(MODES)]
            record: dict[str, Any] = {"event": "hop", "hop": hop, "mode": mode}
            uri = f"tcp:127.0.0.1:{free_port()}"
            following = VmChild(f"hop{hop}", workdir, [*common, *caps, "--incoming", uri])
            started = time.monotonic()
            try:
                arrived = following.connect(60)
                set_mode(client, mode)
                client.execute("migrate", {"uri": uri})
                wait(lambda c=client: status(c) in FINAL, 300, "end", current)  # type: ignore[misc]
                wait(lambda c=arrived: status(c) in FINAL, 60, "end", following)  # type: ignore[misc]
                record["seconds"] = round(time.monotonic() - started, 3)
                record["status"] = [status(client), status(arrived)]
                if record["status"] != ["completed", "completed"]:
                    raise SoakError(
                        f"{record['status']}: "
                        f"{client.execute('query-migrate').get('error-desc')} / "
                        f"{arrived.execute('query-migrate').get('error-desc')}"
                    )
                record["source_state"] = client.execute("query-status")["status"]
                if record["source_state"] != "postmigrate":
                    raise SoakError(f"the source is {record['source_state']}, not postmigrate")
                wait(
                    lambda vm=following: vm.console().count(b"B") >= 1,  # type: ignore[misc]
                    60,
                    "a pass",
                    following,
                )
                now = progress(arrived)
                record["progress"] = now
                if now <= best:
                    raise SoakError(f"no progress: console bytes {now} after {best}")
                best = now
                arrived.execute("stop")
                verdict = arrived.execute("x-verify")
                record["verify"] = verdict["ok"]
                if not verdict["ok"]:
                    raise SoakError(f"x-verify: {verdict['detail']}")
                arrived.execute("cont")
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {error}"
                failures += 1
                following.end()
                emit(record)
                break
            current.quit()
            current, client = following, arrived
            emit(record)
    finally:
        current.quit()
    return failures


# -- 2. failures against one long-lived VM ----------------------------------------------


class FakeDestination:
    """A destination in this process that speaks the protocol (stream header, PONGs, reads
    the RAM runs) and drops the connection after `drop_after` bytes, or reads to the end."""

    def __init__(self, drop_after: int | None) -> None:
        self.listener: Listener = listen("tcp:127.0.0.1:0", auth=None)
        self.uri = str(self.listener.uri)
        self._drop_after = drop_after
        self._thread = threading.Thread(target=self._run, name="fake-destination", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        scratch = memoryview(bytearray(4 << 20))
        with contextlib.suppress(Exception):
            connection = self.listener.accept(30)
            with connection:
                writer = StreamWriter(connection, Direction.RETURN)
                writer.send_stream_header()
                reader = StreamReader(connection, Direction.MAIN, StreamContext(Direction.MAIN))
                reader.read_stream_header()
                while self._drop_after is None or reader.bytes_received < self._drop_after:
                    message = reader.read()
                    if isinstance(message, RamRunHeader) and message.data_length:
                        reader.read_data_into(scratch[: message.data_length])
                    elif isinstance(message, Ping):
                        writer.send(Pong(message.value))

    def close(self) -> None:
        self.listener.close()
        self._thread.join(10)


class Stranger:
    """Accepts and hangs up at once: the source fails in its handshake."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            peer, _ = self._sock.accept()
            peer.close()

    def close(self) -> None:
        self._sock.close()
        self._thread.join(10)


def resources(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status_file:
        fields = dict(line.split(":", 1) for line in status_file if ":" in line)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
        "rss_kib": int(fields["VmRSS"].split()[0]),
    }


def settled_resources(pid: int, reads: int = 10, pause: float = 0.05) -> dict[str, int]:
    """fds and threads at their lowest over half a second: a migration that just ended
    may still be closing its last socket or ending a thread (seen: +2 of each, once in
    200); a leak stays. RSS as last read."""
    samples = []
    for _ in range(reads):
        samples.append(resources(pid))
        time.sleep(pause)
    return {
        "fds": min(s["fds"] for s in samples),
        "threads": min(s["threads"] for s in samples),
        "rss_kib": samples[-1]["rss_kib"],
    }


def fail_once(client: QmpClient, kind: str) -> str:
    """One migration of the kind; returns the final status."""
    peer: FakeDestination | Stranger | None = None
    try:
        if kind == "refused":
            uri = f"tcp:127.0.0.1:{free_port()}"  # nobody listens there
        elif kind == "stranger":
            peer = Stranger()
            uri = peer.uri
        else:
            peer = FakeDestination(drop_after=(8 << 20) if kind == "dropped" else None)
            uri = peer.uri
        cap = (8 << 20) if kind == "cancelled" else 0  # held in precopy until cancelled
        client.execute("migrate-set-parameters", {"max-bandwidth": cap})
        client.execute("migrate", {"uri": uri})
        if kind == "cancelled":
            wait(lambda: status(client) == "active" or status(client) in FINAL, 30, "active")
            client.execute("migrate_cancel")
        wait(lambda: status(client) in FINAL, 60, f"end of a {kind} migration")
        return status(client)
    finally:
        if peer is not None:
            peer.close()


def failures_soak(
    workdir: Path,
    count: int,
    common: list[str],
    warmup: int,
    rss_slack_kib: int,
    emit: Callable[[dict[str, Any]], None],
) -> tuple[int, dict[str, Any]]:
    expected = {"refused": "failed", "stranger": "failed", "dropped": "failed"}
    vm = VmChild("steady", workdir, common)
    bad = 0
    samples: list[dict[str, Any]] = []
    try:
        client = vm.connect(60)
        start = {"event": "sample", "after": 0, **settled_resources(vm.pid)}
        samples.append(start)
        emit(start)
        for index in range(1, count + 1):
            kind = FAILURES[(index - 1) % len(FAILURES)]
            final = fail_once(client, kind)
            if final != expected.get(kind, "cancelled"):
                bad += 1
                emit({"event": "failure", "index": index, "kind": kind, "status": final})
            if not client.execute("query-status")["running"]:
                raise SoakError(f"the VM stopped running after a {kind} migration")
            if index in (warmup, count) or index % 20 == 0:
                sample = {"event": "sample", "after": index, **settled_resources(vm.pid)}
                samples.append(sample)
                emit(sample)
        client.execute("migrate-set-parameters", {"max-bandwidth": 0})
    finally:
        vm.quit()
    base = next(s for s in samples if s["after"] >= warmup)
    last = samples[-1]
    summary = {
        "migrations": count,
        "unexpected": bad,
        "at_start": {k: samples[0][k] for k in ("fds", "threads", "rss_kib")},
        "after_warmup": {k: base[k] for k in ("fds", "threads", "rss_kib")},
        "at_end": {k: last[k] for k in ("fds", "threads", "rss_kib")},
        "rss_growth_kib": last["rss_kib"] - base["rss_kib"],
    }
    flat = (
        last["fds"] == base["fds"]
        and last["threads"] == base["threads"]
        and last["rss_kib"] - base["rss_kib"] <= rss_slack_kib
    )
    summary["flat"] = flat
    return bad + (not flat), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=50)
    parser.add_argument("--failures", type=int, default=200)
    parser.add_argument("--ram", default="256M")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20, help="failures before the baseline")
    parser.add_argument("--rss-slack", default="8M", help="RSS growth allowed after warm-up")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    common = ["--guest", "memtouch", "--ram", args.ram, "--vcpus", str(args.vcpus)]
    output = args.out.open("a") if args.out else None

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if output is not None:
            output.write(line + "\n")
            output.flush()

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="postcopy-soak-") as workdir:
        chain_failures = chain(Path(workdir), args.hops, common, emit) if args.hops else 0
        chain_seconds = round(time.monotonic() - started, 1)
        failure_count, resource_summary = 0, dict[str, Any]()
        if args.failures:
            failure_count, resource_summary = failures_soak(
                Path(workdir),
                args.failures,
                common,
                min(args.warmup, args.failures),
                parse_size(args.rss_slack) // 1024,
                emit,
            )
    summary = {
        "event": "summary",
        "hops": args.hops,
        "hops_failed": chain_failures,
        "chain_seconds": chain_seconds,
        "failures": resource_summary,
        "seconds": round(time.monotonic() - started, 1),
        "ok": chain_failures == 0 and failure_count == 0,
    }
    emit(summary)
    if output is not None:
        output.close()
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
