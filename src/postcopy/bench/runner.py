"""One benchmark run: limits, two VM processes, the migration watched, every figure kept.

A run of a scenario, in order:
1. the limits on this link for this guest size (postcopy.bench.limits), before any VM
   exists so nothing competes with them;
2. a destination `postcopy vm run --incoming` on the destination side of the link and a
   source `postcopy vm run` on the source side, both with a fresh shared key;
3. the source's guest runs until it has written its memory once (console markers);
4. `migrate`; query-migrate on both sides every `poll_interval` until both are final,
   which gives the time series for the plot;
5. the final query-migrate of both sides, the timelines (x-migration-timeline), the
   destination's memory (/proc), its console passes, and x-verify on the stopped guest;
6. `quit` both, and everything the run started is ended (postcopy.bench.cleanup).

The record is one JSON object (a line of the bench's output file); postcopy.bench.analysis
derives the figures, ratios and target verdicts from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postcopy.bench.analysis import analyse, bench_run
from postcopy.bench.cleanup import Cleanup
from postcopy.bench.libvirt import POLL_SECONDS, LibvirtSwitch
from postcopy.bench.limits import measure_limits
from postcopy.bench.link import Link, Side
from postcopy.bench.linkproxy import Cut, LinkProxy
from postcopy.bench.procinfo import (
    host_cpu_times,
    host_cpu_usage,
    memory_figures,
    thread_comms,
    thread_cpu,
    wait_for_quiet_host,
)
from postcopy.bench.profile import Profiler
from postcopy.bench.scenarios import Scenario
from postcopy.bench.service import ServiceRun
from postcopy.linux.hugepages import HUGE_PAGE_2M, HugePagePool
from postcopy.linux.memory import Advice, Mapping
from postcopy.migration.hops import hop_summary, join_hops, wait_summary
from postcopy.tools.qmpclient import QmpClientError
from postcopy.tools.runfile import RunWriter, Sampler, end_records, header_record
from postcopy.tools.vmchild import VmChild, VmChildError, free_port
from postcopy.tools.watch import (
    Poll,
    WatchTimeout,
    query_migrate,
    watch_until_final,
)
from postcopy.transport import AuthConfig
from postcopy.wire import FrameType

# 2: limits.fill_rate is the first (fresh-memory) pass; warm_fill_rate added
# 3: the migration as a run record ("run", postcopy/tools/runfile.py) instead of "series",
#    "timelines", "source" and "destination"
SCHEMA = 3
WARMUP_TIMEOUT = 300.0


class RunError(RuntimeError):
    pass


@dataclass
class RunOptions:
    link: Link
    workdir: Path
    poll_interval: float = 0.05
    verify: bool = True
    fault_probes: int = 2000
    keep_workdir: bool = False
    # with a path prefix, py-spy profiles both VM processes; raw stacks go beside it
    profile_prefix: Path | None = None
    # wait up to this many seconds before each run for other processes to leave the cores
    wait_idle: float = 0.0


def host_info() -> dict[str, Any]:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "thp": thp.read_text().strip() if thp.exists() else None,
    }
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                check=False,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


class VmHandle(VmChild):
    """A `postcopy vm run` process on one side of the link, with its files and QMP; its
    end is on the run's Cleanup from the moment it exists."""

    def __init__(
        self, cleanup: Cleanup, side: Side, directory: Path, name: str, args: list[str]
    ) -> None:
        super().__init__(name, directory, args, wrap=side.command)
        cleanup.push(f"process {name} (pid {self.pid})", self.end)
        try:
            self.qmp = self.connect(60.0, client_timeout=30.0)
        except VmChildError as error:
            raise RunError(f"{error}: {self.stderr_tail()}") from None

    def query(self) -> dict[str, Any] | None:
        """query-migrate, or None once the process or its QMP connection is gone."""
        return query_migrate(self.qmp)


def _wait_for(
    condition: Callable[[], bool], timeout: float, what: str, alive: list[VmHandle]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for vm in alive:
            if vm.process.poll() is not None:
                raise RunError(
                    f"{vm.name} exited with {vm.process.returncode} while waiting "
                    f"for {what}: {vm.stderr_tail()}"
                )
        if time.monotonic() > deadline:
            raise RunError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


class CpuSeries:
    """CPU seconds each thread of both VMs used since `migrate`, one value per poll (the
    run's samples): {side: {thread id: [...]}}."""

    def __init__(self) -> None:
        self.cpu: dict[str, dict[str, list[float | None]]] = {}
        self.polls = 0

    def add(self, side: str, now: dict[int, float], before: dict[int, float]) -> None:
        threads = self.cpu.setdefault(side, {})
        index = self.polls - 1
        for tid, used in now.items():
            column = threads.setdefault(str(tid), [])
            column.extend([None] * (index - len(column)))  # a thread born mid-run
            column.append(round(used - before.get(tid, 0.0), 3))
        for column in threads.values():
            column.extend([None] * (index + 1 - len(column)))  # a thread that ended


def _migration_timeout(scenario: Scenario, link: Link) -> float:
    rate = link.rate or 2e8  # a floor for a loaded loopback
    rounds = int(scenario.migration_parameters.get("x-max-rounds", 5)) + 2
    return 120.0 + rounds * scenario.ram / rate


def _memory(scenario: Scenario, directory: Path, cleanup: Cleanup) -> str:
    """The --memory-backend of both VMs; for huge pages, the pool grown for this run (both
    VMs' pages, warmed: see warm_huge_pages) and, for a file, a hugetlbfs mount of its own,
    all undone by the run's cleanup."""
    if not scenario.hugetlb:
        return scenario.backend
    pool = HugePagePool(2 * scenario.ram // HUGE_PAGE_2M).reserve()
    cleanup.push("the huge pages added to the pool", pool.release)
    warm_huge_pages(pool.pages)
    if scenario.backend == "memfd-hugetlb":
        return "memfd-hugetlb"
    mount = directory / "hugetlbfs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)], check=True
    )
    cleanup.push(f"hugetlbfs mount {mount}", lambda: _unmount(mount))
    return f"file:{mount}"


def _unmount(mount: Path) -> None:
    subprocess.run(["umount", str(mount)], check=False)


def warm_huge_pages(pages: int) -> None:
    """Touch every free huge page once. This host's memory is backed lazily by its own
    hypervisor: the first touch of a page new to the pool costs ~13 ms per 2 MiB (a warm
    one ~0.1-0.4 ms), which would be charged to whichever migration meets it first."""
    with Mapping.memfd(pages * HUGE_PAGE_2M, "warm", hugetlb=True) as mapping:
        mapping.madvise(Advice.POPULATE_WRITE)


def _vm_args(scenario: Scenario, key: Path, trace: Path, memory: str = "ram") -> list[str]:
    args = [
        "--guest",
        scenario.guest,
        "--ram",
        str(scenario.ram),
        "--vcpus",
        str(scenario.vcpus),
        "--key",
        str(key),
        "--trace",
        str(trace),
        "--guest-cpl",
        str(scenario.cpl),
        "--memory-backend",
        memory,
    ]
    if scenario.minor and scenario.backend == "hugetlbfs":
        args += ["--share", "on"]  # minor-fault mode maps the file twice: shared only
    if scenario.prealloc:
        args.append("--mem-prealloc")
    for name, value in scenario.guest_params.items():
        args += ["--guest-param", f"{name}={value}"]
    for capability in scenario.capabilities:
        args += ["--migrate-capability", capability]
    return args


def _cpu_usage(
    vms: list[VmHandle],
    before: dict[str, dict[int, float]],
    seen: dict[str, dict[int, float]],
    host_before: list[int],
    bench_before: float,
    seconds: float,
    names: dict[str, dict[int, str]],
) -> dict[str, Any]:
    """CPU seconds each VM thread used during the migration, and how busy the host was:
    on 2 shared cores, a figure far from its limit is often a thread waiting for a core."""
    usage: dict[str, Any] = {"seconds": seconds}
    ours = time.process_time() - bench_before
    for vm in vms:
        after = {**seen[vm.name], **thread_cpu(vm.pid)}
        threads = {
            tid: round(used - before[vm.name].get(tid, 0.0), 3) for tid, used in after.items()
        }
        usage[vm.name] = {
            "total": round(sum(threads.values()), 3),
            "threads": {str(tid): used for tid, used in threads.items() if used},
            "names": {str(tid): name for tid, name in names[vm.name].items()},
        }
        ours += usage[vm.name]["total"]
    host = host_cpu_usage(host_before, host_cpu_times(), seconds)
    host["ours_cores"] = round(ours / seconds, 3) if seconds > 0 else 0.0
    host["others_cores"] = round(max(host["busy_cores"] - host["ours_cores"], 0.0), 3)
    usage["host"] = host
    return usage


WAIT_HOPS_KEPT = 2000  # requests whose hops go in the record beside the wait log


def _request_hops(
    source: VmHandle, destination: VmHandle
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Where the page requests' latency went, hop by hop, and the vCPUs' waits: the wait
    log as columns and a summary per kind of wait (migration/hops.py)."""
    try:
        outgoing = source.qmp.execute("x-request-hops").get("outgoing") or {}
        incoming = destination.qmp.execute("x-request-hops").get("incoming") or {}
    except QmpClientError:
        return None, None
    joined = join_hops(incoming, outgoing)
    log = incoming.get("waits") or {}
    waits = None
    if log.get("kind"):  # with the requests' hops, to blame a long wait on a hop
        # and every run placed, in order (the push's order and pace: what the vCPUs rode)
        placed = {k: v[:WAIT_HOPS_KEPT] for k, v in (incoming.get("placed") or {}).items()}
        waits = {
            "summary": wait_summary(log),
            "log": log,
            "hops": joined[:WAIT_HOPS_KEPT],
            "placed": placed,
        }
    return (hop_summary(joined) if joined else None), waits


def _migrate(
    scenario: Scenario,
    options: RunOptions,
    directory: Path,
    cleanup: Cleanup,
    record: dict[str, Any],
) -> None:
    link = options.link
    key = directory / "key"
    AuthConfig.generate().write(key)
    uri = f"tcp:{link.destination.address}:{free_port()}"
    # a kvstore guest serves clients through the migration (postcopy.bench.service)
    service = ServiceRun(scenario.load, directory, cleanup) if scenario.load else None
    service_args = service.vm_args() if service else []
    memory = _memory(scenario, directory, cleanup)
    destination = VmHandle(
        cleanup,
        link.destination,
        directory,
        "destination",
        [
            *_vm_args(scenario, key, directory / "destination.trace", memory),
            *service_args,
            "--incoming",
            uri,
        ],
    )
    source = VmHandle(
        cleanup,
        link.source,
        directory,
        "source",
        [*_vm_args(scenario, key, directory / "source.trace", memory), *service_args],
    )
    record["pids"] = {"source": source.pid, "destination": destination.pid}
    vms = [source, destination]
    try:
        source.qmp.execute("migrate-set-parameters", scenario.migration_parameters)
        if scenario.destination_parameters:
            destination.qmp.execute("migrate-set-parameters", scenario.destination_parameters)
        _wait_for(lambda: "status" in (destination.query() or {}), 30, "listening destination", vms)
        marker, count = scenario.warmup
        _wait_for(
            lambda: source.console().count(marker) >= count,
            WARMUP_TIMEOUT,
            f"{count}x {marker!r} on the source console (guest warm-up)",
            vms,
        )
        record["source_memory"] = memory_figures(source.pid, scenario.ram)
        if service is not None:
            service.start_load()

        profiler = None
        if options.profile_prefix is not None:
            run_name = re.sub(r"[^A-Za-z0-9._-]+", "-", record["run_id"])
            profiler = Profiler(
                cleanup,
                record["pids"],
                options.profile_prefix.with_name(
                    f"{options.profile_prefix.name}-{link.name}-{run_name}"
                ),
            )
            profiler.start()
        vcpu_threads = {
            vm.name: {
                cpu["thread-id"]: f"vcpu{cpu['cpu-index']}"
                for cpu in vm.qmp.execute("query-cpus-fast")
            }
            for vm in vms
        }
        cpu_before = {vm.name: thread_cpu(vm.pid) for vm in vms}
        # sampled at every poll: a thread that exits (migration, incoming, fault) leaves
        # /proc with its CPU time, so its last sample is what it used
        cpu_seen = {vm.name: dict(cpu_before[vm.name]) for vm in vms}
        host_before = host_cpu_times()
        bench_before = time.process_time()
        cpu_series = CpuSeries()
        sampler = Sampler()
        recorder = RunWriter()
        timeout = _migration_timeout(scenario, link)
        options_record = {"scenario": scenario.name, "link": link.name}
        started = time.monotonic()
        recorder.write(
            header_record(
                "bench",
                uri,
                options_record,
                source.qmp,
                destination.qmp,
                **{"migrate-mono": started},
            )
        )
        proxy = _cut_link(scenario, link, uri, cleanup)
        source.qmp.execute("migrate", {"uri": proxy.uri if proxy is not None else uri})
        interval = options.poll_interval
        switch: LibvirtSwitch | None = None
        if scenario.switch_at_sync_count is not None:
            switch = LibvirtSwitch(source.qmp, scenario.switch_at_sync_count)
            interval = min(interval, POLL_SECONDS)
        next_sample = [started]

        def on_poll(poll: Poll) -> None:
            if switch is not None:
                switch.check(poll.t, poll.source)
                # the switch polls at 10 ms; samples and /proc keep their own interval
                if poll.mono < next_sample[0]:
                    return
                next_sample[0] = poll.mono + options.poll_interval - POLL_SECONDS / 2
            recorder.write(sampler.sample(poll))
            cpu_series.polls += 1
            for vm in vms:
                for tid, comm in thread_comms(vm.pid).items():
                    vcpu_threads[vm.name].setdefault(tid, comm)
                now_cpu = thread_cpu(vm.pid)
                cpu_seen[vm.name].update(now_cpu)
                cpu_series.add(vm.name, now_cpu, cpu_before[vm.name])

        try:
            last = watch_until_final(
                source.qmp,
                destination.qmp,
                started=started,
                interval=interval,
                on_poll=on_poll,
                timeout=timeout,
            )
        except WatchTimeout as error:
            raise RunError(str(error)) from None
        record["wall_seconds"] = round(time.monotonic() - started, 4)
        if switch is not None:
            record["switch"] = switch.as_json()
        if proxy is not None:
            with contextlib.suppress(TimeoutError):
                record["cut"] = dataclasses.asdict(proxy.wait_cut(0))
        record["cpu"] = _cpu_usage(
            vms,
            cpu_before,
            cpu_seen,
            host_before,
            bench_before,
            record["wall_seconds"],
            vcpu_threads,
        )
        if profiler is not None:
            record["profile"] = profiler.stop()
        final = {
            "source": source.query() or last.source,
            "destination": destination.query() or last.destination,
        }
        statuses = {side: (info or {}).get("status") for side, info in final.items()}
        end_records(
            recorder,
            {"source": source.qmp, "destination": destination.qmp},
            final,
            "completed" if set(statuses.values()) == {"completed"} else "failed",
            record["wall_seconds"],
        )
        record["run"] = recorder.records
        if service is not None:  # before x-verify: a guest idle between batches verifies
            record["service"] = service.finish(bench_run(record))
        record["cpu_series"] = cpu_series.cpu
        record["request_hops"], record["blocktime_waits"] = _request_hops(source, destination)
        record["destination_console_passes"] = destination.console().count(marker)
        if destination.process.poll() is None:
            record["destination_memory"] = memory_figures(destination.pid, scenario.ram)
        if options.verify and statuses["destination"] == "completed":
            try:
                destination.qmp.execute("stop")
                record["verify"] = destination.qmp.execute("x-verify")
            except QmpClientError as error:
                record["verify"] = {"ok": False, "detail": f"x-verify: {error}"}
    finally:
        record["stderr"] = {vm.name: vm.stderr_tail(1500) for vm in vms if vm.stderr_tail()}
        for vm in vms:
            vm.quit()
        record["exit_codes"] = {vm.name: vm.process.returncode for vm in vms}


def _cut_link(scenario: Scenario, link: Link, uri: str, cleanup: Cleanup) -> LinkProxy | None:
    """For a -cut scenario: the proxy the source migrates through, its cut armed."""
    if not scenario.cut:
        return None
    if link.source.namespace is not None:
        raise RunError("a -cut scenario runs on the loopback link (its proxy is on loopback)")
    proxy = LinkProxy(uri)
    cleanup.push("link proxy", proxy.close)
    proxy.arm(Cut(frame=FrameType.PACKAGE, offset=scenario.cut_after, clip=False))
    return proxy


def run_scenario(scenario: Scenario, repetition: int, options: RunOptions) -> dict[str, Any]:
    """Run `scenario` once; the record says what happened even when the run failed."""
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": f"{scenario.name}#{repetition}",
        "scenario": scenario.as_json(),
        "repetition": repetition,
        "link": options.link.name,
        "link_rate": options.link.rate,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": host_info(),
        "status": "error",
    }
    directory = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-{repetition}-", dir=options.workdir))
    cleanup = Cleanup()
    if not options.keep_workdir:
        cleanup.push(f"directory {directory}", lambda: shutil.rmtree(directory, True))
    try:
        record["host_load_before"] = Path("/proc/loadavg").read_text().split()[:3]
        if options.wait_idle > 0:
            record["host_quiet"] = wait_for_quiet_host(options.wait_idle)
        limits = measure_limits(options.link, scenario.ram, cleanup, faults=options.fault_probes)
        record["limits"] = limits.as_json()
        _migrate(scenario, options, directory, cleanup, record)
        run = bench_run(record)
        statuses = (run.source.get("status"), run.destination.get("status"))
        record["status"] = "completed" if statuses == ("completed", "completed") else "failed"
        if record["status"] == "failed":
            record["error"] = (
                f"source {statuses[0]}, destination {statuses[1]}: "
                f"{run.source.get('error-desc') or run.destination.get('error-desc') or ''}"
            )
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        raise
    except Exception as error:
        record["status"] = "error"
        record["error"] = f"{type(error).__name__}: {error}"
    finally:
        cleanup.close()
        record["workdir"] = str(directory) if options.keep_workdir else None
        record.update(analyse(record))
    return record
