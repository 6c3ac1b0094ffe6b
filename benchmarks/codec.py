"""What the wire codec costs per GiB of RAM runs, against loopback TCP carrying as much.

A stream of RAM_RUN frames of 512 pages of 4 KiB (a random quarter of the pages zero, by
default) is encoded and decoded four ways:

- encode, zero-copy: `Encoder.ram_run_header` only (the page data would go from guest RAM
  to the socket with sendmsg; it is not touched here);
- encode, whole frames: `Encoder.encode(RamRun)`, which joins header and data (a copy);
- decode, zero-copy: `parse_frame_header` + `StreamContext.parse_payload` over the stream
  in memory, skipping the page data (the I/O layer would recv_into guest RAM);
- decode, Decoder: `receive_data` in 1 MiB chunks + `next_event`; it keeps immutable chunks
  by reference and joins a run's data when it spans chunks (one copy); reported whole and
  less a baseline doing only one copy of each run's data.

In the same run a plain loopback TCP transfer of the same number of bytes (sender thread
`sendall` of 1 MiB chunks from a prefilled buffer, receiver `recv_into`) gives the link's
time; each codec figure is printed as a share of it. Codec times are CPU time of the
thread (time.thread_time); the medians of --repeat passes.

    /work/venv/bin/python benchmarks/codec.py [--gib 1] [--zero 0.25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from postcopy.wire import (
    NEED_DATA,
    BlockInfo,
    Decoder,
    Direction,
    Encoder,
    Handshake,
    RamRun,
    RamRunHeader,
    StreamContext,
    parse_frame_header,
    parse_stream_header,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4 * KiB
RUN_PAGES = 512
CHUNK = 1 * MiB
SOURCE_BYTES = 64 * MiB  # prefilled "guest RAM" the runs' data is cut from, cyclically


class Workload:
    """The runs of one benchmark: zero bitmaps, data offsets, and the encoded stream."""

    def __init__(self, wire_bytes: int, zero_share: float, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.source = rng.integers(1, 256, SOURCE_BYTES, dtype=np.uint8)  # no zero pages
        patterns = [rng.random(RUN_PAGES) < zero_share for _ in range(64)]
        self.zeros: list[npt.NDArray[np.bool_]] = []
        self.offsets: list[int] = []
        total = 0
        offset = 0
        while total < wire_bytes:
            zero = patterns[len(self.zeros) % len(patterns)]
            data_length = int(np.count_nonzero(~zero)) * PAGE
            if offset + data_length > SOURCE_BYTES:
                offset = 0
            self.zeros.append(zero)
            self.offsets.append(offset)
            offset += data_length
            total += 8 + 14 + RUN_PAGES // 8 + data_length
        self.runs = len(self.zeros)
        self.ram_bytes = self.runs * RUN_PAGES * PAGE
        self.block = BlockInfo("pc.ram", self.ram_bytes, PAGE)
        self.handshake = Handshake(frozenset({"postcopy-ram"}), (self.block,), 1)
        self.stream = self._encode_stream()

    def data(self, index: int) -> memoryview:
        zero = self.zeros[index]
        length = int(np.count_nonzero(~zero)) * PAGE
        start = self.offsets[index]
        return self.source.data[start : start + length]

    def _encode_stream(self) -> bytes:
        encoder = Encoder(Direction.MAIN)
        parts = [encoder.stream_header(), encoder.encode(self.handshake)]
        for index, zero in enumerate(self.zeros):
            parts.append(encoder.ram_run_header(0, index * RUN_PAGES, zero, PAGE))
            parts.append(self.data(index))  # type: ignore[arg-type]
        return b"".join(parts)

    @property
    def first_run(self) -> int:
        """Offset of the first RAM_RUN frame in the stream (after header and Handshake)."""
        return 16 + len(Encoder(Direction.MAIN).encode(self.handshake))


# -- the codec paths ---------------------------------------------------------------------------


def encode_zero_copy(work: Workload) -> None:
    encoder = Encoder(Direction.MAIN, blocks=[work.block])
    for index, zero in enumerate(work.zeros):
        encoder.ram_run_header(0, index * RUN_PAGES, zero, PAGE)


def encode_whole(work: Workload) -> None:
    encoder = Encoder(Direction.MAIN, blocks=[work.block])
    for index, zero in enumerate(work.zeros):
        encoder.encode(RamRun(0, index * RUN_PAGES, zero, work.data(index)))


def decode_zero_copy(work: Workload) -> None:
    view = memoryview(work.stream)
    parse_stream_header(view[:16], Direction.MAIN)
    context = StreamContext(Direction.MAIN, blocks=[work.block])
    offset = 16
    end = len(view)
    while offset < end:
        header = parse_frame_header(view[offset : offset + 8], Direction.MAIN)
        offset += 8
        result = context.parse_payload(header, view[offset : offset + header.length])
        offset += header.length
        if isinstance(result, RamRunHeader):
            offset += result.data_length  # recv_into guest RAM: not the codec's time


def decode_decoder(work: Workload) -> None:
    view = memoryview(work.stream)
    decoder = Decoder(Direction.MAIN, blocks=[work.block])
    for start in range(0, len(view), CHUNK):
        decoder.receive_data(view[start : start + CHUNK])
        while decoder.next_event() is not NEED_DATA:
            pass


def one_copy_per_run(work: Workload) -> None:
    """The data movement a decoder returning owned bytes cannot avoid: each run copied once.

    (The Decoder keeps immutable input chunks by reference and copies a run only when it
    spans chunks: with 1 MiB chunks and 1.5 MiB runs, nearly always.)
    """
    view = memoryview(work.stream)
    offset = work.first_run
    frame = 8 + 14 + RUN_PAGES // 8
    for zero in work.zeros:
        length = int(np.count_nonzero(~zero)) * PAGE
        bytes(view[offset + frame : offset + frame + length])
        offset += frame + length


def cpu_seconds(action: Callable[[Workload], None], work: Workload, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.thread_time()
        action(work)
        times.append(time.thread_time() - started)
    return statistics.median(times)


# -- the link ----------------------------------------------------------------------------------


def tcp_seconds(total: int) -> float:
    """Wall time of a loopback TCP transfer of total bytes, 1 MiB sendall / recv_into."""
    source = np.random.default_rng(2).integers(0, 256, SOURCE_BYTES, dtype=np.uint8)
    sink = bytearray(CHUNK)
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender_socket = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
        failure: list[BaseException] = []

        def send() -> None:
            try:
                view = source.data
                sent = 0
                while sent < total:
                    start = sent % SOURCE_BYTES
                    size = min(CHUNK, total - sent, SOURCE_BYTES - start)
                    sender_socket.sendall(view[start : start + size])
                    sent += size
            except BaseException as error:
                failure.append(error)

        sender = threading.Thread(target=send, name="tcp-sender")
        try:
            started = time.perf_counter()
            sender.start()
            received = 0
            while received < total:
                count = receiver.recv_into(sink, min(CHUNK, total - received))
                if count == 0:
                    raise ConnectionError("sender closed early")
                received += count
            elapsed = time.perf_counter() - started
        finally:
            sender.join()
            sender_socket.close()
            receiver.close()
        if failure:
            raise failure[0]
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="stream size in GiB")
    parser.add_argument("--zero", type=float, default=0.25, help="share of zero pages")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Workload(int(args.gib * GiB), args.zero)
    print(
        f"stream: {len(work.stream) / GiB:.3f} GiB on the wire, {work.runs} RAM_RUN frames of "
        f"{RUN_PAGES} x 4 KiB pages ({args.zero:.0%} zero), {work.ram_bytes / GiB:.2f} GiB of RAM"
    )
    tcp = statistics.median(tcp_seconds(len(work.stream)) for _ in range(args.repeat))
    print(
        f"loopback TCP, same bytes: {tcp * 1e3:8.1f} ms  "
        f"({len(work.stream) / tcp / 1e9:.2f} GB/s)\n"
    )

    rows = [
        ("encode, zero-copy (ram_run_header)", encode_zero_copy),
        ("encode, whole frames (encode)", encode_whole),
        ("decode, zero-copy (parse_payload)", decode_zero_copy),
        ("decode, Decoder (with its copies)", decode_decoder),
    ]
    results = {}
    print(f"{'path':40} {'CPU ms':>9} {'us/frame':>9} {'% of TCP':>9}")
    for name, action in rows:
        seconds = cpu_seconds(action, work, args.repeat)
        results[name] = seconds
        print(
            f"{name:40} {seconds * 1e3:9.1f} {seconds / work.runs * 1e6:9.2f} {seconds / tcp:9.2%}"
        )
    copies = cpu_seconds(one_copy_per_run, work, args.repeat)
    decoder_net = results["decode, Decoder (with its copies)"] - copies
    print(
        f"{'  one copy of each run (baseline)':40} {copies * 1e3:9.1f} {'':9} {copies / tcp:9.2%}"
    )
    print(
        f"{'  Decoder less its copies':40} {decoder_net * 1e3:9.1f} "
        f"{decoder_net / work.runs * 1e6:9.2f} {decoder_net / tcp:9.2%}"
    )
    zero_copy = (
        results["encode, zero-copy (ram_run_header)"] + results["decode, zero-copy (parse_payload)"]
    )
    verdict = "met" if zero_copy / tcp < 0.10 else "NOT met"
    print(
        f"\nzero-copy encode + decode: {zero_copy / tcp:.2%} of the TCP time "
        f"(target < 10%: {verdict})"
    )


if __name__ == "__main__":
    main()
