"""Unit tests of the request hop log and the join of both sides' logs (migration/hops.py)."""

from __future__ import annotations

from typing import Any

import pytest

from postcopy.migration.hops import MAIN, URGENT, HopLog, hop_summary, join_hops, wait_summary


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_each_request_is_matched_with_its_service_and_its_placement() -> None:
    clock = FakeClock()
    destination, source = HopLog(clock), HopLog(clock)
    # request for page 7 of block 0: fault read at 10.000, sent at 10.001
    clock.now = 10.001
    destination.request_sent(0, 7, 1, fault_read=10.000)
    # a push run holding page 7 was placed before the request: not its placement
    clock.now = 10.0005
    destination.run_placed(0, 0, 64, header_read=10.0004, channel=MAIN)
    # the source reads it at 10.002 and has sent it at 10.003
    clock.now = 10.003
    source.request_served(0, 7, 1, read=10.002)
    # an unrelated run, then the urgent one
    clock.now = 10.0035
    destination.run_placed(1, 0, 1, header_read=10.0034, channel=URGENT)
    clock.now = 10.005
    destination.run_placed(0, 7, 1, header_read=10.004, channel=URGENT)
    joined = join_hops(destination.as_qmp(), source.as_qmp())
    assert len(joined) == 1
    row = joined[0]
    assert row["read"] == pytest.approx(10.002) and row["served"] == pytest.approx(10.003)
    assert row["header_read"] == pytest.approx(10.004)
    assert row["placed"] == pytest.approx(10.005)
    assert row["channel"] == URGENT
    summary = hop_summary(joined)
    assert summary["fault read -> placed"]["p50-us"] == pytest.approx(5000, abs=1)
    assert summary["request sent -> read by the source"]["p50-us"] == pytest.approx(1000, abs=1)
    assert summary["header read -> placed"]["count"] == 1


def test_a_request_without_a_match_keeps_the_hops_it_has() -> None:
    clock = FakeClock()
    destination = HopLog(clock)
    destination.request_sent(0, 3, 2, fault_read=9.9)
    joined = join_hops(destination.as_qmp(), HopLog(clock).as_qmp())
    assert set(joined[0]) == {"fault_read", "sent"}
    assert list(hop_summary(joined)) == ["fault read -> request sent"]


def test_the_log_is_bounded() -> None:
    log = HopLog(FakeClock(), capacity=2)
    for page in range(5):
        log.request_sent(0, page, 1, fault_read=1.0)
    assert log.as_qmp()["requests"]["first"] == [0, 1]


def test_waits_are_summed_per_kind() -> None:
    waits: dict[str, list[Any]] = {
        "kind": ["asked", "moved", "asked"],
        "begin": [1.0, 2.0, 3.0],
        "end": [1.004, 2.0001, 3.002],
    }
    summary = wait_summary(waits)
    assert summary["all"]["count"] == 3
    assert summary["asked"]["count"] == 2 and summary["asked"]["sum-ms"] == pytest.approx(6.0)
    assert summary["moved"]["max-us"] == pytest.approx(100.0)
    assert wait_summary({}) == {}


def test_a_request_the_push_answered_has_its_own_hop() -> None:
    """Without preempt the page a vCPU faults on is often in a pushed run already on its
    way: its header is read before the source serves the request. That request's copy
    hops are not the page's; it counts in "request sent -> pushed copy's header read"."""
    clock = FakeClock()
    destination, source = HopLog(clock), HopLog(clock)
    # request 1, for page 7: the push's run 0..63 is read at 10.0015 and placed at 10.002,
    # the source serves the request only at 10.003
    clock.now = 10.001
    destination.request_sent(0, 7, 1, fault_read=10.000)
    clock.now = 10.002
    destination.run_placed(0, 0, 64, header_read=10.0015, channel=MAIN)
    clock.now = 10.003
    source.request_served(0, 7, 1, read=10.0012)
    # request 2, for page 100: served by the source at 10.005, its run read at 10.006
    clock.now = 10.004
    destination.request_sent(0, 100, 1, fault_read=10.0035)
    clock.now = 10.005
    source.request_served(0, 100, 1, read=10.0045)
    clock.now = 10.007
    destination.run_placed(0, 100, 1, header_read=10.006, channel=MAIN)
    joined = join_hops(destination.as_qmp(), source.as_qmp())
    assert [row.get("pushed") for row in joined] == [1.0, None]
    summary = hop_summary(joined)
    assert summary["page sent -> header read"]["count"] == 1
    assert summary["page sent -> header read"]["p50-us"] == pytest.approx(1000, abs=1)
    assert summary["read -> page sent (source)"]["count"] == 1
    pushed = summary["request sent -> pushed copy's header read"]
    assert pushed["count"] == 1 and pushed["p50-us"] == pytest.approx(500, abs=1)
    assert summary["fault read -> placed"]["count"] == 2
