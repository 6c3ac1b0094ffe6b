"""Frames of the request device: what clients, the service front and the device exchange.

Sans-IO (bytes in, frames out; frames in, bytes out), in the shape of postcopy.wire: no
sockets here. Every frame, in every direction, is one envelope:

    u16 length (of the whole frame, 16..MAX_FRAME) | u8 kind | u8 flags | u32 reserved (0)
    u64 id | body (length - 16 bytes)

- A request (client -> front -> device -> guest): kind 1..127, the guest's operation
  (the kvstore guest's are in postcopy.vm.kvstore); `id` is the client's request id
  between a client and the front, and the front's tag between the front and a device.
  Tags grow strictly along one device's stream, so "accepted up to tag H" says exactly
  which requests a device (and so the VM) holds.
- An answer (guest -> device -> front -> client): kind ANSWER, flags = the guest's status,
  `id` the request's tag or id, body the answer's value.
- HELLO (device -> front): body u64 generation, u64 accepted tag, u64 live (0 or 1). A
  device says it on connecting and whenever its VM starts running. generation counts the
  migrations the device state went through; the front sends to the live device of the
  highest generation, and when it switches to a new one it re-sends every unanswered
  request with a tag above that device's accepted tag (those the old one never took).

Between the guest and the device, answers travel as records (see guests/kvstore.c):
u16 low 16 bits of the tag, u8 status, u8 value length, value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

HEADER = struct.Struct("<HBBIQ")
HEADER_SIZE = HEADER.size  # 16
MAX_FRAME = 256  # a frame always fits a 1 KiB exchange block with room to spare
KIND_REQUEST_MAX = 0x7F
KIND_ANSWER = 0x80
KIND_HELLO = 0xF0
HELLO_BODY = struct.Struct("<QQQ")
RECORD_HEADER = struct.Struct("<HBB")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 4


class FrameError(ValueError):
    """Bytes that are not a valid frame; the message names the field and the value."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    flags: int
    id: int
    body: bytes = b""

    def encode(self) -> bytes:
        return encode(self.kind, self.flags, self.id, self.body)


@dataclass(frozen=True, slots=True)
class Hello:
    generation: int
    accepted: int
    live: bool

    def encode(self) -> bytes:
        body = HELLO_BODY.pack(self.generation, self.accepted, int(self.live))
        return encode(KIND_HELLO, 0, 0, body)


def encode(kind: int, flags: int, id: int, body: bytes = b"") -> bytes:
    length = HEADER_SIZE + len(body)
    if length > MAX_FRAME:
        raise FrameError(f"a frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(length, kind, flags, 0, id) + body


def check_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """(length, kind) of the frame whose header starts at `offset`; FrameError if bad."""
    length, kind, _flags, reserved, _id = HEADER.unpack_from(data, offset)
    if not HEADER_SIZE <= length <= MAX_FRAME:
        raise FrameError(f"frame length {length}: it must be {HEADER_SIZE} to {MAX_FRAME} bytes")
    if reserved:
        raise FrameError(f"frame reserved field {reserved:#x}: it must be 0")
    if kind == 0:
        raise FrameError("frame kind 0 is not a request, an answer or a hello")
    return length, kind


class FrameReader:
    """Cuts a byte stream into frames: feed() bytes, then iterate over whole frames.

    A frame that is not valid raises FrameError at the frame, after the frames before
    it; the stream is then unusable (there is no resynchronising a length-prefixed one).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer)

    def raw_frames(self) -> Iterator[bytes]:
        """Each whole, valid frame as its bytes (header included), in order."""
        buffer = self._buffer
        offset = 0
        try:
            while len(buffer) - offset >= HEADER_SIZE:
                length, _kind = check_header(buffer, offset)
                if len(buffer) - offset < length:
                    break
                frame = bytes(buffer[offset : offset + length])
                offset += length  # before the yield: a consumer may stop after this frame
                yield frame
        finally:
            del buffer[:offset]

    def frames(self) -> Iterator[Frame]:
        for raw in self.raw_frames():
            yield decode(raw)


def decode(raw: bytes) -> Frame:
    length, kind, flags, _reserved, id = HEADER.unpack_from(raw)
    return Frame(kind, flags, id, raw[HEADER_SIZE:length])


def decode_hello(frame: Frame) -> Hello:
    if frame.kind != KIND_HELLO or len(frame.body) != HELLO_BODY.size:
        raise FrameError(f"a hello has a body of {HELLO_BODY.size} bytes, not {len(frame.body)}")
    generation, accepted, live = HELLO_BODY.unpack(frame.body)
    if live not in (0, 1):
        raise FrameError(f"hello live field {live}: it must be 0 or 1")
    return Hello(generation, accepted, bool(live))


def with_id(raw: bytes, id: int) -> bytes:
    """The same frame with another id (the front's tag <-> a client's request id)."""
    return raw[:8] + id.to_bytes(8, "little") + raw[16:]


def frame_id(raw: bytes | bytearray | memoryview, offset: int = 0) -> int:
    return int.from_bytes(raw[offset + 8 : offset + 16], "little")
