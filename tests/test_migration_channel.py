"""Frames over a real socket pair: the buffered reader of the page request's channels reads
what the plain reader reads, whatever the buffer holds (migration/channel.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.migration.channel import BufferedStreamReader, StreamReader, StreamWriter
from postcopy.ram import RamBlock
from postcopy.transport import Connection, ConnectionClosed
from postcopy.wire import (
    BlockInfo,
    Direction,
    Handshake,
    Ping,
    RamRunHeader,
    StreamContext,
)

PAGE = 4096
PAGES = 16


def _frames(writer: StreamWriter, block: RamBlock) -> None:
    try:
        writer.send_stream_header()
        writer.send(Handshake(frozenset(), (BlockInfo("pc.ram", PAGES * PAGE, PAGE),), 1))
        writer.send_ram_page(0, block, 3, False)
        writer.send_ram_page(0, block, 4, True)
        zero = np.array([False, True, False, False])
        writer.send_ram_run(0, block, 8, zero)
        writer.send(Ping(7))
    finally:
        writer.connection.shutdown()  # a reader waiting for more is told there is none


def _read_all(reader: StreamReader) -> list[object]:
    got: list[object] = [reader.read_stream_header()]
    for _ in range(5):
        message = reader.read()
        if isinstance(message, RamRunHeader):
            data = memoryview(bytearray(message.data_length))
            reader.read_data_into(data)
            got.append((message.block, message.first_page, message.zero.tolist(), bytes(data)))
        else:
            got.append(message)
    return got


@pytest.mark.parametrize("buffer_size", [8, 40, 5000, 64 << 10])
def test_the_buffered_reader_reads_what_the_plain_one_does(buffer_size: int) -> None:
    with Mapping.anonymous(PAGES * PAGE) as mapping:
        block = RamBlock("pc.ram", mapping)
        for page in range(PAGES):
            mapping.view[page * PAGE : (page + 1) * PAGE] = bytes([page + 1]) * PAGE
        results = []
        for buffered in (False, True):
            ours, theirs = Connection.socketpair()
            with ours, theirs:
                writer = StreamWriter(ours, Direction.MAIN)
                sender = threading.Thread(target=_frames, args=(writer, block))
                sender.start()  # the frames exceed the socket buffer: send while reading
                context = StreamContext(Direction.MAIN)
                reader = (
                    BufferedStreamReader(theirs, Direction.MAIN, context, buffer_size)
                    if buffered
                    else StreamReader(theirs, Direction.MAIN, context)
                )
                results.append((_read_all(reader), reader.bytes_received))
                sender.join(5)
    assert results[0] == results[1]
    frames, _ = results[1]
    assert frames[2] == (0, 3, [False], bytes([4]) * PAGE)
    assert frames[3] == (0, 4, [True], b"")
    run = frames[4]
    assert isinstance(run, tuple)
    assert run[3] == bytes([9]) * PAGE + bytes([11]) * PAGE + bytes([12]) * PAGE


def test_the_buffered_reader_says_when_the_peer_closed_mid_frame() -> None:
    ours, theirs = Connection.socketpair()
    with ours, theirs:
        ours.send_all([b"\x00" * 5])
        ours.shutdown()
        reader = BufferedStreamReader(theirs, Direction.MAIN, StreamContext(Direction.MAIN))
        with pytest.raises(ConnectionClosed, match="closed the connection after 5 of"):
            reader.read_stream_header()


def _read_frames(block: RamBlock, piece_bytes: int) -> tuple[list[object], int]:
    ours, theirs = Connection.socketpair()
    with ours, theirs:
        writer = StreamWriter(ours, Direction.MAIN)
        writer.piece_bytes = piece_bytes
        sender = threading.Thread(target=_frames, args=(writer, block))
        sender.start()
        reader = StreamReader(theirs, Direction.MAIN, StreamContext(Direction.MAIN))
        got = _read_all(reader), reader.bytes_received
        sender.join(5)
    return got


@pytest.mark.parametrize("piece_bytes", [PAGE + 1, 5000, PAGE * 2, PAGE * 3 + 20])
def test_a_run_sent_in_pieces_reads_as_one_frame(piece_bytes: int) -> None:
    """The push's runs cross in pieces (the socket's lock is shared with the page
    requests): the stream is the same bytes, whatever the piece size."""
    with Mapping.anonymous(PAGES * PAGE) as mapping:
        block = RamBlock("pc.ram", mapping)
        for page in range(PAGES):
            mapping.view[page * PAGE : (page + 1) * PAGE] = bytes([page + 1]) * PAGE
        assert _read_frames(block, piece_bytes) == _read_frames(block, 0)


@pytest.mark.parametrize(("piece_bytes", "sends"), [(PAGE, 1), (PAGE * 2, 3)])
def test_a_page_as_large_as_a_piece_crosses_in_one_send(piece_bytes: int, sends: int) -> None:
    """Pieces split runs of pages smaller than a piece only: a huge page (2 MiB, the
    piece 256 KiB) goes in one send, which blocked its vCPUs less on hugetlbfs. (Pieces of
    two pages: the header and 16 KiB go in three.)"""
    with Mapping.anonymous(PAGES * PAGE) as mapping:
        block = RamBlock("pc.ram", mapping)
        ours, theirs = Connection.socketpair()
        with ours, theirs:
            writer = StreamWriter(ours, Direction.MAIN)
            writer.piece_bytes = piece_bytes
            calls: list[int] = []
            send_all = ours.send_all

            def counted(buffers: list[bytes | memoryview]) -> None:
                calls.append(1)
                send_all(buffers)

            ours.send_all = counted  # type: ignore[method-assign,assignment]
            writer.send_ram_run(0, block, 0, np.zeros(4, dtype=bool))  # 4 pages of data
            assert len(calls) == sends
