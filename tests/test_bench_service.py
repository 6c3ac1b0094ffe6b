"""The bench's service part: kvstore scenarios carry a load, the load's record is cut into
windows on the migration's clock, and the per-mode comparison of the longest gap."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from postcopy.bench.scenarios import Catalogue, ScenarioError, parse_name
from postcopy.bench.service import (
    DEFAULT_LOAD,
    SERVICE_FLOOR,
    service_figures,
    service_record,
)
from postcopy.bench.servicereport import (
    comparison_lines,
    comparisons,
    scenario_figures,
    service_figure,
    service_table,
)
from postcopy.bench.suite import runs_so_far
from postcopy.service.checker import Request, summarise
from postcopy.tools.runfile import Run
from postcopy.vm import kvstore as kv


def test_a_kvstore_scenario_runs_the_default_load() -> None:
    scenario = parse_name("kvstore-1g-1cpu-postcopy1-preempt")
    assert scenario.load == DEFAULT_LOAD and scenario.load["rate"] > SERVICE_FLOOR
    assert scenario.warmup == (b"R", 1)
    assert scenario.as_json()["load"]["clients"] == DEFAULT_LOAD["clients"]
    assert parse_name("memtouch-1g-1cpu-precopy").load == {}


def test_the_default_load_reports_a_rate_above_the_floor_though_the_last_answer_is_late() -> None:
    # the shortest bench run: lead and tail around a ~3 s migration, every request sent on
    # time at the default rate and answered 2 ms later, except the last ones: the service
    # catches up with a backlog at the end and answers them 0.3 s late. The rate counts
    # from the first send to the last answer; aimed at the floor itself it reports below
    rate = DEFAULT_LOAD["rate"]
    count = int(rate * (DEFAULT_LOAD["lead"] + 3 + DEFAULT_LOAD["tail"]))
    sends = 100.0 + np.arange(count) / rate
    answers = sends + 0.002
    answers[-50:] = sends[-1] + 0.3
    requests = [
        Request(0, i, kv.GET, 1, float(s), kv.OK, b"", answered=float(a), verdict="ok")
        for i, (s, a) in enumerate(zip(sends, answers, strict=True))
    ]
    assert (summarise(requests).rate or 0) >= SERVICE_FLOOR


def test_a_toml_load_table_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[scenario]]\nname = "kv-fast"\nbase = "kvstore-256m-1cpu-precopy"\n'
        "load = { rate = 8000, clients = 4 }\n"
    )
    catalogue = Catalogue()
    catalogue.load(good)
    load = catalogue.scenario("kv-fast").load
    assert (load["rate"], load["clients"], load["keys"]) == (8000.0, 4, DEFAULT_LOAD["keys"])
    for text, complaint in (
        ("load = { speed = 1 }", "no 'speed'"),
        ('load = { clients = "many" }', "is not a int"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'[[scenario]]\nname = "x"\nbase = "kvstore-256m-1cpu-precopy"\n{text}\n')
        with pytest.raises(ScenarioError, match=complaint):
            Catalogue().load(bad)
    bad.write_text('[[scenario]]\nname = "x"\nbase = "scan-1g-1cpu-precopy"\nload = {}\n')
    with pytest.raises(ScenarioError, match="kvstore"):
        Catalogue().load(bad)


def test_the_load_is_cut_into_windows_on_the_migration_clock() -> None:
    # migrate sent at mono 100; the destination completes 2 s later
    run = Run.from_records(
        [
            {"event": "header", "migrate-mono": 100.0},
            {"event": "completed", "mono": 102.0, "side": "destination"},
        ]
    )
    requests = [
        {"event": "request", "sent": 99.5, "answered": 99.501, "us": 1000.0},
        {"event": "request", "sent": 100.5, "answered": 101.0, "us": 500_000.0},
        {"event": "request", "sent": 101.0, "answered": None, "us": None},
        {"event": "request", "sent": 103.0, "answered": 103.002, "us": 2000.0},
    ]
    summary = {"event": "summary", "sent": 4, "lost": 1, "longest-gap-at": 101.0}
    record = service_record([{"event": "header"}, *requests, summary], [], run)
    assert record["migration_end_s"] == pytest.approx(2.0)
    windows = record["windows"]
    assert windows["before"]["sent"] == 1 and windows["before"]["max_us"] == 1000.0
    assert windows["migration"]["sent"] == 2 and windows["migration"]["lost"] == 1
    assert windows["migration"]["max_us"] == 500_000.0
    assert windows["after"]["sent"] == 1
    assert record["longest_gap_at_s"] == pytest.approx(1.0)
    assert service_figures({"service": record})["service_migration_max_us"] == 500_000.0


def _record(name: str, after: int | None, preempt: bool, gap: float) -> dict[str, Any]:
    during = {"p50_us": gap * 10, "p99_us": gap * 500, "max_us": gap * 1000}
    return {
        "status": "completed",
        "run_id": f"{name}#1",
        "scenario": {"name": name, "postcopy_after_rounds": after, "preempt": preempt},
        "service": {
            "summary": {},
            "windows": {"migration": during},
            "series": {"start": -1.0, "bin": 0.01, "max_us": [1000.0, 0.0, gap * 1000]},
        },
        "figures": {
            "service_longest_gap_ms": gap,
            "service_clean": True,
            "service_rate": 5000,
            "service_migration_p99_us": during["p99_us"],
            "service_migration_max_us": during["max_us"],
        },
    }


def _three_modes() -> list[dict[str, Any]]:
    return [
        *(_record("kvstore-1g-1cpu-precopy", None, False, g) for g in (300, 400, 500)),
        *(_record("kvstore-1g-1cpu-postcopy1", 1, False, g) for g in (150, 200, 900)),
        *(_record("kvstore-1g-1cpu-postcopy1-preempt", 1, True, g) for g in (90, 100, 125)),
    ]


def test_the_comparison_says_how_much_shorter_the_median_and_worst_gaps_are() -> None:
    records = _three_modes()
    rows = scenario_figures(records)
    assert [r["mode"] for r in rows] == ["precopy", "postcopy", "postcopy-preempt"]
    assert rows[0]["gap_ms"] == 400 and rows[1]["worst_gap_ms"] == 900
    # p50 from the migration window, p99 and max its medians over runs
    assert (rows[0]["p50_ms"], rows[0]["p99_ms"], rows[0]["max_ms"]) == (4.0, 200.0, 400.0)
    found = {c["scenario"]: (c["ratio"], c["worst_ratio"]) for c in comparisons(rows)}
    assert found == {
        "kvstore-1g-1cpu-postcopy1": (0.5, 1.8),
        "kvstore-1g-1cpu-postcopy1-preempt": (0.25, 0.25),
    }
    postcopy, preempt = comparison_lines(records)
    assert "median 200.0 vs 400.0 ms (0.50x, 50% shorter)" in postcopy
    assert "worst 900.0 vs 500.0 ms (1.80x, 80% longer)" in postcopy
    assert "median 100.0 vs 400.0 ms (0.25x, 75% shorter)" in preempt
    assert "worst 125.0 vs 500.0 ms (0.25x, 75% shorter)" in preempt


def test_the_table_keeps_each_scenarios_name_whole_on_a_narrow_terminal() -> None:
    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(service_table(_three_modes()))
    text = console.export_text()
    assert "kvstore-1g-1cpu-postcopy1-preempt " in text
    assert "…" not in text  # figures wrap instead


def test_the_plot_puts_the_modes_side_by_side_and_every_runs_gap_beside_them() -> None:
    import matplotlib.pyplot as plt

    figure = service_figure(_three_modes())
    try:
        *timelines, gaps = figure.axes
        assert [a.get_title().split(":")[0] for a in timelines] == [
            "kvstore-1g-1cpu-precopy",
            "kvstore-1g-1cpu-postcopy1",
            "kvstore-1g-1cpu-postcopy1-preempt",
        ]
        assert "gap 400.0 ms" in timelines[0].get_title()  # the run with the median gap
        assert [t.get_text() for t in gaps.get_xticklabels()] == [
            "precopy",
            "postcopy",
            "postcopy-preempt",
        ]
        dots = sorted(y for line in gaps.get_lines() for y in line.get_ydata())
        assert dots == sorted([300, 400, 500, 150, 200, 900, 90, 100, 125])
        notes = [t.get_text() for t in gaps.texts]
        assert notes == ["median 0.50x\nworst 1.80x", "median 0.25x\nworst 0.25x"]
    finally:
        plt.close(figure)
    assert service_figure([]) is None


def test_a_bench_in_pieces_numbers_each_scenarios_runs_on(tmp_path: Path) -> None:
    out = tmp_path / "service.jsonl"
    assert runs_so_far(out) == {}
    lines = [
        {"scenario": {"name": "kvstore-1g-1cpu-precopy"}, "repetition": 1},
        {"scenario": {"name": "kvstore-1g-1cpu-precopy"}, "repetition": 5},
        {"scenario": {"name": "kvstore-1g-1cpu-postcopy1"}, "repetition": 2},
        {"scenario": "not a scenario", "repetition": 9},
    ]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert runs_so_far(out) == {"kvstore-1g-1cpu-precopy": 5, "kvstore-1g-1cpu-postcopy1": 2}
