"""Recovery soak: real cuts at random points of postcopy, and every run must recover.

    .venv/bin/python benchmarks/recovery_soak.py [--runs 50] [--seed N] [--ram 256M]
        [--out FILE.jsonl] [--only MECHANISM,...]

(`make recovery-soak`; not part of the test suite, which holds a handful of these.) Each
run starts a source and a destination (`vm run`, memtouch), migrates with one precopy
round then postcopy through a link proxy (bench/linkproxy.py), and breaks the link at a
random point of postcopy, by turns:

- `reset`: the proxy resets every connection N bytes into what is left of postcopy (N
  random; the push is held at the switchover until the point is drawn and armed, so the
  point is always before the end),
- `reset-ram`: a reset K bytes into a RAM_RUN frame (inside its page data, K random),
- `reset-bitmap`: a first reset as `reset`, then another inside the RECV_BITMAP reply of
  the reconnect (a double failure in the handshake),
- `freeze`: the link goes silent both ways at such a point (the heartbeats find it, then
  it comes back),
- `drop-up`: the return direction is lost from such a point (the source's heartbeat
  finds it),
- `ss-kill`: the proxy holds the link at such a point and `ss -K` destroys its sockets to
  the destination in the kernel (root only; else a `reset`),
- `blocked`: the push is held at 4096 bytes/s, the guest's requests are dropped so that
  a vCPU waits on a missing page, then the link is reset: after the resume, the time to
  that page (x-pending-pages-ms) is what the issue bounds (100 ms),

with or without postcopy-preempt, 1 or 2 vCPUs, the source reconnecting by itself
(x-postcopy-auto-recover). A run passes when both sides complete, x-verify finds the
guest's memory consistent on the destination (QEMU's check_guests_ram: a page lost or
stale shows), the guest makes a new pass there, every needed page was placed, and
afterwards no VM process is left, the proxy's sockets are closed and this process's fds
are back where they were. One JSON line per run; the last line is the summary (runs
passed, and the figures: paused time, reconnect to active, pages sent again, pending
pages served after the resume). Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from soak import SoakError, wait  # the chain soak's: same errors, same polling

from postcopy.bench.linkproxy import Action, Cut, LinkProxy
from postcopy.tools.qmpclient import QmpClient
from postcopy.tools.vmchild import VmChild, free_port
from postcopy.units import parse_size
from postcopy.wire import FrameType

MECHANISMS = ("reset", "reset-ram", "reset-bitmap", "freeze", "drop-up", "ss-kill", "blocked")
QUICK = {"x-heartbeat-interval-ms": 100, "x-heartbeat-timeout-ms": 1500}
PUSH_RATE = 24 << 20  # bytes/s: postcopy lasts a few seconds, so the cut falls inside it
HOLD = 4096  # bytes/s: the push "throttled to nothing"
FINAL = {"completed", "failed", "cancelled"}


def query(client: QmpClient) -> dict[str, Any]:
    return dict(client.execute("query-migrate"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_run(
    index: int, rng: random.Random, workdir: Path, ram: int, mechanism: str
) -> dict[str, Any]:
    vcpus = rng.choice((1, 2))
    preempt = mechanism != "blocked" and rng.random() < 0.5
    record: dict[str, Any] = {
        "event": "run",
        "run": index,
        "mechanism": mechanism,
        "vcpus": vcpus,
        "preempt": preempt,
    }
    uri = f"tcp:127.0.0.1:{free_port()}"
    caps = ["postcopy-ram", "postcopy-blocktime", *(["postcopy-preempt"] if preempt else [])]
    cap_args = [arg for cap in caps for arg in ("--migrate-capability", cap)]
    common = ["--guest", "memtouch", "--ram", str(ram), "--vcpus", str(vcpus)]
    directory = Path(tempfile.mkdtemp(prefix=f"run{index}-", dir=workdir))
    destination = VmChild("destination", directory, [*common, *cap_args, "--incoming", uri])
    source = VmChild("source", directory, [*common, *cap_args])
    vms = (source, destination)
    proxy = LinkProxy(uri)
    started = time.monotonic()
    try:
        dst, src = destination.connect(60), source.connect(60)
        dst.execute("migrate-set-parameters", QUICK)
        src.execute(
            "migrate-set-parameters",
            {
                **QUICK,
                "x-postcopy-after-rounds": 1,
                "max-postcopy-bandwidth": HOLD,  # until the cut is armed: see cut_link
                "x-postcopy-auto-recover": True,
            },
        )
        wait(lambda: source.console().count(b"B") >= vcpus, 60, "a first pass", *vms)
        src.execute("migrate", {"uri": proxy.uri})
        wait(lambda: query(dst).get("status") == "postcopy-active", 60, "postcopy", *vms)
        cut = cut_link(mechanism, rng, proxy, src, dst, uri, record, vms)
        wait(lambda: query(src).get("status") in FINAL, 180, "the end (source)", *vms)
        wait(lambda: query(dst).get("status") in FINAL, 60, "the end (destination)", *vms)
        source_info, destination_info = query(src), query(dst)
        record["seconds"] = round(time.monotonic() - started, 2)
        record["status"] = [source_info.get("status"), destination_info.get("status")]
        record.update(cut)
        record.update(figures(source_info, destination_info))
        if record["status"] != ["completed", "completed"]:
            raise SoakError(
                f"{record['status']}: {source_info.get('error-desc')} / "
                f"{destination_info.get('error-desc')}"
            )
        if not source_info.get("x-pauses"):
            raise SoakError("the link was never found broken: nothing paused")
        counts = source_info.get("x-postcopy") or {}
        placed = destination_info.get("x-pages-placed", 0)
        if placed < counts.get("needed-pages", 0):
            raise SoakError(f"{placed} pages placed of {counts.get('needed-pages')} needed")
        before = destination.console().count(b"B")
        wait(lambda: destination.console().count(b"B") > before, 60, "a new pass", destination)
        dst.execute("stop")
        verdict = dst.execute("x-verify")
        record["verify"] = verdict["detail"]
        if not verdict["ok"]:
            raise SoakError(f"x-verify: {verdict['detail']}")
        record["ok"] = True
    except Exception as error:
        record["ok"] = False
        record["error"] = f"{type(error).__name__}: {error}"
        record["stderr"] = {vm.name: vm.stderr_tail(2000) for vm in vms}
    finally:
        proxy.close()
        for vm in vms:
            vm.end()
        record["left"] = leftovers(vms, proxy, uri)
        if record["left"]:
            record["ok"] = False
        shutil.rmtree(directory, ignore_errors=True)
    return record


def cut_link(
    mechanism: str,
    rng: random.Random,
    proxy: LinkProxy,
    src: QmpClient,
    dst: QmpClient,
    uri: str,
    record: dict[str, Any],
    vms: tuple[VmChild, ...],
) -> dict[str, Any]:
    """Break the link in postcopy as `mechanism` says; the source then recovers by itself.

    The push is held (HOLD) from the switchover until the cut is armed, and the point is
    drawn from what is left of postcopy then: how long postcopy lasts depends on what the
    guest dirtied in the precopy round (11k-19k pages of 256 MiB in most runs, a few
    hundred in some), so a point drawn in time or in bytes from the switchover, without
    looking, may come after the end, and then nothing breaks."""
    found: dict[str, Any] = {}

    def release() -> None:
        src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": PUSH_RATE})

    def arm_in_what_is_left(action: Action) -> None:
        after = random_point(rng, src)
        record["cut_after_bytes"] = after
        proxy.arm(Cut(after=after, action=action))
        release()

    def reported() -> dict[str, Any]:
        report = proxy.wait_cut(120)
        return {"cut_frame": report.frame_type, "cut_offset": report.frame_offset}

    if mechanism in ("reset", "freeze", "drop-up"):
        arm_in_what_is_left("reset" if mechanism == "reset" else "freeze")
        found = reported()
        if mechanism == "drop-up":
            proxy.thaw()  # the main stream flows again; the return direction is lost
            proxy.drop("up")
        if mechanism in ("freeze", "drop-up"):
            wait(lambda: query(src).get("x-pauses", 0) > 0, 60, "a pause", *vms)
            proxy.thaw()
    elif mechanism == "reset-ram":
        proxy.arm(Cut(frame=FrameType.RAM_RUN, offset=rng.randrange(0, 1 << 20)))
        release()
        found = reported()
    elif mechanism == "reset-bitmap":
        arm_in_what_is_left("reset")
        reported()
        # the source reconnects after its first backoff (x-recover-backoff-ms, 500 ms)
        proxy.arm(Cut(frame=FrameType.RECV_BITMAP, direction="up", offset=rng.randrange(0, 9000)))
        found = reported()
    elif mechanism == "ss-kill" and os.geteuid() == 0 and shutil.which("ss"):
        arm_in_what_is_left("freeze")  # the point; the kernel breaks the link there
        found = {**reported(), "cut_by": "ss -K"}
        port = uri.rsplit(":", 1)[1]
        # the proxy's upstream sockets go to the destination's port: kill them in the kernel
        subprocess.run(
            ["ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", port],
            check=True,
            capture_output=True,
        )
        proxy.thaw()
    elif mechanism == "blocked":
        proxy.drop("up")  # requests lost: a vCPU waits on a page that does not come
        sent = query(dst).get("x-postcopy-requests-sent", 0)  # after the drop: lost ones
        wait(lambda: proxy.request_lost(query(dst), sent), 30, "a lost request", *vms)
        time.sleep(0.3)
        proxy.reset()
        wait(lambda: query(src).get("x-recoveries", 0) > 0, 60, "a recovery", *vms)
        wait(lambda: "x-pending-pages-ms" in query(dst), 30, "the pending pages", *vms)
        release()
    else:  # ss-kill without root: the proxy resets the link at the point instead
        arm_in_what_is_left("reset")
        found = {**reported(), "cut_by": "not root: a proxy reset instead of ss -K"}
    return found


def random_point(rng: random.Random, src: QmpClient) -> int:
    """A byte count from now into what is left of postcopy (the push held meanwhile).

    What is left must all cross, on the main channel or on the preempt channel, so one of
    them carries at least half of it; a third leaves room for the pages the guest asks
    for between this query and the cut's arming."""
    info = query(src)
    counts = info.get("x-postcopy") or {}
    left = (
        counts.get("needed-pages", 0)
        - counts.get("pushed-pages", 0)
        - counts.get("requested-pages", 0)
    )
    page_size = int((info.get("ram") or {}).get("page-size") or 4096)
    return rng.randrange(0, max(1, left * page_size // 3))


def figures(source: dict[str, Any], destination: dict[str, Any]) -> dict[str, Any]:
    return {
        "pauses": source.get("x-pauses"),
        "recoveries": source.get("x-recoveries"),
        "attempts": source.get("x-recovery-attempts"),
        "paused_ms": source.get("x-paused-ms"),
        "resent_pages": source.get("x-recovery-resent-pages"),
        "pending_pages": destination.get("x-pending-pages"),
        "pending_ms": destination.get("x-pending-pages-ms"),
        "blocktime_ms": destination.get("postcopy-blocktime"),
        "refused": destination.get("x-refused-connections"),
        "needed_pages": (source.get("x-postcopy") or {}).get("needed-pages"),
        "postcopy_bytes": (source.get("ram") or {}).get("postcopy-bytes"),
    }


def leftovers(vms: tuple[VmChild, ...], proxy: LinkProxy, uri: str) -> list[str]:
    left = [f"{vm.name} (PID {vm.pid}) still runs" for vm in vms if vm.alive()]
    left += [f"proxy connection {c.index} open" for c in proxy.live()]
    port = uri.rsplit(":", 1)[1]
    if shutil.which("ss"):
        sockets = subprocess.run(
            ["ss", "-Htn", f"( sport = :{port} or dport = :{port} )"],
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        left += [f"socket: {line.strip()}" for line in sockets if "ESTAB" in line]
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ram", default="256M")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--only",
        default=",".join(MECHANISMS),
        help="the mechanisms to take in turn, comma-separated (default: all)",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    ram = parse_size(args.ram)
    mechanisms = args.only.split(",")
    unknown = sorted(set(mechanisms) - set(MECHANISMS))
    if unknown:
        parser.error(f"unknown mechanism {unknown[0]!r}; known: {', '.join(MECHANISMS)}")
    out = args.out.open("w") if args.out else None

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    fds_before = open_fds()
    records = []
    with tempfile.TemporaryDirectory(prefix="recovery-soak-") as workdir:
        for index in range(args.runs):
            mechanism = mechanisms[index % len(mechanisms)]
            record = one_run(index, rng, Path(workdir), ram, mechanism)
            emit(record)
            records.append(record)
    fds_after = open_fds()
    passed = [r for r in records if r["ok"]]
    pending = [r["pending_ms"] for r in records if r.get("pending_pages")]
    blocked = [r["pending_ms"] for r in records if r["mechanism"] == "blocked" and r["ok"]]

    def spread(values: list[Any]) -> dict[str, Any]:
        values = sorted(v for v in values if v is not None)
        if not values:
            return {}
        return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}

    emit(
        {
            "event": "summary",
            "seed": seed,
            "runs": len(records),
            "passed": len(passed),
            "failed": [r["run"] for r in records if not r["ok"]],
            "fds_before": fds_before,
            "fds_after": fds_after,
            "paused_ms": spread([r.get("paused_ms") for r in passed]),
            "resent_pages": spread([r.get("resent_pages") for r in passed]),
            "attempts": spread([r.get("attempts") for r in passed]),
            "pending_ms_any": spread(pending),
            "pending_ms_blocked_vcpu_push_held": spread(blocked),
            "cuts_inside_ram_frames": sum(
                1 for r in passed if r.get("cut_frame") == FrameType.RAM_RUN
            ),
            "cuts_inside_the_bitmap_reply": sum(
                1 for r in passed if r.get("cut_frame") == FrameType.RECV_BITMAP
            ),
        }
    )
    if out is not None:
        out.close()
    return 0 if len(passed) == len(records) and fds_after <= fds_before else 1


if __name__ == "__main__":
    sys.exit(main())
