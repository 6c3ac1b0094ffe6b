"""Following the framing of one direction of a migration connection, without decoding it.

The link proxy (`linkproxy`) uses this to cut a link at a point named by the stream, e.g.
inside the page data of a RAM_RUN or inside the RECV_BITMAP reply: it sees the
transport's hello and auth frames, the stream header and the frames of
docs/PROTOCOL.md go by, and records where each frame starts and how long it is.
"""

from __future__ import annotations

import collections
import struct

import numpy as np

from postcopy.wire import (
    FRAME_HEADER_SIZE,
    STREAM_HEADER_SIZE,
    Direction,
    FrameType,
    Handshake,
    ProtocolError,
    StreamContext,
    parse_frame_header,
)

__all__ = ["Frame", "FrameTracker"]

HELLO_SIZE = 76  # transport/auth.py: the fixed-size hello each side sends first
AUTH_FRAME_HEADER = 3  # u8 kind, u16 length


class Frame:
    """A frame seen by a tracker: type, stream offset of its first byte, length so far
    (header and payload; a RAM_RUN's page data are added once its payload is parsed)."""

    __slots__ = ("length", "start", "type")

    def __init__(self, frame_type: int, start: int, length: int) -> None:
        self.type, self.start, self.length = frame_type, start, length


class FrameTracker:
    """Follows the framing of one direction of a plain connection.

    Phases: the 76-byte hello; auth frames (u8 kind, u16 length, payload) until the next
    byte is the stream header's 'P'; the 16-byte stream header; then frames (8-byte
    header, payload, and for RAM_RUN the page data). Only headers and payloads are
    parsed; page data are skipped by length. A TLS connection (or anything unexpected)
    turns it off: cuts by byte count still work there."""

    def __init__(self, page_sizes: dict[int, int]) -> None:
        self.page_sizes = page_sizes  # block index -> page size, shared by the proxy
        self.enabled = True
        self.phase = "hello"
        self.need = HELLO_SIZE
        self.buffer = bytearray()
        self.position = 0  # bytes consumed
        self.current: Frame | None = None
        self.header = b""  # the current frame's header
        self.recent: collections.deque[Frame] = collections.deque(maxlen=256)

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Consume `data`; return the frames whose header completed in it."""
        started: list[Frame] = []
        view = memoryview(data)
        while view and self.enabled:
            if self.phase == "skip":
                take = min(self.need, len(view))
                self.need -= take
                self.position += take
                view = view[take:]
                if self.need == 0:
                    self._expect_frame()
                continue
            take = min(self.need - len(self.buffer), len(view))
            self.buffer += view[:take]
            view = view[take:]
            self.position += take
            if len(self.buffer) == self.need:
                block = bytes(self.buffer)
                self.buffer.clear()
                frame = self._advance(block)
                if frame is not None:
                    started.append(frame)
        if not self.enabled:
            self.position += len(view)
        return started

    def _advance(self, block: bytes) -> Frame | None:
        phase = self.phase
        if phase == "hello":
            if not block.startswith(b"POSTCOPY"):
                self.enabled = False  # TLS (0x16...) or not ours: bytes only
            self.phase, self.need = "auth-or-stream", 1
        elif phase == "auth-or-stream":
            if block == b"P":
                self.phase, self.need = "stream-header", STREAM_HEADER_SIZE - 1
            else:
                self.phase, self.need = "auth-header", AUTH_FRAME_HEADER - 1
        elif phase == "auth-header":
            length = struct.unpack(">H", block)[0]
            self.phase, self.need = ("auth-payload", length) if length else ("auth-or-stream", 1)
        elif phase == "auth-payload":
            self.phase, self.need = "auth-or-stream", 1
        elif phase == "stream-header":
            self._expect_frame()
        elif phase == "frame-header":
            try:
                header = parse_frame_header(block, None)
                self.header = block
            except ProtocolError:
                self.enabled = False
                return None
            frame = Frame(int(header.type), self.position - FRAME_HEADER_SIZE, 8 + header.length)
            self.current = frame
            self.recent.append(frame)
            if header.length:
                self.phase, self.need = "payload", header.length
            else:
                self._expect_frame()
            return frame
        elif phase == "payload":
            extra = 0
            assert self.current is not None
            if self.current.type == FrameType.HANDSHAKE:
                self._learn_blocks(self.header, block)
            elif self.current.type == FrameType.RAM_RUN:
                extra = self._ram_data_length(block)
            if extra:
                self.current.length += extra
                self.phase, self.need = "skip", extra
            else:
                self._expect_frame()
        return None

    def _expect_frame(self) -> None:
        self.phase, self.need = "frame-header", FRAME_HEADER_SIZE

    def _learn_blocks(self, header: bytes, payload: bytes) -> None:
        try:
            message = StreamContext(Direction.MAIN).parse_payload(
                parse_frame_header(header, None), payload
            )
        except ProtocolError:
            return
        if isinstance(message, Handshake):
            for index, block in enumerate(message.blocks):
                self.page_sizes[index] = block.page_size

    def _ram_data_length(self, payload: bytes) -> int:
        block = struct.unpack_from(">H", payload, 0)[0]
        count = struct.unpack_from(">I", payload, 10)[0]
        zeros = int(np.unpackbits(np.frombuffer(payload[14:], dtype=np.uint8)).sum())
        page_size = self.page_sizes.get(block)
        if page_size is None:  # a recovery connection before any Handshake was seen
            self.enabled = False
            return 0
        return (count - zeros) * page_size

    def frame_at(self, position: int) -> Frame | None:
        """The frame holding stream byte `position` (0-based), if it is still known."""
        for frame in reversed(self.recent):
            if frame.start <= position:
                return frame if position < frame.start + frame.length else None
        return None
