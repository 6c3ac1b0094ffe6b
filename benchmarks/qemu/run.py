"""QEMU 7.2's own postcopy on this host, with a guest equivalent to our memtouch.

Runs the boot sector of bootblock.S (built by build.sh) in a source and a destination
qemu-system-x86_64 on loopback, lets the guest write all of its RAM once, migrates with
precopy, switches to postcopy after the first precopy pass the way a management tool
does (libvirt: poll query-migrate every 10 ms and send migrate-start-postcopy once
dirty-sync-count reaches 2; or virsh --postcopy-after-precopy: on the MIGRATION_PASS event
with pass 2) and records QEMU's own figures from query-migrate on both sides. One JSON
line per repetition on stdout (and in --out), then a summary.

    /work/venv/bin/python benchmarks/qemu/run.py --ram 1G --repeat 5 [--preempt]

See README.md here for what the figures mean and the caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from postcopy.linux.hugepages import HUGE_PAGE_2M, HugePagePool
from postcopy.linux.memory import Advice, Mapping
from postcopy.tools.signals import handling
from postcopy.units import parse_size

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
FOUR_GIB = 4 * GiB
PC_LOW_RAM_SPLIT = 0xE0000000  # pc (i440fx): from 3.5 GiB of RAM up, only 3 GiB stay low
PC_LOW_RAM_END = 0xC0000000
BANDWIDTH_UNLIMITED = 100 * 10**9  # bytes/s; QEMU 7.2's default of 128 MiB/s would dominate
POLL_SECONDS = 0.010  # libvirt's query-migrate interval while it waits to switch
# QEMU counts its setup sync (ram_init_bitmaps): dirty-sync-count is 1 during the first
# pass and 2 once it is over; MIGRATION_PASS carries the same number
SWITCH_AT_SYNC = 2
# The source's query-migrate ram fields worth keeping flat in the record.
RAM_FIELDS = (
    "transferred",
    "total",
    "remaining",
    "mbps",
    "duplicate",
    "normal",
    "normal-bytes",
    "dirty-sync-count",
    "postcopy-requests",
    "precopy-bytes",
    "downtime-bytes",
    "postcopy-bytes",
    "pages-per-second",
    "dirty-pages-rate",
    "multifd-bytes",
)


class BenchError(RuntimeError):
    """A repetition could not be measured (QEMU failed, a wait timed out)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP arrived: stop after cleaning up."""


# Every QEMU this process started and has not reaped yet. The signal handler terminates
# them by PID right away: raising inside qemu.qmp's event loop can leave the unwinding
# half done, and a QEMU must not outlive the benchmark.
LIVE_PROCESSES: set[subprocess.Popen[bytes]] = set()
interrupted_by: int | None = None


def check_interrupted() -> None:
    if interrupted_by is not None:
        raise Interrupted(f"signal {interrupted_by}")


def guest_ram_ranges(ram_bytes: int) -> tuple[int, int]:
    """(end below 4 GiB, end above 4 GiB or 0) of the pc machine's RAM map for -m ram_bytes."""
    if ram_bytes >= PC_LOW_RAM_SPLIT:
        return PC_LOW_RAM_END, FOUR_GIB + ram_bytes - PC_LOW_RAM_END
    return ram_bytes, 0


def build_image(directory: Path, ram_bytes: int, mode: str) -> Path:
    low_end, high_end = guest_ram_ranges(ram_bytes)
    if mode == "pm32":
        high_end = 0  # no paging: nothing above 4 GiB is reachable
    image = directory / "bootblock.img"
    subprocess.run(
        ["sh", str(HERE / "build.sh"), "--mode", mode, hex(low_end), str(image), hex(high_end)],
        check=True,
    )
    return image


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def count_passes(serial: Path) -> int:
    try:
        return serial.read_bytes().count(b"B")
    except FileNotFoundError:
        return 0


@dataclass
class Vm:
    """One QEMU process of a repetition, with its files and QMP connection."""

    name: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    qmp: QEMUMonitorProtocol | None = None

    @property
    def serial(self) -> Path:
        return self.directory / f"{self.name}.serial"

    @property
    def qmp_path(self) -> Path:
        return self.directory / f"{self.name}.qmp"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self, command: list[str]) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        LIVE_PROCESSES.add(self.process)

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            check_interrupted()
            self.check_alive()
            if self.qmp_path.exists():
                qmp = QEMUMonitorProtocol(str(self.qmp_path), nickname=self.name)
                try:
                    qmp.connect()
                except Exception:
                    qmp.close()
                    if time.monotonic() > deadline:
                        raise
                else:
                    self.qmp = qmp
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no QMP socket after {timeout} s")
            time.sleep(0.05)

    def cmd(self, name: str, **arguments: Any) -> Any:
        if self.qmp is None:
            raise BenchError(f"{self.name}: not connected")
        return self.qmp.cmd(name, **arguments)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise BenchError(f"{self.name} QEMU exited {self.process.returncode}: {tail}")

    def stop(self) -> None:
        """Quit politely, then terminate and kill this VM's own process by PID."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.settimeout(2.0)
                self.qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        process = self.process
        if process is None:
            return
        for escalate in (None, process.terminate, process.kill):
            if escalate is not None and process.poll() is None:
                escalate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=3)
                break
        LIVE_PROCESSES.discard(process)
        self.process = None


@dataclass
class Options:
    ram_bytes: int
    vcpus: int
    preempt: bool
    image: Path
    qemu: str
    cpu: str
    bandwidth: int
    pass_sample_seconds: float
    observe_seconds: float
    timeout: float
    switch: str = "sync"  # "sync": poll dirty-sync-count; "pass": the MIGRATION_PASS event
    extra: list[str] = field(default_factory=list)
    hugetlbfs: bool = False  # guest RAM in a file on a hugetlbfs mount (2 MiB pages)
    downtime_limit: int | None = None  # ms; None: QEMU's default (300)
    prealloc: bool = False  # -mem-prealloc (prealloc=on): RAM populated before the guest runs


def qemu_command(
    options: Options, vm: Vm, incoming: str | None, mem_path: Path | None = None
) -> list[str]:
    memory: list[str] = []
    if mem_path is not None:
        # QEMU's memory-backend-file on hugetlbfs (share=off, its default, like ours)
        memory = [
            "-object",
            f"memory-backend-file,id=pc.ram,size={options.ram_bytes},mem-path={mem_path}"
            + (",prealloc=on" if options.prealloc else ""),
            "-machine",
            "memory-backend=pc.ram",
        ]
    command = [
        options.qemu,
        "-name",
        vm.name,
        "-machine",
        "pc,accel=kvm",
        "-cpu",
        options.cpu,
        "-m",
        str(options.ram_bytes // (1 << 20)),
        "-smp",
        str(options.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-drive",
        f"file={options.image},format=raw,if=ide",
        "-serial",
        f"file:{vm.serial}",
        "-qmp",
        f"unix:{vm.qmp_path},server=on,wait=off",
        *memory,
        *(["-mem-prealloc"] if options.prealloc and mem_path is None else []),
        *options.extra,
    ]
    if incoming is not None:
        command += ["-incoming", incoming]
    return command


def wait_for(what: str, predicate: Any, timeout: float, *vms: Vm) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        check_interrupted()
        for vm in vms:
            vm.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def sample_pass_times(serial: Path, seconds: float) -> list[float]:
    """Milliseconds between consecutive 'B's, polling the serial file's size."""
    times: list[float] = []
    size = serial.stat().st_size
    last: float | None = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check_interrupted()
        now_size = serial.stat().st_size
        if now_size != size:
            now = time.monotonic()
            # several passes between two polls are averaged over the interval
            if last is not None:
                step = (now - last) * 1000 / (now_size - size)
                times.extend([step] * (now_size - size))
            last, size = now, now_size
        time.sleep(0.001)
    return times


def query_migrate(vm: Vm) -> dict[str, Any]:
    info: dict[str, Any] = vm.cmd("query-migrate")
    return info


@contextlib.contextmanager
def huge_page_memory(options: Options) -> Iterator[Path | None]:
    """For --hugetlbfs: both guests' huge pages added to the pool (and touched once: the
    first touch of a page new to this host's pool costs ~13 ms), a hugetlbfs mount of the
    repetition's own; all given back afterwards, as `postcopy bench -hugetlbfs` does."""
    if not options.hugetlbfs:
        yield None
        return
    pages = 2 * options.ram_bytes // HUGE_PAGE_2M
    mount = Path(tempfile.mkdtemp(prefix="qemu-postcopy-hugetlbfs-"))
    with contextlib.ExitStack() as stack:
        stack.callback(mount.rmdir)
        stack.enter_context(HugePagePool(pages))
        with Mapping.memfd(pages * HUGE_PAGE_2M, "warm", hugetlb=True) as warm:
            warm.madvise(Advice.POPULATE_WRITE)
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)], check=True
        )
        stack.callback(subprocess.run, ["umount", str(mount)], check=False)
        yield mount


def run_once(options: Options, repetition: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="qemu-postcopy-bench-"))
    with huge_page_memory(options) as mem_path:
        return _run_once(options, repetition, directory, mem_path)


def _run_once(
    options: Options, repetition: int, directory: Path, mem_path: Path | None
) -> dict[str, Any]:
    source = Vm("source", directory)
    destination = Vm("destination", directory)
    port = free_tcp_port()
    record: dict[str, Any] = {
        "repetition": repetition,
        "ram_bytes": options.ram_bytes,
        "vcpus": options.vcpus,
        "preempt": options.preempt,
        "qemu": options.qemu,
        "cpu": options.cpu,
        "max_bandwidth": options.bandwidth,
        "hugetlbfs": options.hugetlbfs,
        "downtime_limit": options.downtime_limit,
        "prealloc": options.prealloc,
        "load_before": os.getloadavg(),
    }
    try:
        destination.start(qemu_command(options, destination, f"tcp:127.0.0.1:{port}", mem_path))
        source.start(qemu_command(options, source, None, mem_path))
        destination.connect(30)
        source.connect(30)

        boot_started = time.monotonic()
        wait_for(
            "the source guest's 'A'",
            lambda: source.serial.exists() and source.serial.stat().st_size > 0,
            options.timeout,
            source,
        )
        record["boot_seconds"] = round(time.monotonic() - boot_started, 3)
        wait_for(
            "the source guest's first pass",
            lambda: count_passes(source.serial) >= 1,
            options.timeout,
            source,
        )
        record["first_pass_seconds"] = round(
            time.monotonic() - boot_started - record["boot_seconds"], 3
        )
        passes = sample_pass_times(source.serial, options.pass_sample_seconds)
        record["source_pass_ms"] = round(statistics.median(passes), 3) if passes else None
        record["source_pass_samples"] = len(passes)

        capabilities = [{"capability": "postcopy-ram", "state": True}]
        if options.preempt:
            capabilities.append({"capability": "postcopy-preempt", "state": True})
        events = [{"capability": "events", "state": True}] if options.switch == "pass" else []
        source.cmd("migrate-set-capabilities", capabilities=[*capabilities, *events])
        destination.cmd(
            "migrate-set-capabilities",
            capabilities=[*capabilities, {"capability": "postcopy-blocktime", "state": True}],
        )
        parameters: dict[str, Any] = {"max-bandwidth": options.bandwidth}
        if options.downtime_limit is not None:
            parameters["downtime-limit"] = options.downtime_limit
        source.cmd("migrate-set-parameters", **parameters)

        statuses: list[str] = []
        passes_at_migrate = count_passes(source.serial)
        started = time.monotonic()
        source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        syncs_seen: list[list[float]] = []  # [ms after migrate, dirty-sync-count] as it changes
        passes_seen: list[list[float]] = []  # [ms after migrate, pass] of MIGRATION_PASS
        switched = False
        info: dict[str, Any] = {}
        deadline = started + options.timeout
        while True:
            info = query_migrate(source)
            status = info.get("status", "?")
            if not statuses or statuses[-1] != status:
                statuses.append(status)
                if status == "postcopy-active":
                    record["postcopy_active_at_ms"] = round((time.monotonic() - started) * 1000)
            if status in ("completed", "failed", "cancelled"):
                break
            sync = info.get("ram", {}).get("dirty-sync-count")
            elapsed_ms = round((time.monotonic() - started) * 1000, 1)
            if sync is not None and (not syncs_seen or syncs_seen[-1][1] != sync):
                syncs_seen.append([elapsed_ms, sync])
            pass_number = 0
            if options.switch == "pass" and source.qmp is not None:
                for event in source.qmp.get_events(wait=False):
                    if event.get("event") == "MIGRATION_PASS":
                        pass_number = int(event.get("data", {}).get("pass", 0))
                        passes_seen.append([elapsed_ms, pass_number])
            due = (
                pass_number >= SWITCH_AT_SYNC
                if options.switch == "pass"
                else (sync is not None and sync >= SWITCH_AT_SYNC)
            )
            if status == "active" and due and not switched:
                # the first precopy pass is over: switch as libvirt does
                source.cmd("migrate-start-postcopy")
                switched = True
                record["switch_requested_at_ms"] = elapsed_ms
                record["switch_dirty_sync_count"] = sync
            check_interrupted()
            source.check_alive()
            destination.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"migration not finished after {options.timeout} s: {statuses}")
            time.sleep(POLL_SECONDS)
        record["wall_ms"] = round((time.monotonic() - started) * 1000)
        record["statuses"] = statuses
        record["switch"] = options.switch
        record["dirty_sync_counts_seen"] = syncs_seen
        record["migration_passes_seen"] = passes_seen
        record["source_passes_during_migration"] = count_passes(source.serial) - passes_at_migrate
        record["status"] = info.get("status")
        if record["status"] != "completed":
            raise BenchError(f"source migration {record['status']}: {info.get('error-desc')}")

        wait_for(
            "the destination's completion",
            lambda: query_migrate(destination).get("status") in ("completed", "failed"),
            options.timeout,
            destination,
        )
        destination_info = query_migrate(destination)
        passes_after = count_passes(destination.serial)
        observe_until = time.monotonic() + options.observe_seconds
        while time.monotonic() < observe_until:
            check_interrupted()
            time.sleep(0.05)
        record["destination_passes"] = count_passes(destination.serial) - passes_after
        record["destination_observed_seconds"] = options.observe_seconds
        record["destination_running"] = destination.cmd("query-status").get("status")

        ram = info.get("ram", {})
        record.update(
            {
                "total_time_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"),
                "setup_time_ms": info.get("setup-time"),
                "postcopy": "postcopy-active" in statuses,
                **{f"ram_{key.replace('-', '_')}": ram[key] for key in RAM_FIELDS if key in ram},
                "destination_status": destination_info.get("status"),
                "postcopy_blocktime_ms": destination_info.get("postcopy-blocktime"),
                "postcopy_vcpu_blocktime_ms": destination_info.get("postcopy-vcpu-blocktime"),
            }
        )
        per_vcpu = destination_info.get("postcopy-vcpu-blocktime") or []
        # QEMU 7.2's all-vCPUs total undercounts (README): the worst vCPU is the figure
        record["worst_vcpu_blocktime_ms"] = max(per_vcpu) if per_vcpu else None
        if "postcopy-requests" in ram:
            record["postcopy_requests_per_gib"] = round(
                ram["postcopy-requests"] / (options.ram_bytes / GiB), 1
            )
        if ram.get("precopy-bytes") is not None:
            # precopy passes before the switch: memtouch sends every page in each
            record["precopy_bytes_vs_ram"] = round(ram["precopy-bytes"] / options.ram_bytes, 3)
        if record["total_time_ms"]:
            record["throughput_mb_s"] = round(
                ram.get("transferred", 0) / (record["total_time_ms"] / 1000) / 1e6, 1
            )
        if "postcopy_active_at_ms" in record and record["total_time_ms"]:
            record["postcopy_phase_ms"] = record["wall_ms"] - record["postcopy_active_at_ms"]
        record["source_raw"] = info
        record["destination_raw"] = destination_info
        record["load_after"] = os.getloadavg()
        return record
    except (BenchError, QMPError) as error:
        check_interrupted()  # a QMP error caused by the handler's termination is no result
        record["status"] = "error"
        record["error"] = f"{type(error).__name__}: {error}"
        return record
    finally:
        source.stop()
        destination.stop()
        shutil.rmtree(directory, ignore_errors=True)


def summarise(records: list[dict[str, Any]]) -> list[str]:
    good = [r for r in records if r.get("status") == "completed"]
    lines = [
        f"# {len(good)}/{len(records)} repetitions completed"
        f" ({sum(1 for r in good if r.get('postcopy'))} through postcopy)"
    ]
    keys = (
        "total_time_ms",
        "throughput_mb_s",
        "downtime_ms",
        "postcopy_blocktime_ms",
        "worst_vcpu_blocktime_ms",
        "postcopy_phase_ms",
        "precopy_bytes_vs_ram",
        "postcopy_requests_per_gib",
        "ram_postcopy_requests",
        "source_pass_ms",
        "destination_passes",
    )
    for key in keys:
        values = []
        for record in good:
            value = record.get(key)
            if isinstance(value, list):  # per-vCPU blocktime: the boot CPU's
                value = value[0] if value else None
            if isinstance(value, int | float):
                values.append(value)
        if values:
            lines.append(
                f"# {key:24} median {statistics.median(values):>10.1f}"
                f"  min {min(values):>10.1f}  max {max(values):>10.1f}"
            )
    return lines


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP: terminate our QEMUs by PID now, unwind at the next check."""

    def handler(signum: int, _frame: object) -> None:
        global interrupted_by
        interrupted_by = signum
        for process in list(LIVE_PROCESSES):
            if process.poll() is None:
                process.terminate()

    with handling(handler, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="1G", help="guest RAM: 1G, 4G, ... (default 1G)")
    parser.add_argument(
        "--vcpus",
        type=int,
        choices=(1, 2),
        default=1,
        help="vCPUs (the guest runs on the boot CPU only)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--preempt", action="store_true", help="postcopy-preempt on both sides")
    parser.add_argument(
        "--downtime-limit",
        type=int,
        help="migrate-set-parameters downtime-limit, ms (default QEMU's 300): a low one keeps "
        "precopy from converging before the switch to postcopy",
    )
    parser.add_argument(
        "--hugetlbfs",
        action="store_true",
        help="guest RAM on 2 MiB huge pages: memory-backend-file on a hugetlbfs mount made "
        "for the run, the pool grown for it and given back (root)",
    )
    parser.add_argument(
        "--prealloc",
        action="store_true",
        help="-mem-prealloc on both sides (libvirt's <allocation mode='immediate'/>): all "
        "guest RAM populated when QEMU starts, before the migration",
    )
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument(
        "--guest",
        choices=("cpl3", "pm32"),
        default="cpl3",
        help="cpl3: 64-bit CPL3 guest (native under PVM, like ours); "
        "pm32: 32-bit CPL0 without paging (emulated under PVM)",
    )
    parser.add_argument(
        "--switch",
        choices=("sync", "pass"),
        default="sync",
        help="sync: poll query-migrate every 10 ms, migrate-start-postcopy once "
        "dirty-sync-count >= 2 (libvirt); pass: on the MIGRATION_PASS event with pass 2",
    )
    parser.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    parser.add_argument(
        "--cpu",
        default="host,-arch-capabilities",
        help="-cpu (plain 'host' aborts here: KVM refuses MSR 0x10a)",
    )
    parser.add_argument(
        "--max-bandwidth",
        type=int,
        default=BANDWIDTH_UNLIMITED,
        help="migrate-set-parameters max-bandwidth, bytes/s",
    )
    parser.add_argument(
        "--pass-sample",
        type=float,
        default=3.0,
        help="seconds of timing the source guest's passes before migrating",
    )
    parser.add_argument(
        "--observe",
        type=float,
        default=3.0,
        help="seconds of counting destination passes after completion",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds allowed for boot, first pass and the migration each",
    )
    args = parser.parse_args()
    if not os.access(args.qemu, os.X_OK):
        parser.exit(
            2,
            f"run.py: no QEMU at {args.qemu}: `make qemu` installs Debian 12's qemu-system-x86"
            " (7.2), or give --qemu PATH\n",
        )

    ram_bytes = parse_size(args.ram)
    workdir = Path(tempfile.mkdtemp(prefix="qemu-postcopy-image-"))
    records: list[dict[str, Any]] = []
    try:
        with cleanup_on_signals():
            options = Options(
                ram_bytes=ram_bytes,
                vcpus=args.vcpus,
                preempt=args.preempt,
                image=build_image(workdir, ram_bytes, args.guest),
                qemu=args.qemu,
                cpu=args.cpu,
                bandwidth=args.max_bandwidth,
                pass_sample_seconds=args.pass_sample,
                observe_seconds=args.observe,
                timeout=args.timeout,
                switch=args.switch,
                hugetlbfs=args.hugetlbfs,
                downtime_limit=args.downtime_limit,
                prealloc=args.prealloc,
            )
            for repetition in range(args.repeat):
                record = run_once(options, repetition)
                record["guest"] = args.guest
                line = json.dumps(record, sort_keys=True)
                print(line, flush=True)
                if args.out is not None:
                    with args.out.open("a") as out:
                        out.write(line + "\n")
                records.append(record)
    except Interrupted as interruption:
        print(
            f"# interrupted ({interruption}); every QEMU started here is stopped", file=sys.stderr
        )
        return 128 + (interrupted_by or 0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for line in summarise(records):
        print(line)
    return 0 if records and all(r.get("status") == "completed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
