"""Sizes and rates as people write them (256M, 1G, 4GiB, 100MB/s) and as we print them.

The one parser for every size the project reads: command-line options (`--ram`,
`--max-bandwidth`, `check --hugepages`), bench scenario names, and the kernel's own
`pagesize=2M` in /proc/mounts. It imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; suffixes K, M, G, T (powers of 1024), optional 'B' or 'iB'."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f'"{text}" is not a size (examples: 4096, 256M, 1G)')
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not size < 1 << 63:  # also inf, from a number of hundreds of digits
        raise ValueError(f'"{text[:40]}" is too large a size (at most 8 EiB)')
    return int(size)


def parse_rate(text: str) -> int:
    """Bytes per second in `text`, e.g. 100M, 1G, 500MB/s."""
    return parse_size(text.removesuffix("/s"))


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"
