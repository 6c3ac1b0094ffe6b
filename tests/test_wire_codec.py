"""The wire codec: round trips of every message, ReqPages elision, zero-copy receive, and
every ProtocolError the protocol defines (framing, bounds, blocks, state, configuration)."""

from __future__ import annotations

import pickle
import random
import struct
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy.wire import (
    CLOSED,
    FLAG_BLOCK_NAMED,
    FLAG_GUEST_NAMED,
    MAIN_MAGIC,
    MAX_DISCARD_RANGES,
    MAX_PAYLOAD,
    MAX_RUN_PAGES,
    NEED_DATA,
    RETURN_MAGIC,
    Advise,
    BlockInfo,
    Decoder,
    DeviceState,
    Direction,
    Discard,
    Encoder,
    EndOfRound,
    FrameHeader,
    FrameType,
    Handshake,
    IncomingState,
    Listen,
    Message,
    Package,
    Ping,
    Pong,
    PostcopyComplete,
    PostcopyResume,
    PrecopyComplete,
    ProtocolError,
    RamRun,
    RamRunHeader,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    ResumeAck,
    ResumeRequest,
    Run,
    Shut,
    StreamContext,
    max_run_pages,
    parse_frame_header,
    parse_stream_header,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

BLOCKS = (
    BlockInfo("pc.ram", 1 * GiB, 4 * KiB),
    BlockInfo("vga.vram", 16 * MiB, 64 * KiB),
    BlockInfo("huge", 64 * MiB, 2 * MiB),
)
HANDSHAKE = Handshake(frozenset({"postcopy-ram", "xbzrle"}), BLOCKS, vcpus=2)
ADVISE = Advise(4 * KiB | 64 * KiB | 2 * MiB, 4 * KiB)

# The shortest legal path to a state where each message type may be decoded.
TO_NONE: tuple[Message, ...] = (HANDSHAKE,)
TO_ADVISE: tuple[Message, ...] = (HANDSHAKE, ADVISE)
TO_LISTENING: tuple[Message, ...] = (*TO_ADVISE, Listen())
TO_RUNNING: tuple[Message, ...] = (*TO_LISTENING, Run())


# -- helpers -----------------------------------------------------------------------------------


def frames(direction: Direction, messages: Sequence[Message]) -> bytes:
    encoder = Encoder(direction, blocks=None if direction is Direction.MAIN else BLOCKS)
    return encoder.stream_header() + b"".join(encoder.encode(m) for m in messages)


def decode_all(
    direction: Direction,
    data: bytes,
    chunk_sizes: Callable[[], int] = lambda: 1 << 30,
    blocks: Sequence[BlockInfo] | None = None,
) -> list[Message]:
    """Feed data in chunks, then EOF; return every message until CLOSED."""
    decoder = Decoder(direction, blocks=blocks)
    events: list[Message] = []
    offset = 0
    while offset < len(data):
        size = max(1, chunk_sizes())
        decoder.receive_data(data[offset : offset + size])
        offset += size
        while (event := decoder.next_event()) is not NEED_DATA:
            assert event is not CLOSED
            events.append(event)  # type: ignore[arg-type]
    decoder.receive_data(b"")
    while (event := decoder.next_event()) is not CLOSED:
        assert event is not NEED_DATA
        events.append(event)  # type: ignore[arg-type]
    return events


def decode_zero_copy(
    direction: Direction, data: bytes, blocks: Sequence[BlockInfo] | None = None
) -> list[Message]:
    """Decode as the I/O layer does: headers parsed in place, page data read separately."""
    view = memoryview(data)
    parse_stream_header(view[:16], direction)
    context = StreamContext(direction, blocks=blocks)
    offset = 16
    messages: list[Message] = []
    while offset < len(view):
        header = parse_frame_header(view[offset : offset + 8], direction)
        offset += 8
        result = context.parse_payload(header, view[offset : offset + header.length])
        offset += header.length
        if isinstance(result, RamRunHeader):
            staging = bytearray(result.data_length)  # stands in for recv_into guest RAM
            staging[:] = view[offset : offset + result.data_length]
            offset += result.data_length
            messages.append(result.with_data(bytes(staging)))
        else:
            messages.append(result)
    return messages


def raw_frame(frame_type: int, payload: bytes, flags: int = 0, reserved: int = 0) -> bytes:
    return struct.pack(">BBHI", frame_type, flags, reserved, len(payload)) + payload


def main_stream(*body: bytes, prefix: Sequence[Message] = TO_NONE) -> bytes:
    return frames(Direction.MAIN, prefix) + b"".join(body)


def expect_error(
    direction: Direction,
    data: bytes,
    match: str,
    blocks: Sequence[BlockInfo] | None = None,
) -> ProtocolError:
    """Both receive paths must refuse data with a ProtocolError matching the pattern."""
    with pytest.raises(ProtocolError, match=match) as decoder_error:
        decode_all(direction, data, blocks=blocks)
    if "truncated" in match:  # decode_zero_copy stops at the end of its input
        return decoder_error.value
    with pytest.raises(ProtocolError, match=match):
        decode_zero_copy(direction, data, blocks=blocks)
    return decoder_error.value


# -- strategies --------------------------------------------------------------------------------

QEMU_CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)
PAGE_SIZES = (4 * KiB, 8 * KiB, 64 * KiB, 2 * MiB, 1 * GiB)

capability_names = st.sampled_from(QEMU_CAPABILITIES) | st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True
)


@st.composite
def block_infos(draw: st.DrawFn) -> BlockInfo:
    name = draw(
        st.text(min_size=1, max_size=40).filter(
            lambda s: (
                len(s.encode("utf-8", "surrogatepass")) <= 255
                and s.encode("utf-8", "ignore") == s.encode("utf-8", "surrogatepass")
            )
        )
    )
    page_size = draw(st.sampled_from(PAGE_SIZES))
    pages = draw(st.integers(1, (1 << 48) // page_size))
    return BlockInfo(name, pages * page_size, page_size)


@st.composite
def handshakes(draw: st.DrawFn) -> Handshake:
    blocks = draw(st.lists(block_infos(), min_size=1, max_size=64, unique_by=lambda b: b.name))
    smallest = min(b.page_size for b in blocks)
    target = draw(st.sampled_from([p for p in PAGE_SIZES if p <= smallest]))
    guest = draw(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60))
    guest = guest if guest.isprintable() else ""
    return Handshake(
        frozenset(draw(st.lists(capability_names, max_size=64))),
        tuple(blocks),
        draw(st.integers(1, 1024)),
        target,
        guest,
    )


@st.composite
def ram_runs(draw: st.DrawFn) -> RamRun:
    block = draw(st.integers(0, len(BLOCKS) - 1))
    info = BLOCKS[block]
    count = draw(st.integers(1, max_run_pages(info.page_size)))
    first_page = draw(st.integers(0, info.pages - count))
    zero = np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=bool)
    normal = int(np.count_nonzero(~zero))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(normal * info.page_size)
    as_view = draw(st.booleans())
    return RamRun(block, first_page, zero, memoryview(data) if as_view else data)


@st.composite
def discards(draw: st.DrawFn) -> Discard:
    block = draw(st.integers(0, len(BLOCKS) - 1))
    pages = BLOCKS[block].pages
    ranges = []
    for _ in range(draw(st.integers(1, MAX_DISCARD_RANGES))):
        start = draw(st.integers(0, pages - 1))
        ranges.append((start, draw(st.integers(1, pages - start))))
    return Discard(block, tuple(ranges))


@st.composite
def req_pages(draw: st.DrawFn) -> ReqPages:
    block = draw(st.integers(0, len(BLOCKS) - 1))
    pages = BLOCKS[block].pages
    first = draw(st.integers(0, pages - 1))
    return ReqPages(block, first, draw(st.integers(1, min(pages - first, 2**32 - 1))))


@st.composite
def recv_bitmaps(draw: st.DrawFn) -> RecvBitmap:
    block = draw(st.sampled_from([1, 2]))  # pc.ram's 262144 entries are tested apart
    pages = BLOCKS[block].pages
    bits = draw(st.lists(st.booleans(), min_size=pages, max_size=pages))
    return RecvBitmap(block, np.array(bits, dtype=bool))


device_states = st.binary(max_size=4096).map(DeviceState)
u32 = st.integers(0, 2**32 - 1)

# message type -> (strategy, direction, messages that must precede it)
CASES: dict[str, tuple[st.SearchStrategy[Message], Direction, tuple[Message, ...]]] = {
    "Handshake": (handshakes(), Direction.MAIN, ()),
    "Advise": (st.just(ADVISE), Direction.MAIN, TO_NONE),
    "RamRun": (ram_runs(), Direction.MAIN, TO_NONE),
    "EndOfRound": (u32.map(EndOfRound), Direction.MAIN, TO_NONE),
    "DeviceState": (device_states, Direction.MAIN, TO_NONE),
    "PrecopyComplete": (st.just(PrecopyComplete()), Direction.MAIN, TO_NONE),
    "Discard": (discards(), Direction.MAIN, TO_ADVISE),
    "Listen": (st.just(Listen()), Direction.MAIN, TO_ADVISE),
    "Run": (st.just(Run()), Direction.MAIN, TO_LISTENING),
    "Package": (
        st.lists(device_states, max_size=4).map(lambda ds: Package((*ds, Run()))),
        Direction.MAIN,
        TO_LISTENING,
    ),
    "PostcopyComplete": (st.just(PostcopyComplete()), Direction.MAIN, TO_RUNNING),
    "ResumeRequest": (
        st.builds(ResumeRequest, st.binary(min_size=16, max_size=16), st.integers(1, 2**32 - 1)),
        Direction.MAIN,
        TO_RUNNING,
    ),
    "RecvBitmapRequest": (
        st.integers(0, len(BLOCKS) - 1).map(RecvBitmapRequest),
        Direction.MAIN,
        TO_RUNNING,
    ),
    "PostcopyResume": (st.just(PostcopyResume()), Direction.MAIN, TO_RUNNING),
    "ReqPages": (req_pages(), Direction.RETURN, ()),
    "Shut": (
        st.builds(Shut, st.booleans(), st.text(max_size=200)).filter(
            lambda s: len(s.reason.encode("utf-8", "surrogatepass")) <= 1024
        ),
        Direction.RETURN,
        (),
    ),
    "Ping": (u32.map(Ping), Direction.MAIN, TO_NONE),
    "Pong": (u32.map(Pong), Direction.RETURN, ()),
    "RecvBitmap": (recv_bitmaps(), Direction.RETURN, ()),
    "ResumeAck": (u32.map(ResumeAck), Direction.RETURN, ()),
}


def test_every_message_type_has_a_round_trip_case() -> None:
    from postcopy.wire.messages import MAIN_MESSAGES, RETURN_MESSAGES

    assert {t.__name__ for t in (*MAIN_MESSAGES, *RETURN_MESSAGES)} == set(CASES)


def test_every_frame_type_has_a_spec_a_reader_and_a_writer() -> None:
    """Adding a frame type means an entry in each table; both directions' messages are framed."""
    from postcopy.wire.frames import SPECS
    from postcopy.wire.messages import MAIN_MESSAGES, RETURN_MESSAGES
    from postcopy.wire.readers import READERS
    from postcopy.wire.writers import WRITERS

    assert set(SPECS) == set(FrameType)
    assert set(READERS) == set(FrameType)
    assert set(WRITERS) == set(FrameType)
    for direction, messages in (
        (Direction.MAIN, MAIN_MESSAGES),
        (Direction.RETURN, RETURN_MESSAGES),
    ):
        framed = [spec.message for spec in SPECS.values() if spec.direction is direction]
        assert sorted(t.__name__ for t in framed) == sorted(t.__name__ for t in messages)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_in_random_chunks(name: str, data: st.DataObject) -> None:
    strategy, direction, prefix = CASES[name]
    try:
        message = data.draw(strategy)
    except ProtocolError:  # text strategies may produce lone surrogates
        return
    stream = frames(direction, (*prefix, message))
    chunk = data.draw(st.sampled_from([1, 3, 7, 8, 100, 4096, 65537, 1 << 30]))
    chunk = max(chunk, len(stream) // 2000)  # small chunks through 16 MiB would take minutes
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    blocks = BLOCKS if direction is Direction.RETURN else None

    decoded = decode_all(direction, stream, lambda: rng.randint(1, chunk), blocks=blocks)
    assert decoded == [*prefix, message]
    zero_copy = decode_zero_copy(direction, stream, blocks=blocks)
    assert zero_copy == [*prefix, message]
    last = decoded[-1]
    if isinstance(message, RamRun):
        assert isinstance(last, RamRun)
        assert np.array_equal(last.zero, message.zero)
        assert last.zero.dtype == np.bool_
        assert bytes(last.data) == bytes(message.data)


def test_round_trip_at_the_size_limits() -> None:
    largest_state = DeviceState(bytes(range(256)) * (MAX_PAYLOAD // 256))
    package = Package((DeviceState(b"\x01" * (MAX_PAYLOAD - 16)), Run()))
    huge_run = RamRun(2, 24, np.zeros(8, dtype=bool), b"\xab" * (16 * MiB))
    small_run = RamRun(0, 262144 - 512, np.arange(512) % 3 == 0, b"\xcd" * (341 * 4 * KiB))
    bitmap = RecvBitmap(0, np.arange(BLOCKS[0].pages) % 5 == 0)
    main = (HANDSHAKE, largest_state, huge_run, small_run, ADVISE, Listen(), package)
    assert decode_all(Direction.MAIN, frames(Direction.MAIN, main), lambda: 1 << 20) == list(main)
    assert decode_all(Direction.RETURN, frames(Direction.RETURN, [bitmap]), blocks=BLOCKS) == [
        bitmap
    ]


def test_one_gib_page_runs_carry_a_single_page() -> None:
    assert max_run_pages(1 * GiB) == 1
    assert max_run_pages(2 * MiB) == 8
    assert max_run_pages(4 * KiB) == MAX_RUN_PAGES
    giant = [BlockInfo("giant", 2 * GiB, 1 * GiB)]
    encoder = Encoder(Direction.MAIN, blocks=giant)
    handshake = encoder.encode(Handshake(frozenset(), tuple(giant), 1, 4096))
    header = encoder.ram_run_header(0, 1, np.array([False]), 1 * GiB)
    context = StreamContext(Direction.MAIN, blocks=giant)
    context.parse_payload(parse_frame_header(handshake[:8]), handshake[8:])
    run = context.parse_payload(parse_frame_header(header[:8]), header[8:])
    assert isinstance(run, RamRunHeader)
    assert run.data_length == 1 * GiB
    with pytest.raises(ProtocolError, match=r"RamRun.page_count=2 out of range \[1, 1\]"):
        encoder.ram_run_header(0, 0, np.array([False, False]), 1 * GiB)
    two_pages = struct.pack(">HQI", 0, 0, 2) + b"\x00"
    with pytest.raises(ProtocolError, match=r"RamRun.page_count=2 exceeds 1 pages per run"):
        context.parse_payload(parse_frame_header(raw_frame(0x03, two_pages)[:8]), two_pages)


# -- encoder -----------------------------------------------------------------------------------


def test_stream_header_layout() -> None:
    assert Encoder(Direction.MAIN).stream_header() == MAIN_MAGIC + b"\0\0\0\x01\0\0\0\0"
    assert Encoder(Direction.RETURN).stream_header() == RETURN_MAGIC + b"\0\0\0\x01\0\0\0\0"
    assert parse_stream_header(MAIN_MAGIC + b"\0\0\0\x01\0\0\0\0", Direction.MAIN) == 1


def test_ram_run_frame_layout_byte_by_byte() -> None:
    zero = np.array([True, False, False, True, True, True, True, True, False], dtype=bool)
    data = b"A" * 4096 + b"B" * 4096 + b"C" * 4096
    frame = Encoder(Direction.MAIN).encode(RamRun(1, 0x0102030405060708, zero, data))
    payload = b"\x00\x01" + bytes.fromhex("0102030405060708") + b"\x00\x00\x00\x09"
    # bit i of the bitmap is page i, least significant bit first
    payload += bytes([0b11111001, 0b00000000])
    assert frame == bytes([0x03, 0, 0, 0]) + struct.pack(">I", len(payload)) + payload + data


def test_ram_run_header_matches_encode() -> None:
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    zero = np.arange(512) % 4 == 0
    data = bytes(384 * 4096)
    frame = encoder.encode(RamRun(0, 1024, zero, data))
    header = encoder.ram_run_header(0, 1024, zero, 4096)
    assert frame == header + data
    assert len(header) == 8 + 14 + 64


def test_ram_run_header_refuses_what_decoding_would() -> None:
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    with pytest.raises(ProtocolError, match=r"RamRun.page_size=4096 differs"):
        encoder.ram_run_header(2, 0, np.ones(1, dtype=bool), 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.block=3 out of range"):
        encoder.ram_run_header(3, 0, np.ones(1, dtype=bool), 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.page_count=2 pages from page 262143"):
        encoder.ram_run_header(0, 262143, np.ones(2, dtype=bool), 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.page_count=513 out of range"):
        encoder.ram_run_header(0, 0, np.ones(513, dtype=bool), 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.zero"):
        encoder.ram_run_header(0, 0, np.ones(4, dtype=np.uint8), 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.page_size=5000"):
        Encoder(Direction.MAIN).ram_run_header(0, 0, np.ones(1, dtype=bool), 5000)


@given(st.integers(0, 262143), st.booleans())
def test_ram_page_header_is_ram_run_header_of_one_page(page: int, zero: bool) -> None:
    """A requested page's header (no numpy) is byte for byte a one-page run's."""
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    assert encoder.ram_page_header(0, page, zero, 4096) == encoder.ram_run_header(
        0, page, np.array([zero]), 4096
    )


def test_ram_page_header_refuses_what_decoding_would() -> None:
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    with pytest.raises(ProtocolError, match=r"RamRun.page_size=4096 differs"):
        encoder.ram_page_header(2, 0, True, 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.block=3 out of range"):
        encoder.ram_page_header(3, 0, True, 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.first_page=262144 out of range"):
        encoder.ram_page_header(0, 262144, True, 4096)
    with pytest.raises(ProtocolError, match=r"RamRun.page_size=5000"):
        Encoder(Direction.MAIN).ram_page_header(0, 0, True, 5000)


def test_encoder_checks_messages_against_its_blocks() -> None:
    encoder = Encoder(Direction.MAIN)
    encoder.encode(HANDSHAKE)  # the encoder learns the blocks from its own Handshake
    with pytest.raises(ProtocolError, match=r"RamRun.data=8192 bytes; 1 normal pages"):
        encoder.encode(RamRun(0, 0, np.array([False]), bytes(8192)))
    with pytest.raises(ProtocolError, match=r"Discard.block=7 out of range: 3 blocks"):
        encoder.encode(Discard(7, ((0, 1),)))
    with pytest.raises(ProtocolError, match=r"Advise.page_size_summary=4096 differs"):
        encoder.encode(Advise(4096, 4096))
    with pytest.raises(ProtocolError, match=r"belongs to the return stream"):
        encoder.encode(Pong(1))
    with pytest.raises(ProtocolError, match=r"belongs to the main stream"):
        Encoder(Direction.RETURN).encode(Listen())
    with pytest.raises(ProtocolError, match="is not a wire message"):
        encoder.encode("hello")  # type: ignore[arg-type]


# -- ReqPages block elision --------------------------------------------------------------------


def test_req_pages_names_its_block_only_when_it_changes() -> None:
    encoder = Encoder(Direction.RETURN)
    requests = [
        ReqPages(0, 1, 1),
        ReqPages(0, 9, 2),
        ReqPages(2, 0, 1),
        ReqPages(2, 5, 3),
        ReqPages(0, 7, 1),
    ]
    header = encoder.stream_header()
    encoded = [encoder.encode(r) for r in requests]
    assert [f[1] & FLAG_BLOCK_NAMED for f in encoded] == [1, 0, 1, 0, 1]
    assert [len(f) for f in encoded] == [8 + 14, 8 + 12, 8 + 14, 8 + 12, 8 + 14]
    stream = header + b"".join(encoded)
    assert decode_all(Direction.RETURN, stream, lambda: 5, blocks=BLOCKS) == requests
    assert decode_zero_copy(Direction.RETURN, stream, blocks=BLOCKS) == requests
    # A new stream (reconnect) starts afresh: its first ReqPages names the block again.
    encoder.stream_header()
    assert encoder.encode(ReqPages(0, 1, 1))[1] == FLAG_BLOCK_NAMED


def test_req_pages_without_a_named_block_first_is_refused() -> None:
    stream = RETURN_MAGIC + b"\0\0\0\x01\0\0\0\0" + raw_frame(0x81, struct.pack(">QI", 0, 1))
    error = expect_error(Direction.RETURN, stream, r"ReqPages.block omitted", blocks=BLOCKS)
    assert error.field == "ReqPages.block"


def test_req_pages_block_memory_is_per_connection() -> None:
    decoder = Decoder(Direction.RETURN, blocks=BLOCKS)
    decoder.receive_data(frames(Direction.RETURN, [ReqPages(1, 0, 1)]))
    assert decoder.next_event() == ReqPages(1, 0, 1)
    decoder.new_connection()
    decoder.receive_data(RETURN_MAGIC + b"\0\0\0\x01\0\0\0\0" + raw_frame(0x81, bytes(12)))
    with pytest.raises(ProtocolError, match=r"ReqPages.block omitted"):
        decoder.next_event()


# -- stream header errors ----------------------------------------------------------------------


def test_wrong_magic() -> None:
    error = expect_error(Direction.MAIN, b"QEVM\0\0\0\x03" + bytes(8), r"StreamHeader.magic")
    assert error.value == b"QEVM\0\0\0\x03"
    expect_error(Direction.MAIN, frames(Direction.RETURN, []), r"the return stream's magic")
    expect_error(Direction.RETURN, frames(Direction.MAIN, []), r"the main stream's magic")


def test_wrong_version() -> None:
    error = expect_error(
        Direction.MAIN, MAIN_MAGIC + b"\0\0\0\x02\0\0\0\0", r"StreamHeader.version=2"
    )
    assert error.value == 2


def test_stream_header_reserved_must_be_zero() -> None:
    expect_error(Direction.MAIN, MAIN_MAGIC + b"\0\0\0\x01\0\0\0\x01", r"StreamHeader.reserved=1")


def test_truncated_stream_header_and_empty_stream() -> None:
    expect_error(Direction.MAIN, MAIN_MAGIC[:5], r"truncated stream header")
    assert decode_all(Direction.MAIN, b"") == []


# -- frame header errors -----------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", [0x00, 0x10, 0x42, 0x80, 0x86, 0xFF])
def test_unknown_frame_type(frame_type: int) -> None:
    error = expect_error(
        Direction.MAIN, main_stream(raw_frame(frame_type, b"")), "FrameHeader.type"
    )
    assert "is not a known frame type" in str(error)


def test_frame_of_the_other_direction() -> None:
    expect_error(Direction.MAIN, main_stream(raw_frame(0x83, bytes(4))), r"is a return frame")
    expect_error(
        Direction.RETURN,
        frames(Direction.RETURN, []) + raw_frame(0x0F, bytes(4)),
        r"is a main frame",
    )
    expect_error(
        Direction.RETURN, frames(Direction.RETURN, []) + raw_frame(0x08, b""), r"is a main frame"
    )


def test_frame_reserved_and_flags() -> None:
    expect_error(Direction.MAIN, main_stream(raw_frame(0x08, b"", reserved=1)), r"reserved=1")
    expect_error(Direction.MAIN, main_stream(raw_frame(0x08, b"", flags=1)), r"flags=1 has bits")
    expect_error(
        Direction.RETURN,
        frames(Direction.RETURN, []) + raw_frame(0x81, bytes(14), flags=3),
        r"flags=3",
        blocks=BLOCKS,
    )


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = Decoder(Direction.MAIN)
    decoder.receive_data(main_stream())
    assert isinstance(decoder.next_event(), Handshake)
    decoder.receive_data(struct.pack(">BBHI", 0x05, 0, 0, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match=r"FrameHeader.length=1048577 exceeds MAX_PAYLOAD"):
        decoder.next_event()
    assert decoder.buffered == 8  # it refused without waiting for the megabyte


@pytest.mark.parametrize(
    ("frame_type", "length"),
    [(0x03, 79), (0x03, 14), (0x02, 15), (0x08, 1), (0x07, 4 + 16 * 13), (0x0D, 3), (0x01, 5)],
)
def test_length_outside_the_types_bounds(frame_type: int, length: int) -> None:
    expect_error(
        Direction.MAIN, main_stream(raw_frame(frame_type, bytes(length))), r"FrameHeader.length"
    )


def test_parse_frame_header_needs_exactly_eight_bytes() -> None:
    with pytest.raises(ProtocolError, match=r"FrameHeader.size=7"):
        parse_frame_header(bytes(7))
    assert parse_frame_header(raw_frame(0x03, bytes(15))[:8]) == FrameHeader(
        FrameType.RAM_RUN, 0, 15
    )


# -- truncation --------------------------------------------------------------------------------


def test_truncated_frames() -> None:
    run = RamRun(0, 0, np.array([False, True, False]), bytes(8192))
    stream = frames(Direction.MAIN, [HANDSHAKE, run])
    run_start = len(frames(Direction.MAIN, [HANDSHAKE]))
    for cut in (run_start + 3, run_start + 10, run_start + 8 + 15, len(stream) - 1):
        error = expect_error(Direction.MAIN, stream[:cut], r"^truncated frame")
        assert error.field == "frame"
    with pytest.raises(ProtocolError, match="RAM_RUN page data"):
        decode_all(Direction.MAIN, stream[:-1])


def test_errors_are_sticky_and_eof_is_final() -> None:
    decoder = Decoder(Direction.MAIN)
    decoder.receive_data(b"X" * 16)
    with pytest.raises(ProtocolError) as first:
        decoder.next_event()
    with pytest.raises(ProtocolError) as second:
        decoder.next_event()
    assert first.value is second.value
    closed = Decoder(Direction.MAIN)
    closed.receive_data(main_stream())
    closed.receive_data(b"")
    assert isinstance(closed.next_event(), Handshake)
    assert closed.next_event() is CLOSED
    assert closed.next_event() is CLOSED
    with pytest.raises(RuntimeError):
        closed.receive_data(b"more")


# -- payload errors: blocks and pages ----------------------------------------------------------


def ram_run_payload(block: int, first: int, count: int, bitmap: bytes | None = None) -> bytes:
    return struct.pack(">HQI", block, first, count) + (bitmap or bytes((count + 7) // 8))


def test_ram_run_block_out_of_range() -> None:
    error = expect_error(
        Direction.MAIN, main_stream(raw_frame(0x03, ram_run_payload(3, 0, 1))), r"RamRun.block=3"
    )
    assert (error.field, error.value) == ("RamRun.block", 3)


def test_ram_run_pages_out_of_range() -> None:
    error = expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, ram_run_payload(0, 262144, 1))),
        r"^RamRun.first_page=262144 out of range for block 'pc.ram' \(262144 pages\)$",
    )
    assert (error.field, error.value) == ("RamRun.first_page", 262144)
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, ram_run_payload(0, 262100, 100))),
        r"RamRun.page_count=100 pages from page 262100 run past the end of block 'pc.ram'",
    )
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, ram_run_payload(0, 2**64 - 1, 1))),
        r"RamRun.first_page=18446744073709551615 out of range",
    )
    # 9 pages of 2 MiB would be 18 MiB of data behind one header
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, ram_run_payload(2, 0, 9))),
        r"RamRun.page_count=9 exceeds 8 pages per run for block 'huge'",
    )
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, ram_run_payload(0, 0, 0, b"\0"))),
        r"page_count=0",
    )


def test_ram_run_bitmap_must_match_count_and_have_zero_padding() -> None:
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, struct.pack(">HQI", 0, 0, 9) + b"\x00")),
        r"RamRun.payload=15 bytes; 9 pages need 16",
    )
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x03, ram_run_payload(0, 0, 3, b"\x08"))),
        r"RamRun.zero=8 last byte has padding bits set",
    )


def test_misaligned_sizes_are_unrepresentable_or_refused() -> None:
    # Offsets are page numbers in the block's own page size: a misaligned offset cannot
    # be expressed. What can be misaligned is a size, and every one is refused.
    with pytest.raises(ProtocolError, match=r"BlockInfo.length=5000 is not a multiple"):
        BlockInfo("ram", 5000, 4096)
    with pytest.raises(ProtocolError, match=r"BlockInfo.page_size=12288 is not a power of two"):
        BlockInfo("ram", 12288 * 4, 12288)
    with pytest.raises(ProtocolError, match=r"RamRun.data=6000 bytes is not 2 normal pages"):
        RamRun(0, 0, np.array([False, False]), bytes(6000))
    bad_block = struct.pack(">B", 3) + b"ram" + struct.pack(">QI", 4096 * 3 + 1, 4096)
    handshake = struct.pack(">IIB", 1, 4096, 0) + b"\x01" + bad_block
    expect_error(
        Direction.MAIN,
        frames(Direction.MAIN, []) + raw_frame(0x01, handshake),
        r"BlockInfo.length=12289 is not a multiple",
    )


def test_discard_ranges_must_lie_inside_the_block() -> None:
    prefix = TO_ADVISE

    def discard(block: int, *ranges: tuple[int, int]) -> bytes:
        body = struct.pack(">HH", block, len(ranges))
        return raw_frame(0x07, body + b"".join(struct.pack(">QQ", *r) for r in ranges))

    expect_error(
        Direction.MAIN,
        main_stream(discard(1, (0, 1), (255, 2)), prefix=prefix),
        r"Discard.page_count=2 pages from page 255 run past the end of block 'vga.vram'",
    )
    expect_error(
        Direction.MAIN, main_stream(discard(1, (256, 1)), prefix=prefix), r"Discard.first_page=256"
    )
    expect_error(Direction.MAIN, main_stream(discard(5, (0, 1)), prefix=prefix), r"Discard.block=5")
    expect_error(
        Direction.MAIN, main_stream(discard(0, (0, 0)), prefix=prefix), r"Discard.ranges.count=0"
    )
    too_many = struct.pack(">HH", 0, 13) + bytes(16 * 12)
    expect_error(
        Direction.MAIN, main_stream(raw_frame(0x07, too_many), prefix=prefix), r"Discard.ranges=13"
    )


def test_return_path_blocks_and_pages() -> None:
    header = frames(Direction.RETURN, [])
    expect_error(
        Direction.RETURN,
        header + raw_frame(0x81, struct.pack(">HQI", 1, 250, 7), flags=1),
        r"ReqPages.page_count=7 pages from page 250 run past the end of block 'vga.vram'",
        blocks=BLOCKS,
    )
    expect_error(
        Direction.RETURN,
        header + raw_frame(0x81, struct.pack(">HQI", 9, 0, 1), flags=1),
        r"ReqPages.block=9 out of range",
        blocks=BLOCKS,
    )
    expect_error(
        Direction.RETURN,
        header + raw_frame(0x81, struct.pack(">HQI", 0, 0, 1), flags=1),
        r"no blocks are declared",
    )
    expect_error(
        Direction.RETURN,
        header + raw_frame(0x84, struct.pack(">HQ", 1, 255) + bytes(32)),
        r"RecvBitmap.bitmap.length=255 entries; block 'vga.vram' has 256 pages",
        blocks=BLOCKS,
    )
    expect_error(
        Direction.RETURN, header + raw_frame(0x82, b"\x02"), r"Shut.error=2", blocks=BLOCKS
    )
    expect_error(
        Direction.RETURN, header + raw_frame(0x82, b"\x01\xff"), r"Shut.reason", blocks=BLOCKS
    )


def test_recv_bitmap_request_block_out_of_range() -> None:
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x0D, b"\x00\x03"), prefix=TO_RUNNING),
        r"RecvBitmapRequest.block=3 out of range",
    )


# -- payload errors: handshake, advise, package ------------------------------------------------


def test_handshake_config_mismatch_names_both_configurations() -> None:
    mine = [BlockInfo("pc.ram", 512 * MiB, 4096)]
    error = expect_error(Direction.MAIN, main_stream(), r"Handshake.blocks", blocks=mine)
    text = str(error)
    assert "pc.ram:1073741824@4096" in text  # the peer's
    assert "[pc.ram:536870912@4096]" in text  # ours
    assert decode_all(Direction.MAIN, main_stream(), blocks=BLOCKS) == [HANDSHAKE]


def test_handshake_declares_backends_and_a_mismatch_says_so_in_one_line() -> None:
    huge = [BlockInfo("pc.ram", GiB, 2 * MiB, "memfd-hugetlb")]
    message = Handshake(frozenset(), tuple(huge), 1)
    data = frames(Direction.MAIN, [message])
    assert decode_all(Direction.MAIN, data, blocks=huge) == [message]
    assert data.endswith(b"\x0dmemfd-hugetlb")  # the optional tail, one name per block
    assert huge[0].describe() == "pc.ram:1073741824@2097152/memfd-hugetlb"
    for mine, phrase in (
        ([BlockInfo("pc.ram", GiB, 4096, "ram")], "ram with 4 KiB pages here"),
        ([BlockInfo("pc.ram", GiB, 2 * MiB, "file")], "file with 2 MiB pages here"),
    ):
        error = expect_error(Direction.MAIN, data, r"RAM backend mismatch", blocks=mine)
        assert str(error) == (
            "RAM backend mismatch: block 'pc.ram' is memfd-hugetlb with 2 MiB pages on the "
            f"peer but {phrase} (start both sides with the same --memory-backend)"
        )
    with pytest.raises(ProtocolError, match=r"BlockInfo\.backend='Big' is not a backend name"):
        BlockInfo("pc.ram", GiB, 4096, "Big")


def test_handshake_payload_errors() -> None:
    def handshake(caps: Sequence[bytes], blocks: bytes, count: int = 1, tail: bytes = b"") -> bytes:
        body = struct.pack(">IIB", 2, 4096, len(caps))
        body += b"".join(struct.pack(">B", len(c)) + c for c in caps)
        return raw_frame(0x01, body + struct.pack(">B", count) + blocks + tail)

    good = b"\x03ram" + struct.pack(">QI", 1 << 20, 4096)
    header = frames(Direction.MAIN, [])
    decoded = decode_all(Direction.MAIN, header + handshake([b"xbzrle"], good))[0]
    assert isinstance(decoded, Handshake)
    assert decoded.blocks[0].name == "ram"
    cases = [
        (handshake([b"xbzrle", b"xbzrle"], good), r"contains duplicates"),
        (handshake([b"caf\xc3\xa9"], good), r"is not ASCII"),
        (handshake([b"no spaces"], good), r"is not a capability name"),
        (handshake([], good, tail=b"\x00"), r"BlockInfo.backend.length=0 bytes is out of range"),
        (handshake([], good, tail=b"\x03ram\x00"), r"Handshake.payload=\d+ bytes has 1 trailing"),
        (handshake([], good, tail=b"\x05mem"), r"ends inside a backend name"),
        (handshake([], good, tail=b"\x03RAM"), r"BlockInfo.backend='RAM' is not a backend name"),
        (handshake([], good, count=2), r"Handshake.payload=\d+ bytes ends inside a block name"),
        (handshake([b"xbzrle", b"postcopy-ram"], b"", count=0), r"Handshake.blocks=0 must be"),
        (
            handshake([], b"\x03r\xffm" + good[4:]),
            r"BlockInfo.name=72 ff 6d \(hex\) is not valid UTF-8",
        ),
        (handshake([], good + good, count=2), r"Handshake.blocks='ram' is declared twice"),
        (handshake([b"xbzrle"], b"\x00" + good[4:]), r"BlockInfo.name.length=0"),
    ]
    for frame, match in cases:
        expect_error(Direction.MAIN, header + frame, match)
    vcpus = raw_frame(0x01, struct.pack(">IIBB", 0, 4096, 0, 1) + good)
    expect_error(Direction.MAIN, header + vcpus, r"Handshake.vcpus=0 out of range \[1, 1024\]")


def test_handshake_names_the_guest_behind_a_flag() -> None:
    header = frames(Direction.MAIN, [])
    named = Handshake(frozenset(), BLOCKS, 1, guest="memtouch(passes=0)")
    encoded = Encoder(Direction.MAIN).encode(named)
    assert encoded[1] == FLAG_GUEST_NAMED
    assert encoded.endswith(b"\x12memtouch(passes=0)")
    assert decode_all(Direction.MAIN, header + encoded) == [named]
    # without a guest the frame is what it always was: no flag, no trailing byte
    anonymous = Encoder(Direction.MAIN).encode(Handshake(frozenset(), BLOCKS, 1))
    assert anonymous[1] == 0 and encoded[8:].startswith(anonymous[8:])
    body = anonymous[8:]

    def flagged(tail: bytes) -> bytes:
        payload = body + tail
        return bytes([0x01, FLAG_GUEST_NAMED, 0, 0]) + struct.pack(">I", len(payload)) + payload

    expect_error(Direction.MAIN, header + flagged(b""), r"ends inside the guest name length")
    expect_error(Direction.MAIN, header + flagged(b"\x00"), r"Handshake.guest.length=0")
    expect_error(Direction.MAIN, header + flagged(b"\x02\xff\xfe"), r"Handshake.guest=.*UTF-8")
    expect_error(Direction.MAIN, header + flagged(b"\x02a\n"), r"Handshake.guest='a\\n' is not")
    expect_error(Direction.MAIN, header + flagged(b"\x05ab"), r"ends inside the guest name")
    with pytest.raises(ProtocolError, match="longer than 255 bytes"):
        Handshake(frozenset(), BLOCKS, 1, guest="x" * 256)


def test_advise_must_match_the_handshake() -> None:
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x02, struct.pack(">QQ", 4096, 4096))),
        r"Advise.page_size_summary=4096 differs from the declared blocks' page sizes",
    )
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x02, struct.pack(">QQ", ADVISE.page_size_summary, 8192))),
        r"Advise.target_page_size=8192 differs from the Handshake's 4096",
    )
    expect_error(
        Direction.MAIN,
        main_stream(raw_frame(0x02, struct.pack(">QQ", 4097, 4096))),
        r"Advise.page_size_summary=4097 has bits outside",
    )


def test_package_contents_are_checked() -> None:
    inner_run = raw_frame(0x09, b"")
    inner_state = raw_frame(0x05, b"cpu")
    cases = [
        (inner_run + inner_state, r"Package.messages=\['Run', 'DeviceState'\] must end with Run"),
        (raw_frame(0x03, ram_run_payload(0, 0, 1, b"\x01")) + inner_run, r"RAM_RUN"),
        (raw_frame(0x0A, inner_run), r"PACKAGE"),
        (inner_state[:-1], r"Package.payload=10 bytes ends inside an inner DEVICE_STATE"),
        (inner_run + inner_state[:5], r"ends inside an inner frame header"),
        (raw_frame(0x05, b"", flags=1) + inner_run, r"FrameHeader.flags=1"),
    ]
    for payload, match in cases:
        expect_error(
            Direction.MAIN, main_stream(raw_frame(0x0A, payload), prefix=TO_LISTENING), match
        )
    with pytest.raises(ProtocolError, match=r"Package.messages=1048592 bytes exceeds"):
        Package((DeviceState(bytes(MAX_PAYLOAD)), Run()))
    with pytest.raises(ProtocolError, match=r"Package.messages='Listen' is not allowed"):
        Package((Listen(), Run()))


# -- the incoming state at decode time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "message", "state"),
    [
        (TO_NONE, Discard(0, ((0, 1),)), "NONE"),
        (TO_NONE, Listen(), "NONE"),
        (TO_ADVISE, Run(), "ADVISE"),
        (TO_ADVISE, ADVISE, "ADVISE"),
        ((*TO_ADVISE, Discard(0, ((0, 1),))), RamRun(0, 0, np.ones(1, dtype=bool), b""), "DISCARD"),
        (TO_LISTENING, DeviceState(b"x"), "LISTENING"),
        (TO_RUNNING, Run(), "RUNNING"),
        (TO_RUNNING, EndOfRound(3), "RUNNING"),
        ((*TO_RUNNING, PostcopyComplete()), RamRun(0, 0, np.ones(1, dtype=bool), b""), "END"),
        ((HANDSHAKE, PrecopyComplete()), DeviceState(b""), "END"),
        (TO_NONE, HANDSHAKE, "NONE"),
    ],
)
def test_illegal_command_for_state(
    prefix: tuple[Message, ...], message: Message, state: str
) -> None:
    stream = frames(Direction.MAIN, prefix) + Encoder(Direction.MAIN, blocks=BLOCKS).encode(message)
    name = type(message).__name__
    error = expect_error(
        Direction.MAIN, stream, rf"^{name} is illegal for role incoming in state {state}"
    )
    assert (error.field, error.value) == ("event", name)


def test_stream_must_begin_with_a_handshake() -> None:
    stream = frames(Direction.MAIN, []) + Encoder(Direction.MAIN).encode(Advise(4096, 4096))
    expect_error(Direction.MAIN, stream, r"Advise is illegal .* must begin with a Handshake")
    expect_error(
        Direction.MAIN,
        frames(Direction.MAIN, []) + raw_frame(0x03, ram_run_payload(0, 0, 1)),
        r"RamRun refers to a block, but no blocks are declared",
    )


def test_decoder_exposes_the_state_machine() -> None:
    decoder = Decoder(Direction.MAIN)
    seen = []
    decoder.receive_data(frames(Direction.MAIN, [*TO_RUNNING, PostcopyComplete()]))
    while decoder.next_event() is not NEED_DATA:
        seen.append(decoder.state.state)
    assert seen == [
        IncomingState.NONE,
        IncomingState.ADVISE,
        IncomingState.LISTENING,
        IncomingState.RUNNING,
        IncomingState.END,
    ]
    with pytest.raises(AttributeError):
        Decoder(Direction.RETURN).state  # noqa: B018


def test_recovery_continues_on_a_new_connection() -> None:
    decoder = Decoder(Direction.MAIN, blocks=BLOCKS)
    decoder.receive_data(frames(Direction.MAIN, TO_RUNNING) + b"\x03\x00")  # cut mid-frame
    while decoder.next_event() is not NEED_DATA:
        pass
    decoder.new_connection()
    resumed: list[Message] = [
        ResumeRequest(bytes(range(16)), 1),
        RecvBitmapRequest(0),
        PostcopyResume(),
        PostcopyComplete(),
    ]
    decoder.receive_data(frames(Direction.MAIN, resumed))
    assert [decoder.next_event() for _ in resumed] == resumed
    assert decoder.state.state is IncomingState.END


def test_resume_request_layout_and_a_resumed_stream_context() -> None:
    """RESUME_REQUEST: the 16-byte migration id, then the epoch; a recovery connection's
    context starts in RUNNING without a Handshake, even if the old stream had ended."""
    request = ResumeRequest(bytes(range(16)), 0x01020304)
    frame = Encoder(Direction.MAIN, blocks=BLOCKS).encode(request)
    assert frame == bytes([0x0C, 0, 0, 0, 0, 0, 0, 20]) + bytes(range(16)) + b"\x01\x02\x03\x04"
    context = StreamContext(Direction.MAIN, blocks=BLOCKS, resumed=True)
    assert context.state.state is IncomingState.RUNNING
    assert context.parse_payload(parse_frame_header(frame[:8]), frame[8:]) == request
    for message in (RecvBitmapRequest(0), PostcopyResume()):
        encoded = Encoder(Direction.MAIN, blocks=BLOCKS).encode(message)
        context.parse_payload(parse_frame_header(encoded[:8]), encoded[8:])
    with pytest.raises(ProtocolError, match="Handshake is illegal"):
        handshake = Encoder(Direction.MAIN).encode(Handshake(frozenset(), BLOCKS, 1))
        context.parse_payload(parse_frame_header(handshake[:8]), handshake[8:])


@pytest.mark.parametrize(
    ("migration_id", "epoch", "field"),
    [
        (bytes(15), 1, "ResumeRequest.migration_id"),
        ("x" * 16, 1, "ResumeRequest.migration_id"),
        (bytes(16), 0, "ResumeRequest.epoch"),
        (bytes(16), 2**32, "ResumeRequest.epoch"),
    ],
)
def test_resume_request_fields_are_checked(migration_id: object, epoch: int, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        ResumeRequest(migration_id, epoch)  # type: ignore[arg-type]
    assert caught.value.field == field


# -- the error type ----------------------------------------------------------------------------


def test_protocol_error_names_field_and_value_and_pickles() -> None:
    error = ProtocolError(
        "RamRun.first_page", 4096, "out of range for block 'pc.ram' (262144 pages)"
    )
    assert str(error) == "RamRun.first_page=4096 out of range for block 'pc.ram' (262144 pages)"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.field, copy.value, str(copy)) == (
        ProtocolError,
        error.field,
        error.value,
        str(error),
    )
    long = ProtocolError("DeviceState.data", b"x" * 10_000, "is odd")
    assert len(str(long)) < 200


def test_message_constructors_normalise_and_refuse() -> None:
    run = RamRun(np.int64(1), np.uint32(7), np.ones(2, dtype=bool), b"")  # type: ignore[arg-type]
    assert type(run.block) is int and type(run.first_page) is int
    assert Discard(0, [[1, 2]]).ranges == ((1, 2),)  # type: ignore[arg-type]
    assert Handshake({"xbzrle"}, [BLOCKS[0]], 1).capabilities == frozenset({"xbzrle"})  # type: ignore[arg-type]
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: BlockInfo("", 4096, 4096), r"BlockInfo.name=''"),
        (lambda: BlockInfo("x" * 256, 4096, 4096), r"must be 1 to 255 bytes"),
        (lambda: BlockInfo("ram", 0, 4096), r"BlockInfo.length=0"),
        (lambda: BlockInfo("ram", 2 * GiB, 2 * GiB), r"BlockInfo.page_size=2147483648"),
        (lambda: Handshake(frozenset(), (), 1), r"Handshake.blocks=0"),
        (lambda: Handshake(frozenset(), BLOCKS, 1025), r"Handshake.vcpus=1025"),
        (lambda: Handshake(frozenset(), BLOCKS, 1, 8192), r"Handshake.target_page_size=8192"),
        (lambda: Handshake(frozenset({"a b"}), BLOCKS, 1), r"Handshake.capabilities='a b'"),
        (lambda: RamRun(64, 0, np.ones(1, dtype=bool), b""), r"RamRun.block=64"),
        (lambda: RamRun(0, -1, np.ones(1, dtype=bool), b""), r"RamRun.first_page=-1"),
        (lambda: RamRun(0, 0, np.ones(0, dtype=bool), b""), r"RamRun.zero.length=0"),
        (lambda: RamRun(0, 0, np.ones(1, dtype=bool), b"x"), r"every page is marked zero"),
        (lambda: RamRun(0, 0, [True], b""), r"is not a numpy array"),  # type: ignore[arg-type]
        (lambda: RamRun(True, 0, np.ones(1, dtype=bool), b""), r"is a bool"),
        (
            lambda: RamRun(0, 0, np.zeros(2, dtype=bool), memoryview(bytes(16384))[::2]),
            "contiguous",
        ),
        (lambda: DeviceState(bytes(MAX_PAYLOAD + 1)), r"DeviceState.data=1048577"),
        (lambda: Discard(0, ()), r"Discard.ranges=0"),
        (lambda: Discard(0, ((1,),)), r"is not a \(start, count\) pair"),  # type: ignore[arg-type]
        (lambda: ReqPages(0, 0, 0), r"ReqPages.page_count=0"),
        (lambda: Shut(1, ""), r"Shut.error=1 is not a bool"),  # type: ignore[arg-type]
        (lambda: Shut(True, "x" * 1025), r"Shut.reason=1025"),
        (lambda: Ping(2**32), r"Ping.value=4294967296"),
        (lambda: RecvBitmap(0, np.ones((2, 2), dtype=bool)), r"one-dimensional bool"),
        (lambda: Advise(0, 4096), r"Advise.page_size_summary=0"),
    ]
    for build, match in cases:
        with pytest.raises(ProtocolError, match=match):
            build()


def test_ram_run_equality_compares_contents() -> None:
    zero = np.array([False, True])
    a = RamRun(0, 1, zero, b"\x01" * 4096)
    assert a == RamRun(0, 1, zero.copy(), memoryview(bytearray(b"\x01" * 4096)))
    assert a != RamRun(0, 1, zero, b"\x02" * 4096)
    assert a != RamRun(0, 1, ~zero, b"\x01" * 4096)
    assert a != RamRun(0, 2, zero, b"\x01" * 4096)


@given(st.lists(st.tuples(st.integers(0, 250), st.integers(1, 6)), max_size=60))
def test_discard_frames_are_the_frames_of_each_group(ranges: list[tuple[int, int]]) -> None:
    # the bulk path (numpy, all frames at once) writes what encode() writes per Discard
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    starts = np.array([start for start, _ in ranges], dtype=np.int64)
    lengths = np.array([count for _, count in ranges], dtype=np.int64)
    expected = b"".join(
        encoder.encode(Discard(1, tuple(ranges[i : i + MAX_DISCARD_RANGES])))
        for i in range(0, len(ranges), MAX_DISCARD_RANGES)
    )
    assert encoder.discard_frames(1, starts, lengths) == expected
    # and the reader gives back the same ranges (from_wire: without per-pair checks)
    decoded: list[tuple[int, int]] = []
    for event in decode_all(Direction.MAIN, main_stream(expected, prefix=TO_ADVISE))[2:]:
        assert isinstance(event, Discard) and event.block == 1
        assert event == Discard(1, event.ranges)
        decoded += event.ranges
    assert decoded == ranges


def test_discard_frames_check_every_range() -> None:
    # block 1 (vga.vram) has 256 pages; the bad range is the 20th, in the second frame
    encoder = Encoder(Direction.MAIN, blocks=BLOCKS)
    starts = np.arange(20, dtype=np.int64) * 12
    ones = np.ones(20, dtype=np.int64)
    past_end = starts.copy()
    past_end[19] = 255
    with pytest.raises(ProtocolError, match=r"Discard.page_count=2 pages from page 255 run past"):
        encoder.discard_frames(1, past_end, ones * 2)
    with pytest.raises(ProtocolError, match=r"Discard.ranges.count=0"):
        encoder.discard_frames(1, starts, np.where(starts == 36, 0, ones))
    with pytest.raises(ProtocolError, match=r"Discard.block=3"):
        encoder.discard_frames(3, starts, ones)
    with pytest.raises(ProtocolError, match=r"main stream"):
        Encoder(Direction.RETURN, blocks=BLOCKS).discard_frames(1, starts, ones)
    assert encoder.discard_frames(1, starts[:0], ones[:0]) == b""


def test_req_pages_is_checked_against_the_blocks() -> None:
    """A page request is encoded by a path of its own (the latency-critical one): it
    refuses what decoding would, and a refused one leaves the block elision as it was."""
    encoder = Encoder(Direction.RETURN, blocks=BLOCKS)
    assert encoder.encode(ReqPages(1, 0, 1))[1] == FLAG_BLOCK_NAMED
    with pytest.raises(ProtocolError, match=r"ReqPages.block=3 out of range"):
        encoder.encode(ReqPages(3, 0, 1))
    with pytest.raises(ProtocolError, match=r"ReqPages.page_count=2 pages from page 262143"):
        encoder.encode(ReqPages(0, 262143, 2))
    assert encoder.encode(ReqPages(1, 5, 1))[1] == 0  # still block 1's
    with pytest.raises(ProtocolError, match=r"belongs to the return stream"):
        Encoder(Direction.MAIN, blocks=BLOCKS).encode(ReqPages(0, 0, 1))
