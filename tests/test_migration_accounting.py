"""Unit tests of the source's query-migrate accounting against QEMU 7.2's rules
(migration/accounting.py cites the QEMU functions each rule comes from)."""

from __future__ import annotations

import pytest

from postcopy.migration.accounting import Accounting
from postcopy.migration.stats import RamCounters

PAGE = 4096
GiB = 1 << 30


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def accounting() -> tuple[Accounting, FakeClock]:
    clock = FakeClock()
    return Accounting(RamCounters(total=GiB, page_size=PAGE), clock), clock


def test_the_setup_sync_counts_so_the_first_pass_reads_one_and_its_end_two() -> None:
    acc, clock = accounting()
    pages = GiB // PAGE
    # setup: every page is dirty already, so nothing is newly dirty
    assert acc.sync(0, pages * PAGE) == 1
    assert acc.counters.dirty_sync_count == 1
    assert acc.counters.remaining == GiB
    acc.start()
    clock.now += 0.5
    acc.sent(pages, 0, GiB, "precopy")
    assert acc.counters.dirty_sync_count == 1  # still the first pass
    assert acc.counters.remaining == 0
    assert acc.sync(1000, 1000 * PAGE) == 2
    assert acc.counters.remaining == 1000 * PAGE


def test_dirty_pages_rate_needs_a_period_over_one_second_and_accumulates_syncs() -> None:
    acc, clock = accounting()
    acc.sync(0, 10 * PAGE)
    clock.now += 0.6
    acc.sync(600, 600 * PAGE)
    assert acc.counters.dirty_pages_rate == 0  # 600 ms: no period yet
    clock.now += 0.6
    acc.sync(300, 300 * PAGE)
    # (600 + 300) pages over 1200 ms
    assert acc.counters.dirty_pages_rate == 750
    clock.now += 0.5
    acc.sync(100, 100 * PAGE)
    assert acc.counters.dirty_pages_rate == 750  # a new period has begun


def test_rates_are_over_the_last_window_of_at_least_100_ms() -> None:
    acc, clock = accounting()
    acc.sync(0, 1000 * PAGE)
    acc.start()
    clock.now += 0.05
    acc.sent(512, 12, 2_000_000, "precopy")
    assert acc.counters.mbps == 0  # the window is still open
    clock.now += 0.05
    acc.sent(512, 0, 2_000_000, "precopy")
    assert acc.counters.mbps == pytest.approx(4_000_000 * 8 / 0.1 / 1e6)
    assert acc.counters.pages_per_second == pytest.approx(1024 / 0.1, abs=1)
    # a new window: a slower second one replaces it, no averaging since the start
    clock.now += 1.0
    acc.sent(512, 0, 1_000_000, "precopy")
    assert acc.counters.mbps == pytest.approx(8.0)


def test_expected_downtime_uses_the_bytes_dirty_at_the_last_sync_once_a_rate_exists() -> None:
    acc, clock = accounting()
    acc.sync(0, 100_000 * PAGE)
    acc.start()
    clock.now += 0.2
    acc.sent(1000, 0, 100_000_000, "precopy")  # 500 MB/s
    assert acc.expected_downtime_ms == 0  # no dirty-pages-rate yet
    clock.now += 1.0
    acc.sync(50_000, 50_000 * PAGE)  # 50000 pages = 204.8 MB dirty
    assert acc.counters.dirty_pages_rate > 0
    acc.sent(1000, 0, 500_000_000, "precopy")  # 500 MB over 1.0 s
    assert acc.expected_downtime_ms == int(50_000 * PAGE / 500e6 * 1000)
    # a window with under 10000 bytes keeps the previous figure
    clock.now += 0.2
    acc.sent(1, 1, 50, "precopy")
    assert acc.expected_downtime_ms == int(50_000 * PAGE / 500e6 * 1000)


def test_bytes_go_to_the_phase_of_the_guest_state_and_all_to_transferred() -> None:
    acc, _clock = accounting()
    acc.sync(0, 4000 * PAGE)
    acc.sent(1000, 100, 10, "precopy")
    acc.sent(1000, 0, 20, "downtime")
    acc.sent(1000, 0, 30, "postcopy")
    acc.sent(1000, 0, 40, "requested")
    counters = acc.counters
    assert (counters.precopy_bytes, counters.downtime_bytes, counters.postcopy_bytes) == (
        10,
        20,
        70,
    )
    assert counters.transferred == acc.total_bytes == 100
    assert (counters.normal, counters.duplicate) == (3900, 100)
    assert counters.remaining == 0


def test_completion_averages_mbps_over_the_transfer_time_and_clears_the_live_figures() -> None:
    acc, clock = accounting()
    acc.sync(0, 10 * PAGE)
    clock.now += 2.0
    acc.sync(1000, 1000 * PAGE)
    acc.sent(1010, 0, 250_000_000, "precopy")
    assert acc.counters.dirty_pages_rate
    acc.complete(total_time=2.5, setup_time=0.5)
    assert acc.counters.mbps == pytest.approx(1000.0)
    assert acc.counters.remaining == 0
    assert acc.counters.dirty_pages_rate == 0
    qmp = acc.counters.as_qmp()
    assert qmp["mbps"] == pytest.approx(1000.0)
    assert qmp["dirty-sync-missed-zero-copy"] == 0
