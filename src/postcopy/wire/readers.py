"""Payload readers: bytes of one frame's payload to its message, one reader per frame type.

`READERS` maps each `FrameType` to ``read(ctx, flags, payload)``; the header was checked
against the type's spec before (`frames`), so a reader checks the payload's structure and
what needs no context (counts, padding, UTF-8), and the message constructors check the
fields. The receiver runs the context checks (`checks`) afterwards; a RAM_RUN is checked
here, while its header is read, and read as a `RamRunHeader` (its page data follows).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from postcopy.wire import layout
from postcopy.wire.checks import check_ram_run
from postcopy.wire.errors import ProtocolError
from postcopy.wire.frames import (
    FLAG_BLOCK_NAMED,
    FLAG_GUEST_NAMED,
    PACKAGE_INNER,
    Direction,
    FrameType,
    parse_frame_header,
)
from postcopy.wire.messages import (
    FRAME_HEADER_SIZE,
    MAX_BACKEND_NAME_BYTES,
    MAX_BLOCK_NAME_BYTES,
    MAX_CAPABILITY_NAME_BYTES,
    MAX_DISCARD_RANGES,
    MAX_GUEST_BYTES,
    MAX_RECV_BITMAP_PAGES,
    MAX_RUN_PAGES,
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
    RamRunHeader,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    ResumeAck,
    ResumeRequest,
    Run,
    Shut,
)

if TYPE_CHECKING:
    from postcopy.wire.decoder import StreamContext


class _PayloadReader:
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
        return int(layout.U8.unpack_from(self._buf, self._take(1, what))[0])

    def unpack(self, shape: struct.Struct, what: str) -> tuple[int, ...]:
        return shape.unpack_from(self._buf, self._take(shape.size, what))

    def raw(self, size: int, what: str) -> bytes:
        start = self._take(size, what)
        return bytes(self._buf[start : start + size])

    def at_end(self) -> bool:
        return self._offset == len(self._buf)

    def end(self) -> None:
        if self._offset != len(self._buf):
            raise ProtocolError(
                f"{self._owner}.payload",
                len(self._buf),
                f"bytes has {len(self._buf) - self._offset} trailing bytes",
            )


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


Read = Callable[["StreamContext", int, bytes | memoryview], object]
"""read(ctx, flags, payload): the message (a RamRunHeader for RAM_RUN), or ProtocolError."""


def _read_handshake(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Handshake:
    reader = _PayloadReader("Handshake", payload)
    vcpus, target_page_size = reader.unpack(layout.HANDSHAKE_HEAD, "vcpus and target_page_size")
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
        block_length, page_size = reader.unpack(layout.BLOCK_TAIL, "a block's length and page size")
        blocks.append(BlockInfo(name, block_length, page_size))
    guest = ""
    if flags & FLAG_GUEST_NAMED:
        length = reader.u8("the guest name length")
        if not 1 <= length <= MAX_GUEST_BYTES:
            raise ProtocolError("Handshake.guest.length", length, "bytes is out of range")
        guest = _utf8("Handshake.guest", reader.raw(length, "the guest name"))
    if not reader.at_end():
        # the optional tail: every block's backend, in block order
        for index, block in enumerate(blocks):
            length = reader.u8("a backend name length")
            if not 1 <= length <= MAX_BACKEND_NAME_BYTES:
                raise ProtocolError("BlockInfo.backend.length", length, "bytes is out of range")
            raw = reader.raw(length, "a backend name")
            if not raw.isascii():
                raise ProtocolError("BlockInfo.backend", raw, "is not ASCII")
            blocks[index] = BlockInfo(block.name, block.length, block.page_size, raw.decode())
    reader.end()
    return Handshake(frozenset(capabilities), tuple(blocks), vcpus, target_page_size, guest)


def _read_advise(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Advise:
    summary, target = layout.ADVISE.unpack(payload)
    return Advise(summary, target)


def _read_ram_run(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> RamRunHeader:
    block_index, first_page, count = layout.RAM_RUN.unpack_from(payload)
    if not 1 <= count <= MAX_RUN_PAGES:
        raise ProtocolError("RamRun.page_count", count, f"out of range [1, {MAX_RUN_PAGES}]")
    if len(payload) != layout.RAM_RUN.size + (count + 7) // 8:
        raise ProtocolError(
            "RamRun.payload",
            len(payload),
            f"bytes; {count} pages need {layout.RAM_RUN.size + (count + 7) // 8}",
        )
    block = check_ram_run(ctx.blocks, block_index, first_page, count)
    assert block is not None  # parse_payload made sure blocks are declared
    if count == 1:  # a requested page: no numpy (three calls, microseconds each here)
        bit = payload[layout.RAM_RUN.size]
        if bit > 1:
            raise ProtocolError("RamRun.zero", bit, "last byte has padding bits set past 1 entries")
        return RamRunHeader(
            block_index, first_page, ONE_ZERO if bit else ONE_NORMAL, (1 - bit) * block.page_size
        )
    zero, zero_pages = _unpack_bits("RamRun.zero", payload[layout.RAM_RUN.size :], count)
    return RamRunHeader(block_index, first_page, zero, (count - zero_pages) * block.page_size)


# the zero bitmap of a one-page run, shared by every such header: read-only
ONE_ZERO, ONE_NORMAL = np.ones(1, dtype=np.bool_), np.zeros(1, dtype=np.bool_)
ONE_ZERO.flags.writeable = ONE_NORMAL.flags.writeable = False


def _read_end_of_round(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> EndOfRound:
    return EndOfRound(layout.U32.unpack(payload)[0])


def _read_device_state(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> DeviceState:
    return DeviceState(bytes(payload))


def _read_discard(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Discard:
    block, count = layout.DISCARD_HEAD.unpack_from(payload)
    expected = layout.DISCARD_HEAD.size + count * layout.DISCARD_RANGE.size
    if not 1 <= count <= MAX_DISCARD_RANGES:
        raise ProtocolError("Discard.ranges", count, f"ranges; must be 1 to {MAX_DISCARD_RANGES}")
    if len(payload) != expected:
        raise ProtocolError(
            "Discard.payload", len(payload), f"bytes; {count} ranges need {expected}"
        )
    # struct gives plain ints, each a u64: in range by construction
    ranges = tuple(layout.DISCARD_RANGE.iter_unpack(payload[layout.DISCARD_HEAD.size :]))
    return Discard.from_wire(block, ranges)


def _read_empty(message: type) -> Read:
    def decode(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> object:
        return message()

    return decode


def _read_package(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Package:
    view = memoryview(payload)
    messages: list[Message] = []
    offset = 0
    while offset < len(view):
        if offset + FRAME_HEADER_SIZE > len(view):
            raise ProtocolError(
                "Package.payload", len(view), f"bytes ends inside an inner frame header at {offset}"
            )
        header = parse_frame_header(view[offset : offset + FRAME_HEADER_SIZE], Direction.MAIN)
        if header.type not in PACKAGE_INNER:
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
        inner = READERS[header.type](ctx, header.flags, view[start:end])
        messages.append(inner)  # type: ignore[arg-type]
        offset = end
    return Package(tuple(messages))


def _read_resume_request(
    ctx: StreamContext, flags: int, payload: bytes | memoryview
) -> ResumeRequest:
    migration_id, epoch = layout.RESUME_REQUEST.unpack(payload)
    return ResumeRequest(migration_id, epoch)


def _read_recv_bitmap_request(
    ctx: StreamContext, flags: int, payload: bytes | memoryview
) -> RecvBitmapRequest:
    return RecvBitmapRequest(layout.U16.unpack(payload)[0])


def _read_req_pages(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> ReqPages:
    if flags & FLAG_BLOCK_NAMED:
        if len(payload) != layout.REQ_PAGES_NAMED.size:
            raise ProtocolError(
                "ReqPages.payload",
                len(payload),
                f"bytes; with a block it is {layout.REQ_PAGES_NAMED.size}",
            )
        block, first_page, count = layout.REQ_PAGES_NAMED.unpack(payload)
        return ReqPages(block, first_page, count)
    if len(payload) != layout.REQ_PAGES.size:
        raise ProtocolError(
            "ReqPages.payload",
            len(payload),
            f"bytes; without a block it is {layout.REQ_PAGES.size}",
        )
    if ctx.last_req_block is None:
        raise ProtocolError(
            "ReqPages.block",
            None,
            message="ReqPages.block omitted before any ReqPages on this stream named a block",
        )
    first_page, count = layout.REQ_PAGES.unpack(payload)
    return ReqPages(ctx.last_req_block, first_page, count)


def _read_shut(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> Shut:
    error = payload[0]
    if error > 1:
        raise ProtocolError("Shut.error", error, "is not 0 or 1")
    return Shut(bool(error), _utf8("Shut.reason", bytes(payload[1:])))


def _read_u32(message: type) -> Read:
    def decode(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> object:
        return message(layout.U32.unpack(payload)[0])

    return decode


def _read_recv_bitmap(ctx: StreamContext, flags: int, payload: bytes | memoryview) -> RecvBitmap:
    block, count = layout.RECV_BITMAP.unpack_from(payload)
    if not 1 <= count <= MAX_RECV_BITMAP_PAGES:
        raise ProtocolError(
            "RecvBitmap.page_count", count, f"out of range [1, {MAX_RECV_BITMAP_PAGES}]"
        )
    bitmap, _ = _unpack_bits("RecvBitmap.bitmap", payload[layout.RECV_BITMAP.size :], count)
    return RecvBitmap(block, bitmap)


READERS: Final[dict[FrameType, Read]] = {
    FrameType.HANDSHAKE: _read_handshake,
    FrameType.ADVISE: _read_advise,
    FrameType.RAM_RUN: _read_ram_run,
    FrameType.END_OF_ROUND: _read_end_of_round,
    FrameType.DEVICE_STATE: _read_device_state,
    FrameType.PRECOPY_COMPLETE: _read_empty(PrecopyComplete),
    FrameType.DISCARD: _read_discard,
    FrameType.LISTEN: _read_empty(Listen),
    FrameType.RUN: _read_empty(Run),
    FrameType.PACKAGE: _read_package,
    FrameType.POSTCOPY_COMPLETE: _read_empty(PostcopyComplete),
    FrameType.RESUME_REQUEST: _read_resume_request,
    FrameType.RECV_BITMAP_REQUEST: _read_recv_bitmap_request,
    FrameType.POSTCOPY_RESUME: _read_empty(PostcopyResume),
    FrameType.REQ_PAGES: _read_req_pages,
    FrameType.SHUT: _read_shut,
    FrameType.PING: _read_u32(Ping),
    FrameType.PONG: _read_u32(Pong),
    FrameType.RECV_BITMAP: _read_recv_bitmap,
    FrameType.RESUME_ACK: _read_u32(ResumeAck),
}
assert set(READERS) == set(FrameType)
