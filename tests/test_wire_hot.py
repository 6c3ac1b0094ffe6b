"""StreamContext.parse_hot: a page request's frames in one step, exactly as the usual way.

For any bytes, parse_hot either declines (None) or gives what parse_frame_header and
parse_payload give for the same bytes on a context in the same state, and leaves the
context as they do; it never accepts what the usual way refuses, and it takes every
valid REQ_PAGES and one-page RAM_RUN that is whole."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.wire import (
    FRAME_HEADER_SIZE,
    BlockInfo,
    Direction,
    Encoder,
    Handshake,
    ProtocolError,
    RamRunHeader,
    ReqPages,
    StreamContext,
    parse_frame_header,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCKS = (
    BlockInfo("pc.ram", 1 * GiB, 4 * KiB),
    BlockInfo("vga.vram", 16 * MiB, 64 * KiB),
    BlockInfo("huge", 64 * MiB, 2 * MiB),
)
HANDSHAKE = Handshake(frozenset({"postcopy-ram"}), BLOCKS, vcpus=1)


def contexts(direction: Direction, last_req_block: int | None) -> list[StreamContext]:
    """Two contexts in the same state: the return path's with its blocks configured,
    the main stream's after a handshake."""
    made = []
    for _ in range(2):
        if direction is Direction.RETURN:
            context = StreamContext(direction, blocks=BLOCKS)
            context.last_req_block = last_req_block
        else:
            context = StreamContext(direction)
            frame = Encoder(Direction.MAIN).encode(HANDSHAKE)
            context.parse_payload(
                parse_frame_header(frame[:FRAME_HEADER_SIZE], direction), frame[FRAME_HEADER_SIZE:]
            )
        made.append(context)
    return made


def usual(context: StreamContext, data: bytes) -> tuple[object, int] | None:
    """The usual way's message and frame size (without page data), None if refused or
    incomplete."""
    if len(data) < FRAME_HEADER_SIZE:
        return None
    try:
        header = parse_frame_header(data[:FRAME_HEADER_SIZE], context.direction)
        size = FRAME_HEADER_SIZE + header.length
        if len(data) < size:
            return None
        return context.parse_payload(header, data[FRAME_HEADER_SIZE:size]), size
    except ProtocolError:
        return None


def same(hot: object, expected: object) -> bool:
    if isinstance(hot, RamRunHeader) and isinstance(expected, RamRunHeader):
        return (
            (hot.block, hot.first_page, hot.data_length)
            == (expected.block, expected.first_page, expected.data_length)
            and np.array_equal(hot.zero, expected.zero)
            and not hot.zero.flags.writeable
        )
    return hot == expected


def check(direction: Direction, data: bytes, last_req_block: int | None = None) -> object:
    hot_context, usual_context = contexts(direction, last_req_block)
    prefix = b"\xaa" * 3  # parse_hot reads at an offset in the receiver's buffer
    hot = hot_context.parse_hot(bytearray(prefix + data), len(prefix), len(data))
    expected = usual(usual_context, data)
    if hot is not None:
        assert expected is not None, f"parse_hot took what the usual way refuses: {data!r}"
        assert same(hot[0], expected[0]) and hot[1] == expected[1]
        assert hot_context.last_req_block == usual_context.last_req_block
        if direction is Direction.MAIN:
            assert hot_context.state.state is usual_context.state.state
        return hot[0]
    if expected is not None:  # declined: only what is not a hot frame
        message = expected[0]
        if isinstance(message, ReqPages):
            pytest.fail(f"parse_hot declined a valid REQ_PAGES: {data!r}")
        if isinstance(message, RamRunHeader) and message.zero.size == 1:
            pytest.fail(f"parse_hot declined a valid one-page RAM_RUN: {data!r}")
    return None


def req_frame(block: int, first: int, count: int, named: bool) -> bytes:
    if named:
        return struct.pack(">BBHIHQI", 0x81, 1, 0, 14, block, first, count)
    return struct.pack(">BBHIQI", 0x81, 0, 0, 12, first, count)


def one_page_frame(block: int, first: int, bit: int) -> bytes:
    return struct.pack(">BBHIHQIB", 0x03, 0, 0, 15, block, first, 1, bit)


def test_valid_hot_frames_are_taken() -> None:
    assert check(Direction.RETURN, req_frame(0, 5, 1, True)) == ReqPages(0, 5, 1)
    assert check(Direction.RETURN, req_frame(0, 7, 3, False), last_req_block=2) == ReqPages(2, 7, 3)
    last = BLOCKS[1].pages - 1
    assert check(Direction.RETURN, req_frame(1, last, 1, True)) == ReqPages(1, last, 1)
    header = check(Direction.MAIN, one_page_frame(0, 9, 0) + bytes(4096))
    assert isinstance(header, RamRunHeader) and header.data_length == 4 * KiB
    header = check(Direction.MAIN, one_page_frame(2, 31, 1))
    assert isinstance(header, RamRunHeader) and header.data_length == 0


@pytest.mark.parametrize(
    ("direction", "data", "last_req_block"),
    [
        (Direction.RETURN, req_frame(3, 0, 1, True), None),  # no such block
        (Direction.RETURN, req_frame(1, BLOCKS[1].pages, 1, True), None),  # past the end
        (Direction.RETURN, req_frame(1, BLOCKS[1].pages - 1, 2, True), None),
        (Direction.RETURN, req_frame(0, 0, 0, True), None),  # no page
        (Direction.RETURN, req_frame(0, 0, 1, False), None),  # no block named yet
        (Direction.RETURN, req_frame(0, 0, 1, True)[:-1], None),  # incomplete
        (Direction.RETURN, one_page_frame(0, 0, 0), None),  # the other direction's
        (Direction.MAIN, req_frame(0, 0, 1, True), None),
        (Direction.MAIN, one_page_frame(0, 0, 2), None),  # padding bit
        (Direction.MAIN, one_page_frame(0, BLOCKS[0].pages, 0), None),
        (Direction.MAIN, one_page_frame(3, 0, 0), None),
    ],
)
def test_what_the_usual_way_refuses_is_declined(
    direction: Direction, data: bytes, last_req_block: int | None
) -> None:
    assert check(direction, data, last_req_block) is None


@given(
    st.sampled_from([Direction.RETURN, Direction.MAIN]),
    st.sampled_from([None, 0, 1, 2]),
    st.integers(0, 3),
    st.integers(0, 2**64 - 1) | st.integers(0, 300_000),
    st.integers(0, 2**32 - 1) | st.integers(0, 3),
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 31), st.integers(0, 255)), max_size=3),
    st.integers(0, 40),
)
def test_any_bytes_parse_as_the_usual_way_says(
    direction: Direction,
    last_req_block: int | None,
    block: int,
    first: int,
    count: int,
    named: bool,
    mutations: list[tuple[int, int]],
    cut: int,
) -> None:
    if direction is Direction.RETURN:
        frame = bytearray(req_frame(block, first, count, named))
    else:
        frame = bytearray(one_page_frame(block, min(first, 2**64 - 1), count & 3))
    for position, value in mutations:
        if position < len(frame):
            frame[position] = value
    check(
        direction, bytes(frame[: max(len(frame) - cut, 0)] if cut < 20 else frame), last_req_block
    )


@given(st.integers(0, BLOCKS[0].pages - 1), st.booleans())
def test_a_requested_pages_header_after_the_first_is_the_same_and_as_checked(
    page: int, zero: bool
) -> None:
    """Encoder.ram_page_header keeps what it checked of a block: the next headers are
    byte for byte one-page runs' headers, and still refuse a page past the block or
    another page size."""
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    encoder.ram_page_header(0, 0, False, 4096)  # checked once
    assert encoder.ram_page_header(0, page, zero, 4096) == encoder.ram_run_header(
        0, page, np.array([zero]), 4096
    )
    with pytest.raises(ProtocolError, match=r"RamRun.first_page=262144 out of range"):
        encoder.ram_page_header(0, 262144, True, 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.page_size=65536 differs"):
        encoder.ram_page_header(0, page, zero, 64 * KiB)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 2**64 - 1) | st.integers(0, 300_000),
            st.integers(0, 2**32) | st.integers(0, 3),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_req_pages_frame_is_encode_of_req_pages(requests: list[tuple[int, int, int]]) -> None:
    """Encoder.req_pages_frame (the fault thread's request, no message object) gives the
    bytes encode gives, names the block when encode would, and refuses what it refuses."""
    fast, usual = Encoder(Direction.RETURN, blocks=BLOCKS), Encoder(Direction.RETURN, blocks=BLOCKS)
    for block, first, count in requests:
        try:
            expected: bytes | type = usual.encode(ReqPages(block, first, count))
        except (ProtocolError, ValueError) as error:
            expected = type(error)
        try:
            got: bytes | type = fast.req_pages_frame(block, first, count)
        except (ProtocolError, ValueError) as error:
            got = type(error)
        assert got == expected
        assert fast.last_req_block == usual.last_req_block
