"""Payload writers: a message to its frame's flags and payload, one writer per frame type.

`WRITERS` maps each `FrameType` to ``write(encoder, message) -> (flags, payload)``; the
`Encoder` checked the message against the context first and frames the payload after
(a RAM_RUN's page data follows the payload, see `Encoder.encode`). The encoder is passed
for what a writer needs of the stream so far: the block of the last ReqPages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from postcopy.wire import layout
from postcopy.wire.frames import FLAG_BLOCK_NAMED, FLAG_GUEST_NAMED, FrameType
from postcopy.wire.messages import (
    Advise,
    DeviceState,
    Discard,
    EndOfRound,
    Handshake,
    Package,
    RamRun,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    ResumeRequest,
    Shut,
)

if TYPE_CHECKING:
    from postcopy.wire.encoder import Encoder

Write = Callable[["Encoder", Any], tuple[int, bytes]]
"""write(encoder, message) -> (frame flags, payload)."""


def _pack_bits(bits: npt.NDArray[np.bool_]) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def ram_run_payload(block: int, first_page: int, zero: npt.NDArray[np.bool_]) -> bytes:
    """A RAM_RUN's payload: its fixed part and the zero bitmap (not the page data)."""
    return layout.RAM_RUN.pack(block, first_page, zero.shape[0]) + _pack_bits(zero)


def _write_handshake(encoder: Encoder, message: Handshake) -> tuple[int, bytes]:
    parts = [
        layout.HANDSHAKE_HEAD.pack(message.vcpus, message.target_page_size),
        layout.U8.pack(len(message.capabilities)),
    ]
    for name in sorted(message.capabilities):
        raw = name.encode("ascii")
        parts += (layout.U8.pack(len(raw)), raw)
    parts.append(layout.U8.pack(len(message.blocks)))
    for block in message.blocks:
        raw = block.name.encode("utf-8")
        parts += (
            layout.U8.pack(len(raw)),
            raw,
            layout.BLOCK_TAIL.pack(block.length, block.page_size),
        )
    flags = 0
    if message.guest:
        raw = message.guest.encode("utf-8")
        parts += (layout.U8.pack(len(raw)), raw)
        flags = FLAG_GUEST_NAMED
    if any(block.backend for block in message.blocks):
        # the optional tail: every block's backend, in block order
        for block in message.blocks:
            raw = block.backend.encode("ascii")
            parts += (layout.U8.pack(len(raw)), raw)
    return flags, b"".join(parts)


def _write_advise(encoder: Encoder, message: Advise) -> tuple[int, bytes]:
    return 0, layout.ADVISE.pack(message.page_size_summary, message.target_page_size)


def _write_ram_run(encoder: Encoder, message: RamRun) -> tuple[int, bytes]:
    return 0, ram_run_payload(message.block, message.first_page, message.zero)


def _write_end_of_round(encoder: Encoder, message: EndOfRound) -> tuple[int, bytes]:
    return 0, layout.U32.pack(message.round)


def _write_device_state(encoder: Encoder, message: DeviceState) -> tuple[int, bytes]:
    return 0, message.data


def _write_discard(encoder: Encoder, message: Discard) -> tuple[int, bytes]:
    head = layout.DISCARD_HEAD.pack(message.block, len(message.ranges))
    return 0, head + b"".join(
        layout.DISCARD_RANGE.pack(start, count) for start, count in message.ranges
    )


def _write_empty(encoder: Encoder, message: object) -> tuple[int, bytes]:
    return 0, b""


def _write_package(encoder: Encoder, message: Package) -> tuple[int, bytes]:
    parts: list[bytes] = []
    for inner in message.messages:
        if isinstance(inner, DeviceState):
            header = layout.FRAME_HEADER.pack(FrameType.DEVICE_STATE, 0, 0, len(inner.data))
            parts += (header, inner.data)
        else:
            parts.append(layout.FRAME_HEADER.pack(FrameType.RUN, 0, 0, 0))
    return 0, b"".join(parts)


def _write_resume_request(encoder: Encoder, message: ResumeRequest) -> tuple[int, bytes]:
    return 0, layout.RESUME_REQUEST.pack(message.migration_id, message.epoch)


def _write_recv_bitmap_request(encoder: Encoder, message: RecvBitmapRequest) -> tuple[int, bytes]:
    return 0, layout.U16.pack(message.block)


def _write_req_pages(encoder: Encoder, message: ReqPages) -> tuple[int, bytes]:
    # The block is named only when it differs from the previous ReqPages' on this stream.
    if message.block != encoder.last_req_block:
        payload = layout.REQ_PAGES_NAMED.pack(message.block, message.first_page, message.page_count)
        return FLAG_BLOCK_NAMED, payload
    return 0, layout.REQ_PAGES.pack(message.first_page, message.page_count)


def _write_shut(encoder: Encoder, message: Shut) -> tuple[int, bytes]:
    return 0, layout.U8.pack(int(message.error)) + message.reason.encode("utf-8")


def _write_u32_value(encoder: Encoder, message: Any) -> tuple[int, bytes]:
    return 0, layout.U32.pack(message.value)


def _write_recv_bitmap(encoder: Encoder, message: RecvBitmap) -> tuple[int, bytes]:
    head = layout.RECV_BITMAP.pack(message.block, message.bitmap.shape[0])
    return 0, head + _pack_bits(message.bitmap)


WRITERS: Final[dict[FrameType, Write]] = {
    FrameType.HANDSHAKE: _write_handshake,
    FrameType.ADVISE: _write_advise,
    FrameType.RAM_RUN: _write_ram_run,
    FrameType.END_OF_ROUND: _write_end_of_round,
    FrameType.DEVICE_STATE: _write_device_state,
    FrameType.PRECOPY_COMPLETE: _write_empty,
    FrameType.DISCARD: _write_discard,
    FrameType.LISTEN: _write_empty,
    FrameType.RUN: _write_empty,
    FrameType.PACKAGE: _write_package,
    FrameType.POSTCOPY_COMPLETE: _write_empty,
    FrameType.RESUME_REQUEST: _write_resume_request,
    FrameType.RECV_BITMAP_REQUEST: _write_recv_bitmap_request,
    FrameType.POSTCOPY_RESUME: _write_empty,
    FrameType.REQ_PAGES: _write_req_pages,
    FrameType.SHUT: _write_shut,
    FrameType.PING: _write_u32_value,
    FrameType.PONG: _write_u32_value,
    FrameType.RECV_BITMAP: _write_recv_bitmap,
    FrameType.RESUME_ACK: _write_u32_value,
}
assert set(WRITERS) == set(FrameType)
