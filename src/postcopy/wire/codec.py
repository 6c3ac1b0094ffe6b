"""The migration stream's framing: messages to bytes and bytes to messages, with no I/O.

Three ways in and out, all pure (model: h11):

- `Encoder`: ``stream_header()``, ``encode(message)`` for whole frames, and
  ``ram_run_header(...)`` for zero-copy sending (the caller sends the page data itself
  straight from guest RAM).
- Zero-copy receiving: `parse_stream_header`, `parse_frame_header` and
  `StreamContext.parse_payload`, which the I/O layer calls on bytes it read itself. For a
  RAM_RUN it returns a `RamRunHeader` saying how many data bytes follow, so the caller can
  ``recv_into`` its own staging buffer. Every bound is checked before that.
- `Decoder`: a buffering façade (``receive_data`` / ``next_event``) over the same functions,
  for tests, the return path and anything not on the page hot path.

The byte layout is specified in docs/PROTOCOL.md; all multi-byte integers are big-endian.
"""

from __future__ import annotations

import collections
import enum
import functools
import struct
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from postcopy.wire.errors import ProtocolError
from postcopy.wire.messages import (
    FRAME_HEADER_SIZE,
    MAX_BLOCK_NAME_BYTES,
    MAX_BLOCKS,
    MAX_CAPABILITY_NAME_BYTES,
    MAX_DISCARD_RANGES,
    MAX_PAYLOAD,
    MAX_RECV_BITMAP_PAGES,
    MAX_RUN_PAGES,
    MAX_SHUT_REASON_BYTES,
    RAM_RUN_FIXED_PAYLOAD,
    RECV_BITMAP_FIXED_PAYLOAD,
    U64_MAX,
    Advise,
    BlockInfo,
    DeviceState,
    Discard,
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
    RamRun,
    RamRunHeader,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    ResumeAck,
    ResumeRequest,
    Run,
    Shut,
    is_page_size,
    max_run_pages,
)
from postcopy.wire.state import IncomingStateMachine

__all__ = [
    "FLAG_BLOCK_NAMED",
    "MAIN_MAGIC",
    "MAX_PAYLOAD",
    "MAX_RUN_PAGES",
    "PROTOCOL_VERSION",
    "RETURN_MAGIC",
    "STREAM_HEADER_SIZE",
    "Closed",
    "Decoder",
    "Direction",
    "Encoder",
    "FrameHeader",
    "FrameType",
    "NeedData",
    "RamRunHeader",
    "StreamContext",
    "max_frame_size",
    "parse_frame_header",
    "parse_stream_header",
]

MAIN_MAGIC: Final = b"PCPYMIG\0"
RETURN_MAGIC: Final = b"PCPYRET\0"
PROTOCOL_VERSION: Final = 1
STREAM_HEADER_SIZE: Final = 16
FLAG_BLOCK_NAMED: Final = 0x01
"""ReqPages flag: the payload names the block (it differs from the previous ReqPages')."""


class Direction(enum.Enum):
    """Which stream: MAIN (source -> destination) or RETURN (destination -> source)."""

    MAIN = "main"
    RETURN = "return"


_MAGIC: Final = {Direction.MAIN: MAIN_MAGIC, Direction.RETURN: RETURN_MAGIC}


class FrameType(enum.IntEnum):
    """The u8 type of a frame. Main stream 0x01-0x0F, return path 0x81-0x85."""

    HANDSHAKE = 0x01
    ADVISE = 0x02
    RAM_RUN = 0x03
    END_OF_ROUND = 0x04
    DEVICE_STATE = 0x05
    PRECOPY_COMPLETE = 0x06
    DISCARD = 0x07
    LISTEN = 0x08
    RUN = 0x09
    PACKAGE = 0x0A
    POSTCOPY_COMPLETE = 0x0B
    RESUME_REQUEST = 0x0C
    RECV_BITMAP_REQUEST = 0x0D
    POSTCOPY_RESUME = 0x0E
    PING = 0x0F
    REQ_PAGES = 0x81
    SHUT = 0x82
    PONG = 0x83
    RECV_BITMAP = 0x84
    RESUME_ACK = 0x85


class FrameHeader(NamedTuple):
    """A checked frame header: type, flags and payload length (page data not included)."""

    type: FrameType
    flags: int
    length: int


class NeedData:
    """Decoder event: the buffer holds no complete frame; call receive_data."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """Decoder event: the peer ended the stream cleanly, between frames."""

    _instance: Closed | None = None

    def __new__(cls) -> Closed:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CLOSED"


NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()

# -- binary layouts ----------------------------------------------------------------------------

_STREAM_HEADER = struct.Struct(">8sII")
_FRAME_HEADER = struct.Struct(">BBHI")
_RAM_RUN = struct.Struct(">HQI")
_ADVISE = struct.Struct(">QQ")
_DISCARD_HEAD = struct.Struct(">HH")
_DISCARD_RANGE = struct.Struct(">QQ")
_REQ_PAGES_NAMED = struct.Struct(">HQI")
_REQ_PAGES = struct.Struct(">QI")
_RECV_BITMAP = struct.Struct(">HQ")
_HANDSHAKE_HEAD = struct.Struct(">II")
_BLOCK_TAIL = struct.Struct(">QI")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

assert _RAM_RUN.size == RAM_RUN_FIXED_PAYLOAD
assert _RECV_BITMAP.size == RECV_BITMAP_FIXED_PAYLOAD
assert _FRAME_HEADER.size == FRAME_HEADER_SIZE
assert _STREAM_HEADER.size == STREAM_HEADER_SIZE

_MIN_BLOCK_ENTRY = 1 + 1 + _BLOCK_TAIL.size  # name length, one name byte, length, page size


class _FrameSpec(NamedTuple):
    frame_type: FrameType
    message: type
    direction: Direction
    min_length: int
    max_length: int
    allowed_flags: int


def _spec(
    frame_type: FrameType,
    message: type,
    direction: Direction,
    min_length: int,
    max_length: int,
    allowed_flags: int = 0,
) -> _FrameSpec:
    return _FrameSpec(frame_type, message, direction, min_length, max_length, allowed_flags)


_M, _R = Direction.MAIN, Direction.RETURN
_SPECS: Final[dict[int, _FrameSpec]] = {
    spec.frame_type: spec
    for spec in (
        _spec(
            FrameType.HANDSHAKE,
            Handshake,
            _M,
            _HANDSHAKE_HEAD.size + 2 + _MIN_BLOCK_ENTRY,
            MAX_PAYLOAD,
        ),
        _spec(FrameType.ADVISE, Advise, _M, _ADVISE.size, _ADVISE.size),
        _spec(
            FrameType.RAM_RUN,
            RamRun,
            _M,
            _RAM_RUN.size + 1,
            _RAM_RUN.size + (MAX_RUN_PAGES + 7) // 8,
        ),
        _spec(FrameType.END_OF_ROUND, EndOfRound, _M, 4, 4),
        _spec(FrameType.DEVICE_STATE, DeviceState, _M, 0, MAX_PAYLOAD),
        _spec(FrameType.PRECOPY_COMPLETE, PrecopyComplete, _M, 0, 0),
        _spec(
            FrameType.DISCARD,
            Discard,
            _M,
            _DISCARD_HEAD.size + _DISCARD_RANGE.size,
            _DISCARD_HEAD.size + MAX_DISCARD_RANGES * _DISCARD_RANGE.size,
        ),
        _spec(FrameType.LISTEN, Listen, _M, 0, 0),
        _spec(FrameType.RUN, Run, _M, 0, 0),
        _spec(FrameType.PACKAGE, Package, _M, FRAME_HEADER_SIZE, MAX_PAYLOAD),
        _spec(FrameType.POSTCOPY_COMPLETE, PostcopyComplete, _M, 0, 0),
        _spec(FrameType.RESUME_REQUEST, ResumeRequest, _M, 0, 0),
        _spec(FrameType.RECV_BITMAP_REQUEST, RecvBitmapRequest, _M, 2, 2),
        _spec(FrameType.POSTCOPY_RESUME, PostcopyResume, _M, 0, 0),
        # QEMU's MIG_CMD_PING: the source learns the destination got this far (the answer,
        # Pong, comes back on the return path).
        _spec(FrameType.PING, Ping, _M, 4, 4),
        _spec(
            FrameType.REQ_PAGES,
            ReqPages,
            _R,
            _REQ_PAGES.size,
            _REQ_PAGES_NAMED.size,
            FLAG_BLOCK_NAMED,
        ),
        _spec(FrameType.SHUT, Shut, _R, 1, 1 + MAX_SHUT_REASON_BYTES),
        _spec(FrameType.PONG, Pong, _R, 4, 4),
        _spec(
            FrameType.RECV_BITMAP,
            RecvBitmap,
            _R,
            _RECV_BITMAP.size + 1,
            _RECV_BITMAP.size + (MAX_RECV_BITMAP_PAGES + 7) // 8,
        ),
        _spec(FrameType.RESUME_ACK, ResumeAck, _R, 4, 4),
    )
}
_SPEC_OF_MESSAGE: Final[dict[type, _FrameSpec]] = {spec.message: spec for spec in _SPECS.values()}
_PACKAGE_INNER: Final = frozenset({FrameType.DEVICE_STATE, FrameType.RUN})


def max_frame_size(page_size: int) -> int:
    """Most bytes one frame can take in a stream whose largest block page is page_size."""
    return FRAME_HEADER_SIZE + MAX_PAYLOAD + max_run_pages(page_size) * page_size


# -- stream and frame headers ------------------------------------------------------------------


def stream_header(direction: Direction) -> bytes:
    """The 16 bytes that open a stream in this direction."""
    return _STREAM_HEADER.pack(_MAGIC[direction], PROTOCOL_VERSION, 0)


def parse_stream_header(buf: bytes | bytearray | memoryview, direction: Direction) -> int:
    """Check the 16-byte stream header of a stream in this direction; return its version."""
    if len(buf) != STREAM_HEADER_SIZE:
        raise ProtocolError(
            "StreamHeader.length", len(buf), f"bytes; a stream header is {STREAM_HEADER_SIZE}"
        )
    magic, version, reserved = _STREAM_HEADER.unpack(buf)
    expected = _MAGIC[direction]
    if magic != expected:
        other = next(d for d in Direction if d is not direction)
        hint = (
            f"; that is the {other.value} stream's magic (wrong end of the connection?)"
            if magic == _MAGIC[other]
            else ""
        )
        raise ProtocolError(
            "StreamHeader.magic",
            magic,
            f"is not {expected!r} (the {direction.value} stream){hint}",
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "StreamHeader.version",
            version,
            f"is not supported (this side speaks {PROTOCOL_VERSION})",
        )
    if reserved != 0:
        raise ProtocolError("StreamHeader.reserved", reserved, "must be 0")
    return int(version)


def _type_name(value: int) -> str:
    spec = _SPECS.get(value)
    return f"{value:#04x} ({spec.frame_type.name})" if spec else f"{value:#04x}"


def _check_header(spec: _FrameSpec, flags: int, length: int, direction: Direction | None) -> None:
    if direction is not None and spec.direction is not direction:
        raise ProtocolError(
            "FrameHeader.type",
            _type_name(spec.frame_type),
            f"is a {spec.direction.value} frame, not allowed in the {direction.value} stream",
        )
    if flags & ~spec.allowed_flags:
        raise ProtocolError(
            "FrameHeader.flags",
            flags,
            f"has bits not defined for {spec.frame_type.name} (allowed {spec.allowed_flags:#04x})",
        )
    if length > MAX_PAYLOAD:
        raise ProtocolError("FrameHeader.length", length, f"exceeds MAX_PAYLOAD {MAX_PAYLOAD}")
    if not spec.min_length <= length <= spec.max_length:
        raise ProtocolError(
            "FrameHeader.length",
            length,
            f"out of range [{spec.min_length}, {spec.max_length}] for {spec.frame_type.name}",
        )


def parse_frame_header(
    buf8: bytes | bytearray | memoryview, direction: Direction | None = None
) -> FrameHeader:
    """Check an 8-byte frame header: known type (of this direction, if given), flags defined
    for the type, reserved zero, payload length within MAX_PAYLOAD and the type's bounds."""
    if len(buf8) != FRAME_HEADER_SIZE:
        raise ProtocolError(
            "FrameHeader.size", len(buf8), f"bytes; a frame header is {FRAME_HEADER_SIZE}"
        )
    frame_type, flags, reserved, length = _FRAME_HEADER.unpack(buf8)
    spec = _SPECS.get(frame_type)
    if spec is None:
        raise ProtocolError("FrameHeader.type", _type_name(frame_type), "is not a known frame type")
    if reserved != 0:
        raise ProtocolError("FrameHeader.reserved", reserved, "must be 0")
    _check_header(spec, flags, length, direction)
    return FrameHeader(spec.frame_type, flags, length)


# -- payload reading helpers -------------------------------------------------------------------


class _Reader:
    """Reads a payload front to back; running short or leaving bytes over is an error."""

    __slots__ = ("_buf", "_offset", "_owner")

    def __init__(self, owner: str, buf: bytes | memoryview) -> None:
        self._owner = owner
        self._buf = buf
        self._offset = 0

    def _take(self, size: int, what: str) -> int:
        start = self._offset
        if start + size > len(self._buf):
            raise ProtocolError(
                f"{self._owner}.payload",
                len(self._buf),
                f"bytes ends inside {what} (needs {start + size})",
            )
        self._offset = start + size
        return start

    def u8(self, what: str) -> int:
        return int(_U8.unpack_from(self._buf, self._take(1, what))[0])

    def u32(self, what: str) -> int:
        return int(_U32.unpack_from(self._buf, self._take(4, what))[0])

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        return layout.unpack_from(self._buf, self._take(layout.size, what))

    def raw(self, size: int, what: str) -> bytes:
        start = self._take(size, what)
        return bytes(self._buf[start : start + size])

    def end(self) -> None:
        if self._offset != len(self._buf):
            raise ProtocolError(
                f"{self._owner}.payload",
                len(self._buf),
                f"bytes has {len(self._buf) - self._offset} trailing bytes",
            )


def _pack_bits(bits: npt.NDArray[np.bool_]) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _unpack_bits(
    field: str, raw: bytes | memoryview, count: int
) -> tuple[npt.NDArray[np.bool_], int]:
    """The bitmap of count entries packed in raw, and how many entries are set."""
    if len(raw) != (count + 7) // 8:
        raise ProtocolError(field, len(raw), f"bytes of bitmap for {count} entries")
    # Little-endian bytes, least significant bit first: bit i of this int is entry i.
    bits = int.from_bytes(raw, "little")
    if bits >> count:
        # Padding must be zero so that every value has exactly one encoding.
        raise ProtocolError(field, raw[-1], f"last byte has padding bits set past {count} entries")
    packed = np.frombuffer(raw, dtype=np.uint8)
    return np.unpackbits(packed, count=count, bitorder="little").view(np.bool_), bits.bit_count()


def _utf8(field: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(field, raw, "is not valid UTF-8") from None


# -- checks against the declared blocks (shared by decoding and encoding) ----------------------


def _describe_blocks(blocks: Sequence[BlockInfo]) -> str:
    return "[" + ", ".join(block.describe() for block in blocks) + "]"


def _lookup_block(owner: str, blocks: tuple[BlockInfo, ...] | None, index: int) -> BlockInfo | None:
    """The declared block at index; None if blocks are unknown (encoder without config)."""
    if blocks is None:
        return None
    if index >= len(blocks):
        raise ProtocolError(
            f"{owner}.block", index, f"out of range: {len(blocks)} blocks are declared"
        )
    return blocks[index]


def _check_pages(owner: str, block: BlockInfo, first_page: int, count: int) -> None:
    pages = block.pages
    if first_page >= pages:
        raise ProtocolError(
            f"{owner}.first_page",
            first_page,
            f"out of range for block {block.name!r} ({pages} pages)",
        )
    if first_page + count > pages:
        raise ProtocolError(
            f"{owner}.page_count",
            count,
            f"pages from page {first_page} run past the end of block {block.name!r} "
            f"({pages} pages)",
        )


def _check_ram_run(
    blocks: tuple[BlockInfo, ...] | None, block_index: int, first_page: int, count: int
) -> BlockInfo | None:
    block = _lookup_block("RamRun", blocks, block_index)
    if block is None:
        return None
    limit = max_run_pages(block.page_size)
    if count > limit:
        raise ProtocolError(
            "RamRun.page_count",
            count,
            f"exceeds {limit} pages per run for block {block.name!r} (page size {block.page_size})",
        )
    _check_pages("RamRun", block, first_page, count)
    return block


def _check_context(
    message: object, blocks: tuple[BlockInfo, ...] | None, target_page_size: int | None
) -> None:
    """Checks a message against the declared configuration, if known (both directions).

    RAM_RUN on the receiving side is checked while its header is decoded.
    """
    if isinstance(message, RamRun):
        block = _check_ram_run(blocks, message.block, message.first_page, message.page_count)
        if block is not None:
            expected = message.normal_pages * block.page_size
            if message.data_length != expected:
                raise ProtocolError(
                    "RamRun.data",
                    message.data_length,
                    f"bytes; {message.normal_pages} normal pages of block {block.name!r} "
                    f"need {expected}",
                )
    elif isinstance(message, Discard):
        block = _lookup_block("Discard", blocks, message.block)
        if block is not None:
            for start, count in message.ranges:
                _check_pages("Discard", block, start, count)
    elif isinstance(message, ReqPages):
        block = _lookup_block("ReqPages", blocks, message.block)
        if block is not None:
            _check_pages("ReqPages", block, message.first_page, message.page_count)
    elif isinstance(message, RecvBitmapRequest):
        _lookup_block("RecvBitmapRequest", blocks, message.block)
    elif isinstance(message, RecvBitmap):
        block = _lookup_block("RecvBitmap", blocks, message.block)
        if block is not None and message.bitmap.shape[0] != block.pages:
            raise ProtocolError(
                "RecvBitmap.bitmap.length",
                message.bitmap.shape[0],
                f"entries; block {block.name!r} has {block.pages} pages",
            )
    elif isinstance(message, Advise):
        if blocks is not None:
            summary = 0
            for block in blocks:
                summary |= block.page_size
            if message.page_size_summary != summary:
                raise ProtocolError(
                    "Advise.page_size_summary",
                    message.page_size_summary,
                    f"differs from the declared blocks' page sizes (OR = {summary})",
                )
        if target_page_size is not None and message.target_page_size != target_page_size:
            raise ProtocolError(
                "Advise.target_page_size",
                message.target_page_size,
                f"differs from the Handshake's {target_page_size}",
            )
    elif isinstance(message, Handshake) and blocks is not None and message.blocks != blocks:
        raise ProtocolError(
            "Handshake.blocks",
            _describe_blocks(message.blocks),
            f"differ from this side's configuration {_describe_blocks(blocks)}",
            message=(
                "Handshake.blocks: the peer declares "
                f"{_describe_blocks(message.blocks)} but this side is configured with "
                f"{_describe_blocks(blocks)}"
            ),
        )


def _needs_blocks(message: object) -> str | None:
    """The message type's name if it refers to a block (so blocks must be declared)."""
    if isinstance(
        message, RamRun | RamRunHeader | Discard | ReqPages | RecvBitmapRequest | RecvBitmap
    ):
        return "RamRun" if isinstance(message, RamRunHeader) else type(message).__name__
    return None


# -- payload decoders (structure and context-free checks; the constructors check fields) -------

_Decode = Callable[["StreamContext", int, bytes | memoryview], object]


def _decode_handshake(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Handshake:
    reader = _Reader("Handshake", payload)
    vcpus, target_page_size = reader.unpack(_HANDSHAKE_HEAD, "vcpus and target_page_size")
    capabilities = []
    for _ in range(reader.u8("the capability count")):
        length = reader.u8("a capability name length")
        if not 1 <= length <= MAX_CAPABILITY_NAME_BYTES:
            raise ProtocolError("Handshake.capabilities.length", length, "bytes is out of range")
        raw = reader.raw(length, "a capability name")
        if not raw.isascii():
            raise ProtocolError("Handshake.capabilities", raw, "is not ASCII")
        capabilities.append(raw.decode("ascii"))
    if len(set(capabilities)) != len(capabilities):
        raise ProtocolError("Handshake.capabilities", capabilities, "contains duplicates")
    blocks = []
    for _ in range(reader.u8("the block count")):
        length = reader.u8("a block name length")
        if not 1 <= length <= MAX_BLOCK_NAME_BYTES:
            raise ProtocolError("BlockInfo.name.length", length, "bytes is out of range")
        name = _utf8("BlockInfo.name", reader.raw(length, "a block name"))
        block_length, page_size = reader.unpack(_BLOCK_TAIL, "a block's length and page size")
        blocks.append(BlockInfo(name, block_length, page_size))
    reader.end()
    return Handshake(frozenset(capabilities), tuple(blocks), vcpus, target_page_size)


def _decode_advise(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Advise:
    summary, target = _ADVISE.unpack(payload)
    return Advise(summary, target)


def _decode_ram_run(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> RamRunHeader:
    block_index, first_page, count = _RAM_RUN.unpack_from(payload)
    if not 1 <= count <= MAX_RUN_PAGES:
        raise ProtocolError("RamRun.page_count", count, f"out of range [1, {MAX_RUN_PAGES}]")
    if len(payload) != _RAM_RUN.size + (count + 7) // 8:
        raise ProtocolError(
            "RamRun.payload",
            len(payload),
            f"bytes; {count} pages need {_RAM_RUN.size + (count + 7) // 8}",
        )
    block = _check_ram_run(ctx.blocks, block_index, first_page, count)
    assert block is not None  # parse_payload made sure blocks are declared
    zero, zero_pages = _unpack_bits("RamRun.zero", payload[_RAM_RUN.size :], count)
    return RamRunHeader(block_index, first_page, zero, (count - zero_pages) * block.page_size)


def _decode_end_of_round(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> EndOfRound:
    return EndOfRound(_U32.unpack(payload)[0])


def _decode_device_state(
    ctx: StreamContext, flags: int, payload: bytes | memoryview
) -> DeviceState:
    return DeviceState(bytes(payload))


def _decode_discard(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Discard:
    block, count = _DISCARD_HEAD.unpack_from(payload)
    expected = _DISCARD_HEAD.size + count * _DISCARD_RANGE.size
    if not 1 <= count <= MAX_DISCARD_RANGES:
        raise ProtocolError("Discard.ranges", count, f"ranges; must be 1 to {MAX_DISCARD_RANGES}")
    if len(payload) != expected:
        raise ProtocolError(
            "Discard.payload", len(payload), f"bytes; {count} ranges need {expected}"
        )
    ranges = tuple(
        (int(start), int(length))
        for start, length in _DISCARD_RANGE.iter_unpack(payload[_DISCARD_HEAD.size :])
    )
    return Discard(block, ranges)


def _decode_empty(message: type) -> _Decode:
    def decode(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> object:
        return message()

    return decode


def _decode_package(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Package:
    view = memoryview(payload)
    messages: list[Message] = []
    offset = 0
    while offset < len(view):
        if offset + FRAME_HEADER_SIZE > len(view):
            raise ProtocolError(
                "Package.payload", len(view), f"bytes ends inside an inner frame header at {offset}"
            )
        header = parse_frame_header(view[offset : offset + FRAME_HEADER_SIZE], Direction.MAIN)
        if header.type not in _PACKAGE_INNER:
            raise ProtocolError(
                "Package.messages",
                header.type.name,
                "is not allowed inside a Package (only DEVICE_STATE and RUN)",
            )
        start = offset + FRAME_HEADER_SIZE
        end = start + header.length
        if end > len(view):
            raise ProtocolError(
                "Package.payload",
                len(view),
                f"bytes ends inside an inner {header.type.name} frame (needs {end})",
            )
        inner = _DECODERS[header.type](ctx, header.flags, view[start:end])
        messages.append(inner)  # type: ignore[arg-type]
        offset = end
    return Package(tuple(messages))


def _decode_recv_bitmap_request(
    ctx: StreamContext, flags: int, payload: bytes | memoryview
) -> RecvBitmapRequest:
    return RecvBitmapRequest(_U16.unpack(payload)[0])


def _decode_req_pages(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> ReqPages:
    if flags & FLAG_BLOCK_NAMED:
        if len(payload) != _REQ_PAGES_NAMED.size:
            raise ProtocolError(
                "ReqPages.payload",
                len(payload),
                f"bytes; with a block it is {_REQ_PAGES_NAMED.size}",
            )
        block, first_page, count = _REQ_PAGES_NAMED.unpack(payload)
        return ReqPages(block, first_page, count)
    if len(payload) != _REQ_PAGES.size:
        raise ProtocolError(
            "ReqPages.payload", len(payload), f"bytes; without a block it is {_REQ_PAGES.size}"
        )
    if ctx.last_req_block is None:
        raise ProtocolError(
            "ReqPages.block",
            None,
            message="ReqPages.block omitted before any ReqPages on this stream named a block",
        )
    first_page, count = _REQ_PAGES.unpack(payload)
    return ReqPages(ctx.last_req_block, first_page, count)


def _decode_shut(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Shut:
    error = payload[0]
    if error > 1:
        raise ProtocolError("Shut.error", error, "is not 0 or 1")
    return Shut(bool(error), _utf8("Shut.reason", bytes(payload[1:])))


def _decode_u32(message: type) -> _Decode:
    def decode(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> object:
        return message(_U32.unpack(payload)[0])

    return decode


def _decode_recv_bitmap(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> RecvBitmap:
    block, count = _RECV_BITMAP.unpack_from(payload)
    if not 1 <= count <= MAX_RECV_BITMAP_PAGES:
        raise ProtocolError(
            "RecvBitmap.page_count", count, f"out of range [1, {MAX_RECV_BITMAP_PAGES}]"
        )
    bitmap, _ = _unpack_bits("RecvBitmap.bitmap", payload[_RECV_BITMAP.size :], count)
    return RecvBitmap(block, bitmap)


_DECODERS: Final[dict[FrameType, _Decode]] = {
    FrameType.HANDSHAKE: _decode_handshake,
    FrameType.ADVISE: _decode_advise,
    FrameType.RAM_RUN: _decode_ram_run,
    FrameType.END_OF_ROUND: _decode_end_of_round,
    FrameType.DEVICE_STATE: _decode_device_state,
    FrameType.PRECOPY_COMPLETE: _decode_empty(PrecopyComplete),
    FrameType.DISCARD: _decode_discard,
    FrameType.LISTEN: _decode_empty(Listen),
    FrameType.RUN: _decode_empty(Run),
    FrameType.PACKAGE: _decode_package,
    FrameType.POSTCOPY_COMPLETE: _decode_empty(PostcopyComplete),
    FrameType.RESUME_REQUEST: _decode_empty(ResumeRequest),
    FrameType.RECV_BITMAP_REQUEST: _decode_recv_bitmap_request,
    FrameType.POSTCOPY_RESUME: _decode_empty(PostcopyResume),
    FrameType.REQ_PAGES: _decode_req_pages,
    FrameType.SHUT: _decode_shut,
    FrameType.PING: _decode_u32(Ping),
    FrameType.PONG: _decode_u32(Pong),
    FrameType.RECV_BITMAP: _decode_recv_bitmap,
    FrameType.RESUME_ACK: _decode_u32(ResumeAck),
}
assert set(_DECODERS) == set(FrameType)


# -- receiving ---------------------------------------------------------------------------------


def _own_blocks(blocks: Sequence[BlockInfo] | None) -> tuple[BlockInfo, ...] | None:
    """Validate a configuration given by the local side (same rules as a Handshake's)."""
    if blocks is None:
        return None
    try:
        return _validated_blocks(tuple(blocks))
    except TypeError:  # unhashable, so not BlockInfos: let the Handshake say what is wrong
        return Handshake(frozenset(), tuple(blocks), 1).blocks


@functools.lru_cache(maxsize=16)
def _validated_blocks(blocks: tuple[BlockInfo, ...]) -> tuple[BlockInfo, ...]:
    # A process opens many streams with the same configuration (one per connection).
    return Handshake(frozenset(), blocks, 1).blocks


class StreamContext:
    """What a receiver must remember between frames of one stream direction.

    The declared blocks (from the Handshake, or given by the receiver as its own
    configuration), the Handshake's target page size, the incoming state machine (main
    stream only) and the block of the last ReqPages (return path). The I/O layer calls
    `parse_payload` for every frame; `Decoder` is built on the same object.
    """

    def __init__(self, direction: Direction, *, blocks: Sequence[BlockInfo] | None = None) -> None:
        self.direction = direction
        self._blocks = _own_blocks(blocks)
        self._target_page_size: int | None = None
        self._state = IncomingStateMachine() if direction is Direction.MAIN else None
        self.last_req_block: int | None = None

    @property
    def blocks(self) -> tuple[BlockInfo, ...] | None:
        """The declared blocks, or None before the Handshake (when none were given)."""
        return self._blocks

    @property
    def target_page_size(self) -> int | None:
        return self._target_page_size

    @property
    def state(self) -> IncomingStateMachine:
        """The incoming state machine (main stream only)."""
        if self._state is None:
            raise AttributeError("the return path has no incoming state machine")
        return self._state

    def new_connection(self) -> None:
        """A new connection carries on this stream (recovery): forget the ReqPages block.

        Block elision never crosses a connection: the new stream's first ReqPages names
        its block. The blocks and the incoming state are kept.
        """
        self.last_req_block = None

    def parse_payload(
        self, header: FrameHeader, payload: bytes | memoryview
    ) -> Message | RamRunHeader:
        """Decode and check one frame's payload; advance the incoming state.

        For RAM_RUN the result is a `RamRunHeader`: ``data_length`` bytes of page data
        follow in the stream, already known to fit inside the declared block.
        """
        spec = _SPECS.get(header.type)
        if spec is None:
            raise ProtocolError(
                "FrameHeader.type", _type_name(header.type), "is not a known frame type"
            )
        _check_header(spec, header.flags, header.length, self.direction)
        if len(payload) != header.length:
            raise ProtocolError(
                f"{spec.message.__name__}.payload",
                len(payload),
                f"bytes, but the frame header says {header.length}",
            )
        if self._blocks is None and spec.message in _BLOCK_MESSAGES:
            raise ProtocolError(
                f"{spec.message.__name__}.block",
                None,
                message=f"{spec.message.__name__} refers to a block, but no blocks are declared "
                "(no Handshake yet and none configured)",
            )
        message = _DECODERS[spec.frame_type](self, header.flags, payload)
        if type(message) is not RamRunHeader:  # checked while decoding: the hot path
            _check_context(message, self._blocks, self._target_page_size)
        if self._state is not None:
            self._state.process(message)  # type: ignore[arg-type]
        if isinstance(message, Handshake):
            self._blocks = message.blocks
            self._target_page_size = message.target_page_size
        elif isinstance(message, ReqPages):
            self.last_req_block = message.block
        return message  # type: ignore[return-value]


_BLOCK_MESSAGES: Final = frozenset({RamRun, Discard, ReqPages, RecvBitmapRequest, RecvBitmap})


class _ByteQueue:
    """Received bytes as a queue of immutable chunks.

    Each chunk is copied once on arrival (the caller may reuse its buffer); taking bytes
    that lie inside one chunk is a memoryview of it (no copy), taking across chunks is one
    join. A bytearray with ``del buf[:n]`` would move the remainder on every downsize.
    """

    __slots__ = ("_chunks", "_head", "_size")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._head = 0  # bytes of the first chunk already taken
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        chunk: bytes | memoryview
        if isinstance(data, bytes) or (
            isinstance(data, memoryview)
            and data.readonly
            and isinstance(data.obj, bytes)
            and data.contiguous
            and data.itemsize == 1
        ):
            chunk = data  # immutable: keeping a reference is as good as a copy
        else:
            chunk = bytes(data)
        if len(chunk):
            self._chunks.append(chunk)
            self._size += len(chunk)

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self._size = 0

    def peek(self, size: int) -> bytes | memoryview:
        """The first size bytes (size <= len), without consuming them."""
        if size == 0:
            return b""
        first = self._chunks[0]
        if self._head + size <= len(first):
            return memoryview(first)[self._head : self._head + size]
        pieces: list[bytes | memoryview] = []
        need = size
        offset = self._head
        for chunk in self._chunks:
            piece = memoryview(chunk)[offset : offset + need]
            pieces.append(piece)
            need -= len(piece)
            offset = 0
            if not need:
                break
        return b"".join(pieces)

    def take(self, size: int) -> bytes | memoryview:
        """Consume and return the first size bytes (size <= len)."""
        data = self.peek(size)
        self._size -= size
        remaining = size
        while remaining:
            available = len(self._chunks[0]) - self._head
            if remaining < available:
                self._head += remaining
                break
            remaining -= available
            self._chunks.popleft()
            self._head = 0
        return data


class Decoder:
    """Sans-IO decoder of one stream direction: feed bytes, take messages (h11's shape).

    ``receive_data(b"")`` signals EOF. ``next_event()`` returns a message, `NEED_DATA` or,
    after a clean EOF between frames, `CLOSED`; a broken stream raises `ProtocolError`,
    and so does every later call. The buffer is consumed frame by frame, and a frame that
    declares more than its bound is refused from its header, before its bytes are awaited.
    For the main stream the Decoder drives the incoming state machine (`state`).

    A RamRun's data may be a memoryview of a chunk passed to receive_data (copied on
    arrival, so the caller may reuse its buffer): no further copy unless the run spans
    chunks.
    """

    def __init__(self, direction: Direction, *, blocks: Sequence[BlockInfo] | None = None) -> None:
        self.direction = direction
        self.context = StreamContext(direction, blocks=blocks)
        self.version: int | None = None
        self._buffer = _ByteQueue()
        self._eof = False
        self._header: FrameHeader | None = None
        self._run: RamRunHeader | None = None
        self._error: ProtocolError | None = None

    @property
    def state(self) -> IncomingStateMachine:
        """The incoming state machine this main-stream Decoder drives."""
        return self.context.state

    @property
    def blocks(self) -> tuple[BlockInfo, ...] | None:
        return self.context.blocks

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the peer; empty data means the peer closed the stream."""
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        if len(data) == 0:
            self._eof = True
        else:
            self._buffer.append(data)

    def new_connection(self) -> None:
        """Continue on a fresh connection (recovery): expect a new stream header.

        Unconsumed bytes of the old connection are dropped (a frame cut by the failure is
        lost; the source resends pages after recovery). Blocks and state are kept.
        """
        self._buffer.clear()
        self._eof = False
        self._header = None
        self._run = None
        self._error = None
        self.version = None
        self.context.new_connection()

    def next_event(self) -> Message | NeedData | Closed:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as error:
            self._error = error
            raise

    def _truncated(self, what: str, have: int, need: int) -> ProtocolError:
        return ProtocolError(
            "frame",
            have,
            message=f"truncated frame: the stream ended after {have} of {need} bytes of {what}",
        )

    def _next_event(self) -> Message | NeedData | Closed:
        buffer = self._buffer
        if self.version is None:
            if len(buffer) < STREAM_HEADER_SIZE:
                if not self._eof:
                    return NEED_DATA
                if not buffer:
                    return CLOSED
                raise ProtocolError(
                    "StreamHeader.length",
                    len(buffer),
                    message=f"truncated stream header: the stream ended after {len(buffer)} "
                    f"of {STREAM_HEADER_SIZE} bytes",
                )
            self.version = parse_stream_header(buffer.peek(STREAM_HEADER_SIZE), self.direction)
            buffer.take(STREAM_HEADER_SIZE)
        if self._run is not None:
            return self._finish_run(self._run)
        if self._header is None:
            if len(buffer) < FRAME_HEADER_SIZE:
                if not self._eof:
                    return NEED_DATA
                if not buffer:
                    return CLOSED
                raise self._truncated("a frame header", len(buffer), FRAME_HEADER_SIZE)
            self._header = parse_frame_header(buffer.peek(FRAME_HEADER_SIZE), self.direction)
        header = self._header
        total = FRAME_HEADER_SIZE + header.length
        if len(buffer) < total:
            if self._eof:
                raise self._truncated(f"a {header.type.name} frame", len(buffer), total)
            return NEED_DATA
        payload = buffer.peek(total)[FRAME_HEADER_SIZE:]
        result = self.context.parse_payload(header, payload)
        self._header = None
        buffer.take(total)
        if isinstance(result, RamRunHeader):
            self._run = result
            return self._finish_run(result)
        return result

    def _finish_run(self, run: RamRunHeader) -> RamRun | NeedData:
        buffer = self._buffer
        length = run.data_length
        if len(buffer) < length:
            if self._eof:
                raise self._truncated("RAM_RUN page data", len(buffer), length)
            return NEED_DATA
        data = buffer.take(length)
        self._run = None
        return run.with_data(data)


# -- sending -----------------------------------------------------------------------------------


def _ram_run_payload(block: int, first_page: int, zero: npt.NDArray[np.bool_]) -> bytes:
    return _RAM_RUN.pack(block, first_page, zero.shape[0]) + _pack_bits(zero)


def _encode_handshake(message: Handshake) -> bytes:
    parts = [
        _HANDSHAKE_HEAD.pack(message.vcpus, message.target_page_size),
        _U8.pack(len(message.capabilities)),
    ]
    for name in sorted(message.capabilities):
        raw = name.encode("ascii")
        parts += (_U8.pack(len(raw)), raw)
    parts.append(_U8.pack(len(message.blocks)))
    for block in message.blocks:
        raw = block.name.encode("utf-8")
        parts += (_U8.pack(len(raw)), raw, _BLOCK_TAIL.pack(block.length, block.page_size))
    return b"".join(parts)


def _encode_package(message: Package) -> bytes:
    parts: list[bytes] = []
    for inner in message.messages:
        if isinstance(inner, DeviceState):
            parts += (_FRAME_HEADER.pack(FrameType.DEVICE_STATE, 0, 0, len(inner.data)), inner.data)
        else:
            parts.append(_FRAME_HEADER.pack(FrameType.RUN, 0, 0, 0))
    return b"".join(parts)


def _encode_shut(message: Shut) -> bytes:
    return _U8.pack(int(message.error)) + message.reason.encode("utf-8")


class Encoder:
    """Turns messages of one direction into bytes, checking them first.

    It remembers the blocks (given, or from the Handshake it encodes) so it can check
    RAM runs and ranges against them, and on the return path the last ReqPages block, so
    a ReqPages names its block only when it changes. Not thread-safe: one per connection
    writer (or guard it with the writer's lock).
    """

    def __init__(self, direction: Direction, *, blocks: Sequence[BlockInfo] | None = None) -> None:
        self.direction = direction
        self._blocks = _own_blocks(blocks)
        self._target_page_size: int | None = None
        self._last_req_block: int | None = None

    @property
    def blocks(self) -> tuple[BlockInfo, ...] | None:
        return self._blocks

    def stream_header(self) -> bytes:
        """The 16 bytes opening a stream; a new stream starts ReqPages elision afresh."""
        self._last_req_block = None
        return stream_header(self.direction)

    def encode(self, message: Message) -> bytes:
        """One whole frame (for RamRun including its page data)."""
        spec = _SPEC_OF_MESSAGE.get(type(message))
        if spec is None:
            raise ProtocolError("message", type(message).__name__, "is not a wire message")
        if spec.direction is not self.direction:
            raise ProtocolError(
                "message",
                type(message).__name__,
                f"belongs to the {spec.direction.value} stream, not the {self.direction.value}",
            )
        _check_context(message, self._blocks, self._target_page_size)
        flags = 0
        data: bytes | memoryview = b""
        if isinstance(message, RamRun):
            payload = _ram_run_payload(message.block, message.first_page, message.zero)
            data = message.data
        elif isinstance(message, Handshake):
            payload = _encode_handshake(message)
            self._blocks = message.blocks
            self._target_page_size = message.target_page_size
        elif isinstance(message, ReqPages):
            if message.block != self._last_req_block:
                flags = FLAG_BLOCK_NAMED
                payload = _REQ_PAGES_NAMED.pack(
                    message.block, message.first_page, message.page_count
                )
                self._last_req_block = message.block
            else:
                payload = _REQ_PAGES.pack(message.first_page, message.page_count)
        elif isinstance(message, Advise):
            payload = _ADVISE.pack(message.page_size_summary, message.target_page_size)
        elif isinstance(message, EndOfRound):
            payload = _U32.pack(message.round)
        elif isinstance(message, DeviceState):
            payload = message.data
        elif isinstance(message, Discard):
            payload = _DISCARD_HEAD.pack(message.block, len(message.ranges)) + b"".join(
                _DISCARD_RANGE.pack(start, count) for start, count in message.ranges
            )
        elif isinstance(message, Package):
            payload = _encode_package(message)
        elif isinstance(message, RecvBitmapRequest):
            payload = _U16.pack(message.block)
        elif isinstance(message, Shut):
            payload = _encode_shut(message)
        elif isinstance(message, Ping | Pong | ResumeAck):
            payload = _U32.pack(message.value)
        elif isinstance(message, RecvBitmap):
            payload = _RECV_BITMAP.pack(message.block, message.bitmap.shape[0]) + _pack_bits(
                message.bitmap
            )
        else:  # the messages without fields
            payload = b""
        _check_header(spec, flags, len(payload), None)
        return b"".join(
            (_FRAME_HEADER.pack(spec.frame_type, flags, 0, len(payload)), payload, data)
        )

    def ram_run_header(
        self, block: int, first_page: int, zero: npt.NDArray[np.bool_], page_size: int
    ) -> bytes:
        """Frame header and payload of a RAM_RUN, without its data (zero-copy sending).

        The caller then sends the normal pages (where ``zero`` is False), each page_size
        bytes, contiguous and in order: ``count_nonzero(~zero) * page_size`` bytes.
        """
        if not isinstance(zero, np.ndarray) or zero.dtype != np.bool_ or zero.ndim != 1:
            raise ProtocolError("RamRun.zero", type(zero).__name__, "must be a 1-D bool array")
        count = zero.shape[0]
        if not is_page_size(page_size):
            raise ProtocolError("RamRun.page_size", page_size, "is not a valid page size")
        if not 1 <= count <= max_run_pages(page_size):
            raise ProtocolError(
                "RamRun.page_count", count, f"out of range [1, {max_run_pages(page_size)}]"
            )
        if not 0 <= block < MAX_BLOCKS:
            raise ProtocolError("RamRun.block", block, f"out of range [0, {MAX_BLOCKS - 1}]")
        if not 0 <= first_page <= U64_MAX:
            raise ProtocolError("RamRun.first_page", first_page, f"out of range [0, {U64_MAX}]")
        info = _check_ram_run(self._blocks, block, first_page, count)
        if info is not None and info.page_size != page_size:
            raise ProtocolError(
                "RamRun.page_size",
                page_size,
                f"differs from block {info.name!r}'s {info.page_size}",
            )
        payload = _ram_run_payload(block, first_page, zero)
        return _FRAME_HEADER.pack(FrameType.RAM_RUN, 0, 0, len(payload)) + payload
