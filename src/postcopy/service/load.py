"""The load generator behind `postcopy load`: N clients against a kvstore service, every
answer checked against a model of the store (postcopy.service.checker).

Each client has its own connection and its own keys: of the working set (keys
key_offset+1 .. key_offset+keys), client c owns the keys whose rank r = 0, 1, ... maps to
key_offset + 1 + r * clients + c, drawn uniformly or from a Zipf distribution over r (rank
0 the hottest). Operations are drawn from the read/write mix; a PUT writes a value no
other request writes (client, request id and a hash), so a stale answer cannot pass.

Open loop (rate > 0): requests leave at `rate` per second in all, spread round-robin over
the clients, whatever the answers do (a stalled service shows as latency, not as fewer
requests). Closed loop (rate 0): each client keeps `depth` requests in flight.

Every time is time.monotonic(), the clock the migration's timelines use, so the two can
be drawn on one axis. Output (write_jsonl): a header line, one line per request (sent,
answered, latency, verdict), then the summary.
"""

from __future__ import annotations

import json
import math
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from postcopy.service.checker import Checker, Request, Summary
from postcopy.service.sockets import connect
from postcopy.vm import kvstore as kv
from postcopy.vm import reqframe
from postcopy.vm.reqframe import FrameReader

SERIES_BIN = 0.01  # seconds per bin of the latency series kept in the summary
MAX_BURST = 2000  # requests sent per loop turn at most, so answers are read in between
_VALUE_HEAD = struct.Struct("<QQ")


class LoadError(RuntimeError):
    """The load cannot run (no service, a bad answer to INFO); one line for the user."""


@dataclass
class LoadOptions:
    address: str
    clients: int = 8
    rate: float = 5000.0  # requests per second in all; 0 = closed loop
    depth: int = 1  # closed loop: requests in flight per client
    duration: float | None = 10.0  # seconds of sending; None = until stop()
    keys: int = 100_000
    key_offset: int = 0
    distribution: str = "zipf"  # or "uniform"
    zipf_s: float = 0.99
    read: float = 0.9  # fraction of GETs
    delete: float = 0.01  # fraction of DELETEs; the rest are PUTs
    value_size: int = 16
    seed: int = 1
    grace: float = 10.0  # after the last send, seconds to wait for answers
    preloaded: int | None = None  # None: ask the guest (INFO)
    connect_timeout: float = 30.0

    def check(self) -> None:
        if self.clients < 1:
            raise ValueError(f"--clients {self.clients}: at least one client")
        if not (math.isfinite(self.rate) and self.rate >= 0):  # float() reads "nan" too
            raise ValueError(f"--rate {self.rate}: a rate is not negative (0 = closed loop)")
        if self.depth < 1:
            raise ValueError(f"--depth {self.depth}: at least one request in flight")
        if self.keys < self.clients:
            raise ValueError(f"--keys {self.keys}: at least one key per client")
        if self.distribution not in ("zipf", "uniform"):
            raise ValueError(f"--distribution {self.distribution!r}: zipf or uniform")
        if not (math.isfinite(self.zipf_s) and self.zipf_s > 0):
            raise ValueError(f"zipf exponent {self.zipf_s}: it must be above 0")
        if not (0 <= self.read <= 1 and 0 <= self.delete <= 1 and self.read + self.delete <= 1):
            raise ValueError(
                f"--read {self.read} and --delete {self.delete}: fractions summing to 1 at most"
            )
        if not 1 <= self.value_size <= kv.VALUE_MAX:
            raise ValueError(f"--value-size {self.value_size}: 1 to {kv.VALUE_MAX} bytes")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"--duration {self.duration}: above 0")
        if not (math.isfinite(self.grace) and self.grace >= 0):
            raise ValueError(f"--grace {self.grace}: not negative")


class KeyChooser:
    """Operations and keys of each client, drawn in blocks with numpy."""

    def __init__(self, options: LoadOptions) -> None:
        self._options = options
        self._rng = np.random.default_rng(options.seed)
        self._ranks = options.keys // options.clients
        if options.distribution == "zipf":
            weights = 1.0 / np.arange(1, self._ranks + 1) ** options.zipf_s
            self._cdf: np.ndarray | None = np.cumsum(weights / weights.sum())
        else:
            self._cdf = None
        self._block: list[tuple[int, int]] = []

    def next(self, client: int) -> tuple[int, int]:
        """(operation, key) of the next request of `client`."""
        if not self._block:
            self._refill()
        op, rank = self._block.pop()
        return op, self._options.key_offset + 1 + rank * self._options.clients + client

    def _refill(self, size: int = 8192) -> None:
        if self._cdf is None:
            ranks = self._rng.integers(0, self._ranks, size)
        else:
            ranks = np.minimum(np.searchsorted(self._cdf, self._rng.random(size)), self._ranks - 1)
        draw = self._rng.random(size)
        read, delete = self._options.read, self._options.delete
        ops = np.where(draw < read, kv.GET, np.where(draw < read + delete, kv.DELETE, kv.PUT))
        self._block = list(zip(ops.tolist(), ranks.tolist(), strict=True))


def put_value(client: int, id: int, size: int) -> bytes:
    """A value no other request writes: client and id, then a hash, to `size` bytes."""
    head = _VALUE_HEAD.pack((client << 48) | id, kv.mix64((client << 48) ^ id))
    return (head * (size // 16 + 1))[:size]


class _Client:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.reader = FrameReader()
        self.out = bytearray()
        self.next_id = 1
        self.in_flight = 0


class LoadGenerator:
    """Runs the load of `options`; run() returns the summary. stop() (any thread, or a
    signal handler) ends the sending early; answers are then awaited for `grace`."""

    def __init__(
        self,
        options: LoadOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        options.check()
        self.options = options
        self._clock = clock
        self._progress = progress
        self._stopping = False
        self.checker: Checker | None = None
        self.started: float | None = None
        self.info: kv.Info | None = None

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> Summary:
        options = self.options
        clients: list[_Client] = []
        selector = selectors.DefaultSelector()
        try:
            for index in range(options.clients):
                try:
                    sock = connect(options.address, options.connect_timeout)
                except OSError as error:
                    raise LoadError(f"cannot connect to {options.address}: {error}") from None
                clients.append(_Client(index, sock))
                selector.register(sock, selectors.EVENT_READ, clients[-1])
            preloaded = options.preloaded
            if preloaded is None:
                self.info = self._ask_info(clients[0], selector)
                preloaded = self.info.preloaded
            self.checker = Checker(preloaded)
            return self._loop(clients, selector, self.checker)
        finally:
            selector.close()
            for client in clients:
                client.sock.close()

    def _ask_info(self, client: _Client, selector: selectors.BaseSelector) -> kv.Info:
        """INFO through the service (id 0): the guest's table and preloaded keys."""
        client.sock.sendall(kv.request(kv.INFO, 0, 0))
        deadline = self._clock() + self.options.connect_timeout
        while self._clock() < deadline and not self._stopping:
            for _key, _mask in selector.select(0.1):
                data = client.sock.recv(65536)
                if not data:
                    raise LoadError("the service closed the connection before answering INFO")
                client.reader.feed(data)
            for frame in client.reader.frames():
                if frame.id != 0 or frame.kind != reqframe.KIND_ANSWER or frame.flags != kv.OK:
                    raise LoadError(f"the service answered INFO with {frame}")
                try:
                    return kv.decode_info(frame.body)
                except ValueError as error:
                    raise LoadError(f"the service's INFO answer: {error}") from None
        raise LoadError(
            f"no answer to INFO within {self.options.connect_timeout:g} s: is a kvstore VM "
            "connected to the front and running?"
        )

    def _loop(
        self, clients: list[_Client], selector: selectors.BaseSelector, checker: Checker
    ) -> Summary:
        options = self.options
        chooser = KeyChooser(options)
        clock = self._clock
        start = self.started = clock()
        stop_at = None if options.duration is None else start + options.duration
        sending = True
        stopped_sending = start
        sent_total = 0
        next_progress = start + 1.0
        last_progress = (0, 0)
        turn = 0
        while True:
            now = clock()
            if sending and (self._stopping or (stop_at is not None and now >= stop_at)):
                sending = False
                stopped_sending = now
            if sending:
                if options.rate > 0:
                    due = min(int((now - start) * options.rate) + 1 - sent_total, MAX_BURST)
                    batch = []
                    for _ in range(max(due, 0)):
                        batch.append(clients[turn])
                        turn = (turn + 1) % len(clients)
                else:
                    batch = [c for c in clients for _ in range(options.depth - c.in_flight)]
                if batch:
                    sent_at = clock()
                    for client in batch:
                        self._send(client, chooser, checker, sent_at)
                    sent_total += len(batch)
                    for client in set(batch):
                        self._flush(client)
            elif checker.outstanding() == 0 or now - stopped_sending > options.grace:
                break
            if options.rate > 0 and sending:
                timeout = max(start + sent_total / options.rate - clock(), 0.0)
            else:
                timeout = 0.05
            for key, mask in selector.select(min(timeout, 0.05)):
                client = key.data
                if mask & selectors.EVENT_READ:
                    self._receive(client, checker)
                if mask & selectors.EVENT_WRITE:
                    self._flush(client)
            if self._progress is not None and clock() >= next_progress:
                counts = (len(checker.order), sum(checker.counts.values()))
                self._progress(
                    {
                        "t": round(clock() - start, 3),
                        "sent": counts[0],
                        "answered": checker.counts["ok"] + checker.counts["wrong"],
                        "rate": counts[0] - last_progress[0],
                        "waiting": checker.outstanding(),
                        "wrong": checker.counts["wrong"],
                        "duplicate": checker.counts["duplicate"],
                    }
                )
                last_progress = counts
                next_progress += 1.0
        return checker.finish(clock())

    def _send(self, client: _Client, chooser: KeyChooser, checker: Checker, t: float) -> None:
        op, key = chooser.next(client.index)
        id = client.next_id
        client.next_id += 1
        value = put_value(client.index, id, self.options.value_size) if op == kv.PUT else b""
        client.out += kv.request(op, id, key, value)
        client.in_flight += 1
        checker.sent(client.index, id, op, key, value, t)

    def _flush(self, client: _Client) -> None:
        try:
            while client.out:
                sent = client.sock.send(client.out)
                del client.out[:sent]
        except BlockingIOError:
            pass
        except OSError as error:
            raise LoadError(
                f"client {client.index}: the service connection failed: {error}"
            ) from None

    def _receive(self, client: _Client, checker: Checker) -> None:
        try:
            data = client.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as error:
            raise LoadError(
                f"client {client.index}: the service connection failed: {error}"
            ) from None
        if not data:
            raise LoadError(f"client {client.index}: the service closed the connection")
        now = self._clock()
        client.reader.feed(data)
        for frame in client.reader.frames():
            if frame.kind != reqframe.KIND_ANSWER:
                raise LoadError(
                    f"client {client.index}: the service sent a frame of kind {frame.kind:#x}"
                )
            if checker.answer(client.index, frame.id, frame.flags, frame.body, now) in (
                "ok",
                "wrong",
            ):
                client.in_flight -= 1


def latency_series(
    requests: list[Request], start: float, width: float = SERIES_BIN
) -> dict[str, Any]:
    """Per bin of send time: requests sent, the largest latency among them (µs; a lost one
    counts as waiting to the end) and how many were lost: a compact picture of a run."""
    if not requests:
        return {"start": start, "bin": width, "sent": [], "max_us": [], "lost": []}
    sends = np.array([r.sent for r in requests])
    ends = np.array([np.nan if r.answered is None else r.answered for r in requests])
    end = np.nanmax(ends) if np.isfinite(ends).any() else sends.max()
    lost = np.isnan(ends)
    latency = (np.where(lost, end, ends) - sends) * 1e6
    bins = np.floor((sends - start) / width).astype(np.int64)
    bins -= min(int(bins.min()), 0)
    count = int(bins.max()) + 1
    sent = np.bincount(bins, minlength=count)
    worst = np.zeros(count)
    np.maximum.at(worst, bins, latency)
    lost_count = np.bincount(bins, weights=lost, minlength=count)
    return {
        "start": start,
        "bin": width,
        "sent": sent.tolist(),
        "max_us": np.round(worst, 1).tolist(),
        "lost": lost_count.astype(np.int64).tolist(),
    }


def write_jsonl(path: Path | TextIO, generator: LoadGenerator, summary: Summary) -> None:
    """Header, one line per request, the summary (with the latency series)."""
    checker = generator.checker
    requests = checker.order if checker is not None else []
    start = generator.started or 0.0
    out = path.open("w") if isinstance(path, Path) else path
    try:
        header = {"event": "header", "start": start, **asdict(generator.options)}
        if generator.info is not None:
            header["info"] = asdict(generator.info)
        out.write(json.dumps(header) + "\n")
        for r in requests:
            line = {
                "event": "request",
                "client": r.client,
                "id": r.id,
                "op": kv.OPS[r.op],
                "key": r.key,
                "sent": round(r.sent, 6),
                "answered": None if r.answered is None else round(r.answered, 6),
                "us": None if r.answered is None else round((r.answered - r.sent) * 1e6, 1),
                "verdict": r.verdict,
            }
            out.write(json.dumps(line) + "\n")
        record = {
            "event": "summary",
            **summary.as_json(),
            "series": latency_series(requests, start),
        }
        out.write(json.dumps(record) + "\n")
    finally:
        if out is not path:
            out.close()
