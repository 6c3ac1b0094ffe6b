"""The sending side of the codec: messages to bytes, checked first (no I/O).

``encode(message)`` gives whole frames; ``ram_run_header(...)`` gives a RAM_RUN's frame
header and payload without its page data, which the caller sends itself straight from guest
RAM (zero-copy); ``discard_frames(...)`` gives the DISCARD frames of any number of ranges at
once, built with numpy (a guest that dirties random pages makes one range per page, and
thousands of them may have to cross inside the downtime). The payload of each frame type is
written by its entry in `writers.WRITERS`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from postcopy.wire import layout
from postcopy.wire.checks import check_context, check_discard_runs, check_ram_run, own_blocks
from postcopy.wire.errors import ProtocolError
from postcopy.wire.frames import (
    FLAG_BLOCK_NAMED,
    SPEC_OF_MESSAGE,
    Direction,
    FrameType,
    check_header,
    stream_header,
)
from postcopy.wire.messages import (
    MAX_BLOCKS,
    MAX_DISCARD_RANGES,
    U32_MAX,
    U64_MAX,
    BlockInfo,
    Handshake,
    Message,
    RamRun,
    ReqPages,
    is_page_size,
    max_run_pages,
)
from postcopy.wire.writers import WRITERS, ram_run_payload

# one DISCARD frame carrying MAX_DISCARD_RANGES ranges, as numpy lays it out (big-endian)
_FULL_DISCARD = np.dtype(
    [
        ("type", "u1"),
        ("flags", "u1"),
        ("reserved", ">u2"),
        ("length", ">u4"),
        ("block", ">u2"),
        ("count", ">u2"),
        ("ranges", ">u8", (MAX_DISCARD_RANGES, 2)),
    ]
)
assert _FULL_DISCARD.itemsize == layout.FRAME_HEADER.size + layout.DISCARD_HEAD.size + (
    MAX_DISCARD_RANGES * layout.DISCARD_RANGE.size
)


class Encoder:
    """Turns messages of one direction into bytes, checking them first.

    It remembers the blocks (given, or from the Handshake it encodes) so it can check
    RAM runs and ranges against them, and on the return path the last ReqPages block, so
    a ReqPages names its block only when it changes. Not thread-safe: one per connection
    writer (or guard it with the writer's lock).
    """

    def __init__(self, direction: Direction, *, blocks: Sequence[BlockInfo] | None = None) -> None:
        self.direction = direction
        self._blocks = own_blocks(blocks)
        # per block checked by `ram_page_header`: its pages and page size (the blocks'
        # own figures, kept while the blocks are these)
        self._one_page_blocks: dict[int, tuple[int, int]] = {}
        self._block_pages = _pages_of(self._blocks)  # per block, its pages
        self._target_page_size: int | None = None
        # The block of the last ReqPages on this stream: the next names its block if it differs.
        self.last_req_block: int | None = None

    @property
    def blocks(self) -> tuple[BlockInfo, ...] | None:
        return self._blocks

    def stream_header(self) -> bytes:
        """The 16 bytes opening a stream; a new stream starts ReqPages elision afresh."""
        self.last_req_block = None
        return stream_header(self.direction)

    def encode(self, message: Message) -> bytes:
        """One whole frame (for RamRun including its page data)."""
        if type(message) is ReqPages and self.direction is Direction.RETURN:
            return self._req_pages_frame(message)
        spec = SPEC_OF_MESSAGE.get(type(message))
        if spec is None:
            raise ProtocolError("message", type(message).__name__, "is not a wire message")
        if spec.direction is not self.direction:
            raise ProtocolError(
                "message",
                type(message).__name__,
                f"belongs to the {spec.direction.value} stream, not the {self.direction.value}",
            )
        check_context(message, self._blocks, self._target_page_size)
        flags, payload = WRITERS[spec.frame_type](self, message)
        check_header(spec, flags, len(payload), None)
        if isinstance(message, Handshake):
            self._blocks = message.blocks
            self._one_page_blocks = {}
            self._block_pages = _pages_of(self._blocks)
            self._target_page_size = message.target_page_size
        elif isinstance(message, ReqPages):
            self.last_req_block = message.block
        data = message.data if isinstance(message, RamRun) else b""
        header = layout.FRAME_HEADER.pack(spec.frame_type, flags, 0, len(payload))
        return b"".join((header, payload, data))

    def req_pages_frame(self, block: int, first_page: int, page_count: int) -> bytes:
        """`encode(ReqPages(block, first_page, page_count))` from the fields, without the
        message object: the same bytes and checks (a request that is not plainly inside a
        declared block goes the usual way, which says what is wrong)."""
        pages = self._block_pages
        if (
            self.direction is Direction.RETURN
            and type(block) is int
            and type(first_page) is int
            and type(page_count) is int
            and 0 <= block < len(pages)
            and first_page >= 0
            and 1 <= page_count <= U32_MAX
            and first_page + page_count <= pages[block]
        ):
            if block != self.last_req_block:
                self.last_req_block = block
                return _REQ_PAGES_NAMED_HEADER + layout.REQ_PAGES_NAMED.pack(
                    block, first_page, page_count
                )
            return _REQ_PAGES_HEADER + layout.REQ_PAGES.pack(first_page, page_count)
        return self.encode(ReqPages(block, first_page, page_count))

    def _req_pages_frame(self, message: ReqPages) -> bytes:
        """`encode` of a ReqPages (a page request: the latency-critical path): the same
        bytes and checks without the generic dispatch (the frame header is one of two)."""
        check_context(message, self._blocks, self._target_page_size)
        block = message.block
        if block != self.last_req_block:
            self.last_req_block = block
            return _REQ_PAGES_NAMED_HEADER + layout.REQ_PAGES_NAMED.pack(
                block, message.first_page, message.page_count
            )
        return _REQ_PAGES_HEADER + layout.REQ_PAGES.pack(message.first_page, message.page_count)

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
        info = check_ram_run(self._blocks, block, first_page, count)
        if info is not None and info.page_size != page_size:
            raise ProtocolError(
                "RamRun.page_size",
                page_size,
                f"differs from block {info.name!r}'s {info.page_size}",
            )
        payload = ram_run_payload(block, first_page, zero)
        return layout.FRAME_HEADER.pack(FrameType.RAM_RUN, 0, 0, len(payload)) + payload

    def discard_frames(
        self, block: int, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
    ) -> bytes:
        """The DISCARD frames of ranges (starts[i], lengths[i]) of `block`, in order, at most
        MAX_DISCARD_RANGES per frame: what ``encode(Discard(block, group))`` gives for each
        group, checked and built without a Python step per range."""
        if self.direction is not Direction.MAIN:
            raise ProtocolError(
                "message", "Discard", f"belongs to the main stream, not the {self.direction.value}"
            )
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if starts.ndim != 1 or starts.shape != lengths.shape:
            raise ProtocolError(
                "Discard.ranges", starts.shape, "starts and lengths differ in shape"
            )
        if starts.size == 0:
            return b""
        if not 0 <= block < MAX_BLOCKS:
            raise ProtocolError("Discard.block", block, f"out of range [0, {MAX_BLOCKS - 1}]")
        check_discard_runs(self._blocks, block, starts, lengths)
        full, rest = divmod(starts.size, MAX_DISCARD_RANGES)
        frames = np.zeros(full, dtype=_FULL_DISCARD)
        frames["type"] = FrameType.DISCARD
        frames["length"] = _FULL_DISCARD.itemsize - layout.FRAME_HEADER.size
        frames["block"] = block
        frames["count"] = MAX_DISCARD_RANGES
        cut = full * MAX_DISCARD_RANGES
        pairs = frames["ranges"]
        pairs[:, :, 0] = starts[:cut].reshape(full, MAX_DISCARD_RANGES)
        pairs[:, :, 1] = lengths[:cut].reshape(full, MAX_DISCARD_RANGES)
        data = frames.tobytes()
        if rest:
            tail = np.empty((rest, 2), dtype=">u8")
            tail[:, 0], tail[:, 1] = starts[cut:], lengths[cut:]
            payload = layout.DISCARD_HEAD.pack(block, rest) + tail.tobytes()
            data += layout.FRAME_HEADER.pack(FrameType.DISCARD, 0, 0, len(payload)) + payload
        return data

    def ram_page_header(self, block: int, page: int, zero: bool, page_size: int) -> bytes:
        """`ram_run_header` for a run of one page (a requested page: the latency-critical
        path), the same bytes and checks without numpy; once a block's page size has
        been checked, its page is the only thing left to check."""
        known = self._one_page_blocks.get(block)
        if known is not None and known[1] == page_size and 0 <= page < known[0]:
            return _ONE_PAGE_FRAME.pack(_ONE_PAGE_FRAME_HEADER, block, page, 1, 1 if zero else 0)
        if not is_page_size(page_size):
            raise ProtocolError("RamRun.page_size", page_size, "is not a valid page size")
        if not 0 <= block < MAX_BLOCKS:
            raise ProtocolError("RamRun.block", block, f"out of range [0, {MAX_BLOCKS - 1}]")
        if not 0 <= page <= U64_MAX:
            raise ProtocolError("RamRun.first_page", page, f"out of range [0, {U64_MAX}]")
        info = check_ram_run(self._blocks, block, page, 1)
        if info is not None and info.page_size != page_size:
            raise ProtocolError(
                "RamRun.page_size",
                page_size,
                f"differs from block {info.name!r}'s {info.page_size}",
            )
        if info is not None:
            self._one_page_blocks[block] = (info.pages, page_size)
        return (
            _ONE_PAGE_FRAME_HEADER
            + layout.RAM_RUN.pack(block, page, 1)
            + (_ZERO_BIT if zero else _NORMAL_BIT)
        )


def _pages_of(blocks: Sequence[BlockInfo] | None) -> tuple[int, ...]:
    return tuple(block.pages for block in blocks or ())


# a one-page RAM_RUN: its payload is the fixed part and one byte of zero bitmap (bit 0)
_ONE_PAGE_FRAME_HEADER = layout.FRAME_HEADER.pack(FrameType.RAM_RUN, 0, 0, layout.RAM_RUN.size + 1)
_ZERO_BIT, _NORMAL_BIT = b"\x01", b"\x00"
# ... in one piece: the frame header, then block, page, 1 page, the zero bit
_ONE_PAGE_FRAME = struct.Struct(f">{len(_ONE_PAGE_FRAME_HEADER)}sHQIB")
# a ReqPages frame's header, with the block named or not (writers._write_req_pages)
_REQ_PAGES_NAMED_HEADER = layout.FRAME_HEADER.pack(
    FrameType.REQ_PAGES, FLAG_BLOCK_NAMED, 0, layout.REQ_PAGES_NAMED.size
)
_REQ_PAGES_HEADER = layout.FRAME_HEADER.pack(FrameType.REQ_PAGES, 0, 0, layout.REQ_PAGES.size)
