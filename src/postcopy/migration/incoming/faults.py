"""The fault thread of the destination: vCPU faults in, page requests out.

Owns `FaultThread` (QEMU's postcopy_ram_fault_thread), from LISTEN to completion: it polls
the userfaultfd, those of other processes sharing guest RAM (shared.py) and a quit eventfd,
reads faults in batches, and for each one either resolves it locally (moving back the
still-valid precopy page a vCPU waits for and its neighbours in the direction the faults
go, a window that grows along a streak of faults (prepaging.py), zero-filling a page known to
be zero, waking a vCPU whose page was placed after the fault was raised) or sends REQ_PAGES
on the return path, once per page (`requested`): a vCPU's fault on a page from the source
is asked for first and its wait counted after the send (`_ask`, `_count_waits`), the
request being the critical path. Pages are the block's pages: a fault
anywhere in a huge page asks for the huge page; how a page is filled here depends on the
RAM backend (backends.py). A sharing process's fault is served the same way, and the
process is woken once its page is here. It runs SCHED_FIFO: it is one of the three hops
of a page request, and it never waits or spins: a fault the kernel cannot resolve now
(EAGAIN) is deferred to its next poll, a millisecond later at most (eagain.py).

While postcopy is paused (recovery.py) there is no return path: it goes on resolving
locally what it can, and the requests for missing pages stay pending (requested, not
received; the vCPU sleeps in the kernel meanwhile). A send that fails reports the broken
link and leaves its requests pending too. On resume, `resend_pending` asks for all of
them again on the new return path: the source lost its queue with the connection.
"""

from __future__ import annotations

import contextlib
import errno
import select
import threading
from collections.abc import Callable

import numpy as np

from postcopy.linux.memory import EventFd
from postcopy.linux.userfaultfd import PageFault, RetryError, UserfaultFd
from postcopy.migration.channel import StreamWriter
from postcopy.migration.hops import HopLog
from postcopy.migration.incoming.eagain import DEFER_SECONDS
from postcopy.migration.incoming.errors import IncomingError
from postcopy.migration.incoming.placement import Placement
from postcopy.migration.incoming.swap import RamSwap
from postcopy.migration.prepaging import FaultWindow, Window
from postcopy.migration.scheduling import prefer_this_thread
from postcopy.migration.shared import SharedClient, SharedClients
from postcopy.migration.stats import BlocktimeTracker, Clock, LatencyRecorder
from postcopy.ram import Bitmap, RamList, runs
from postcopy.wire import ReqPages

FAULT_BATCH = 64
FAULT_MOVE_PAGES = 64  # valid pages moved back on a fault before its vCPU is woken
PREPAGE_MAX_PAGES = 4096  # the most a streak of faults brings in at once (prepaging.py)


class FaultThread:
    """postcopy_ram_fault_thread: faults in, page requests out, no duplicates in flight."""

    def __init__(
        self,
        uffd: UserfaultFd,
        ram: RamList,
        received: list[Bitmap],
        return_path: StreamWriter | None,
        *,
        latency: LatencyRecorder,
        blocktime: BlocktimeTracker,
        swap: RamSwap | None,
        clock: Clock,
        placements: list[Placement],
        shared: SharedClients | None = None,
        hops: HopLog | None = None,
    ) -> None:
        self._uffd = uffd
        self._hops = hops
        self._ram = ram
        # per block: where it lies in this process and its page size (`_locate`)
        self._spans = [
            (block.host_address, block.host_address + block.length, block.page_size)
            for block in ram
        ]
        self._received = received
        self._return = return_path
        self._generation = 0
        self._return_lock = threading.Lock()
        # called with the error and the generation of the return path that failed
        self.on_send_failed: Callable[[BaseException, int], object] = lambda error, gen: None
        self._latency = latency
        self._blocktime = blocktime
        self._swap = swap
        self._clock = clock
        self._placements = placements
        self._shared = shared
        # pages asked for: a bytearray per block (`_ask` indexes it, microseconds cheaper
        # than a numpy array) and a numpy view of the same bytes (`pending`)
        self._requested_bytes = [bytearray(block.pages) for block in ram]
        self._requested = [np.frombuffer(bits, dtype=np.bool_) for bits in self._requested_bytes]
        self._window = FaultWindow(FAULT_MOVE_PAGES, PREPAGE_MAX_PAGES)
        self._ahead: list[Window] = []  # windows to bring in once this batch is answered
        self._quit = EventFd()
        self._tid_to_vcpu: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="fault", daemon=True)
        self.requests_sent = 0
        self.resent_requests = 0
        self.local_zero_faults = 0
        self.shared_faults = 0

    def start(self) -> None:
        self._thread.start()

    def set_return_path(self, writer: StreamWriter | None, generation: int) -> None:
        """Where requests go from now on; None while paused (they stay pending)."""
        with self._return_lock:
            self._return, self._generation = writer, generation

    def pending(self) -> list[Bitmap]:
        """Per block, the pages requested and not received yet."""
        return [r & ~got for r, got in zip(self._requested, self._received, strict=True)]

    def resend_pending(self) -> None:
        """Ask again for every page requested and not received (after a recovery)."""
        with self._return_lock:
            writer, generation = self._return, self._generation
        if writer is None:
            return
        requests: list[ReqPages] = []
        for index, pending in enumerate(self.pending()):
            starts, lengths = runs(pending)
            requests += [
                ReqPages(index, start, length)
                for start, length in zip(starts.tolist(), lengths.tolist(), strict=True)
            ]
        self.resent_requests += self._send(writer, generation, requests, None)

    def _send(
        self,
        writer: StreamWriter,
        generation: int,
        requests: list[ReqPages],
        fault_read: float | None,
    ) -> int:
        """Send requests until one fails; a failure is reported, the rest stay pending.
        `fault_read` is when their faults were read (None for requests sent again after a
        recovery: their hops were logged when first sent)."""
        sent = 0
        for request in requests:
            try:
                writer.send(request)
            except OSError as error:
                self.on_send_failed(error, generation)
                break
            sent += 1
            if self._hops is not None and fault_read is not None:
                self._hops.request_sent(
                    request.block, request.first_page, request.page_count, fault_read
                )
        return sent

    def _send_one(
        self, writer: StreamWriter, generation: int, block: int, page: int, fault_read: float
    ) -> int:
        """`_send` of a request for one page, without a ReqPages object."""
        try:
            writer.send_req_pages(block, page, 1)
        except OSError as error:
            self.on_send_failed(error, generation)
            return 0
        if self._hops is not None:
            self._hops.request_sent(block, page, 1, fault_read)
        return 1

    def set_vcpu_threads(self, thread_ids: list[int]) -> None:
        """The vCPUs' native thread ids (index = vCPU), to charge faults to vCPUs."""
        # a new dict, assigned once (by the receiver at RUN): the fault thread reads either
        # the empty one or this one, never a half-built one; a fault before RUN is no vCPU's
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
        clients = self._watch_clients(poller, {})
        # faults to try again: the kernel said EAGAIN (the client is None for a vCPU's;
        # `counted`: the vCPU whose fault's outcome the blocktime tracker waits for)
        deferred: list[tuple[int, int, SharedClient | None, int | None]] = []
        # the waits of vCPUs whose page is asked for (or on its way), counted once the
        # requests are sent: (vcpu, block, page, kind); see `_count_waits`
        waits: list[tuple[int, int, int, str]] = []
        quit_fd, uffd_fd = self._quit.fileno(), uffd.fileno()
        while True:
            # with deferred faults, come back to them soon; never spin (this is SCHED_FIFO)
            ready = poller.poll(DEFER_SECONDS * 1000 if deferred else None)
            for fd, _ in ready:
                if fd == quit_fd:
                    return
            now = self._clock()
            requests: list[tuple[int, int]] = []  # (block, page): built into frames once
            retry, deferred = deferred, []
            for block_index, page, client, counted in retry:
                if not self._handle(block_index, page, now, requests, client, counted):
                    deferred.append((block_index, page, client, counted))
            for fd, _ in ready:
                if fd == uffd_fd:
                    source: SharedClient | None = None
                elif fd in clients:
                    source = clients[fd]
                else:
                    if self._shared is not None and fd == self._shared.changed.fileno():
                        self._shared.changed.read()
                        clients = self._watch_clients(poller, clients)
                    continue
                try:
                    if source is None:
                        # our own fd is non-blocking: the read keeps the GIL (given away
                        # for its few microseconds, it often took hundreds to come back)
                        events = uffd.read_events(FAULT_BATCH, hold_gil=True)
                    else:
                        events = source.uffd.read_events(FAULT_BATCH)
                except OSError as error:
                    if error.errno == errno.EBADF:
                        return
                    raise
                for event in events:
                    if not isinstance(event, PageFault):
                        continue
                    if source is None:
                        block_index, page = self._locate(event.address)
                        vcpu = self._tid_to_vcpu.get(event.thread_id)
                        if vcpu is not None:
                            # a vCPU's fault on a page to come from the source: asked for
                            # now, its wait counted once the request is out
                            kind = self._ask(block_index, page, now, requests)
                            if kind is not None:
                                waits.append((vcpu, block_index, page, kind))
                                continue
                            # the waits before this one are counted before it, in order
                            self._count_waits(waits, now)
                        located: tuple[int, int, int | None] | None = self._begin_wait(
                            block_index, page, vcpu, now
                        )
                    else:
                        located = self._locate_client_event(event, source)
                    if located is None:
                        continue
                    block_index, page, counted = located
                    if not self._handle(block_index, page, now, requests, source, counted):
                        deferred.append((block_index, page, source, counted))
            with self._return_lock:
                writer, generation = self._return, self._generation
            # this thread is the only writer of requests_sent (QMP reads it)
            if writer is not None and len(requests) == 1:  # the common case: no objects
                self.requests_sent += self._send_one(writer, generation, *requests[0], now)
            elif writer is not None and requests:
                frames = [ReqPages(b, first, count) for b, first, count in coalesce(requests)]
                self.requests_sent += self._send(writer, generation, frames, now)
            self._count_waits(waits, now)
            self._bring_in_ahead()

    def _ask(
        self, block_index: int, page: int, now: float, requests: list[tuple[int, int]]
    ) -> str | None:
        """A vCPU's fault, first the page request's critical path: if the page is to come
        from the source (not received, not a precopy page to move back), ask for it now
        (into `requests`) unless it was asked for before; "asked" or "in-flight". None:
        the fault is resolved here (`_begin_wait`, `_handle`)."""
        swap = self._swap
        # `received` is set only after a page is placed (PagePlacer._record), see `_handle`
        if self._received[block_index][page] or (
            swap is not None and swap.is_unmoved(block_index, page)
        ):
            return None
        requested = self._requested_bytes[block_index]
        if requested[page]:
            return "in-flight"
        requested[page] = 1
        # before the request goes out: its copy may be placed before `asked` could follow
        self._latency.asked_page(block_index, page, now)
        requests.append((block_index, page))
        return "asked"

    def _count_waits(self, waits: list[tuple[int, int, int, str]], now: float) -> None:
        """The blocktime of the faults `_ask` asked for (or found on their way), after the
        requests went out: a wait begins at `now` (when the faults were read, as for every
        fault), is counted as a fault from the source and says what was done. A page
        placed meanwhile (by the push: the request's own copy is a round trip away) found
        no waiter there, so its wait ends here, now: the placer sets `received` before it
        tells the tracker, so either it ends the wait or this sees the page."""
        blocktime, received = self._blocktime, self._received
        for vcpu, block_index, page, kind in waits:
            if blocktime.fault(vcpu, block_index, page, now):
                blocktime.handled(from_source=True)
                blocktime.note(vcpu, block_index, page, kind)
                if received[block_index][page]:
                    blocktime.placed(block_index, page, 1)
        waits.clear()

    def _begin_wait(
        self, block_index: int, page: int, vcpu: int | None, now: float
    ) -> tuple[int, int, int | None]:
        """(block, page, counted) of a vCPU's fault, charged to the vCPU (blocktime);
        `counted`: the vCPU of a fault that began a wait, counted once handled."""
        if vcpu is not None and self._blocktime.fault(vcpu, block_index, page, now):
            return block_index, page, vcpu
        return block_index, page, None

    def _locate_client_event(
        self, event: PageFault, client: SharedClient
    ) -> tuple[int, int, int | None] | None:
        """(block, page, None) of a sharing process's fault, charged to it."""
        located = client.locate(event.address)
        if located is None:  # not guest RAM: it registered more than it was given
            return None
        client.faults += 1
        self.shared_faults += 1
        return located[0], located[1], None

    def _watch_clients(
        self, poller: select.poll, watched: dict[int, SharedClient]
    ) -> dict[int, SharedClient]:
        """Poll the userfaultfds of the processes sharing RAM as they come and go."""
        if self._shared is None:
            return {}
        if not watched:
            poller.register(self._shared.changed.fileno(), select.POLLIN)
        now = {client.fileno(): client for client in self._shared.clients()}
        for fd in watched.keys() - now.keys():
            poller.unregister(fd)
        for fd in now.keys() - watched.keys():
            poller.register(fd, select.POLLIN)
        return now

    def _handle(
        self,
        block_index: int,
        page: int,
        now: float,
        requests: list[tuple[int, int]],
        client: SharedClient | None = None,
        counted: int | None = None,
    ) -> bool:
        """One fault: resolved here, or asked for (in `requests`), or False: the kernel
        answered EAGAIN, try again later (the vCPU sleeps on until then). A sharing
        process (`client`) is woken once its page is here, now or after placement. The
        fault of a `counted` vCPU is counted by its outcome (blocktime.handled), once, and
        what was done goes in the wait log: "moved" (a valid precopy page moved back),
        "here" (resolved locally), "asked" (requested now), "in-flight" (requested before)."""
        swap = self._swap
        # `_unmoved` is cleared by the mover too, without a lock: see RamSwap.is_unmoved
        if swap is not None and swap.is_unmoved(block_index, page):
            # and the valid pages around it, in the direction the faults go: a guest that
            # touched this one is likely to touch those next, and each fault costs a trip
            # through this thread (no lock with the mover: see RamSwap._mover). The
            # faulting page's own chunk first, so its vCPU waits for that alone; the rest
            # of the window once this batch's faults are answered (`_bring_in_ahead`)
            window = self._window.window(block_index, page, self._ram[block_index].pages)
            near = max(window.first, min(page, window.end - FAULT_MOVE_PAGES))
            swap.move_pages(block_index, near, FAULT_MOVE_PAGES, on_demand=True)
            if swap.is_unmoved(block_index, page):
                return False  # not known to be in guest RAM: a ZEROPAGE now would lose it
            # the move woke its vCPU: its wait ends here, not after the resolving below (a
            # vCPU whose page was a hole faults again, and that wait is counted anew)
            self._blocktime.placed(block_index, near, FAULT_MOVE_PAGES)
            if window.count > FAULT_MOVE_PAGES:
                self._ahead.append(window)
            else:
                swap.follow(block_index, window.pivot)
            kind = "moved"
        else:
            kind = "here"
        # `received` is set only after a page is placed (PagePlacer._record): a page seen
        # here as received is in guest RAM or a known zero page, and a page placed after
        # this read is asked for once more at worst (the source sends it again; EEXIST)
        if self._received[block_index][page]:
            if not self._resolve_locally(block_index, page):
                return False
            if counted is not None:
                self._blocktime.handled(from_source=False)
                self._blocktime.note(counted, block_index, page, kind)
            if client is not None:
                client.wake(block_index, page, 1)
            return True
        kind = "in-flight"
        if not self._requested[block_index][page]:
            self._requested[block_index][page] = True
            self._latency.asked(block_index, page, 1, now)
            requests.append((block_index, page))
            kind = "asked"
        if counted is not None:  # asked for now, or already on its way: from the source
            self._blocktime.handled(from_source=True)
            self._blocktime.note(counted, block_index, page, kind)
        return True

    def _bring_in_ahead(self) -> None:
        """Move the rest of this batch's pre-paging windows, then point the mover at the
        far edge of the last one (Hines and Gopalan's pivot): it goes on from there."""
        swap, ahead, self._ahead = self._swap, self._ahead, []
        if swap is None:
            return
        for window in ahead:
            # an EAGAIN leaves the rest to the mover or the next fault: nobody waits here
            swap.move_pages(window.block, window.first, window.count, on_demand=True)
        if ahead:
            swap.follow(ahead[-1].block, ahead[-1].pivot)

    def _locate(self, address: int) -> tuple[int, int]:
        """(block, page) of a fault's address: a scan of the few blocks, no objects."""
        for index, (start, end, page_size) in enumerate(self._spans):
            if start <= address < end:
                return index, (address - start) // page_size
        raise IncomingError(f"fault at {address:#x} outside guest RAM")

    def _resolve_locally(self, block_index: int, page: int) -> bool:
        """A fault on a page we already know: a zero page never populated, or one placed
        after the fault was raised. The block's placement fills the first (ZEROPAGE, a
        zero huge page, CONTINUE) and wakes the waiters of the second. False on EAGAIN:
        try again later."""
        try:
            if self._placements[block_index].resolve_fault(page):
                self.local_zero_faults += 1  # this thread is its only writer
        except RetryError:
            return False
        self._blocktime.placed(block_index, page, 1)
        return True


def coalesce(requests: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(block, first page, count) of the runs of adjacent pages asked for (faults often come
    in order), from (block, page) pairs."""
    merged: list[tuple[int, int, int]] = []
    for block, page in sorted(requests):
        if merged and merged[-1][0] == block and merged[-1][1] + merged[-1][2] == page:
            merged[-1] = (block, merged[-1][1], merged[-1][2] + 1)
        else:
            merged.append((block, page, 1))
    return merged
