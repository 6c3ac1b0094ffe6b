"""The source's page service on a real socket pair: what a page request sends, and that
every page is claimed once (migration/outgoing/pageservice.py)."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from postcopy.linux.hugepages import HUGE_PAGE_2M
from postcopy.linux.memory import Mapping
from postcopy.migration.channel import StreamWriter
from postcopy.migration.hops import HopLog
from postcopy.migration.outgoing.pageservice import (
    PUSH_BACKLOG_BYTES,
    PUSH_PING_BYTES,
    PUSH_PING_PAGES,
    PUSH_RUN_FLOOR_BYTES,
    PageRequest,
    PageService,
)
from postcopy.migration.outgoing.sender import RamSender
from postcopy.migration.parameters import Parameters
from postcopy.ram import RamBlock, RamList
from postcopy.transport.connection import Connection
from postcopy.wire import Direction, layout
from postcopy.wire.frames import FrameType
from tests.hugepages import huge_pages

PAGES = 64
PAGE = 4096


def _draining(connection: Connection) -> tuple[threading.Thread, bytearray]:
    """A thread that reads `connection` to its end into the bytearray returned with it."""
    received = bytearray()

    def drain() -> None:
        buffer = memoryview(bytearray(1 << 16))
        while count := connection.recv_into(buffer):
            received.extend(buffer[:count])

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return reader, received


def _runs_sent(raw: bytes) -> list[tuple[int, int, list[bool], bytes]]:
    """(first page, count, zero bits, data) of each RAM_RUN frame in `raw`."""
    found = []
    position = 0
    while position < len(raw):
        _, _, _, length = layout.FRAME_HEADER.unpack_from(raw, position)
        position += layout.FRAME_HEADER.size
        _, first, count = layout.RAM_RUN.unpack_from(raw, position)
        bits = np.unpackbits(
            np.frombuffer(raw[position + layout.RAM_RUN.size : position + length], np.uint8),
            bitorder="little",
        )[:count].astype(bool)
        position += length
        data_length = int(np.count_nonzero(~bits)) * PAGE
        found.append((first, count, bits.tolist(), raw[position : position + data_length]))
        position += data_length
    return found


def test_a_request_sends_what_is_needed_and_again_what_the_push_took() -> None:
    mapping = Mapping.anonymous(PAGES * PAGE)
    ram = RamList([RamBlock("pc.ram", mapping)])
    for page in range(0, PAGES, 2):  # odd pages stay zero
        mapping.view[page * PAGE : (page + 1) * PAGE] = bytes([page + 1]) * PAGE
    sender = RamSender(ram, Parameters(), time.monotonic)
    service = PageService(ram, sender)
    ours, theirs = Connection.socketpair()

    with mapping, ours, theirs:
        reader, received = _draining(theirs)
        service.set_urgent_channel(StreamWriter(ours, Direction.MAIN))
        needed = np.ones(PAGES, dtype=np.bool_)
        needed[11] = False  # the push took page 11 already
        service.set_needed([needed])
        service.request(PageRequest(0, 10, 1))  # one page with data
        service.request(PageRequest(0, 9, 1))  # one zero page
        service.request(PageRequest(0, 10, 4))  # 10 served, 11 taken: 12-13 and 10-11 again
        ours.shutdown()
        reader.join(5)
        sent = _runs_sent(bytes(received))
    assert [(first, count, bits) for first, count, bits, _ in sent] == [
        (10, 1, [False]),
        (9, 1, [True]),
        (12, 2, [False, True]),
        (10, 2, [False, True]),
    ]
    assert sent[0][3] == bytes([11]) * PAGE and sent[2][3] == bytes([13]) * PAGE
    assert not needed[9:14].any() and needed[14:].all() and needed[:9].all()
    counters = sender.counters
    assert (counters.pages_requested, counters.pages_resent) == (4, 2)
    assert (counters.normal, counters.duplicate) == (3, 3)


def test_a_one_page_request_sends_its_page_once_or_again_if_the_push_took_it() -> None:
    """The urgent channel's one-page requests (PageService._serve_page): a needed page is
    claimed and sent, a page the push took is sent again (small pages), both counted and
    logged in the hops; the push goes on after the page."""
    mapping = Mapping.anonymous(PAGES * PAGE)
    ram = RamList([RamBlock("pc.ram", mapping)])
    mapping.view[3 * PAGE : 4 * PAGE] = b"\x07" * PAGE
    sender = RamSender(ram, Parameters(), time.monotonic)
    hops = HopLog()
    service = PageService(ram, sender, hops)
    ours, theirs = Connection.socketpair()
    with mapping, ours, theirs:
        reader, received = _draining(theirs)
        service.set_urgent_channel(StreamWriter(ours, Direction.MAIN))
        needed = np.ones(PAGES, dtype=np.bool_)
        needed[5] = False  # the push took page 5 already
        service.set_needed([needed])
        service.request(PageRequest(0, 3, 1, read_at=1.0))
        service.request(PageRequest(0, 5, 1, read_at=2.0))
        ours.shutdown()
        reader.join(5)
        sent = _runs_sent(bytes(received))
    assert [(first, count, bits) for first, count, bits, _ in sent] == [
        (3, 1, [False]),
        (5, 1, [True]),
    ]
    assert sent[0][3] == b"\x07" * PAGE
    assert not needed[3] and not needed[5] and needed[:3].all() and needed[6:].all()
    assert (sender.counters.pages_requested, sender.counters.pages_resent) == (1, 1)
    assert [(block, first, count, read) for block, first, count, read, _ in hops.served] == [
        (0, 3, 1, 1.0),
        (0, 5, 1, 2.0),
    ]
    assert service._jump == (0, 6)


def test_zero_pages_found_ahead_are_found_again_after_a_sync() -> None:
    # a sweep finds zero pages ahead of the runs it sends; a page written after that look
    # goes out as a zero page (the dirty log has the write, and the next round sends it)
    # unless a sync of the dirty log came in between: then it is looked at again
    pages = 256
    mapping = Mapping.anonymous(pages * PAGE)
    ram = RamList([RamBlock("pc.ram", mapping)])
    mapping.view[5 * PAGE] = 1
    sender = RamSender(ram, Parameters(), time.monotonic)
    ours, theirs = Connection.socketpair()

    with mapping, ours, theirs:
        reader, received = _draining(theirs)
        writer = StreamWriter(ours, Direction.MAIN)
        block = ram[0]
        sender.send_pages(writer, 0, block, 0, 64, phase="precopy", ahead=pages - 64)
        mapping.view[100 * PAGE] = 7  # the guest writes a page found zero a moment ago
        sender.send_pages(writer, 0, block, 64, 64, phase="precopy", ahead=pages - 128)
        sender.forget_zero_pages()  # a sync (its dirty log holds page 100)
        sender.send_pages(writer, 0, block, 64, 64, phase="precopy", ahead=pages - 128)
        ours.shutdown()
        reader.join(5)
        sent = _runs_sent(bytes(received))
    assert [(first, count) for first, count, _, _ in sent] == [(0, 64), (64, 64), (64, 64)]
    assert np.flatnonzero(~np.array(sent[0][2])).tolist() == [5]
    assert not any(not bit for bit in sent[1][2])  # page 100 went as a zero page
    assert np.flatnonzero(~np.array(sent[2][2])).tolist() == [36]  # and now with its data
    assert sent[2][3] == b"\x07" + bytes(PAGE - 1)
    assert sender.pages_not_read == 63 + 64 + 63  # never touched, each time it was sent


def _frames(raw: bytes, page: int = PAGE) -> list[tuple[int, int, int]]:
    """(frame type, offset of the frame's end in `raw`, PING value or 0) of every whole
    frame in `raw` (RAM_RUN frames with their page data, pages of `page` bytes)."""
    found = []
    position = 0
    while position + layout.FRAME_HEADER.size <= len(raw):
        kind, _, _, length = layout.FRAME_HEADER.unpack_from(raw, position)
        body = position + layout.FRAME_HEADER.size
        end = body + length
        value = 0
        if kind == FrameType.RAM_RUN:
            _, _, count = layout.RAM_RUN.unpack_from(raw, body)
            bits = np.unpackbits(
                np.frombuffer(raw[body + layout.RAM_RUN.size : end], np.uint8), bitorder="little"
            )[:count]
            end += int(np.count_nonzero(bits == 0)) * page
        elif kind == FrameType.PING:
            (value,) = layout.U32.unpack_from(raw, body)
        if end > len(raw):
            break
        found.append((kind, end, value))
        position = end
    return found


def test_without_preempt_the_push_keeps_what_the_destination_has_not_read_bounded() -> None:
    """A requested page waits behind what the push wrote and the destination has not read:
    the push stops PUSH_BACKLOG_BYTES ahead of the last PONG, and goes on with the PONGs."""
    pages = 4096  # 16 MiB: far more than the backlog allows
    mapping = Mapping.anonymous(pages * PAGE)
    ram = RamList([RamBlock("pc.ram", mapping)])
    mapping.view[:] = b"\xa5" * mapping.length  # no zero pages: every run carries its data
    sender = RamSender(ram, Parameters(), time.monotonic)
    service = PageService(ram, sender)
    service.set_needed([np.ones(pages, dtype=np.bool_)])
    ours, theirs = Connection.socketpair()
    received = bytearray()
    lock = threading.Lock()
    done = threading.Event()

    def drain() -> None:  # reads everything at once, and answers no PING by itself
        buffer = memoryview(bytearray(1 << 20))
        while count := theirs.recv_into(buffer):
            with lock:
                received.extend(buffer[:count])

    def push() -> None:
        service.push(StreamWriter(ours, Direction.MAIN), lambda: None)
        done.set()

    with mapping, ours, theirs:
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        # the push writes up to the bound and then waits for a PONG: it never goes beyond
        deadline = time.monotonic() + 30
        while len(received) < PUSH_BACKLOG_BYTES and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a push that does not wait to overrun the bound
        with lock:
            held = bytes(received)
        assert PUSH_BACKLOG_BYTES <= len(held) <= PUSH_BACKLOG_BYTES + PUSH_PING_BYTES + 4 * 8192
        assert not done.is_set()
        # the destination reads on, PONG by PONG: the push goes on to its end
        parsed = 0
        while not done.is_set() and time.monotonic() < deadline:
            with lock:
                fresh = bytes(received[parsed:])
            for kind, end, value in _frames(fresh):
                if kind == FrameType.PING:
                    service.pong(value)
                parsed_end = end
            if fresh and _frames(fresh):
                parsed += parsed_end
            time.sleep(0.001)
        assert done.is_set()
        ours.shutdown()
        reader.join(5)
    frames = _frames(bytes(received))
    pushed = sum(1 for kind, _, _ in frames if kind == FrameType.RAM_RUN)
    pings = sum(1 for kind, _, _ in frames if kind == FrameType.PING)
    assert sender.counters.pages_pushed == pages and pushed == pages // 64
    assert pings >= pages * PAGE // PUSH_PING_BYTES - 1


def test_scattered_one_page_runs_count_as_the_destinations_work_per_run() -> None:
    """Every other page needed (a kvstore guest's postcopy): each run is one page, and the
    destination's work per run, not its 4 KiB, is what a requested page waits behind. The
    push stops PUSH_BACKLOG_BYTES / PUSH_RUN_FLOOR_BYTES runs ahead of the last PONG, not
    512 runs (2 MiB of pages)."""
    pages = 8192
    mapping = Mapping.anonymous(pages * PAGE)
    ram = RamList([RamBlock("pc.ram", mapping)])
    mapping.view[:] = b"\x3c" * mapping.length
    sender = RamSender(ram, Parameters(), time.monotonic)
    service = PageService(ram, sender)
    needed = np.zeros(pages, dtype=np.bool_)
    needed[::2] = True
    service.set_needed([needed])
    ours, theirs = Connection.socketpair()
    stop = threading.Event()

    def check_cancel() -> None:
        if stop.is_set():
            raise _Stopped

    def push() -> None:
        with contextlib.suppress(_Stopped):
            service.push(StreamWriter(ours, Direction.MAIN), check_cancel)

    with mapping, ours, theirs:
        reader, received = _draining(theirs)  # answers no PING: the push must hold
        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        bound = PUSH_BACKLOG_BYTES // PUSH_RUN_FLOOR_BYTES
        deadline = time.monotonic() + 30
        while len(_frames(bytes(received))) < bound and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a push that does not wait to overrun the bound
        runs_held = sum(1 for kind, _, _ in _frames(bytes(received)) if kind == FrameType.RAM_RUN)
        assert bound <= runs_held <= bound + PUSH_PING_BYTES // PUSH_RUN_FLOOR_BYTES + 1
        assert sender.counters.pages_pushed < pages // 2
        stop.set()
        pusher.join(10)
        assert not pusher.is_alive()
        ours.shutdown()
        reader.join(5)


class _Stopped(Exception):
    """The test's end, raised in the push by its check_cancel."""


def test_requested_pages_beyond_the_backlog_bound_get_a_ping_of_their_own() -> None:
    """Served requests fill the backlog too (a 2 MiB huge page each): the push PINGs for
    what they added before it waits for a PONG, or it would wait for good."""
    pages = 4 * PUSH_BACKLOG_BYTES // PAGE  # room for the requests, every other page
    mapping = Mapping.anonymous(pages * PAGE)
    ram = RamList([RamBlock("pc.ram", mapping)])
    mapping.view[:] = b"\x5a" * mapping.length
    sender = RamSender(ram, Parameters(), time.monotonic)
    service = PageService(ram, sender)
    service.set_needed([np.ones(pages, dtype=np.bool_)])
    # more than the bound, requested before the push sends anything (and so any PING)
    requested = PUSH_BACKLOG_BYTES // PAGE + 64
    for page in range(0, 2 * requested, 2):
        service.request(PageRequest(0, page, 1))
    ours, theirs = Connection.socketpair()
    done = threading.Event()

    def destination() -> None:  # reads everything and answers every PING, as it does
        buffer = bytearray()
        chunk = memoryview(bytearray(1 << 20))
        while count := theirs.recv_into(chunk):
            buffer.extend(chunk[:count])
            frames = _frames(bytes(buffer))
            for kind, _, value in frames:
                if kind == FrameType.PING:
                    service.pong(value)
            if frames:
                del buffer[: frames[-1][1]]

    def push() -> None:
        service.push(StreamWriter(ours, Direction.MAIN), lambda: None)
        done.set()

    with mapping, ours, theirs:
        reader = threading.Thread(target=destination, daemon=True)
        reader.start()
        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        assert done.wait(30), "the push waits for a PONG no PING asked for"
        ours.shutdown()
        reader.join(5)
    assert sender.counters.pages_requested == requested
    assert sender.counters.pages_pushed == pages - requested


def test_without_preempt_the_push_keeps_huge_pages_unread_by_the_page() -> None:
    """A huge page is 2 MiB by itself: with the bound in bytes alone the push sent one,
    waited for its PONG (read and placed), and only then sent the next: stop and wait.
    It PINGs every PUSH_PING_PAGES pages and keeps twice that unread, and no more."""
    held = 2 * PUSH_PING_PAGES
    pages = held + 2
    with huge_pages(pages):
        mapping = Mapping.memfd(pages * HUGE_PAGE_2M, "t", hugetlb=True)
        with mapping:
            ram = RamList([RamBlock("pc.ram", mapping)])
            mapping.view[:] = b"\x3c" * mapping.length
            sender = RamSender(ram, Parameters(), time.monotonic)
            service = PageService(ram, sender)
            service.set_needed([np.ones(pages, dtype=np.bool_)])
            ours, theirs = Connection.socketpair()
            received = bytearray()
            lock = threading.Lock()
            done = threading.Event()

            def drain() -> None:  # reads everything at once, and answers no PING
                buffer = memoryview(bytearray(1 << 20))
                while count := theirs.recv_into(buffer):
                    with lock:
                        received.extend(buffer[:count])

            def push() -> None:
                service.push(StreamWriter(ours, Direction.MAIN), lambda: None)
                done.set()

            def runs_read() -> list[tuple[int, int, int]]:
                with lock:
                    raw = bytes(received)
                return [f for f in _frames(raw, HUGE_PAGE_2M) if f[0] == FrameType.RAM_RUN]

            with ours, theirs:
                threading.Thread(target=drain, daemon=True).start()
                pusher = threading.Thread(target=push, daemon=True)
                pusher.start()
                deadline = time.monotonic() + 30
                while len(runs_read()) < held and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)  # room for a push that does not wait to overrun the bound
                assert len(runs_read()) == held
                assert not done.is_set()
                # the destination reads on, PONG by PONG: the push goes on to its end
                answered = 0
                while not done.is_set() and time.monotonic() < deadline:
                    with lock:
                        raw = bytes(received)
                    pongs = [v for k, _, v in _frames(raw, HUGE_PAGE_2M) if k == FrameType.PING]
                    for value in pongs[answered:]:
                        service.pong(value)
                    answered = len(pongs)
                    time.sleep(0.001)
                assert done.is_set()
                ours.shutdown()
                pusher.join(5)
            assert sender.counters.pages_pushed == pages
