"""The source's postcopy page service: the background push and the page requests.

Owns `PageService`, from the switchover to completion: `needed` (the pages the destination
does not have: never sent, or dirtied since), the queue of page requests, and where the
push goes on after a request. The migration thread pushes every needed page on the main
channel (`push`); requests overtake it: with postcopy-preempt the return-path thread serves
them at once on the preempt channel, otherwise they queue and the push serves them before
each run. Every page is claimed (test and clear of `needed` under a lock) before it is
sent, so none is forgotten and none is pushed twice. QEMU's ram_save_queue_pages and
postcopy's page request handling in ram.c. After a recovery, `rebuild` makes `needed`
exactly what the destination's received bitmaps lack (QEMU's ram_dirty_bitmap_reload).

Without postcopy-preempt a requested page queues behind whatever the push has put on the
main channel and the destination has not read yet: socket buffers autotune to megabytes
(13 MB were waiting at RUN in one run, and the first request waited 124 ms behind them).
So the push keeps at most PUSH_BACKLOG_BYTES unread: a PING every PUSH_PING_BYTES, whose
PONG says the destination has read up to there, and the push waits for PONGs (serving
requests meanwhile) when it is that far ahead.

The bound sets the push's pace on a loaded host: the push waits for a PONG, the destination
for the data that PONG lets through, and each wake-up waits for a core. With 1 MiB and a
PING every 256 KiB both sides slept most of the push (memtouch-1g postcopy1, 365 runs of
256 KiB in 508 ms: the push waited 0.33 s for PONGs and the destination 0.35 s for data);
with 2 MiB and a PING every 512 KiB (half the PONGs, each a wake-up of the source's return
path) the push ran at 207-299 MB/s against 127-195 (postcopy1) and 281-326 against 263-272
(postcopy from the start, worst-vCPU blocktime 625-1,237 ms against 1,306-1,335 ms), the
first request's wait unchanged (7-10 ms against 8-19 ms); same window, 3 runs each.

A run counts as at least PUSH_RUN_FLOOR_BYTES: the destination's work per run (read its
header, place it, record it) costs the time of ~32 KiB of data, so a backlog of scattered
one-page runs took far longer to drain than its bytes said. A kvstore guest's postcopy is
such runs (its writes fall anywhere in a 1 GiB table): 512 of them were a 2 MiB backlog,
read and placed one every ~40 us, so a requested page waited 17-86 ms behind them (the
service's requests p50 40 ms, 395x the raw fault round trip, against 0.5 ms with preempt).

On huge pages both scale with the page: a PING every PUSH_PING_PAGES pages, and twice
that unread. A 2 MiB page (plus its frame header) is already past a 2 MiB bound, so the push
sent a page, waited for the PONG that said the destination had read and placed it, and only
then read and sent the next: stop and wait (1 GiB memtouch on hugetlbfs: a page placed every
5-7 ms, and a guest riding the push waited that long for each page). With two pages unread
and a PING after each page it streamed, yet each PONG cost the pace too: it wakes the
source's return path (SCHED_FIFO), which preempts whatever runs on that core, and then the
push (1 GiB memtouch postcopy from the start on a hugetlb memfd, a page every 3.1 ms with a
PING per page and 2 pages unread, 2.0 with a PING per page and no bound at all, 1.7 with a
PING every 2 pages and 4 unread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from postcopy.migration.channel import SHARED_SOCKET_PIECE, StreamWriter
from postcopy.migration.hops import HopLog
from postcopy.migration.outgoing.sender import RamSender, resend_taken_pages, run_pages_for
from postcopy.ram import Bitmap, RamList, pages_after, runs, split_runs
from postcopy.wire import Ping

SMALL_CLAIM_PAGES = 16  # up to this many pages, a claim is a Python list, not numpy
PUSH_BACKLOG_BYTES = 2 << 20  # without preempt: what a requested page may queue behind
PUSH_PING_BYTES = 512 << 10  # a PING this often measures what the destination has read
PUSH_PING_PAGES = 2  # ... or every this many pages, if more (huge pages); the bound is twice
PUSH_RUN_FLOOR_BYTES = 32 << 10  # what a run costs the destination at least, as bytes
BACKLOG_PING = 0x4000_0000  # the push's PING values (neither the heartbeat's nor 1, 2, ...)
BACKLOG_WAIT = 0.005  # seconds between checks while the push waits for the destination


def _runs_of(first: int, bits: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in `bits`, whose first is page `first`."""
    found: list[tuple[int, int]] = []
    start = -1
    for offset, bit in enumerate(bits):
        if bit and start < 0:
            start = offset
        elif not bit and start >= 0:
            found.append((first + start, offset - start))
            start = -1
    if start >= 0:
        found.append((first + start, len(bits) - start))
    return found


@dataclass
class PageRequest:
    block: int
    first_page: int
    page_count: int
    read_at: float = 0.0  # when the return path read it (hops.py)


class PageService:
    """Serves the pages a destination in postcopy still needs."""

    def __init__(self, ram: RamList, sender: RamSender, hops: HopLog | None = None) -> None:
        self._ram = ram
        self._hops = hops
        self._sender = sender
        self._counters = sender.counters
        self._urgent: StreamWriter | None = None  # the preempt channel's writer, if any
        self._requests: queue.SimpleQueue[PageRequest] = queue.SimpleQueue()
        self._needed: list[Bitmap] = []
        self._needed_lock = threading.Lock()
        self._jump: tuple[int, int] | None = None
        # the unread backlog of the main channel (the push's thread; pongs from the return
        # path): bytes written, bytes known read, and the bytes each PING in flight stood at
        self._written = 0
        self._read = 0
        self._ping_at: dict[int, int] = {}
        self._next_ping = 0
        self._pings = 0
        largest = max((block.page_size for block in ram), default=0)
        self._ping_bytes = max(PUSH_PING_BYTES, PUSH_PING_PAGES * largest)
        # the last PING is at most _ping_bytes behind what was written when the push waits
        # (_room_in_backlog), so its PONG always makes room: the bound must be above that
        self._backlog_bytes = max(PUSH_BACKLOG_BYTES, 2 * self._ping_bytes)
        self._attention = threading.Event()  # a request or a PONG came

    def set_urgent_channel(self, writer: StreamWriter | None) -> None:
        """With postcopy-preempt: requested pages go out at once on `writer` (None while
        the link is down: requests queue for the push)."""
        self._urgent = writer

    def rebuild(self, received: list[Bitmap]) -> int:
        """Recovery: the pages to send are exactly those the destination has not received
        (pages that were on their way at the cut go again). Returns how many of them had
        been sent already. Queued requests go: the destination sends its pending ones
        again once resumed."""
        with self._needed_lock:
            resent = sum(
                int(np.count_nonzero(~got & ~need))
                for got, need in zip(received, self._needed, strict=True)
            )
            self._needed = [~got for got in received]
            self._counters.remaining = sum(
                int(np.count_nonzero(need)) * block.page_size
                for need, block in zip(self._needed, self._ram, strict=True)
            )
        while True:
            try:
                self._requests.get_nowait()
            except queue.Empty:
                break
        self._jump = None
        return resent

    def set_needed(self, needed: list[Bitmap]) -> None:
        with self._needed_lock:
            self._needed = needed

    def request(self, request: PageRequest) -> None:
        """A page request from the return path: served at once on the preempt channel, or
        queued for the push."""
        urgent = self._urgent
        if urgent is not None and request.page_count == 1:
            self._serve_page(urgent, request)
        elif urgent is not None:
            self._serve_request(urgent, request, urgent=True)
        else:
            self._requests.put(request)
            self._sender.interrupt_wait()
            self._attention.set()

    def pong(self, value: int) -> None:
        """The return path got a PONG: if it is the push's, the destination has read all
        that was written before that PING."""
        written = self._ping_at.pop(value, None)  # one writer per key, and pop is atomic
        if written is not None:
            self._read = max(self._read, written)
            self._attention.set()

    def push(self, writer: StreamWriter, check_cancel: Callable[[], None]) -> None:
        """Send every needed page; requested pages first, then onward from the last request."""
        configured = self._sender.parameters.x_postcopy_run_pages
        # automatic: 2 MiB per run with an urgent channel, else 256 KiB, so that a queued
        # request waits behind little (one huge page per run on hugetlb)
        run_bytes = (512 if self._urgent is not None else 64) * 4096
        # a new channel (the first push, or after a recovery) holds nothing unread
        self._written = self._read = self._next_ping = 0
        self._ping_at.clear()
        # the return path reads requests from this socket: never hold its lock long
        writer.piece_bytes = SHARED_SOCKET_PIECE
        try:
            self._push(writer, check_cancel, configured, run_bytes)
        finally:
            writer.piece_bytes = 0
        self._counters.remaining = 0

    def _push(
        self,
        writer: StreamWriter,
        check_cancel: Callable[[], None],
        configured: int,
        run_bytes: int,
    ) -> None:
        for index, block in enumerate(self._ram):
            block_run_pages = run_pages_for(
                block, configured or max(1, run_bytes // block.page_size)
            )
            while True:  # passes until nothing is needed: a jump can leave pages behind
                with self._needed_lock:
                    snapshot = self._needed[index].copy()
                starts, lengths = split_runs(*runs(snapshot), block_run_pages)
                if starts.size == 0:
                    break
                after = pages_after(starts, lengths)  # zero pages are found this far ahead
                position = 0
                while position < starts.size:
                    check_cancel()
                    self._serve_queued_requests(writer)
                    if not self._room_in_backlog(writer):
                        continue  # a request or a PONG came: serve, then look again
                    if not self._sender.wait_for_bandwidth("postcopy"):
                        continue  # a request came (or the end): serve it first
                    # read and cleared without a lock while the return path may set it: a
                    # hint only; a jump lost in between leaves the push where it was
                    jump, self._jump = self._jump, None
                    if jump is not None and jump[0] == index:
                        # continue the push from just after the last requested page
                        position = max(int(np.searchsorted(starts, jump[1], side="right")) - 1, 0)
                    start, length = int(starts[position]), int(lengths[position])
                    end = start + length + after[position]
                    position += 1
                    for sub_start, sub_length in self._claim(index, start, length):
                        size = self._sender.send_pages(
                            writer,
                            index,
                            block,
                            sub_start,
                            sub_length,
                            phase="postcopy",
                            ahead=end - sub_start - sub_length,
                        )
                        self._written += max(size, PUSH_RUN_FLOOR_BYTES)
                        self._counters.pages_pushed += sub_length  # only the push writes it
                    self._ping_if_due(writer)

    def _room_in_backlog(self, writer: StreamWriter) -> bool:
        """Without an urgent channel: True when the destination has read all but
        PUSH_BACKLOG_BYTES (or 2 x PUSH_PING_PAGES huge pages) of what the push wrote; else
        wait a little for a PONG, False.
        Requested pages count too, and nothing may wait for a PONG that no PING asks
        for: what they added since the last PING gets one first (a 2 MiB huge page each,
        served back to back, held the push for good)."""
        if self._urgent is not None or self._written - self._read <= self._backlog_bytes:
            return True
        self._ping_if_due(writer)  # the last PING is then at most _ping_bytes behind
        self._attention.wait(BACKLOG_WAIT)
        self._attention.clear()
        return self._written - self._read <= self._backlog_bytes

    def _ping_if_due(self, writer: StreamWriter) -> None:
        if self._urgent is not None or self._written < self._next_ping:
            return
        self._pings += 1
        value = BACKLOG_PING | (self._pings % BACKLOG_PING)
        self._ping_at[value] = self._written
        writer.send(Ping(value))
        self._next_ping = self._written + self._ping_bytes

    def _claim(self, index: int, first: int, count: int) -> list[tuple[int, int]]:
        """Take the still-needed pages of a range (test and clear), as runs."""
        if count == 1:  # a requested page: two scalar accesses
            with self._needed_lock:
                needed = self._needed[index]
                wanted = bool(needed[first])
                if wanted:
                    needed[first] = False
            return [(first, 1)] if wanted else []
        if count <= SMALL_CLAIM_PAGES:  # a page request: Python beats numpy's call overhead
            with self._needed_lock:
                window = self._needed[index][first : first + count]
                wanted = window.tolist()
                window[:] = False
            return _runs_of(first, wanted)
        with self._needed_lock:
            window = self._needed[index][first : first + count]
            wanted_bits = window.copy()
            window[:] = False
        if wanted_bits.all():  # the push's common case: nothing taken yet, one run
            return [(first, count)]
        starts, lengths = runs(wanted_bits)
        return [(first + s, n) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]

    def _serve_queued_requests(self, writer: StreamWriter) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            self._serve_request(writer, request)

    def _serve_page(self, writer: StreamWriter, request: PageRequest) -> None:
        """`_serve_request` of a request for one page on the urgent channel (a vCPU's
        fault: nearly every request), with the claim inline and the page sent first: the
        page if it was still needed, else again if `resend_taken_pages` (see there)."""
        index, page = request.block, request.first_page
        block = self._ram[index]
        with self._needed_lock:
            needed = self._needed[index]
            wanted = bool(needed[page])
            if wanted:
                needed[page] = False
        if wanted or resend_taken_pages(block):
            self._sender.send_pages(writer, index, block, page, 1, phase="requested")
            # the return path is the only writer of these two with preempt
            if wanted:
                self._counters.pages_requested += 1
            else:
                self._counters.pages_resent += 1
        self._jump = (index, page + 1)
        if self._hops is not None:
            self._hops.request_served(index, page, 1, request.read_at)

    def _serve_request(
        self, writer: StreamWriter, request: PageRequest, *, urgent: bool = False
    ) -> None:
        """Send the requested pages that are still needed, and continue the push after them.

        On the urgent channel the pages the push has already taken are sent again too: the
        destination asked, so the push's copy has not arrived, and it may sit behind
        megabytes of the main channel. Whichever copy comes second meets EEXIST there. Not
        huge pages (QEMU's ram_save_host_page_urgent skips the page the precopy channel is
        sending): the push's copy is at most a run or two ahead, and a second 2 MiB copy
        of every page a vCPU waits for halved the bandwidth where it waits."""
        block = self._ram[request.block]
        claimed = self._claim(request.block, request.first_page, request.page_count)
        for start, length in claimed:
            size = self._sender.send_pages(
                writer, request.block, block, start, length, phase="requested"
            )
            if not urgent:
                self._written += max(size, PUSH_RUN_FLOOR_BYTES)  # the push's thread
            # one thread serves requests in a given mode (the return path with preempt,
            # else the push): each of these counters has one writer
            self._counters.pages_requested += length
        if urgent and resend_taken_pages(block):
            if request.page_count == 1:
                resend = [] if claimed else [(request.first_page, 1)]
            else:
                taken = [True] * request.page_count
                for start, length in claimed:
                    offset = start - request.first_page
                    taken[offset : offset + length] = [False] * length
                resend = _runs_of(request.first_page, taken)
            for start, length in resend:
                self._sender.send_pages(
                    writer, request.block, block, start, length, phase="requested"
                )
                self._counters.pages_resent += length
        self._jump = (request.block, request.first_page + request.page_count)
        if self._hops is not None:
            self._hops.request_served(
                request.block, request.first_page, request.page_count, request.read_at
            )
