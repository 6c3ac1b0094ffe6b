"""The binary layouts of the stream: struct formats of headers and fixed payload parts.

Shared by the payload readers (`readers`), the writers (`writers`) and the header functions
(`frames`). All multi-byte integers are big-endian; the byte layout is in docs/PROTOCOL.md.
"""

from __future__ import annotations

import struct
from typing import Final

from postcopy.wire.messages import (
    FRAME_HEADER_SIZE,
    MIGRATION_ID_BYTES,
    RAM_RUN_FIXED_PAYLOAD,
    RECV_BITMAP_FIXED_PAYLOAD,
)

STREAM_HEADER_SIZE: Final = 16

STREAM_HEADER: Final = struct.Struct(">8sII")
FRAME_HEADER: Final = struct.Struct(">BBHI")
RAM_RUN: Final = struct.Struct(">HQI")
ADVISE: Final = struct.Struct(">QQ")
DISCARD_HEAD: Final = struct.Struct(">HH")
DISCARD_RANGE: Final = struct.Struct(">QQ")
REQ_PAGES_NAMED: Final = struct.Struct(">HQI")
REQ_PAGES: Final = struct.Struct(">QI")
RECV_BITMAP: Final = struct.Struct(">HQ")
RESUME_REQUEST: Final = struct.Struct(">16sI")
HANDSHAKE_HEAD: Final = struct.Struct(">II")
BLOCK_TAIL: Final = struct.Struct(">QI")
U8: Final = struct.Struct(">B")
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")

assert RAM_RUN.size == RAM_RUN_FIXED_PAYLOAD
assert RECV_BITMAP.size == RECV_BITMAP_FIXED_PAYLOAD
assert RESUME_REQUEST.size == MIGRATION_ID_BYTES + 4
assert FRAME_HEADER.size == FRAME_HEADER_SIZE
assert STREAM_HEADER.size == STREAM_HEADER_SIZE

MIN_BLOCK_ENTRY: Final = 1 + 1 + BLOCK_TAIL.size  # name length, one name byte, length, page size
