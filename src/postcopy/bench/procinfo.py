"""What a process holds in memory, from /proc: total RSS and the share that is guest RAM.

The guest's RAM is the mapping at least as large as the guest's RAM size with the most
resident pages; everything else resident (interpreter, libraries, bitmaps, staging
buffers, socket buffers mapped in, ...) is the process's overhead beyond guest RAM.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
KIB = 1024


def _kib_fields(text: str) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, colon, rest = line.partition(":")
        parts = rest.split()
        if colon and len(parts) == 2 and parts[1] == "kB":
            fields[name.strip()] = int(parts[0]) * KIB
    return fields


def mappings(pid: int) -> list[dict[str, Any]]:
    """Each mapping of /proc/PID/smaps as {"range", "name", "Size", "Rss", "Anonymous", ...}."""
    entries: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if _HEADER.match(line):
            parts = line.split(maxsplit=5)
            current = {"range": parts[0], "name": parts[5] if len(parts) > 5 else ""}
            entries.append(current)
        elif current is not None:
            current.update(_kib_fields(line))
    return entries


def memory_figures(pid: int, guest_ram: int) -> dict[str, Any]:
    """Bytes: rss, peak_rss (VmHWM), guest_rss, overhead = rss - guest_rss,
    peak_overhead, anon_overhead (private anonymous memory beyond guest RAM) and
    rss_minus_guest_ram (the plain difference, negative when guest pages were never touched)."""
    rollup = _kib_fields(Path(f"/proc/{pid}/smaps_rollup").read_text())
    status = _kib_fields(Path(f"/proc/{pid}/status").read_text())
    candidates = [m for m in mappings(pid) if m.get("Size", 0) >= guest_ram]
    guest = max(candidates, key=lambda m: m.get("Rss", 0), default=None)
    rss = rollup.get("Rss", status.get("VmRSS", 0))
    figures: dict[str, Any] = {
        "rss": rss,
        "peak_rss": status.get("VmHWM", rss),
        "anonymous": rollup.get("Anonymous", 0),
        "rss_minus_guest_ram": rss - guest_ram,
        "guest_rss": None,
        "overhead": None,
        "peak_overhead": None,
        "anon_overhead": None,
    }
    if guest is not None:
        guest_rss = int(guest.get("Rss", 0))
        figures.update(
            guest_rss=guest_rss,
            overhead=rss - guest_rss,
            peak_overhead=figures["peak_rss"] - guest_rss,
            anon_overhead=figures["anonymous"] - int(guest.get("Anonymous", 0)),
            guest_mapping=guest["name"] or "[anonymous]",
        )
    return figures


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each thread of process `pid`."""
    used: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return used
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15
        used[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return used


def thread_comms(pid: int) -> dict[int, str]:
    """Each thread's kernel name (comm), where it differs from the main thread's: a
    thread that names itself (prctl PR_SET_NAME) shows up in top -H, perf and here."""
    names: dict[int, str] = {}
    try:
        main = Path(f"/proc/{pid}/comm").read_text().strip()
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return names
    for task in tasks:
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        if comm != main:
            names[int(task.name)] = comm
    return names


def host_cpu_times() -> list[int]:
    """The aggregate "cpu" line of /proc/stat: user nice system idle iowait irq softirq
    steal (in clock ticks)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    return [int(value) for value in first[1:9]]


def host_cpu_usage(before: list[int], after: list[int], seconds: float) -> dict[str, float]:
    """Busy cores, idle cores and stolen cores (time the hypervisor ran something else)
    averaged over an interval of `seconds`."""
    delta = [b - a for a, b in zip(before, after, strict=True)]

    def cores(ticks: int) -> float:
        return round(ticks / CLOCK_TICKS / seconds, 3) if seconds > 0 else 0.0

    user, nice, system, idle, iowait, irq, softirq, steal = delta
    return {
        "busy_cores": cores(user + nice + system + irq + softirq),
        "idle_cores": cores(idle + iowait),
        "steal_cores": cores(steal),
        "cpus": float(os.cpu_count() or 0),
    }


def wait_for_quiet_host(
    max_wait: float, busy_limit: float = 0.3, window: float = 1.0
) -> dict[str, Any]:
    """Wait (at most `max_wait` s) until the host's cores are busy less than `busy_limit`
    cores on average over a `window`: other work on two shared cores moves every figure."""
    started = time.monotonic()
    while True:
        before = host_cpu_times()
        time.sleep(window)
        busy = host_cpu_usage(before, host_cpu_times(), window)["busy_cores"]
        waited = time.monotonic() - started
        if busy <= busy_limit or waited >= max_wait:
            return {"busy_cores": busy, "waited_s": round(waited, 1), "quiet": busy <= busy_limit}


def cores_used(
    times: Sequence[float], seconds: Sequence[float | None], window: float = 0.1
) -> list[float | None]:
    """Cores a thread used at each sample: its CPU seconds over a sliding `window` of
    wall seconds (one poll interval alone is too jumpy); None where it did not exist."""
    cores: list[float | None] = []
    start = 0
    for index, now in enumerate(times):
        while times[start] < now - window:
            start += 1
        first, last = seconds[start], seconds[index]
        span = now - times[start]
        cores.append(None if first is None or last is None or span <= 0 else (last - first) / span)
    return cores
