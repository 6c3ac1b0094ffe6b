"""The receiving side of the codec: what a receiver remembers, and the buffering Decoder.

Two ways in, both pure:

- Zero-copy: the I/O layer reads the stream and frame headers and the payload itself and
  calls `parse_stream_header`, `parse_frame_header` (`frames`) and
  `StreamContext.parse_payload`. For a RAM_RUN that returns a `RamRunHeader` saying how
  many data bytes follow, so the caller can ``recv_into`` its own staging buffer. Every
  bound is checked before that.
- `Decoder`: a buffering façade (``receive_data`` / ``next_event``, h11's shape) over the
  same functions, for tests, the return path and anything not on the page hot path.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from typing import Final

from postcopy.wire.checks import BLOCK_MESSAGES, check_context, own_blocks
from postcopy.wire.errors import ProtocolError
from postcopy.wire.frames import (
    FLAG_BLOCK_NAMED,
    SPECS,
    Direction,
    FrameHeader,
    FrameType,
    check_header,
    parse_frame_header,
    parse_stream_header,
    type_name,
)
from postcopy.wire.layout import STREAM_HEADER_SIZE
from postcopy.wire.messages import (
    FRAME_HEADER_SIZE,
    BlockInfo,
    Handshake,
    Message,
    RamRun,
    RamRunHeader,
    ReqPages,
)
from postcopy.wire.readers import ONE_NORMAL, ONE_ZERO, READERS
from postcopy.wire.state import IncomingStateMachine


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

# The frames of a page request, each unpacked whole in `StreamContext.parse_hot`: the frame
# header (type, flags, reserved, length) with a named or an unnamed REQ_PAGES, or with a
# RAM_RUN of one page (block, first page, count, the zero bitmap's byte).
_HOT_REQ_NAMED: Final = struct.Struct(">BBHIHQI")
_HOT_REQ: Final = struct.Struct(">BBHIQI")
_HOT_ONE_PAGE_RUN: Final = struct.Struct(">BBHIHQIB")
_REQ_NAMED_LENGTH: Final = _HOT_REQ_NAMED.size - FRAME_HEADER_SIZE
_REQ_LENGTH: Final = _HOT_REQ.size - FRAME_HEADER_SIZE
_ONE_PAGE_RUN_LENGTH: Final = _HOT_ONE_PAGE_RUN.size - FRAME_HEADER_SIZE
_REQ_PAGES_TYPE: Final = int(FrameType.REQ_PAGES)
_RAM_RUN_TYPE: Final = int(FrameType.RAM_RUN)


class StreamContext:
    """What a receiver must remember between frames of one stream direction.

    The declared blocks (from the Handshake, or given by the receiver as its own
    configuration), the Handshake's target page size, the incoming state machine (main
    stream only) and the block of the last ReqPages (return path). The I/O layer calls
    `parse_payload` for every frame; `Decoder` is built on the same object.
    """

    def __init__(
        self,
        direction: Direction,
        *,
        blocks: Sequence[BlockInfo] | None = None,
        resumed: bool = False,
    ) -> None:
        """`resumed` (main stream): a recovery connection's stream, which carries on a
        postcopy whose guest runs (no Handshake; the state starts at RUNNING)."""
        self.direction = direction
        self._blocks: tuple[BlockInfo, ...] | None = None
        self._block_pages: tuple[int, ...] = ()  # per block: its pages and page size,
        self._page_sizes: tuple[int, ...] = ()  # for `parse_hot`
        self._set_blocks(own_blocks(blocks))
        # the hot frame of this direction (`parse_hot`)
        self._hot = _REQ_PAGES_TYPE if direction is Direction.RETURN else _RAM_RUN_TYPE
        self._target_page_size: int | None = None
        self._state = IncomingStateMachine(resumed=resumed) if direction is Direction.MAIN else None
        self.last_req_block: int | None = None

    def _set_blocks(self, blocks: tuple[BlockInfo, ...] | None) -> None:
        self._blocks = blocks
        self._block_pages = tuple(block.pages for block in blocks or ())
        self._page_sizes = tuple(block.page_size for block in blocks or ())

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
        spec = SPECS.get(header.type)
        if spec is None:
            raise ProtocolError(
                "FrameHeader.type", type_name(header.type), "is not a known frame type"
            )
        check_header(spec, header.flags, header.length, self.direction)
        if len(payload) != header.length:
            raise ProtocolError(
                f"{spec.message.__name__}.payload",
                len(payload),
                f"bytes, but the frame header says {header.length}",
            )
        if self._blocks is None and spec.message in BLOCK_MESSAGES:
            raise ProtocolError(
                f"{spec.message.__name__}.block",
                None,
                message=f"{spec.message.__name__} refers to a block, but no blocks are declared "
                "(no Handshake yet and none configured)",
            )
        message = READERS[spec.frame_type](self, header.flags, payload)
        if type(message) is not RamRunHeader:  # checked while decoding: the hot path
            check_context(message, self._blocks, self._target_page_size)
        if self._state is not None:
            self._state.process(message)  # type: ignore[arg-type]
        if isinstance(message, Handshake):
            self._set_blocks(message.blocks)
            self._target_page_size = message.target_page_size
        elif isinstance(message, ReqPages):
            self.last_req_block = message.block
        return message  # type: ignore[return-value]

    def parse_hot(
        self, buffer: bytes | bytearray | memoryview, offset: int, available: int
    ) -> tuple[ReqPages | RamRunHeader, int] | None:
        """The frame at `buffer[offset:]` (`available` bytes there) and its size, if it is
        a page request's: a REQ_PAGES on the return path, a RAM_RUN of one page on the main
        stream (its page data follows, unread), whole and valid. None for anything else,
        an incomplete frame or any field out of bounds: parse it as usual
        (`parse_frame_header`, `parse_payload`), which also says what is wrong.

        The same checks and the same effect as the usual way, in one unpack and a few
        comparisons: the usual way's dispatch, spec lookups and objects cost ~30 µs per
        frame on a freshly woken thread here, on each of the two receiving hops of a page
        request."""
        pages = self._block_pages
        kind = buffer[offset] if available >= FRAME_HEADER_SIZE and pages else -1
        if kind != self._hot:
            return None
        if kind == _REQ_PAGES_TYPE:
            flags = buffer[offset + 1]
            if flags == FLAG_BLOCK_NAMED and available >= _HOT_REQ_NAMED.size:
                _, _, reserved, length, block, first, count = _HOT_REQ_NAMED.unpack_from(
                    buffer, offset
                )
                size, expected = _HOT_REQ_NAMED.size, _REQ_NAMED_LENGTH
            elif flags == 0 and self.last_req_block is not None and available >= _HOT_REQ.size:
                _, _, reserved, length, first, count = _HOT_REQ.unpack_from(buffer, offset)
                block = self.last_req_block
                size, expected = _HOT_REQ.size, _REQ_LENGTH
            else:
                return None
            # count >= 1 and first + count <= pages: first is in the block too
            if reserved or length != expected or block >= len(pages) or not count:
                return None
            if first + count > pages[block]:
                return None
            self.last_req_block = block
            return ReqPages(block, first, count), size
        if available >= _HOT_ONE_PAGE_RUN.size:
            _, flags, reserved, length, block, first, count, bit = _HOT_ONE_PAGE_RUN.unpack_from(
                buffer, offset
            )
            if flags or reserved or length != _ONE_PAGE_RUN_LENGTH or count != 1 or bit > 1:
                return None
            if block >= len(pages) or first >= pages[block]:
                return None
            header = RamRunHeader(
                block, first, ONE_ZERO if bit else ONE_NORMAL, (1 - bit) * self._page_sizes[block]
            )
            if self._state is not None:
                self._state.process(header)
            return header, _HOT_ONE_PAGE_RUN.size
        return None


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

    def _set_blocks(self, blocks: tuple[BlockInfo, ...] | None) -> None:
        self._blocks = blocks
        self._block_pages = tuple(block.pages for block in blocks or ())
        self._page_sizes = tuple(block.page_size for block in blocks or ())

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
