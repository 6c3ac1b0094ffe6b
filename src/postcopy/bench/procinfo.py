"""What a process holds in memory, from /proc: total RSS and the share that is guest RAM.

The guest's RAM is the mapping at least as large as the guest's RAM size with the most
resident pages; everything else resident (interpreter, libraries, bitmaps, staging
buffers, socket buffers mapped in, ...) is the process's overhead beyond guest RAM.
"""

from __future__ import annotations

import re
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
        figures.update(guest_rss=guest_rss, overhead=rss - guest_rss,
                       peak_overhead=figures["peak_rss"] - guest_rss,
                       anon_overhead=figures["anonymous"] - int(guest.get("Anonymous", 0)),
                       guest_mapping=guest["name"] or "[anonymous]")
    return figures
