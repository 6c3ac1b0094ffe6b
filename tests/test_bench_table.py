"""The bench's terminal summary: it fits the terminal (columns dropped, least important
first, never squeezed into ellipses), says under the table what each column is, and
shows every column with --wide. Records are made up: this is about the table."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from postcopy.bench.analysis import judge
from postcopy.bench.table import COLUMNS, never_cut, print_summary, recovery_line


def record(run_id: str, repetition: int = 1) -> dict[str, Any]:
    ratios = {
        "throughput_vs_limit": 0.25,
        "bulk_round_vs_line_rate": 0.26,
        "latency_p50_vs_fault_rtt": 187.17,
        "downtime_vs_target": 0.57,
        "rss_overhead_vs_guest_ram": 0.17,
    }
    return {
        "run_id": f"{run_id}#{repetition}",
        "scenario": {"name": run_id},
        "link": "loopback",
        "status": "completed",
        "figures": {
            "total_time_ms": 890,
            "throughput_bytes_per_s": 326e6,
            "bulk_round_bytes_per_s": 581e6,
            "downtime_us": 2870.0,
            "request_latency_p50_us": 19394.0,
            "request_latency_p99_us": 19394.0,
            "request_latency_max_us": 19394.0,
            "blocktime_us": 40270.0,
            "postcopy_requests": 1,
            "destination_overhead_bytes": 42 << 20,
            "host_busy_cores": 2.0,
            "host_other_processes_cores": 1.3,
            "verify_ok": True,
        },
        "ratios": ratios,
        "targets": judge(ratios),
        "limits": {"line_rate": 2.25e9, "fill_rate": 1.29e9, "fault_rtt_p50_us": 104.0},
    }


RECORDS = [record("memtouch-1g-2cpu-postcopy1-preempt-cpl0", n) for n in (1, 2, 3)] + [
    record("randwrite-4g-1cpu-precopy")
]


def name(column: Any) -> str:
    return str(column.meaning.partition(":")[0])


def explained(text: str) -> list[str]:
    """The columns the lines under the table explain, in their order."""
    return [
        n for line in text.splitlines() for n in map(name, COLUMNS) if line.startswith(f" {n} ")
    ]


def render(width: int, wide: bool = False) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    print_summary(RECORDS, console, wide=wide)
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 100, 120, 160])
def test_the_table_fits_the_terminal_without_squeezing(width: int) -> None:
    text = render(width)
    assert "…" not in text, text  # no cell cut short
    assert max(len(line) for line in text.splitlines()) <= width, text
    # each figure shown is explained under the table; the others are named for --wide
    shown = explained(text)
    assert len(shown) >= 3  # even at 80 columns: time, throughput, downtime at least
    headers = " ".join(text[: text.index(" total time ")].split())
    firsts = [c.header.split("\n")[0] for c in COLUMNS]
    for column, first in zip(COLUMNS, firsts, strict=True):
        if firsts.count(first) == 1:  # a header's first line that is its own
            assert (first in headers) == (name(column) in shown), name(column)
    hidden = [name(c) for c in COLUMNS if name(c) not in shown]
    assert f"--wide shows {len(hidden)} more: {', '.join(hidden)}" in " ".join(text.split())
    assert "medians over the repetitions" in text


def test_narrow_terminals_keep_the_most_important_columns() -> None:
    narrow, wider = explained(render(80)), explained(render(160))
    assert narrow == [name(c) for c in COLUMNS][: len(narrow)]
    assert len(wider) > len(narrow)


def test_wide_shows_every_column_and_the_limits() -> None:
    text = render(100, wide=True)
    assert explained(text) == [name(c) for c in COLUMNS]
    assert "…" not in text and "--wide shows" not in text
    assert "line rate 2,250 MB/s" in text and "raw fault round trip 104 µs" in text


def test_a_cut_run_whose_postcopy_ended_before_the_cut_says_it_was_never_cut() -> None:
    # a kvstore guest's postcopy sent under 16 MiB: four "-cut" runs read "verified" with
    # no recovery in them, as if they had recovered
    uncut = record("kvstore-1g-1cpu-postcopy1-cut")
    uncut["scenario"]["cut_after"] = 16 << 20
    cut = record("memtouch-1g-1cpu-postcopy1-cut")
    cut["scenario"]["cut_after"] = 16 << 20
    cut["figures"].update(pauses=1, paused_ms=510, reconnect_to_active_ms=7.1)
    assert never_cut(uncut) and not never_cut(cut) and not never_cut(record("plain"))
    line = recovery_line(uncut)
    assert line is not None and "never cut" in line and "16,777,216" in line
    assert "never cut" not in str(recovery_line(cut))
    out = io.StringIO()
    print_summary([uncut, cut], Console(file=out, width=200, color_system=None))
    assert out.getvalue().count("not cut") == 1
