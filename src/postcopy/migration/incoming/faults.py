"""The fault thread of the destination: vCPU faults in, page requests out.

Owns `FaultThread` (QEMU's postcopy_ram_fault_thread), from LISTEN to completion: it polls
the userfaultfd and a quit eventfd, reads faults in batches, and for each one either
resolves it locally (moving back the still-valid precopy page a vCPU waits for and the 63
after it, zero-filling a page known to be zero, waking a vCPU whose page was placed after
the fault was raised) or sends REQ_PAGES on the return path, once per page (`requested`).
It runs SCHED_FIFO: it is one of the three hops of a page request.
"""

from __future__ import annotations

import contextlib
import errno
import select
import threading

import numpy as np

from postcopy.linux.memory import EventFd
from postcopy.linux.userfaultfd import PageExistsError, PageFault, UserfaultFd
from postcopy.migration.channel import StreamWriter
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.swap import RamSwap
from postcopy.migration.scheduling import prefer_this_thread
from postcopy.migration.stats import BlocktimeTracker, Clock, LatencyRecorder
from postcopy.ram import Bitmap, RamBlock
from postcopy.wire import ReqPages

FAULT_BATCH = 64
FAULT_MOVE_PAGES = 64  # valid pages moved back on a fault: the faulting one and those after


class FaultThread:
    """postcopy_ram_fault_thread: faults in, page requests out, no duplicates in flight."""

    def __init__(
        self,
        uffd: UserfaultFd,
        ram: list[RamBlock],
        received: list[Bitmap],
        return_path: StreamWriter,
        *,
        latency: LatencyRecorder,
        blocktime: BlocktimeTracker,
        swap: RamSwap | None,
        clock: Clock,
    ) -> None:
        self._uffd = uffd
        self._ram = ram
        self._received = received
        self._return = return_path
        self._latency = latency
        self._blocktime = blocktime
        self._swap = swap
        self._clock = clock
        self._requested = [np.zeros(block.pages, dtype=np.bool_) for block in ram]
        self._quit = EventFd()
        self._tid_to_vcpu: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="fault", daemon=True)
        self.requests_sent = 0
        self.local_zero_faults = 0

    def start(self) -> None:
        self._thread.start()

    def set_vcpu_threads(self, thread_ids: list[int]) -> None:
        """The vCPUs' native thread ids (index = vCPU), to charge faults to vCPUs."""
        self._tid_to_vcpu = {tid: i for i, tid in enumerate(thread_ids)}

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._quit.write(1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def close(self) -> None:
        self._quit.close()

    def _run(self) -> None:
        prefer_this_thread()
        uffd = self._uffd
        poller = select.poll()
        poller.register(uffd.fileno(), select.POLLIN)
        poller.register(self._quit.fileno(), select.POLLIN)
        while True:
            ready = poller.poll()
            if any(fd == self._quit.fileno() for fd, _ in ready):
                return
            try:
                events = uffd.read_events(FAULT_BATCH)
            except OSError as error:
                if error.errno == errno.EBADF:
                    return
                raise
            now = self._clock()
            requests: list[ReqPages] = []
            for event in events:
                if not isinstance(event, PageFault):
                    continue
                block_index, page = self._locate(event.address)
                vcpu = self._tid_to_vcpu.get(event.thread_id)
                if vcpu is not None:
                    self._blocktime.fault(vcpu, block_index, page, now)
                swap = self._swap
                if swap is not None and swap.is_unmoved(block_index, page):
                    # and the valid pages after it: a guest that touched this one is likely
                    # to touch those next, and each fault costs a trip through this thread
                    # (no lock with the mover: see RamSwap._mover)
                    swap.move_pages(block_index, page, FAULT_MOVE_PAGES, on_demand=True)
                if self._received[block_index][page]:
                    self._resolve_locally(block_index, page)
                elif not self._requested[block_index][page]:
                    self._requested[block_index][page] = True
                    self._latency.asked(block_index, page, 1, now)
                    requests.append(ReqPages(block_index, page, 1))
            for request in coalesce(requests):
                self._return.send(request)
                self.requests_sent += 1

    def _locate(self, address: int) -> tuple[int, int]:
        for index, block in enumerate(self._ram):
            if block.contains_host(address):
                return index, (address - block.host_address) // block.page_size
        raise IncomingError(f"fault at {address:#x} outside guest RAM")

    def _resolve_locally(self, block_index: int, page: int) -> None:
        """A fault on a page we already know: a zero page never populated, or one placed
        after the fault was raised. ZEROPAGE fills the first; EEXIST means the second."""
        block = self._ram[block_index]
        address = block.host_address + page * block.page_size
        try:
            self._uffd.zeropage(address, block.page_size)
            self.local_zero_faults += 1
        except PageExistsError:
            self._uffd.wake(address, block.page_size)
        self._blocktime.placed(block_index, page, 1)


def coalesce(requests: list[ReqPages]) -> list[ReqPages]:
    """Merge requests for adjacent pages of one block (faults often come in order)."""
    merged: list[ReqPages] = []
    for request in sorted(requests, key=lambda r: (r.block, r.first_page)):
        if (
            merged
            and merged[-1].block == request.block
            and merged[-1].first_page + merged[-1].page_count == request.first_page
        ):
            last = merged[-1]
            merged[-1] = ReqPages(last.block, last.first_page, last.page_count + request.page_count)
        else:
            merged.append(request)
    return merged
