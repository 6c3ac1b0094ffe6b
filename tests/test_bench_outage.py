"""A -cut scenario's blocktime around the outage (bench/analysis.py `outage_blocktime`):
from the first pause to a second after the last resume, against as long just before.
The run records are made up: this is about the arithmetic on samples and timeline."""

from __future__ import annotations

from typing import Any

from postcopy.bench.analysis import outage_blocktime
from postcopy.tools.runfile import Run


def records(final_us: float = 900_000.0) -> list[dict[str, Any]]:
    """Postcopy from t=1; the link breaks at t=3 (source first), resumes at t=4.5; the
    live blocktime grows 100 ms/s before the pause and 400 ms over the outage."""
    blocktime = {1.0: 0, 2.0: 100_000, 2.9: 190_000, 3.5: 190_000, 4.4: 190_000}
    blocktime |= {4.6: 560_000, 5.6: 590_000, 6.0: 600_000}
    out: list[dict[str, Any]] = [{"event": "header", "migrate-mono": 100.0}]
    for t, us in blocktime.items():
        out.append({"event": "sample", "t": t, "status": "x", "blocktime-us": us})
    out += [
        {"event": "status", "side": "source", "mono": 101.0, "status": "postcopy-active"},
        {"event": "paused", "side": "source", "mono": 103.0, "reason": "cut"},
        {"event": "paused", "side": "destination", "mono": 103.2, "reason": "cut"},
        {"event": "resumed", "side": "destination", "mono": 104.5, "epoch": 1},
        {"event": "summary", "side": "destination", "x-postcopy-blocktime-us": final_us},
    ]
    return out


def test_the_outage_window_runs_from_the_first_pause_to_a_second_after_the_resume() -> None:
    figures = outage_blocktime(Run.from_records(records()))
    assert figures["outage_window_ms"] == 2500.0  # 3.0 .. 5.5
    # the sample before 3.0 (2.9: 190 ms) to the first at or after 5.5 (5.6: 590 ms)
    assert figures["outage_blocktime_ms"] == 400.0
    # as long before, but not before the switchover: 1.0 .. 3.0 (0 -> 190 ms)
    assert figures["before_outage_window_ms"] == 2000.0
    assert figures["before_outage_blocktime_ms"] == 190.0


def test_a_migration_that_ends_inside_the_window_takes_its_final_figure() -> None:
    cut = [r for r in records(final_us=700_000.0) if r.get("t", 0.0) < 5.0]
    assert outage_blocktime(Run.from_records(cut))["outage_blocktime_ms"] == 510.0


def test_a_run_that_never_paused_has_no_outage_figures() -> None:
    calm = [r for r in records() if r["event"] not in ("paused", "resumed")]
    assert outage_blocktime(Run.from_records(calm)) == {}
