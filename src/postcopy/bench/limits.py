"""The physical limits of one run, measured on its link just before its migration.

Each limit runs as probe processes (postcopy.bench.probe) on the side of the link where
the migration does the same work: line rate from a sender on the source side to a
receiver on the destination side; fresh-memory fill rate on the destination side; the
raw fault round trip with the faulting process on the destination side and the page
server on the source side. Measured before the VMs start, so nothing else of the run
competes for the two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from postcopy.bench.cleanup import Cleanup
from postcopy.bench.link import Link, Side
from postcopy.tools.vmchild import end_process

PROBE = (sys.executable, "-m", "postcopy.bench.probe")


class ProbeError(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    """What the hardware allows: rates in bytes per second, times in microseconds."""

    line_rate: float
    fill_rate_4k: float
    fill_rate_thp: float
    first_fill_rate_4k: float
    first_fill_rate_thp: float
    fault_rtt_p50_us: float
    fault_rtt_p99_us: float
    fault_rtt_max_us: float
    handler_rtt_p50_us: float
    handler_rtt_p99_us: float
    fault_rtt_one_cpu_p50_us: float
    fault_rtt_one_cpu_p99_us: float
    transfer_bytes: int

    @property
    def fill_rate(self) -> float:
        """The best first-touch rate a fresh process meets now, THP or base pages: the
        first pass of the probe, as the destination's RAM is fresh memory too."""
        return max(self.first_fill_rate_4k, self.first_fill_rate_thp)

    @property
    def warm_fill_rate(self) -> float:
        """The best rate on memory the guest kernel had just recycled (later passes): what
        the machine does when the hypervisor already backs the memory."""
        return max(self.fill_rate_4k, self.fill_rate_thp)

    @property
    def throughput_limit(self) -> float:
        return min(self.line_rate, self.fill_rate)

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "fill_rate": self.fill_rate,
            "warm_fill_rate": self.warm_fill_rate,
            "throughput_limit": self.throughput_limit,
        }


def _result(process: subprocess.Popen[bytes], what: str, timeout: float) -> dict[str, Any]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process(process)
        raise ProbeError(f"{what}: no result after {timeout:.0f} s") from None
    for line in stdout.decode(errors="replace").splitlines():
        message = json.loads(line)
        if "result" in message:
            return dict(message["result"])
    raise ProbeError(
        f"{what} exited {process.returncode} without a result: "
        f"{stderr.decode(errors='replace').strip()[-2000:]}"
    )


def _start_server(
    cleanup: Cleanup, side: Side, args: list[str], what: str
) -> tuple[subprocess.Popen[bytes], int]:
    process = cleanup.spawn(
        side.command([*PROBE, *args]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, name=what
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        _, stderr = process.communicate(timeout=10)
        raise ProbeError(f"{what} did not start: {stderr.decode(errors='replace').strip()[-2000:]}")
    return process, int(json.loads(line)["port"])


def _run_client(
    cleanup: Cleanup, side: Side, args: list[str], what: str, timeout: float
) -> dict[str, Any]:
    process = cleanup.spawn(
        side.command([*PROBE, *args]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, name=what
    )
    return _result(process, what, timeout)


def measure_line_rate(link: Link, size: int, cleanup: Cleanup) -> float:
    slowest = link.rate or 2e8  # bytes/s; generous for a loaded loopback
    timeout = 60 + 3 * size / slowest
    sink, port = _start_server(
        cleanup,
        link.destination,
        [
            "sink",
            "--bind",
            link.destination.address,
            "--bytes",
            str(size),
            "--timeout",
            str(timeout),
        ],
        "line-rate sink",
    )
    sent = _run_client(
        cleanup,
        link.source,
        ["send", "--connect", link.destination.address, "--port", str(port), "--bytes", str(size)],
        "line-rate sender",
        timeout,
    )
    _result(sink, "line-rate sink", 30)
    return float(sent["rate"])


def measure_fill_rate(link: Link, size: int, cleanup: Cleanup) -> dict[str, Any]:
    return _run_client(
        cleanup,
        link.destination,
        ["fill", "--bytes", str(size)],
        "fill-rate probe",
        60 + 4 * size / 5e7,
    )


def measure_fault_rtt(
    link: Link, cleanup: Cleanup, faults: int = 2000, cpu: int | None = None
) -> dict[str, Any]:
    """The raw fault round trip; with `cpu`, both probe processes run on that CPU only."""
    pin = [] if cpu is None else ["--cpu", str(cpu)]
    server, port = _start_server(
        cleanup, link.source, [*pin, "page-server", "--bind", link.source.address], "page server"
    )
    result = _run_client(
        cleanup,
        link.destination,
        [
            *pin,
            "fault-rtt",
            "--connect",
            link.source.address,
            "--port",
            str(port),
            "--faults",
            str(faults),
        ],
        "fault round-trip probe",
        120,
    )
    _result(server, "page server", 30)
    return result


def measure_limits(link: Link, size: int, cleanup: Cleanup, *, faults: int = 2000) -> Limits:
    """All limits for a guest of `size` bytes on `link`."""
    line_rate = measure_line_rate(link, size, cleanup)
    fill = measure_fill_rate(link, size, cleanup)
    rtt = measure_fault_rtt(link, cleanup, faults)
    # the same with every thread on one CPU: no wake-up of another (possibly halted) CPU,
    # which on this machine kind costs ~100-200 us per hop when the CPUs are idle
    pinned = measure_fault_rtt(link, cleanup, max(faults // 4, 100), cpu=0)
    return Limits(
        line_rate=line_rate,
        fill_rate_4k=float(fill["rate_4k"]),
        fill_rate_thp=float(fill["rate_thp"]),
        first_fill_rate_4k=float(fill["first_rate_4k"]),
        first_fill_rate_thp=float(fill["first_rate_thp"]),
        fault_rtt_p50_us=float(rtt["fault"]["p50_us"]),
        fault_rtt_p99_us=float(rtt["fault"]["p99_us"]),
        fault_rtt_max_us=float(rtt["fault"]["max_us"]),
        handler_rtt_p50_us=float(rtt["handler"]["p50_us"]),
        handler_rtt_p99_us=float(rtt["handler"]["p99_us"]),
        fault_rtt_one_cpu_p50_us=float(pinned["fault"]["p50_us"]),
        fault_rtt_one_cpu_p99_us=float(pinned["fault"]["p99_us"]),
        transfer_bytes=size,
    )
