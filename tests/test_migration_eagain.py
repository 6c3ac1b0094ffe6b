"""EAGAIN on the destination: bounded where a thread may wait, deferred on the fault thread.

The kernel answers UFFDIO_COPY with EAGAIN for as long as a non-cooperative event (here a
MADV_DONTNEED under Feature.EVENT_REMOVE) waits to be read: the real way to hold EAGAIN.
The fault thread's deferral is a policy, tested with a uffd stand-in that answers EAGAIN
for one page until the test lets it.
"""

from __future__ import annotations

import errno
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import pytest

from postcopy.linux.memory import Advice, Mapping
from postcopy.linux.userfaultfd import (
    Feature,
    RegisterMode,
    Remove,
    RetryError,
    UserfaultFd,
)
from postcopy.migration.incoming import eagain
from postcopy.migration.incoming.eagain import Retrier
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.faults import FaultThread
from postcopy.migration.incoming.placement import Placement
from postcopy.migration.incoming.placer import PagePlacer
from postcopy.migration.stats import BlocktimeTracker, LatencyRecorder
from postcopy.ram import RamBlock, RamList
from tests.faultqueue import QueuedFaults

PAGE = 4096
PAGES = 16


@pytest.fixture
def ram() -> Iterator[RamList]:
    ram = RamList([RamBlock("pc.ram", Mapping.anonymous(PAGES * PAGE))])
    yield ram
    ram.close()


def test_a_retrier_pauses_longer_each_time_and_gives_up() -> None:
    pauses: list[float] = []
    retry = Retrier("UFFDIO_COPY", attempts=10, sleep=pauses.append)
    retry.again(RetryError(errno.EAGAIN, "UFFDIO_COPY", 0, PAGE, done=PAGE))  # progress
    assert pauses == []
    for _ in range(10):
        retry.again(RetryError(errno.EAGAIN, "UFFDIO_COPY", 0, PAGE))
    assert pauses == sorted(pauses) and pauses[0] == eagain.FIRST_PAUSE
    assert max(pauses) == eagain.LONGEST_PAUSE
    with pytest.raises(IncomingError, match="UFFDIO_COPY answered EAGAIN 10 times in a row"):
        retry.again(RetryError(errno.EAGAIN, "UFFDIO_COPY", 0, PAGE))


def test_a_placement_that_keeps_meeting_eagain_fails_instead_of_spinning(
    ram: RamList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a MADV_DONTNEED waits for its REMOVE event to be read, every UFFDIO_COPY on the
    uffd answers EAGAIN: the placer gives up after MAX_ATTEMPTS, and once the event is read
    the same placement succeeds."""
    monkeypatch.setattr(eagain, "MAX_ATTEMPTS", 5)
    block = ram[0]
    staging = Mapping.anonymous(PAGES * PAGE)
    with UserfaultFd.open(Feature.EVENT_REMOVE) as uffd:
        uffd.register(block.host_address, block.length, RegisterMode.MISSING)
        received = [np.zeros(PAGES, dtype=np.bool_)]
        placer = PagePlacer(
            uffd,
            list(ram),
            received,
            LatencyRecorder([PAGES]),
            BlocktimeTracker(1),
            [Placement(block, uffd)],
        )
        # the event is queued and blocks the madvise until it is read
        remover = threading.Thread(
            target=block.mapping.madvise, args=(Advice.DONTNEED, (PAGES - 1) * PAGE, PAGE)
        )
        remover.start()
        try:
            assert _wait_readable(uffd)  # the REMOVE event is queued, the madvise waits

            outcome: list[BaseException | None] = []

            def place() -> None:
                try:
                    placer.place(0, 0, np.zeros(4, dtype=np.bool_), staging.address)
                    outcome.append(None)
                except BaseException as error:
                    outcome.append(error)

            placing = threading.Thread(target=place, daemon=True)
            placing.start()
            placing.join(10)
            assert not placing.is_alive(), "the placer is still retrying an EAGAIN"
            assert isinstance(outcome[0], IncomingError)
            assert "answered EAGAIN 5 times in a row" in str(outcome[0])
            assert not received[0].any()
        finally:
            events = uffd.read_events(8)  # completes the madvise
            remover.join(10)
        assert [type(event) for event in events] == [Remove]
        placer.place(0, 0, np.zeros(4, dtype=np.bool_), staging.address)  # EAGAIN has ended
        assert received[0][:4].all()
    staging.close()


class _FlakyUffd(QueuedFaults):
    """A stand-in for the fault thread's userfaultfd: hands out queued faults, and answers
    ZEROPAGE at `stuck` with EAGAIN until `release()` (as the kernel does until another
    thread has done its part), every other page at once."""

    def __init__(self, stuck: int) -> None:
        super().__init__()
        self.stuck = stuck
        self.refusals = 0
        self.zeroed: list[int] = []
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def zeropage(self, start: int, length: int) -> int:
        if start == self.stuck and not self._released.is_set():
            self.refusals += 1
            raise RetryError(errno.EAGAIN, "UFFDIO_ZEROPAGE", start, length)
        self.zeroed.append(start)
        return length


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_the_fault_thread_defers_a_fault_that_meets_eagain(ram: RamList) -> None:
    """EAGAIN on the fault thread (SCHED_FIFO) is neither spun on nor fatal: the fault is
    tried again at the next polls, the thread serves other faults meanwhile (a thread
    that spun on the stuck page would serve none), and once the kernel lets it the
    deferred fault is resolved."""
    stuck = ram[0].host_address + 5 * PAGE
    uffd = _FlakyUffd(stuck)
    received = [np.ones(PAGES, dtype=np.bool_)]  # known pages: resolved locally
    faults = FaultThread(
        cast(UserfaultFd, uffd),
        ram,
        received,
        cast(Any, None),  # no request is ever sent: every page is known
        latency=LatencyRecorder([PAGES]),
        blocktime=BlocktimeTracker(1),
        swap=None,
        clock=time.monotonic,
        placements=[Placement(ram[0], cast(UserfaultFd, uffd))],
    )
    faults.start()
    try:
        uffd.fault(stuck)
        _until(lambda: uffd.refusals >= 2, "the EAGAIN fault was not tried again")
        uffd.fault(ram[0].host_address + 6 * PAGE)  # served while page 5 is still stuck
        _until(lambda: faults.local_zero_faults == 1, "no other fault served meanwhile")
        assert uffd.zeroed == [ram[0].host_address + 6 * PAGE]
        uffd.release()
        _until(lambda: faults.local_zero_faults == 2, "the deferred fault was not resolved")
        assert uffd.zeroed[-1] == stuck
    finally:
        faults.stop()
        faults.close()
        uffd.close()


def test_each_vcpu_fault_is_counted_once_by_its_outcome(ram: RamList) -> None:
    """vCPU faults = needed a page from the source + resolved here, counted where each is
    handled: a fault deferred by EAGAIN counts once, when it is resolved; the same fault
    raised again (the vCPU still waits on that page) and a fault of a thread that is no
    vCPU do not count; a page asked for counts for each vCPU that waits on it."""
    stuck = ram[0].host_address + 5 * PAGE
    uffd = _FlakyUffd(stuck)
    received = [np.ones(PAGES, dtype=np.bool_)]
    received[0][8] = False  # at the source still
    blocktime = BlocktimeTracker(3)
    latency = LatencyRecorder([PAGES])
    faults = FaultThread(
        cast(UserfaultFd, uffd),
        ram,
        received,
        None,  # paused: requests stay pending, which is all this needs
        latency=latency,
        blocktime=blocktime,
        swap=None,
        clock=time.monotonic,
        placements=[Placement(ram[0], cast(UserfaultFd, uffd))],
    )
    vcpu = [101, 102, 103]  # the vCPUs' thread ids
    faults.set_vcpu_threads(vcpu)
    faults.start()

    def counts() -> tuple[int, int, int]:
        view = blocktime.as_qmp()
        return (
            view["x-postcopy-vcpu-faults"],
            view["x-postcopy-vcpu-faults-from-source"],
            view["x-postcopy-vcpu-faults-resolved-here"],
        )

    try:
        uffd.fault(stuck, vcpu[0])
        _until(lambda: uffd.refusals >= 2, "the EAGAIN fault was not tried again")
        assert counts() == (0, 0, 0)  # not handled yet
        uffd.fault(ram[0].host_address + 6 * PAGE, vcpu[1])
        _until(lambda: counts() == (1, 0, 1), f"vCPU 1's fault: {counts()}")
        uffd.release()
        _until(lambda: faults.local_zero_faults == 2, "the deferred fault was not resolved")
        _until(lambda: counts() == (2, 0, 2), f"vCPU 0's deferred fault: {counts()}")
        uffd.fault(ram[0].host_address + 7 * PAGE, 999)  # no vCPU's thread
        _until(lambda: faults.local_zero_faults == 3, "the other thread's fault")
        missing = ram[0].host_address + 8 * PAGE
        uffd.fault(missing, vcpu[1])
        _until(lambda: counts() == (3, 1, 2), f"vCPU 1's request: {counts()}")
        uffd.fault(missing + 64, vcpu[1])  # the same fault again: still one wait
        uffd.fault(missing, vcpu[2])  # another vCPU waits on the page already asked for
        _until(lambda: counts() == (4, 2, 2), f"vCPU 2 on the same page: {counts()}")
        assert faults.pending()[0].nonzero()[0].tolist() == [8]  # asked for once
    finally:
        faults.stop()
        faults.close()
        uffd.close()
    # all three wait for page 8 or were resolved; no fault is left out of the sum
    view = blocktime.as_qmp()
    assert view["x-postcopy-vcpu-faults"] == (
        view["x-postcopy-vcpu-faults-from-source"] + view["x-postcopy-vcpu-faults-resolved-here"]
    )


def _wait_readable(uffd: UserfaultFd) -> bool:
    """Until an event is pending on `uffd` (without reading it, which would complete it)."""
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    return bool(poller.poll(10_000))
