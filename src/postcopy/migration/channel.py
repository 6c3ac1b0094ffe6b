"""Frames over a connection: the glue between the sans-IO codec and a transport.

StreamWriter sends whole frames (several threads may share one, a lock keeps frames whole)
and sends RAM runs straight from guest memory with one scatter-gather send. `send_soon`
is for heartbeats: it never blocks (a stuck link must not stop the thread that watches
for one) and goes out right after the frame being sent when the channel is busy.
StreamReader reads frames; for a RAM run it returns the checked header and the caller reads
the page data itself, into guest RAM or a staging buffer, so no copy is made in between.
BufferedStreamReader, for the channels of small frames on a page request's path (the return
path, the preempt channel), takes in one receive what has arrived instead of one receive
per header, payload and page.
It records when the last frame arrived (`last_activity`), for the heartbeat.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from postcopy.ram import Bitmap, RamBlock, runs
from postcopy.transport import Connection, ConnectionClosed
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

# In postcopy the main connection carries the push one way and the page requests the
# other, and a TCP socket has one lock for both: a send or a receive holds it while it
# copies, so a 2 MiB run sent or received in one call kept a page request waiting for the
# copy (~0.5-1 ms here) on either side. The push's runs cross in pieces of this size.
SHARED_SOCKET_PIECE = 256 << 10
SEND_NOW_BYTES = 80 << 10  # frames up to this size are sent keeping the GIL (send_now)


class StreamWriter:
    def __init__(self, connection: Connection, direction: Direction) -> None:
        self.connection = connection
        self._encoder = Encoder(direction)
        self._lock = threading.Lock()
        self._soon: Message | None = None  # a heartbeat waiting for the channel
        # RAM runs go out in sends of at most this many bytes (0: one send per run)
        self.piece_bytes = 0

    def send_stream_header(self) -> None:
        self._send([self._encoder.stream_header()])

    def send(self, message: Message) -> int:
        with self._lock:
            frame = self._encoder.encode(message)
            self._send_frame(frame)
            self._send_waiting()
        return len(frame)

    def send_req_pages(self, block: int, first_page: int, page_count: int) -> int:
        """`send(ReqPages(block, first_page, page_count))` without the message object
        (the fault thread's request: a page request's critical path)."""
        with self._lock:
            frame = self._encoder.req_pages_frame(block, first_page, page_count)
            self._send_frame(frame)
            self._send_waiting()
        return len(frame)

    def _send_frame(self, frame: bytes) -> None:
        """With the lock held: a small frame (a page request, a PONG, a requested page)
        goes out keeping the GIL (`Connection.send_now`), the rest as usual. Given away
        around the send, the GIL came back to a page request's thread after the threads
        that took it meanwhile (perf, 1 GiB memtouch postcopy from the start: the fault
        thread's waits right after its REQ_PAGES, p99 ~0.5 ms)."""
        sent = self.connection.send_now(frame) if len(frame) <= SEND_NOW_BYTES else 0
        if sent < len(frame):
            self.connection.send_all([memoryview(frame)[sent:]] if sent else [frame])

    def send_soon(self, message: Message) -> bool:
        """Send a small, stateless frame (PING, PONG) without blocking: at once if the
        channel is free and the socket has room, else right after the frame another
        thread is sending (a newer one replaces one still waiting). True if sent now."""
        if not self._lock.acquire(blocking=False):
            self._soon = message
            return False
        try:
            try:
                _, ready, _ = select.select([], [self.connection.fileno()], [], 0)
            except (OSError, ValueError):
                ready = []
            if not ready:
                self._soon = message
                return False
            frame = self._encoder.encode(message)
            self.connection.send_all([frame])
            return True
        finally:
            self._lock.release()

    def _send_waiting(self) -> None:
        """With the lock held, after a frame: the heartbeat that waited for it, if any."""
        message, self._soon = self._soon, None
        if message is not None:
            frame = self._encoder.encode(message)
            self.connection.send_all([frame])

    def send_ram_run(self, block_index: int, block: RamBlock, first_page: int, zero: Bitmap) -> int:
        """Send pages first_page.. of `block`: zero pages as markers, the rest from guest RAM.

        Returns the bytes put on the wire. The guest may write the pages meanwhile; the dirty
        log catches such writes, so the copy that crosses is never the last word on a page.
        """
        header = self._encoder.ram_run_header(block_index, first_page, zero, block.page_size)
        buffers: list[bytes | memoryview] = [header]
        normal = zero.size - int(np.count_nonzero(zero))
        if normal == zero.size:  # the common case: every page has data, one buffer
            buffers.append(block.page_view(first_page, normal))
        elif normal:
            normal_starts, normal_lengths = runs(~zero)
            for start, length in zip(normal_starts.tolist(), normal_lengths.tolist(), strict=True):
                buffers.append(block.page_view(first_page + start, length))
        piece = self.piece_bytes
        # a huge page crosses in one send: in pieces, 1 GiB memtouch on hugetlbfs blocked
        # its vCPU longer (worst-vCPU blocktime median 88 vs 61 ms, 8 runs each, noisy)
        if piece and block.page_size < piece < normal * block.page_size:
            self._send_in_pieces(buffers, piece)
        else:
            self._send(buffers)
        return len(header) + normal * block.page_size

    def _send_in_pieces(self, buffers: list[bytes | memoryview], piece: int) -> None:
        """One frame, sent in sends of at most `piece` bytes (SHARED_SOCKET_PIECE)."""
        with self._lock:
            batch: list[bytes | memoryview] = []
            room = piece
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                while view.nbytes:
                    take = view[:room]
                    batch.append(take)
                    room -= take.nbytes
                    view = view[take.nbytes :]
                    if room == 0:
                        self.connection.send_all(batch)
                        batch, room = [], piece
            if batch:
                self.connection.send_all(batch)
            self._send_waiting()

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

    def send_ram_page(
        self,
        block_index: int,
        block: RamBlock,
        page: int,
        zero: bool,
        data: bytes | None = None,
    ) -> int:
        """`send_ram_run` for one page (a requested page), without numpy, in one send that
        keeps the GIL (`_send_frame`). `data`: the page's content, if the caller has it
        (`bytes(block.page_view(page, 1))`)."""
        header = self._encoder.ram_page_header(block_index, page, zero, block.page_size)
        if not zero:
            header += bytes(block.page_view(page, 1)) if data is None else data
        with self._lock:
            self._send_frame(header)
            self._send_waiting()
        return len(header)

    def _send(self, buffers: list[Any]) -> None:
        with self._lock:
            self.connection.send_all(buffers)
            self._send_waiting()


class StreamReader:
    def __init__(
        self, connection: Connection, direction: Direction, context: StreamContext
    ) -> None:
        self.connection = connection
        self.direction = direction
        self.context = context
        self._header = bytearray(FRAME_HEADER_SIZE)
        self.bytes_received = 0
        self.last_activity = time.monotonic()

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
        self.last_activity = time.monotonic()
        return self.context.parse_payload(header, payload)

    def read_data_into(self, view: memoryview) -> None:
        self.connection.recv_exact_into(view)
        self.bytes_received += len(view)
        self.last_activity = time.monotonic()


class BufferedStreamReader(StreamReader):
    """A StreamReader that receives into a buffer of its own: one receive takes whatever
    has arrived, often a whole frame with its page (a requested page is one sendmsg), where
    StreamReader makes three, each a system call and a hand-over of the GIL on the page
    request's path. Frame data beyond what is buffered is received straight into the
    caller's view, as StreamReader does. Nothing here reads or writes guest RAM: a page is
    copied from this buffer into the caller's view (a staging buffer), never into RAM that
    can be missing (the GIL rule)."""

    def __init__(
        self,
        connection: Connection,
        direction: Direction,
        context: StreamContext,
        buffer_size: int = 64 << 10,
    ) -> None:
        super().__init__(connection, direction, context)
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._start = 0  # buffered bytes are _buffer[_start:_end]
        self._end = 0

    def read_stream_header(self) -> int:
        data = self._take(STREAM_HEADER_SIZE)
        self.bytes_received += len(data)
        return parse_stream_header(data, self.direction)

    def read(self) -> Message | RamRunHeader:
        if self._end - self._start < FRAME_HEADER_SIZE <= len(self._buffer):
            self._fill(FRAME_HEADER_SIZE)
        # a page request's frame (REQ_PAGES, a one-page RAM_RUN) in one step, else as usual
        hot = self.context.parse_hot(self._buffer, self._start, self._end - self._start)
        if hot is not None:
            message, size = hot
            self._start += size
            self.bytes_received += size
            self.last_activity = time.monotonic()
            return message
        header = parse_frame_header(self._take(FRAME_HEADER_SIZE), self.direction)
        payload = self._take(header.length) if header.length else b""
        self.bytes_received += FRAME_HEADER_SIZE + header.length
        self.last_activity = time.monotonic()
        return self.context.parse_payload(header, payload)

    def read_data_into(self, view: memoryview) -> None:
        self._read_into(view)
        self.bytes_received += len(view)
        self.last_activity = time.monotonic()

    def _read_into(self, view: memoryview) -> None:
        """Fill `view`: first from the buffer, the rest straight from the connection."""
        target = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        buffered = min(self._end - self._start, target.nbytes)
        target[:buffered] = self._view[self._start : self._start + buffered]
        self._start += buffered
        if buffered < target.nbytes:
            self.connection.recv_exact_into(target[buffered:])

    def _fill(self, size: int) -> None:
        """Receive until at least `size` (<= the buffer's size) bytes are buffered."""
        held = self._end - self._start
        if self._start:  # move what is left to the front
            self._buffer[:held] = self._view[self._start : self._end]
            self._start, self._end = 0, held
        while self._end < size:
            count = self.connection.recv_into(self._view[self._end :])
            if count == 0:
                raise ConnectionClosed(
                    f"{self.connection.peer} closed the connection after "
                    f"{self._end} of {size} bytes"
                )
            self._end += count

    def _take(self, size: int) -> bytes:
        """The next `size` bytes, receiving as needed."""
        if size > len(self._buffer):  # a large frame (a bitmap): past the buffer
            large = bytearray(size)
            self._read_into(memoryview(large))
            return bytes(large)
        if self._end - self._start < size:
            self._fill(size)
        data = bytes(self._view[self._start : self._start + size])
        self._start += size
        return data
