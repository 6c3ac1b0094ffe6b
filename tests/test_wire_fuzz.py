"""Fuzzing the receive paths: random and mutated streams may only raise ProtocolError, and
nothing they make the decoder yield may reach outside the declared RAM blocks.

Each input is fed to a `Decoder` in random chunks and, separately, through the zero-copy
functions (`parse_frame_header` + `StreamContext.parse_payload`) as the I/O layer uses them;
both must agree. Every decoded RamRun, Discard and return-path request is applied to a
numpy model of guest RAM with explicit bounds assertions (numpy slicing would silently clip).

Iterations default to 100k (about 30 s here); FUZZ_ITERATIONS and FUZZ_SEED override, e.g.
``FUZZ_ITERATIONS=5000000 FUZZ_SEED=$RANDOM pytest tests/test_wire_fuzz.py`` for a long run.
"""

from __future__ import annotations

import collections
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from postcopy.wire import (
    CLOSED,
    MAX_PAYLOAD,
    NEED_DATA,
    Advise,
    BlockInfo,
    Decoder,
    DeviceState,
    Direction,
    Discard,
    Encoder,
    EndOfRound,
    Handshake,
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
    max_frame_size,
    max_run_pages,
    parse_frame_header,
    parse_stream_header,
)

ITERATIONS = int(os.environ.get("FUZZ_ITERATIONS", "100000"))
SEED = int(os.environ.get("FUZZ_SEED", "4"))
KiB, MiB = 1 << 10, 1 << 20

BLOCKS = (
    BlockInfo("pc.ram", 1 * MiB, 4 * KiB),  # 256 pages
    BlockInfo("rom", 512 * KiB, 64 * KiB),  # 8 pages
    BlockInfo("huge", 4 * MiB, 2 * MiB),  # 2 pages
)
HANDSHAKE = Handshake(frozenset({"postcopy-ram", "xbzrle"}), BLOCKS, vcpus=2)
ADVISE = Advise(4 * KiB | 64 * KiB | 2 * MiB, 4 * KiB)


# -- valid streams, kept as frames so mutations can aim at frame boundaries --------------------


def random_run(rng: random.Random) -> RamRun:
    block = rng.choices((0, 1, 2), weights=(70, 20, 10))[0]
    info = BLOCKS[block]
    limit = min(max_run_pages(info.page_size), info.pages)
    # mostly short runs with few data pages: big streams would make each input slow
    count = rng.randint(
        1, min(limit, rng.choice((1, 2, 4, 8, 32)) if rng.random() < 0.98 else limit)
    )
    first = rng.randint(0, info.pages - count)
    # few data pages (the data is copied several times per input), but never none
    zero_share = 0.99 if block == 2 or count > 32 else 0.9 if block == 1 else rng.random()
    zero = np.array([rng.random() < zero_share for _ in range(count)], dtype=bool)
    data = rng.randbytes(int(np.count_nonzero(~zero)) * info.page_size)
    return RamRun(block, first, zero, data)


def random_discard(rng: random.Random) -> Discard:
    block = rng.randrange(len(BLOCKS))
    pages = BLOCKS[block].pages
    ranges = []
    for _ in range(rng.randint(1, 12)):
        start = rng.randrange(pages)
        ranges.append((start, rng.randint(1, pages - start)))
    return Discard(block, tuple(ranges))


def valid_main(rng: random.Random) -> list[Message]:
    """A legal main stream, kept short (about 8 frames): a mutation anywhere in it is
    reached, and the campaign's time goes into inputs rather than into long tails."""

    def maybe(share: float, *messages: Message) -> list[Message]:
        return list(messages) if rng.random() < share else []

    def runs() -> list[Message]:
        return [random_run(rng) for _ in range(rng.choice((0, 1, 1, 2)))]

    messages: list[Message] = [HANDSHAKE]
    if rng.random() < 0.3:
        messages += [*runs(), *maybe(0.5, EndOfRound(1)), DeviceState(rng.randbytes(40))]
        return [*messages, *maybe(0.3, Ping(rng.getrandbits(32))), PrecopyComplete()]
    messages += [ADVISE, *runs(), *maybe(0.5, EndOfRound(rng.getrandbits(32)))]
    messages += [random_discard(rng) for _ in range(rng.choice((0, 1, 1, 2)))]
    messages += [Listen(), *runs()]
    state = DeviceState(rng.randbytes(rng.randint(0, 100)))
    messages.append(Package((state, Run())) if rng.random() < 0.8 else Run())
    messages += runs()
    messages += maybe(
        0.2,
        ResumeRequest(rng.randbytes(16), rng.randint(1, 2**32 - 1)),
        RecvBitmapRequest(rng.randrange(3)),
        PostcopyResume(),
    )
    return [*messages, *maybe(0.3, Ping(7)), PostcopyComplete()]


def valid_return(rng: random.Random) -> list[Message]:
    messages: list[Message] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.6:
            block = rng.choice((0, 0, 0, 1, 2))
            pages = BLOCKS[block].pages
            first = rng.randrange(pages)
            messages.append(ReqPages(block, first, rng.randint(1, pages - first)))
        elif kind < 0.7:
            messages.append(Pong(rng.getrandbits(32)))
        elif kind < 0.8:
            block = rng.randrange(3)
            bits = np.frombuffer(rng.randbytes(BLOCKS[block].pages), np.uint8) & 1
            messages.append(RecvBitmap(block, bits.astype(bool)))
        elif kind < 0.9:
            messages.append(ResumeAck(rng.getrandbits(32)))
        else:
            messages.append(Shut(rng.random() < 0.5, "reason" * rng.randint(0, 5)))
    return messages


def encode_frames(direction: Direction, messages: list[Message]) -> list[bytes]:
    encoder = Encoder(direction, blocks=BLOCKS)
    return [encoder.stream_header(), *(encoder.encode(m) for m in messages)]


# -- mutations ---------------------------------------------------------------------------------

INTERESTING = (
    0,
    1,
    2,
    7,
    8,
    12,
    13,
    255,
    256,
    511,
    512,
    513,
    0xFFFF,
    0x10000,
    262144,
    MAX_PAYLOAD,
    MAX_PAYLOAD + 1,
    0x7FFFFFFF,
    0xFFFFFFFF,
    2**63,
    2**64 - 1,
)


def pick_frame(frames: list[bytes], rng: random.Random) -> int:
    return rng.randrange(1, len(frames)) if len(frames) > 1 else 0


def flip_bits(frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]) -> list[bytes]:
    index = pick_frame(frames, rng)
    frame = bytearray(frames[index])
    if not frame:
        return frames
    for _ in range(rng.randint(1, 6)):
        # headers and the first payload bytes are where the structure lives
        limit = len(frame) if rng.random() < 0.3 else min(len(frame), 40)
        position = rng.randrange(limit)
        frame[position] ^= 1 << rng.randrange(8)
    return [*frames[:index], bytes(frame), *frames[index + 1 :]]


def truncate(frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]) -> list[bytes]:
    data = b"".join(frames)
    return [data[: rng.randrange(len(data) + 1)]]


def splice(frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]) -> list[bytes]:
    other = rng.choice(corpus)
    if rng.random() < 0.5:  # at frame boundaries: well-formed frames in a wrong order
        return frames[: rng.randint(1, len(frames))] + other[rng.randint(1, len(other)) :]
    a, b = b"".join(frames), b"".join(other)
    return [a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1) :]]


def change_length(
    frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]
) -> list[bytes]:
    index = pick_frame(frames, rng)
    frame = bytearray(frames[index])
    if len(frame) < 8:
        return frames
    (length,) = struct.unpack_from(">I", frame, 4)
    choice = rng.random()
    if choice < 0.5:
        length = min(max(0, length + rng.randint(-16, 16)), 0xFFFFFFFF)  # u32 on the wire
    elif choice < 0.8:
        length = rng.choice(INTERESTING) & 0xFFFFFFFF
    else:
        length = rng.getrandbits(32)
    struct.pack_into(">I", frame, 4, length)
    return [*frames[:index], bytes(frame), *frames[index + 1 :]]


def set_field(frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]) -> list[bytes]:
    index = pick_frame(frames, rng)
    frame = bytearray(frames[index])
    width = rng.choice((1, 2, 4, 8))
    if len(frame) < width:
        return frames
    offset = rng.randrange(min(len(frame), 48) - width + 1)
    value = rng.choice(INTERESTING) % (1 << (8 * width))
    frame[offset : offset + width] = value.to_bytes(width, "big")
    return [*frames[:index], bytes(frame), *frames[index + 1 :]]


def change_type(frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]) -> list[bytes]:
    index = pick_frame(frames, rng)
    frame = bytearray(frames[index])
    if len(frame) < 2:
        return frames
    frame[0] = rng.choice((*range(0x00, 0x11), *range(0x80, 0x87), rng.randrange(256)))
    if rng.random() < 0.3:
        frame[1] = rng.randrange(256)
    return [*frames[:index], bytes(frame), *frames[index + 1 :]]


def reorder(frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]) -> list[bytes]:
    body = frames[1:]
    if not body:
        return frames
    choice = rng.random()
    if choice < 0.3:
        body.insert(rng.randrange(len(body) + 1), rng.choice(body))  # duplicate
    elif choice < 0.6:
        del body[rng.randrange(len(body))]  # drop
    else:
        i, j = rng.randrange(len(body)), rng.randrange(len(body))
        body[i], body[j] = body[j], body[i]
    return [frames[0], *body]


def insert_delete(
    frames: list[bytes], rng: random.Random, corpus: list[list[bytes]]
) -> list[bytes]:
    data = bytearray(b"".join(frames))
    position = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        data[position:position] = rng.randbytes(rng.randint(1, 16))
    else:
        del data[position : position + rng.randint(1, 16)]
    return [bytes(data)]


Mutation = Callable[[list[bytes], random.Random, list[list[bytes]]], list[bytes]]
MUTATIONS: dict[str, Mutation] = {
    "flip_bits": flip_bits,
    "truncate": truncate,
    "splice": splice,
    "change_length": change_length,
    "set_field": set_field,
    "change_type": change_type,
    "reorder": reorder,
    "insert_delete": insert_delete,
}


def random_input(direction: Direction, rng: random.Random) -> bytes:
    """Garbage, or a valid stream header followed by garbage or by random frames."""
    choice = rng.random()
    if choice < 0.3:
        return rng.randbytes(rng.randint(0, 64))
    header = Encoder(direction).stream_header()
    if choice < 0.6:
        return header + rng.randbytes(rng.randint(0, 256))
    frames = []
    types = (*range(0x00, 0x11), *range(0x80, 0x87))
    for _ in range(rng.randint(1, 6)):
        payload = rng.randbytes(rng.choice((0, 1, 2, 4, 12, 14, 15, 16, 20, 30, 78)))
        flags = 0 if rng.random() < 0.8 else rng.randrange(256)
        frames.append(struct.pack(">BBHI", rng.choice(types), flags, 0, len(payload)) + payload)
    return header + b"".join(frames)


# -- the model of guest RAM --------------------------------------------------------------------


class GuestMemory:
    """Page arrays of the configured blocks; every write asserts its bounds first.

    Blocks that only a mutated Handshake declares are checked arithmetically (allocating
    and faulting in a fresh array for each would dominate the campaign's time).
    """

    def __init__(self) -> None:
        self.arrays = {
            info: np.zeros((info.pages, info.page_size), dtype=np.uint8) for info in BLOCKS
        }

    def pages_of(self, info: BlockInfo) -> npt.NDArray[np.uint8] | None:
        return self.arrays.get(info)

    def apply(self, message: Message, blocks: tuple[BlockInfo, ...] | None) -> None:
        if isinstance(message, RamRun):
            assert blocks is not None
            assert 0 <= message.block < len(blocks)
            info = blocks[message.block]
            first, count = message.first_page, message.page_count
            assert first >= 0 and first + count <= info.pages
            assert count <= max_run_pages(info.page_size)
            normal = count - int(np.count_nonzero(message.zero))
            assert message.data_length == normal * info.page_size
            pages = self.pages_of(info)
            if pages is not None:
                target = pages[first : first + count]
                assert target.shape[0] == count
                data = np.frombuffer(message.data, np.uint8).reshape(normal, info.page_size)
                target[~message.zero] = data
                target[message.zero] = 0
        elif isinstance(message, Discard):
            assert blocks is not None and 0 <= message.block < len(blocks)
            info = blocks[message.block]
            pages = self.pages_of(info)
            for start, count in message.ranges:
                assert count >= 1 and start >= 0 and start + count <= info.pages
                if pages is not None:
                    target = pages[start : start + count]
                    assert target.shape[0] == count
                    target[:] = 0
        elif isinstance(message, ReqPages):
            assert blocks is not None and 0 <= message.block < len(blocks)
            info = blocks[message.block]
            assert message.first_page >= 0 and message.first_page + message.page_count <= info.pages
        elif isinstance(message, RecvBitmap):
            assert blocks is not None and 0 <= message.block < len(blocks)
            assert message.bitmap.shape == (blocks[message.block].pages,)
        elif isinstance(message, RecvBitmapRequest):
            assert blocks is not None and 0 <= message.block < len(blocks)


# -- the two receive paths ---------------------------------------------------------------------


class Outcome:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.error: ProtocolError | None = None


def through_decoder(
    direction: Direction,
    data: bytes,
    blocks: tuple[BlockInfo, ...] | None,
    rng: random.Random,
    memory: GuestMemory,
) -> Outcome:
    outcome = Outcome()
    decoder = Decoder(direction, blocks=blocks)
    largest = max_frame_size(max(b.page_size for b in BLOCKS)) if blocks else None
    # a dozen chunks or so: byte by byte through megabytes would take seconds
    chunk_limit = max(rng.choice((1, 7, 64, 4096, 1 << 30)), len(data) // 12)
    offset = 0
    try:
        while True:
            size = rng.randint(1, chunk_limit)
            chunk = data[offset : offset + size]
            offset += len(chunk)
            decoder.receive_data(chunk)
            while True:
                event = decoder.next_event()
                if event is NEED_DATA:
                    # it consumes frame by frame: never more than one frame plus a chunk
                    assert largest is None or decoder.buffered <= largest + len(chunk)
                    break
                if event is CLOSED:
                    assert not chunk
                    return outcome
                outcome.messages.append(event)  # type: ignore[arg-type]
                memory.apply(event, decoder.blocks)  # type: ignore[arg-type]
    except ProtocolError as error:
        outcome.error = error
    return outcome


class EndOfInput(Exception):
    pass


def through_zero_copy(
    direction: Direction, data: bytes, blocks: tuple[BlockInfo, ...] | None
) -> Outcome:
    outcome = Outcome()
    view = memoryview(data)

    def take(offset: int, size: int) -> memoryview:
        if offset + size > len(view):
            raise EndOfInput
        return view[offset : offset + size]

    try:
        if not data:
            return outcome
        parse_stream_header(take(0, 16), direction)
        context = StreamContext(direction, blocks=blocks)
        offset = 16
        while offset < len(view):
            header = parse_frame_header(take(offset, 8), direction)
            payload = take(offset + 8, header.length)
            offset += 8 + header.length
            result = context.parse_payload(header, payload)
            if isinstance(result, RamRunHeader):
                result = result.with_data(bytes(take(offset, result.data_length)))
                offset += result.data_length
            outcome.messages.append(result)
    except ProtocolError as error:
        outcome.error = error
    except EndOfInput:
        outcome.error = ProtocolError("frame", len(data), "truncated")
    return outcome


# -- the campaign ------------------------------------------------------------------------------


@dataclass
class Statistics:
    inputs: int = 0
    with_messages: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    clean: int = 0
    by_mutation: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class Case:
    direction: Direction
    data: bytes
    how: str
    blocks: tuple[BlockInfo, ...] | None
    chunk_seed: int


def make_case(rng: random.Random, corpora: dict[Direction, list[list[bytes]]]) -> Case:
    direction = Direction.MAIN if rng.random() < 0.8 else Direction.RETURN
    corpus = corpora[direction]
    if rng.random() < 0.1:
        data, how = random_input(direction, rng), "random"
    else:
        frames = rng.choice(corpus)
        names = rng.sample(sorted(MUTATIONS), rng.choice((1, 1, 1, 2, 3)))
        for name in names:
            frames = MUTATIONS[name](frames, rng, corpus)
        data, how = b"".join(frames), "+".join(names)
    # Main stream: half with the destination's own configuration, half learning it from
    # the (possibly mutated) Handshake. The return path always knows its blocks.
    given = BLOCKS if direction is Direction.RETURN or rng.random() < 0.5 else None
    return Case(direction, data, how, given, rng.getrandbits(32))


def check_case(case: Case, memory: GuestMemory, stats: Statistics) -> None:
    chunks = random.Random(case.chunk_seed)
    decoded = through_decoder(case.direction, case.data, case.blocks, chunks, memory)
    zero_copy = through_zero_copy(case.direction, case.data, case.blocks)
    assert decoded.messages == zero_copy.messages, "the two receive paths disagree"
    assert (decoded.error is None) == (zero_copy.error is None), (decoded.error, zero_copy.error)
    stats.inputs += 1
    stats.by_mutation[case.how] += 1
    stats.with_messages += bool(decoded.messages)
    if decoded.error is None:
        stats.clean += 1
    else:
        stats.errors[decoded.error.field] += 1


@pytest.mark.timeout(900 + ITERATIONS // 100)  # long campaigns get time in proportion
def test_fuzz_decoder_only_raises_protocol_error_and_stays_in_bounds(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    corpora = {
        Direction.MAIN: [encode_frames(Direction.MAIN, valid_main(rng)) for _ in range(300)],
        Direction.RETURN: [encode_frames(Direction.RETURN, valid_return(rng)) for _ in range(100)],
    }
    # The unmutated corpus decodes cleanly through both paths (the oracle works).
    memory = GuestMemory()
    for direction, corpus in corpora.items():
        for frames in corpus[:20]:
            data = b"".join(frames)
            given = BLOCKS if direction is Direction.RETURN else None
            outcome = through_decoder(direction, data, given, rng, memory)
            assert outcome.error is None and len(outcome.messages) == len(frames) - 1

    stats = Statistics()
    started, cpu_started = time.perf_counter(), time.process_time()
    for index in range(ITERATIONS):
        case = make_case(rng, corpora)
        try:
            check_case(case, memory, stats)
        except Exception as failure:
            crash = tmp_path / f"crash-{SEED}-{index}.bin"
            crash.write_bytes(case.data)
            raise AssertionError(
                f"seed {SEED} input {index} ({case.direction.value}, {case.how}, blocks "
                f"{'given' if case.blocks else 'from the Handshake'}, chunk seed "
                f"{case.chunk_seed}) escaped with {type(failure).__name__}: {failure}; "
                f"input saved to {crash}: {case.data[:200].hex()}"
            ) from failure
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(
        f"\nfuzz: {stats.inputs} inputs in {elapsed:.1f} s ({cpu:.1f} s CPU, seed {SEED}); "
        f"{stats.with_messages} yielded messages, {stats.clean} decoded cleanly; "
        f"errors by field: {stats.errors.most_common(12)}"
    )
    if ITERATIONS >= 20_000:
        # The mutators reach past the framing into every layer of checks.
        assert stats.with_messages > ITERATIONS // 2
        expected = {
            "StreamHeader.magic", "StreamHeader.version", "FrameHeader.type", "FrameHeader.length",
            "FrameHeader.flags", "FrameHeader.reserved", "frame", "event", "Handshake.blocks",
            "RamRun.block", "RamRun.first_page", "RamRun.page_count", "RamRun.zero",
            "Discard.first_page", "Discard.page_count", "ReqPages.page_count",
            "ReqPages.block", "Package.messages",
        }  # fmt: skip
        assert expected <= set(stats.errors), expected - set(stats.errors)
