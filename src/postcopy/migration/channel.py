"""Frames over a connection: the glue between the sans-IO codec and a transport.

StreamWriter sends whole frames (several threads may share one, a lock keeps frames whole)
and sends RAM runs straight from guest memory with one scatter-gather send.
StreamReader reads frames; for a RAM run it returns the checked header and the caller reads
the page data itself, into guest RAM or a staging buffer, so no copy is made in between.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from postcopy.ram import Bitmap, RamBlock, runs
from postcopy.transport import Connection
from postcopy.wire import (
    FRAME_HEADER_SIZE,
    STREAM_HEADER_SIZE,
    Direction,
    Encoder,
    Message,
    RamRunHeader,
    StreamContext,
    parse_frame_header,
    parse_stream_header,
)


class StreamWriter:
    def __init__(self, connection: Connection, direction: Direction) -> None:
        self.connection = connection
        self._encoder = Encoder(direction)
        self._lock = threading.Lock()

    def send_stream_header(self) -> None:
        self._send([self._encoder.stream_header()])

    def send(self, message: Message) -> int:
        with self._lock:
            frame = self._encoder.encode(message)
            self.connection.send_all([frame])
        return len(frame)

    def send_ram_run(self, block_index: int, block: RamBlock, first_page: int, zero: Bitmap) -> int:
        """Send pages first_page.. of `block`: zero pages as markers, the rest from guest RAM.

        Returns the bytes put on the wire. The guest may write the pages meanwhile; the dirty
        log catches such writes, so the copy that crosses is never the last word on a page.
        """
        header = self._encoder.ram_run_header(block_index, first_page, zero, block.page_size)
        buffers: list[bytes | memoryview] = [header]
        normal_starts, normal_lengths = runs(~zero)
        for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
            buffers.append(block.page_view(first_page + start, length))
        size = len(header) + int(np.count_nonzero(~zero)) * block.page_size
        self._send(buffers)
        return size

    def send_discards(
        self, block_index: int, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
    ) -> int:
        """DISCARD the runs (starts[i], lengths[i]) of a block: every frame in one send.
        Returns the pages discarded."""
        with self._lock:
            data = self._encoder.discard_frames(block_index, starts, lengths)
            if data:
                self.connection.send_all([data])
        return int(lengths.sum())

    def send_ram_page(self, block_index: int, block: RamBlock, page: int, zero: bool) -> int:
        """`send_ram_run` for one page (a requested page), without numpy."""
        header = self._encoder.ram_page_header(block_index, page, zero, block.page_size)
        if zero:
            self._send([header])
            return len(header)
        self._send([header, block.page_view(page, 1)])
        return len(header) + block.page_size

    def _send(self, buffers: list[Any]) -> None:
        with self._lock:
            self.connection.send_all(buffers)


class StreamReader:
    def __init__(
        self, connection: Connection, direction: Direction, context: StreamContext
    ) -> None:
        self.connection = connection
        self.direction = direction
        self.context = context
        self._header = bytearray(FRAME_HEADER_SIZE)
        self.bytes_received = 0

    def read_stream_header(self) -> int:
        data = self.connection.recv_exact(STREAM_HEADER_SIZE)
        self.bytes_received += len(data)
        return parse_stream_header(data, self.direction)

    def read(self) -> Message | RamRunHeader:
        """The next frame, checked. For a RamRunHeader, read its data with `read_data_into`."""
        self.connection.recv_exact_into(memoryview(self._header))
        header = parse_frame_header(self._header, self.direction)
        payload = self.connection.recv_exact(header.length) if header.length else b""
        self.bytes_received += FRAME_HEADER_SIZE + header.length
        return self.context.parse_payload(header, payload)

    def read_data_into(self, view: memoryview) -> None:
        self.connection.recv_exact_into(view)
        self.bytes_received += len(view)
