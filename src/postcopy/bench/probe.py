"""Limit probes: small programs that measure what the hardware allows, one per process.

The bench runs each probe as `python -m postcopy.bench.probe MODE ...` on the side of the
link where the real migration runs the same work (inside that side's network namespace),
so a limit is measured between the same two endpoints as the migration it bounds:

- `sink` / `send`: a plain TCP transfer source -> destination, Python `sendall` of 1 MiB
  chunks from a prefilled buffer, `recv_into` a reused 1 MiB buffer: the line rate.
- `fill`: first touch of a fresh anonymous mapping of the guest's size with ctypes.memset,
  with MADV_NOHUGEPAGE and with MADV_HUGEPAGE: how fast the destination can fill memory.
- `page-server` / `fault-rtt`: a host thread faults on MISSING-registered memory, a
  handler thread reads the fault, sends an 8-byte request over the link to the page
  server in another process, receives the 4 KiB reply and places it with UFFDIO_COPY:
  the raw fault round trip that every postcopy page request pays at least.

Listening probes print one JSON line {"port": N} as soon as they listen; every probe
prints its result as one JSON line on stdout and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from typing import Any

import numpy as np

from postcopy.linux.memory import Advice, EventFd, Mapping
from postcopy.linux.userfaultfd import PageFault, RegisterMode, UserfaultFd

CHUNK = 1 << 20
PAGE = 4096
REQUEST = struct.Struct("<Q")
ACK = b"k"


def _say(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _listen(address: str) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))
    server.listen(1)
    _say({"port": server.getsockname()[1]})
    return server


def _accept(server: socket.socket, timeout: float) -> socket.socket:
    server.settimeout(timeout)
    connection, _ = server.accept()
    connection.settimeout(None)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.close()
    return connection


def _connect(address: str, port: int) -> socket.socket:
    connection = socket.create_connection((address, port), timeout=30)
    connection.settimeout(None)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _recv_exactly(connection: socket.socket, view: memoryview) -> bool:
    """Fill `view` from the socket; False on a clean EOF before the first byte."""
    received = 0
    while received < len(view):
        count = connection.recv_into(view[received:])
        if count == 0:
            if received == 0:
                return False
            raise ConnectionError(f"peer closed after {received} of {len(view)} bytes")
        received += count
    return True


# -- line rate ---------------------------------------------------------------------------------


def sink(address: str, size: int, timeout: float) -> dict[str, Any]:
    """Receive `size` bytes into a reused 1 MiB buffer, then acknowledge."""
    connection = _accept(_listen(address), timeout)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    received = 0
    started = time.perf_counter()
    with connection:
        while received < size:
            count = connection.recv_into(view[: min(CHUNK, size - received)])
            if count == 0:
                raise ConnectionError(f"sender closed after {received} of {size} bytes")
            received += count
        seconds = time.perf_counter() - started
        connection.sendall(ACK)
    return {"received": received, "seconds": seconds}


def send(address: str, port: int, size: int) -> dict[str, Any]:
    """Send `size` bytes in 1 MiB sendall calls; time until the receiver acknowledged."""
    # random bytes, so nothing on the path can take a shortcut on zeros
    buffer = np.random.default_rng(7).integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    view = memoryview(buffer)
    with _connect(address, port) as connection:
        started = time.perf_counter()
        left = size
        while left > 0:
            chunk = min(CHUNK, left)
            connection.sendall(view[:chunk])
            left -= chunk
        if connection.recv(1) != ACK:
            raise ConnectionError("receiver did not acknowledge the transfer")
        seconds = time.perf_counter() - started
    return {"bytes": size, "seconds": seconds, "rate": size / seconds}


# -- fresh-memory fill rate --------------------------------------------------------------------


def fill(size: int, passes: int = 2) -> dict[str, Any]:
    """First touch of `size` bytes of fresh anonymous memory, 4 KiB pages and THP."""
    result: dict[str, Any] = {"bytes": size, "passes": passes}
    best = {"4k": float("inf"), "thp": float("inf")}
    # In a VM whose own memory the hypervisor backs lazily (this machine kind), the first
    # touch of guest-physical memory the host never backed costs several times more than
    # that of memory the guest kernel recycled. The first pass meets whatever the kernel
    # hands out now (often host-cold); later passes reuse what the first freed (warm).
    # Alternating passes, best of each, give the warm rate; the first passes are kept.
    for number in range(passes):
        for key, advice in (("4k", Advice.NOHUGEPAGE), ("thp", Advice.HUGEPAGE)):
            with Mapping.anonymous(size) as mapping:
                mapping.madvise(advice)
                started = time.perf_counter()
                ctypes.memset(mapping.address, 0x5A, size)  # releases the GIL, faults every page
                seconds = time.perf_counter() - started
            best[key] = min(best[key], seconds)
            if number == 0:
                result[f"first_rate_{key}"] = size / seconds
    for key, seconds in best.items():
        result[f"rate_{key}"] = size / seconds
        result[f"seconds_{key}"] = seconds
    return result


# -- raw fault round trip ----------------------------------------------------------------------


def page_server(address: str, timeout: float) -> dict[str, Any]:
    """Answer every 8-byte request with a 4 KiB page until the client hangs up."""
    connection = _accept(_listen(address), timeout)
    page = np.random.default_rng(11).integers(1, 256, PAGE, dtype=np.uint8).tobytes()
    request = bytearray(REQUEST.size)
    view = memoryview(request)
    served = 0
    with connection:
        while _recv_exactly(connection, view):
            connection.sendall(page)
            served += 1
    return {"served": served}


def _percentiles(samples: list[float]) -> dict[str, float]:
    array = np.asarray(samples) * 1e6
    p50, p99 = np.percentile(array, [50, 99])
    return {
        "p50_us": round(float(p50), 2),
        "p99_us": round(float(p99), 2),
        "max_us": round(float(array.max()), 2),
        "count": int(array.size),
    }


def fault_rtt(address: str, port: int, faults: int, warmup: int) -> dict[str, Any]:
    """Fault `warmup + faults` pages one at a time from a host thread and resolve each
    through the page server; per fault, the faulting thread's wait and the handler's
    read-to-placed time."""
    pages = warmup + faults
    handler_times: list[float] = []
    failure: list[BaseException] = []
    with (
        Mapping.anonymous(pages * PAGE) as target,
        Mapping.anonymous(PAGE) as staging,
        UserfaultFd.open() as uffd,
        EventFd() as quit_event,
        _connect(address, port) as connection,
    ):
        target.madvise(Advice.NOHUGEPAGE)
        uffd.register(target.address, target.length, RegisterMode.MISSING)
        staging_view = staging.view  # staging is ours and always present: safe under the GIL

        def handle() -> None:
            poller = select.poll()
            poller.register(uffd.fileno(), select.POLLIN)
            poller.register(quit_event.fileno(), select.POLLIN)
            try:
                while True:
                    ready = poller.poll()
                    if any(fd == quit_event.fileno() for fd, _ in ready):
                        return
                    for event in uffd.read_events(64):
                        if not isinstance(event, PageFault):
                            continue
                        read_at = time.perf_counter()
                        connection.sendall(REQUEST.pack(event.address - target.address))
                        if not _recv_exactly(connection, staging_view):
                            raise ConnectionError("page server hung up")
                        uffd.copy(event.address, staging.address, PAGE)
                        handler_times.append(time.perf_counter() - read_at)
            except BaseException as error:  # reported by the main thread
                failure.append(error)
                uffd.unregister(target.address, target.length)  # release the faulting thread

        handler = threading.Thread(target=handle, name="fault-handler", daemon=True)
        handler.start()
        fault_times: list[float] = []
        memset = ctypes.memset
        clock = time.perf_counter
        try:
            for index in range(pages):
                if failure:
                    break
                started = clock()
                memset(target.address + index * PAGE, 1, 1)  # GIL released while it waits
                fault_times.append(clock() - started)
        finally:
            quit_event.write(1)
            handler.join(10)
        if failure:
            raise failure[0]
    return {
        "fault": _percentiles(fault_times[warmup:]),
        "handler": _percentiles(handler_times[warmup:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m postcopy.bench.probe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cpu", type=int, help="run on this CPU only (sched_setaffinity)")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("sink")
    p.add_argument("--bind", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("send")
    p.add_argument("--connect", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p = sub.add_parser("fill")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--passes", type=int, default=2)
    p = sub.add_parser("page-server")
    p.add_argument("--bind", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("fault-rtt")
    p.add_argument("--connect", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--faults", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.mode == "sink":
        result = sink(args.bind, args.bytes, args.timeout)
    elif args.mode == "send":
        result = send(args.connect, args.port, args.bytes)
    elif args.mode == "fill":
        result = fill(args.bytes, args.passes)
    elif args.mode == "page-server":
        result = page_server(args.bind, args.timeout)
    else:
        result = fault_rtt(args.connect, args.port, args.faults, args.warmup)
    _say({"result": result, "pid": os.getpid()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
