"""Unit tests of the migration's policies: discard ranges, blocktime, latency, status, and
the scheduling of its threads (on the real kernel)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.linux.memory import Mapping
from postcopy.migration.discard import MAX_DISCARD_RANGES, discard_ranges, page_ranges
from postcopy.migration.outgoing.sender import RamSender
from postcopy.migration.parameters import Capabilities, ParameterError, Parameters
from postcopy.migration.prepaging import BACKWARD, FORWARD, FaultWindow
from postcopy.migration.scheduling import (
    prefer_this_thread,
    set_thread_nice,
    urgent_for_a_moment,
)
from postcopy.migration.stats import BlocktimeTracker, LatencyRecorder, VcpuSleep, percentiles
from postcopy.migration.status import (
    CANCELLABLE,
    IllegalTransition,
    MigrationStatus,
    StatusHolder,
)
from postcopy.ram import RamBlock, RamList


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.booleans(), max_size=400), st.lists(st.booleans(), max_size=400))
def test_discard_ranges_cover_exactly_sent_and_dirty(
    sent_bits: list[bool], dirty_bits: list[bool]
) -> None:
    size = min(len(sent_bits), len(dirty_bits))
    sent = np.array(sent_bits[:size], dtype=np.bool_)
    dirty = np.array(dirty_bits[:size], dtype=np.bool_)
    covered = np.zeros(size, dtype=np.bool_)
    for group in discard_ranges(sent, dirty):
        assert 1 <= len(group) <= MAX_DISCARD_RANGES
        for first, count in group:
            assert count > 0
            assert not covered[first : first + count].any()
            covered[first : first + count] = True
    assert (covered == (sent & dirty)).all()


@given(st.lists(st.booleans(), max_size=400))
def test_page_ranges_of_sparse_pages_match_the_bitmap_runs(bits: list[bool]) -> None:
    bitmap = np.array(bits, dtype=np.bool_)
    everything = np.ones(len(bits), dtype=np.bool_)
    from_bitmap = list(discard_ranges(everything, bitmap))
    from_pages = list(page_ranges(np.flatnonzero(bitmap).astype(np.int64)))
    assert from_pages == from_bitmap


def test_blocktime_counts_per_vcpu_and_all_blocked_overlap() -> None:
    clock = FakeClock()
    tracker = BlocktimeTracker(vcpus=2, clock=clock)
    tracker.fault(0, block=0, page=10, when=1.0)
    tracker.fault(1, block=0, page=20, when=2.0)  # both blocked from t=2
    clock.now = 3.0
    tracker.placed(0, 10, 1)  # vCPU0 waited 2 s; overlap 1 s
    clock.now = 5.0
    tracker.placed(0, 15, 10)  # vCPU1 waited 3 s
    assert tracker.per_vcpu == [2.0, 3.0]
    assert tracker.total == 1.0
    view = tracker.as_qmp()
    assert view["postcopy-blocktime"] == 1000
    assert view["postcopy-vcpu-blocktime"] == [2000, 3000]


def test_blocktime_a_vcpu_faulting_on_another_page_no_longer_waits_on_the_first() -> None:
    """A vCPU waits in one fault at a time: a fault on another page means it was woken
    from the first (placed and not yet recorded: the placer wakes, then records). That
    wait ends there and the new one begins; the same fault raised again is the same wait.
    (Ignoring the new fault, the vCPU stayed 'waiting' on the first page: the fault was
    not counted and the wait for the second page was charged to no one.)"""
    clock = FakeClock()
    tracker = BlocktimeTracker(vcpus=2, clock=clock)
    assert tracker.fault(0, block=0, page=10, when=1.0)
    assert not tracker.fault(0, block=0, page=10, when=1.5)  # raised again: one wait
    assert tracker.fault(0, block=0, page=20, when=3.0)  # woken from page 10 by now
    assert tracker.per_vcpu == [2.0, 0.0]
    clock.now = 3.5
    tracker.placed(0, 10, 1)  # its record, late: no one waits there any more
    assert tracker.per_vcpu == [2.0, 0.0]
    assert tracker.fault(1, block=0, page=30, when=4.0)  # both wait from t=4
    clock.now = 5.0
    tracker.placed(0, 20, 1)
    assert tracker.per_vcpu == [4.0, 0.0] and tracker.total == 1.0
    clock.now = 6.0
    tracker.placed(0, 30, 1)
    assert tracker.per_vcpu == [4.0, 2.0] and tracker.total == 1.0
    for from_source in (True, True, False):
        tracker.handled(from_source=from_source)
    view = tracker.as_qmp()
    assert view["x-postcopy-vcpu-faults"] == 3
    assert view["x-postcopy-vcpu-faults-from-source"] == 2
    assert view["x-postcopy-vcpu-faults-resolved-here"] == 1


def test_blocktime_logs_each_wait_and_closes_one_its_vcpu_ran_out_of() -> None:
    """A vCPU that faults again on another page was woken without its page being placed
    (it ran): its wait ends at the new fault, and the new one is counted (QEMU's
    mark_postcopy_blocktime_begin restarts the vCPU's wait there too). The same page read
    twice is one wait."""
    clock = FakeClock()
    tracker = BlocktimeTracker(vcpus=1, clock=clock)
    tracker.fault(0, block=0, page=10, when=1.0)
    tracker.note(0, 0, 10, "asked")
    tracker.fault(0, block=0, page=10, when=1.5)  # the same wait, read again
    tracker.fault(0, block=0, page=70, when=2.0)  # it ran: the wait on page 10 is over
    tracker.note(0, 0, 70, "moved")
    clock.now = 2.25
    tracker.placed(0, 64, 64)
    clock.now = 9.0
    tracker.placed(0, 10, 1)  # page 10 comes at last: nobody waits for it any more
    tracker.fault(0, block=0, page=5, when=9.0)
    tracker.placed(0, 5, 1)  # resolved at once, before the fault thread said how
    tracker.note(0, 0, 5, "here")
    assert tracker.per_vcpu == [1.25] and tracker.total == 1.25
    assert tracker.refaults == 1
    log = tracker.wait_log()
    assert log["page"] == [10, 70, 5] and log["kind"] == ["asked", "moved", "here"]
    assert log["begin"] == [1.0, 2.0, 9.0] and log["end"] == [2.0, 2.25, 9.0]
    assert log["run_pages"] == [0, 64, 1]
    assert tracker.as_qmp()["x-postcopy-vcpu-refaults"] == 1


def test_vcpu_sleep_counts_the_time_a_thread_was_blocked() -> None:
    """The kernel's view beside the blocktime counter: a thread blocked the whole time
    slept the whole time; the figure is taken once, at stop()."""
    release = threading.Event()
    started = threading.Event()

    def blocked() -> None:
        started.set()
        release.wait()

    thread = threading.Thread(target=blocked, daemon=True)
    thread.start()
    started.wait()
    clock = FakeClock()
    clock.now = 100.0
    sleep = VcpuSleep([thread.native_id or 0], clock)
    assert sleep.as_qmp() == {}
    release.wait(0.2)  # the thread stays blocked: it is released only below
    clock.now = 130.0  # 30 s on the migration's clock, of which it ran well under 1 s
    sleep.stop()
    release.set()
    thread.join()
    assert sleep.slept is not None and 29.0 < sleep.slept[0] <= 30.0
    clock.now = 200.0
    sleep.stop()  # taken once
    assert sleep.as_qmp() == {"x-vcpu-slept-us": [round(sleep.slept[0] * 1e6, 1)]}


def test_latency_recorder_measures_only_requested_pages() -> None:
    clock = FakeClock()
    recorder = LatencyRecorder([100], clock=clock)
    recorder.asked(0, 5, 1, when=1.0)
    recorder.asked(0, 50, 2, when=2.0)
    clock.now = 1.5
    recorder.placed(0, 0, 10)
    clock.now = 2.25
    recorder.placed(0, 40, 20)
    recorder.placed(0, 40, 20)  # placed again: not counted twice
    summary = recorder.summary()
    assert summary["count"] == 3
    assert summary["max-us"] == 500000.0
    assert sorted(recorder.samples().tolist()) == [0.25, 0.25, 0.5]


@given(
    st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=300),
    st.lists(st.floats(0, 100), min_size=1, max_size=3),
)
def test_percentiles_are_numpys(values: list[float], quantiles: list[float]) -> None:
    # query-migrate's figures, without np.percentile's cost under the GIL
    array = np.array(values, dtype=np.float64)
    ours = percentiles(array, tuple(quantiles))
    assert ours == pytest.approx(np.percentile(array, quantiles).tolist(), rel=1e-9, abs=1e-9)


def test_latency_recorder_shows_pages_still_waiting_and_the_oldest_wait() -> None:
    clock = FakeClock()
    recorder = LatencyRecorder([100, 100], clock=clock)
    assert recorder.waiting() == (0, 0.0)
    recorder.asked(0, 5, 1, when=1.0)
    recorder.asked(1, 7, 2, when=3.0)
    clock.now = 4.0
    assert recorder.waiting() == (3, 3.0)
    recorder.placed(0, 5, 1)  # the oldest arrives: the next oldest is 1 s old
    assert recorder.waiting() == (2, 1.0)
    summary = recorder.summary()
    assert (summary["waiting"], summary["oldest-waiting-ms"]) == (2, 1000.0)


def test_status_table_refuses_illegal_moves() -> None:
    seen: list[MigrationStatus] = []
    status = StatusHolder(seen.append)
    status.move(MigrationStatus.SETUP)
    status.move(MigrationStatus.ACTIVE)
    with pytest.raises(IllegalTransition, match="active -> postcopy-paused"):
        status.move(MigrationStatus.POSTCOPY_PAUSED)
    status.move(MigrationStatus.POSTCOPY_ACTIVE)
    status.move(MigrationStatus.COMPLETED)
    assert [s.value for s in seen] == ["setup", "active", "postcopy-active", "completed"]


class _LockThatLetsAnotherThreadIn:
    """A lock that, the first time it is released, runs what another thread would do at
    that instant (the migration thread's own step), to hold a race still in a test."""

    def __init__(self, other_thread: Callable[[], None]) -> None:
        self._real = threading.Lock()
        self._other_thread: Callable[[], None] | None = other_thread

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._real.acquire(blocking, timeout)

    def release(self) -> None:
        self._real.release()
        other, self._other_thread = self._other_thread, None
        if other is not None:
            other()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _in_device_state() -> StatusHolder:
    status = StatusHolder()
    for step in (MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE):
        status.move(step)
    return status


def test_a_cancel_and_the_completion_racing_agree_on_one_winner() -> None:
    # migrate_cancel checks "device" and the migration thread commits to completion at
    # that very instant: the cancel must be taken whole (the completion then sees it)
    # instead of raising IllegalTransition into the QMP command or the migration thread
    status = _in_device_state()
    completion_saw: list[bool] = []
    racing = _LockThatLetsAnotherThreadIn(lambda: completion_saw.append(status.refuse_cancel()))
    status._lock = racing  # type: ignore[assignment]
    status._changed = threading.Condition(racing)  # type: ignore[arg-type]

    assert status.move_if(CANCELLABLE, MigrationStatus.CANCELLING)
    assert completion_saw == [False]  # the completion raises Cancelled: the source resumes
    assert status.value == MigrationStatus.CANCELLING


def test_a_cancel_after_the_source_committed_to_completion_loses() -> None:
    # past this point the destination may run the guest: a cancel that resumed the source
    # too would run it twice
    status = _in_device_state()
    assert status.refuse_cancel()
    assert not status.move_if(CANCELLABLE, MigrationStatus.CANCELLING)
    status.move(MigrationStatus.COMPLETED)
    status.move(MigrationStatus.SETUP)  # the next migration takes cancels again
    assert status.move_if(CANCELLABLE, MigrationStatus.CANCELLING)


def test_parameters_and_capabilities_use_qemu_names_and_check_values() -> None:
    parameters = Parameters()
    parameters.set("downtime-limit", 50)
    assert parameters.query()["downtime-limit"] == 50
    with pytest.raises(ParameterError, match="Parameter 'no-such' is unexpected"):
        parameters.set("no-such", 1)
    with pytest.raises(ParameterError, match="expected: integer"):
        parameters.set("max-bandwidth", "fast")
    with pytest.raises(ParameterError, match="between"):
        parameters.set("x-postcopy-run-pages", -1)
    capabilities = Capabilities()
    capabilities.set("postcopy-ram", True)
    assert "postcopy-ram" in capabilities.names()
    with pytest.raises(ParameterError, match="not supported"):
        capabilities.set("xbzrle", True)
    with pytest.raises(ParameterError, match="not found"):
        capabilities.set("warp-drive", True)


def test_zero_page_detection_takes_qemus_values() -> None:
    parameters = Parameters()
    assert parameters.query()["zero-page-detection"] == "multifd"  # QEMU's default
    parameters.set("zero-page-detection", "none")
    assert parameters.zero_page_detection == "none"
    with pytest.raises(ParameterError, match="'zero-page-detection' does not accept value 'x'"):
        parameters.set("zero-page-detection", "x")
    with pytest.raises(ParameterError, match="expected: string"):
        parameters.set("zero-page-detection", 0)


def test_urgent_threads_run_real_time_and_bulk_threads_at_their_nice() -> None:
    """As root (these machines) the page-request path gets SCHED_FIFO: a woken thread runs
    at once instead of after a busy thread's time slice."""
    seen: dict[str, object] = {}

    def urgent() -> None:
        prefer_this_thread()
        tid = threading.get_native_id()
        seen["urgent"] = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)

    def urgent_without_realtime() -> None:
        prefer_this_thread(realtime=False)
        tid = threading.get_native_id()
        seen["fallback"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))

    def bulk() -> None:
        set_thread_nice(-5)
        seen["bulk"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for target in (urgent, urgent_without_realtime, bulk):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen["urgent"] == (os.SCHED_FIFO, 1)
    assert seen["fallback"] == (os.SCHED_OTHER, -10)
    assert seen["bulk"] == -5


def test_a_bulk_thread_is_real_time_only_for_its_moment_and_gets_its_nice_back() -> None:
    """The source's migration thread during the downtime: SCHED_FIFO inside the block,
    its normal policy and nice value after it, also when the block raises."""
    seen: dict[str, object] = {}

    def policy() -> tuple[int, int, int]:
        tid = threading.get_native_id()
        return (
            os.sched_getscheduler(tid),
            os.sched_getparam(tid).sched_priority,
            os.getpriority(os.PRIO_PROCESS, tid),
        )

    def bulk() -> None:
        set_thread_nice(-5)
        with urgent_for_a_moment():
            seen["inside"] = policy()
        seen["after"] = policy()
        with contextlib.suppress(KeyError), urgent_for_a_moment():
            raise KeyError("the block failed")
        seen["after a failure"] = policy()

    thread = threading.Thread(target=bulk)
    thread.start()
    thread.join()
    assert seen["inside"] == (os.SCHED_FIFO, 1, -5)
    assert seen["after"] == (os.SCHED_OTHER, 0, -5)
    assert seen["after a failure"] == (os.SCHED_OTHER, 0, -5)


def test_prepaging_window_grows_along_a_walk_and_starts_over_elsewhere() -> None:
    """Adaptive pre-paging: a fault out of the blue brings in `base` pages from it; faults
    at the far edge of the last window (a guest walking up or down its memory) double the
    window in that direction, up to the maximum; a fault elsewhere starts again."""
    faults = FaultWindow(base=64, maximum=256)
    first = faults.window(0, 1000, 10_000)
    assert (first.first, first.count, first.direction, first.pivot) == (1000, 64, FORWARD, 1064)
    up = [faults.window(0, page, 10_000) for page in (1064, 1192, 1448)]
    assert [(w.first, w.count) for w in up] == [(1064, 128), (1192, 256), (1448, 256)]
    assert faults.streak_faults == 3
    # beyond the far edge by less than the maximum: the mover filled the gap, same walk
    assert (faults.window(0, 1904, 10_000).first, faults.streak_faults) == (1904, 4)
    elsewhere = faults.window(0, 5000, 10_000)
    assert (elsewhere.first, elsewhere.count) == (5000, 64)
    # another block is elsewhere too, whatever the page
    assert faults.window(1, 5064, 10_000).count == 64
    # walking down: the window turns and grows below the fault, the pivot at its low edge
    down = [faults.window(1, page, 10_000) for page in (5063, 4935, 4679)]
    assert [(w.first, w.count, w.direction) for w in down] == [
        (4936, 128, BACKWARD),
        (4680, 256, BACKWARD),
        (4424, 256, BACKWARD),
    ]
    assert down[-1].pivot == 4424


@given(st.lists(st.integers(0, 999), min_size=1, max_size=50))
def test_prepaging_window_always_holds_the_fault_and_stays_in_the_block(pages: list[int]) -> None:
    faults = FaultWindow(base=16, maximum=128)
    for page in pages:
        window = faults.window(3, page, 1000)
        assert window.block == 3
        assert window.first <= page < window.end <= 1000
        assert 1 <= window.count <= 128


class _CountingWriter:
    """A fake stream for the bandwidth policy: each run is `run_bytes` on the wire."""

    def __init__(self, run_bytes: int) -> None:
        self.run_bytes = run_bytes

    def send_ram_run(self, index: int, block: RamBlock, first: int, zero: object) -> int:
        return self.run_bytes


def _runs_before_a_wait(sender: RamSender, writer: _CountingWriter, block: RamBlock) -> int:
    """Runs of precopy the limit lets go at once (the clock stands still): a wait ends in
    `give_up` here, so the count stops at the first run that would have to wait."""
    sent = 0
    while sender.wait_for_bandwidth("precopy") and sent < 1000:
        sender.send_pages(writer, 0, block, 0, 2, phase="precopy")  # type: ignore[arg-type]
        sent += 1
    return sent


def test_a_new_bandwidth_limit_counts_from_when_it_is_set() -> None:
    """The bytes sent under one max-bandwidth are neither a debt nor a credit under the
    next one (QEMU's limit is per 100 ms window): a lowered limit once waited for 1 GiB at
    1 MiB/s (~1,000 s), and a limit lifted after a held second let a second of the new
    rate go at once (a test that held the first pass at 1 byte/s, then ran it at
    128 MiB/s, saw its sync come at once)."""
    mapping = Mapping.anonymous(16 * 4096)
    ram = RamList([RamBlock("pc.ram", mapping)])
    clock = FakeClock()
    parameters = Parameters()
    sender = RamSender(ram, parameters, clock, give_up=lambda: True)
    try:
        block = ram[0]
        writer = _CountingWriter(1 << 20)  # 1 MiB a run
        parameters.max_bandwidth = 1 << 30
        sender.restart_throttle()
        assert _runs_before_a_wait(sender, writer, block) == 1
        clock.now += 1.0  # a second at 1 GiB/s: 1,024 runs
        writer.run_bytes = 1 << 20
        assert _runs_before_a_wait(sender, writer, block) > 100
        # a debt: 1 GiB sent, then 1 MiB/s; the next run goes within a second
        parameters.max_bandwidth = 1 << 20
        assert _runs_before_a_wait(sender, writer, block) == 1
        clock.now += 1.0
        assert _runs_before_a_wait(sender, writer, block) == 1
        # a credit: held at 1 byte/s for half a second, then lifted to 128 MiB/s
        parameters.max_bandwidth = 1
        assert _runs_before_a_wait(sender, writer, block) == 1
        clock.now += 0.5
        parameters.max_bandwidth = 128 << 20
        assert _runs_before_a_wait(sender, writer, block) == 1  # not 64 (half a second's)
    finally:
        sender.close()
        mapping.close()
