"""The fault thread sends a vCPU's page request first and counts its wait after.

Its wait must still mean what it meant (QEMU's postcopy-blocktime: from the fault read to
the placement), also when the page is placed between the request and the counting, as
the push may place it: then no placement finds a waiter, and the fault thread ends the
wait itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import PageFault, PageFaultFlags, UserfaultFd
from postcopy.migration.incoming.faults import FaultThread
from postcopy.migration.incoming.placement import Placement
from postcopy.migration.stats import BlocktimeTracker, LatencyRecorder
from postcopy.ram import RamBlock, RamList
from postcopy.wire import ReqPages
from tests.faultqueue import QueuedFaults

PAGE = 4096
PAGES = 16
VCPU_TID = 4242


@pytest.fixture
def ram() -> Iterator[RamList]:
    ram = RamList([RamBlock("pc.ram", Mapping.anonymous(PAGES * PAGE))])
    yield ram
    ram.close()


class _ReturnPath:
    """Takes the requests; `on_send` runs as each goes out (the placer, racing)."""

    def __init__(self, on_send: Callable[[ReqPages], None]) -> None:
        self.sent: list[ReqPages] = []
        self._on_send = on_send

    def send(self, message: ReqPages) -> int:
        self.sent.append(message)
        self._on_send(message)
        return 0

    def send_req_pages(self, block: int, first_page: int, page_count: int) -> int:
        return self.send(ReqPages(block, first_page, page_count))


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


@pytest.mark.parametrize("placed_before_counting", [False, True])
def test_a_requested_pages_wait_is_counted_after_the_request(
    ram: RamList, placed_before_counting: bool
) -> None:
    """The request is out before the wait is counted (the tracker has no waiter while it
    is sent); the wait begins at the fault read either way and ends at the placement, or,
    for a page placed before the wait was counted (the push's copy), when the fault
    thread sees it placed. The latency sample is taken once, by the placement."""
    uffd = QueuedFaults()
    received = [np.zeros(PAGES, dtype=np.bool_)]
    blocktime = BlocktimeTracker(1)
    latency = LatencyRecorder([PAGES])
    waiters_at_send: list[int] = []

    def placer(message: ReqPages) -> None:
        waiters_at_send.append(blocktime.as_qmp()["x-postcopy-vcpu-faults"])
        if placed_before_counting:  # as PagePlacer._record does, on another thread
            received[0][message.first_page] = True
            latency.placed(0, message.first_page, 1)
            blocktime.placed(0, message.first_page, 1)

    return_path = _ReturnPath(placer)
    faults = FaultThread(
        cast(UserfaultFd, uffd),
        ram,
        received,
        cast(Any, return_path),
        latency=latency,
        blocktime=blocktime,
        swap=None,
        clock=time.monotonic,
        placements=[Placement(ram[0], cast(UserfaultFd, uffd))],
    )
    faults.set_vcpu_threads([VCPU_TID])
    faults.start()
    try:
        uffd.fault(ram[0].host_address + 3 * PAGE, VCPU_TID)
        _until(lambda: blocktime.as_qmp()["x-postcopy-vcpu-faults"] == 1, "no fault counted")
        assert return_path.sent == [ReqPages(0, 3, 1)]
        assert waiters_at_send == [0]  # counted after the send
        if not placed_before_counting:
            time.sleep(0.01)
            assert blocktime.wait_log()["kind"] == []  # still waiting
            received[0][3] = True
            latency.placed(0, 3, 1)
            blocktime.placed(0, 3, 1)
        waits = blocktime.wait_log()
        assert waits["kind"] == ["asked"] and waits["page"] == [3]
        assert waits["end"][0] >= waits["begin"][0]
        assert latency.summary()["count"] == 1 and latency.waiting()[0] == 0
        view = blocktime.as_qmp()
        assert view["x-postcopy-vcpu-faults-from-source"] == 1
        # no wait left open: the next fault of the vCPU is no refault
        uffd.fault(ram[0].host_address + 4 * PAGE, VCPU_TID)
        _until(lambda: len(return_path.sent) == 2, "the second request")
        _until(lambda: blocktime.as_qmp()["x-postcopy-vcpu-faults"] == 2, "second fault")
        assert blocktime.as_qmp()["x-postcopy-vcpu-refaults"] == 0
    finally:
        faults.stop()
        faults.close()
        uffd.close()


def test_faults_of_a_batch_are_counted_in_order(ram: RamList) -> None:
    """A batch with a fault asked for and then one resolved here (the same vCPU, woken
    in between): the first wait is counted before the second begins, as before."""
    uffd = QueuedFaults()
    received = [np.zeros(PAGES, dtype=np.bool_)]
    received[0][9] = True  # known here: resolved locally
    blocktime = BlocktimeTracker(1)
    sent = threading.Event()
    return_path = _ReturnPath(lambda message: sent.set())
    faults = FaultThread(
        cast(UserfaultFd, uffd),
        ram,
        received,
        cast(Any, return_path),
        latency=LatencyRecorder([PAGES]),
        blocktime=blocktime,
        swap=None,
        clock=time.monotonic,
        placements=[Placement(ram[0], cast(UserfaultFd, uffd))],
    )
    faults.set_vcpu_threads([VCPU_TID])
    # both faults in one read
    uffd._faults = [
        PageFault(ram[0].host_address + 2 * PAGE, PageFaultFlags.WRITE, VCPU_TID),
        PageFault(ram[0].host_address + 9 * PAGE, PageFaultFlags.WRITE, VCPU_TID),
    ]
    faults.start()
    try:
        uffd._ready.write(1)
        _until(lambda: blocktime.as_qmp()["x-postcopy-vcpu-faults"] == 2, "both faults")
        assert sent.is_set()
        waits = blocktime.wait_log()
        # page 2's wait ended when the vCPU faulted on page 9 (a refault), then page 9's
        assert waits["page"] == [2, 9] and waits["kind"] == ["asked", "here"]
        view = blocktime.as_qmp()
        assert view["x-postcopy-vcpu-faults-from-source"] == 1
        assert view["x-postcopy-vcpu-faults-resolved-here"] == 1
    finally:
        faults.stop()
        faults.close()
        uffd.close()
