"""Soak: memtouch and randwrite on every RAM backend, every mode, 1 and 2 vCPUs, x-verify.

    .venv/bin/python benchmarks/backends_soak.py [--ram 256M] [--hugetlb-passes 3]
        [--backends ram,memfd,memfd-hugetlb,hugetlbfs] [--modes precopy,postcopy1,postcopy0]
        [--minor] [--out FILE.jsonl]

(`make backends-soak`; as root, not part of the test suite.) One migration per
combination of guest (memtouch, randwrite), backend (ram, memfd, memfd-hugetlb, a file on
a hugetlbfs mount), mode (precopy, postcopy after one round, postcopy from the start) and
vCPUs (1, 2), between two `postcopy vm run` processes on loopback; the guest runs a pass on
the destination, then is stopped and checked with x-verify. The hugetlb backends go round
`--hugetlb-passes` times (3: 24 runs per mode on huge pages). It takes the huge pages it
needs from the pool for each run and gives them back (benchmarks run on a shared machine),
mounts hugetlbfs in a temporary directory for the file backend, and checks after each run
that none of the pages it took is still in use once given back (`pool_given_back`; the
machine-wide counts, `pool_restored`, also move when others reserve pages meanwhile, so
they are recorded, not checked) and the mount holds no file. One JSON line per run;
the last line is the summary; the exit status is 1 if any run failed or mismatched.
`--minor`: the destinations in minor-fault mode (x-postcopy-minor-faults; memfd and hugetlb
backends, a hugetlbfs file then mapped --share on; `ram` places by copy as without it).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from postcopy.linux.hugepages import HUGE_PAGE_2M, HugePagePool, hugepages_reserved
from postcopy.tools.qmpclient import QmpClientError
from postcopy.tools.vmchild import VmChild, free_port
from postcopy.units import parse_size

GUESTS = {"memtouch": b"B", "randwrite": b"W"}
MODES = {"precopy": None, "postcopy1": 1, "postcopy0": 0}
HUGETLB = ("memfd-hugetlb", "hugetlbfs")


@contextlib.contextmanager
def hugetlbfs_mount() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="postcopy-soak-hugetlbfs-")
    try:
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", directory], check=True
        )
        try:
            yield directory
        finally:
            leftovers = os.listdir(directory)
            subprocess.run(["umount", directory], check=True)
            if leftovers:
                raise RuntimeError(f"files left on the hugetlbfs mount: {leftovers}")
    finally:
        os.rmdir(directory)


def wait(condition: Any, timeout: float, what: str, *vms: VmChild) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for vm in vms:
            if not vm.alive():
                raise RuntimeError(f"{vm.name} exited: {vm.last_error()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:g} s")
        time.sleep(0.05)


def migrate_once(
    workdir: Path,
    guest: str,
    backend: str,
    mode: str,
    vcpus: int,
    ram: int,
    mount: str | None,
    minor: bool = False,
) -> dict[str, Any]:
    marker = GUESTS[guest]
    memory = f"file:{mount}" if backend == "hugetlbfs" else backend
    common = ["--guest", guest, "--ram", str(ram), "--vcpus", str(vcpus)]
    if minor and backend == "hugetlbfs":
        common += ["--share", "on"]  # minor-fault mode maps the file twice: shared only
    common.append("--memory-backend")
    caps = [] if MODES[mode] is None else ["--migrate-capability", "postcopy-ram"]
    uri = f"tcp:127.0.0.1:{free_port()}"
    destination = VmChild("destination", workdir, [*common, memory, "--incoming", uri, *caps])
    source = VmChild("source", workdir, [*common, memory, *caps])
    record: dict[str, Any] = {"guest": guest, "backend": backend, "mode": mode, "vcpus": vcpus}
    try:
        dst = destination.connect(60)
        src = source.connect(60)
        if minor:
            dst.execute("migrate-set-parameters", {"x-postcopy-minor-faults": True})
        parameters: dict[str, Any] = {"x-max-rounds": 5}
        if MODES[mode] is not None:
            src.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
            )
            parameters["x-postcopy-after-rounds"] = MODES[mode]
        src.execute("migrate-set-parameters", parameters)
        wait(lambda: source.console().count(marker) >= vcpus, 120, "warm-up", source)
        started = time.monotonic()
        src.execute("migrate", {"uri": uri})
        final = {"completed", "failed", "cancelled"}
        wait(lambda: src.execute("query-migrate")["status"] in final, 300, "end", source)
        wait(lambda: dst.execute("query-migrate")["status"] in final, 60, "end", destination)
        record["seconds"] = round(time.monotonic() - started, 3)
        info, dest_info = src.execute("query-migrate"), dst.execute("query-migrate")
        record["status"] = [info["status"], dest_info["status"]]
        record["total_time_ms"] = info.get("total-time")
        record["placement"] = dest_info.get("x-placement")
        record["huge_page_placement_us"] = dest_info.get("x-huge-page-placement-us")
        record["request_latency"] = dest_info.get("x-request-latency")
        if record["status"] != ["completed", "completed"]:
            record["error"] = info.get("error-desc") or dest_info.get("error-desc")
            return record
        passes = destination.console().count(marker)
        wait(lambda: destination.console().count(marker) > passes, 60, "pass", destination)
        dst.execute("stop")
        verify = dst.execute("x-verify")
        record["verify"] = {"ok": verify["ok"], "detail": verify["detail"]}
    except (QmpClientError, RuntimeError, TimeoutError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
    finally:
        for vm in (source, destination):
            vm.quit()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="256M")
    parser.add_argument("--hugetlb-passes", type=int, default=3)
    parser.add_argument("--backends", default="ram,memfd,memfd-hugetlb,hugetlbfs")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--minor", action="store_true", help="destinations in minor-fault mode")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ram = parse_size(args.ram)
    backends = args.backends.split(",")
    unknown = set(args.modes.split(",")) - MODES.keys()
    if unknown:
        parser.error(f"unknown mode {sorted(unknown)[0]!r}: one of {', '.join(MODES)}")
    runs = []
    for backend in backends:
        passes = args.hugetlb_passes if backend in HUGETLB else 1
        modes = args.modes.split(",")
        for _, guest, mode, vcpus in itertools.product(range(passes), GUESTS, modes, (1, 2)):
            runs.append((guest, backend, mode, vcpus))
    failures = 0
    per_mode: dict[str, list[int]] = {}
    output = args.out.open("a") if args.out else None
    for index, (guest, backend, mode, vcpus) in enumerate(runs, 1):
        before = hugepages_reserved(HUGE_PAGE_2M)
        pool = None
        with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as workdir:
            mount = None
            if backend in HUGETLB:
                pool = stack.enter_context(HugePagePool(2 * ram // HUGE_PAGE_2M))
            if backend == "hugetlbfs":
                mount = stack.enter_context(hugetlbfs_mount())
            record = migrate_once(
                Path(workdir), guest, backend, mode, vcpus, ram, mount, args.minor
            )
        after = hugepages_reserved(HUGE_PAGE_2M)
        # what the run took went back: none of its pages still mapped once it gave the pool
        # back (HugePagePool.still_in_use); the machine-wide counts, beside it, also move
        # when someone else reserves pages meanwhile (benchmarks on a shared machine)
        record["pool_given_back"] = pool is None or pool.still_in_use == 0
        record["pool_restored"] = after == before
        if after != before:  # (total, free): another user of the pool, or ours left over
            record["pool"] = {"before": list(before), "after": list(after)}
        ok = bool(record.get("verify", {}).get("ok")) and record["pool_given_back"]
        failures += not ok
        if backend in HUGETLB:
            per_mode.setdefault(mode, [0, 0])[0 if ok else 1] += 1
        line = json.dumps(record)
        print(f"[{index}/{len(runs)}] {'ok' if ok else 'FAIL'} {line}", flush=True)
        if output is not None:
            output.write(line + "\n")
            output.flush()
    summary = {
        "runs": len(runs),
        "failed": failures,
        "hugetlb_runs_per_mode": {
            mode: {"ok": ok, "failed": bad} for mode, (ok, bad) in per_mode.items()
        },
    }
    print("# " + json.dumps(summary), flush=True)
    if output is not None:
        output.write("# " + json.dumps(summary) + "\n")
        output.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
