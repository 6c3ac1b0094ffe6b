"""Frame specs and headers: every frame type, its message, direction and payload bounds.

`SPECS` is the table a new frame type is added to first (then a reader in `readers.READERS`
and a writer in `writers.WRITERS`; ``tests/test_wire_codec.py`` checks that every type has
all three). Here too: the stream and frame headers, built and checked (known type, the
stream's direction, defined flags, reserved zero, the type's payload bounds), before any
payload byte is awaited.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

from postcopy.wire import layout
from postcopy.wire.errors import ProtocolError
from postcopy.wire.layout import STREAM_HEADER_SIZE
from postcopy.wire.messages import (
    FRAME_HEADER_SIZE,
    MAX_DISCARD_RANGES,
    MAX_PAYLOAD,
    MAX_RECV_BITMAP_PAGES,
    MAX_RUN_PAGES,
    MAX_SHUT_REASON_BYTES,
    Advise,
    DeviceState,
    Discard,
    EndOfRound,
    Handshake,
    Listen,
    Package,
    Ping,
    Pong,
    PostcopyComplete,
    PostcopyResume,
    PrecopyComplete,
    RamRun,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    ResumeAck,
    ResumeRequest,
    Run,
    Shut,
    max_run_pages,
)

MAIN_MAGIC: Final = b"PCPYMIG\0"
RETURN_MAGIC: Final = b"PCPYRET\0"
PROTOCOL_VERSION: Final = 1
FLAG_BLOCK_NAMED: Final = 0x01
"""ReqPages flag: the payload names the block (it differs from the previous ReqPages')."""
FLAG_GUEST_NAMED: Final = 0x01
"""Handshake flag: the payload ends with the guest's name (u8 length, UTF-8)."""


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


class FrameSpec(NamedTuple):
    """What the header of one frame type may say: its message, stream and payload bounds."""

    frame_type: FrameType
    message: type
    direction: Direction
    min_length: int
    max_length: int
    allowed_flags: int = 0


def _specs(direction: Direction, *rows: tuple[FrameType, type, int, int]) -> list[FrameSpec]:
    return [
        FrameSpec(frame_type, message, direction, low, high)
        for frame_type, message, low, high in rows
    ]


# Bounds are of the payload (after the 8-byte frame header; RAM_RUN page data not included).
_MAINSPECS: Final = [
    FrameSpec(
        FrameType.HANDSHAKE,
        Handshake,
        Direction.MAIN,
        layout.HANDSHAKE_HEAD.size + 2 + layout.MIN_BLOCK_ENTRY,
        MAX_PAYLOAD,
        FLAG_GUEST_NAMED,
    ),
    *_specs(
        Direction.MAIN,
        (FrameType.ADVISE, Advise, layout.ADVISE.size, layout.ADVISE.size),
        (
            FrameType.RAM_RUN,
            RamRun,
            layout.RAM_RUN.size + 1,
            layout.RAM_RUN.size + (MAX_RUN_PAGES + 7) // 8,
        ),
        (FrameType.END_OF_ROUND, EndOfRound, 4, 4),
        (FrameType.DEVICE_STATE, DeviceState, 0, MAX_PAYLOAD),
        (FrameType.PRECOPY_COMPLETE, PrecopyComplete, 0, 0),
        (
            FrameType.DISCARD,
            Discard,
            layout.DISCARD_HEAD.size + layout.DISCARD_RANGE.size,
            layout.DISCARD_HEAD.size + MAX_DISCARD_RANGES * layout.DISCARD_RANGE.size,
        ),
        (FrameType.LISTEN, Listen, 0, 0),
        (FrameType.RUN, Run, 0, 0),
        (FrameType.PACKAGE, Package, FRAME_HEADER_SIZE, MAX_PAYLOAD),
        (FrameType.POSTCOPY_COMPLETE, PostcopyComplete, 0, 0),
        (
            FrameType.RESUME_REQUEST,
            ResumeRequest,
            layout.RESUME_REQUEST.size,
            layout.RESUME_REQUEST.size,
        ),
        (FrameType.RECV_BITMAP_REQUEST, RecvBitmapRequest, 2, 2),
        (FrameType.POSTCOPY_RESUME, PostcopyResume, 0, 0),
        # QEMU's MIG_CMD_PING: the source learns the destination got this far (the answer,
        # Pong, comes back on the return path).
        (FrameType.PING, Ping, 4, 4),
    ),
]
_RETURNSPECS: Final = [
    FrameSpec(
        FrameType.REQ_PAGES,
        ReqPages,
        Direction.RETURN,
        layout.REQ_PAGES.size,
        layout.REQ_PAGES_NAMED.size,
        FLAG_BLOCK_NAMED,
    ),
    *_specs(
        Direction.RETURN,
        (FrameType.SHUT, Shut, 1, 1 + MAX_SHUT_REASON_BYTES),
        (FrameType.PONG, Pong, 4, 4),
        (
            FrameType.RECV_BITMAP,
            RecvBitmap,
            layout.RECV_BITMAP.size + 1,
            layout.RECV_BITMAP.size + (MAX_RECV_BITMAP_PAGES + 7) // 8,
        ),
        (FrameType.RESUME_ACK, ResumeAck, 4, 4),
    ),
]
SPECS: Final[dict[int, FrameSpec]] = {
    spec.frame_type: spec for spec in (*_MAINSPECS, *_RETURNSPECS)
}
SPEC_OF_MESSAGE: Final[dict[type, FrameSpec]] = {spec.message: spec for spec in SPECS.values()}
PACKAGE_INNER: Final = frozenset({FrameType.DEVICE_STATE, FrameType.RUN})


def max_frame_size(page_size: int) -> int:
    """Most bytes one frame can take in a stream whose largest block page is page_size."""
    return FRAME_HEADER_SIZE + MAX_PAYLOAD + max_run_pages(page_size) * page_size


# -- stream and frame headers ------------------------------------------------------------------


def stream_header(direction: Direction) -> bytes:
    """The 16 bytes that open a stream in this direction."""
    return layout.STREAM_HEADER.pack(_MAGIC[direction], PROTOCOL_VERSION, 0)


def parse_stream_header(buf: bytes | bytearray | memoryview, direction: Direction) -> int:
    """Check the 16-byte stream header of a stream in this direction; return its version."""
    if len(buf) != STREAM_HEADER_SIZE:
        raise ProtocolError(
            "StreamHeader.length", len(buf), f"bytes; a stream header is {STREAM_HEADER_SIZE}"
        )
    magic, version, reserved = layout.STREAM_HEADER.unpack(buf)
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
            f'is not "{expected[:-1].decode()}" and a zero byte, the '
            f"{direction.value} stream's magic{hint}",
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


def type_name(value: int) -> str:
    spec = SPECS.get(value)
    return f"{value:#04x} ({spec.frame_type.name})" if spec else f"{value:#04x}"


def check_header(spec: FrameSpec, flags: int, length: int, direction: Direction | None) -> None:
    if direction is not None and spec.direction is not direction:
        raise ProtocolError(
            "FrameHeader.type",
            type_name(spec.frame_type),
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
    frame_type, flags, reserved, length = layout.FRAME_HEADER.unpack(buf8)
    spec = SPECS.get(frame_type)
    if spec is None:
        raise ProtocolError("FrameHeader.type", type_name(frame_type), "is not a known frame type")
    if reserved != 0:
        raise ProtocolError("FrameHeader.reserved", reserved, "must be 0")
    check_header(spec, flags, length, direction)
    return FrameHeader(spec.frame_type, flags, length)
