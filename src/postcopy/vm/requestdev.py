"""The request device: clients' requests reach the guest and its answers come back,
through port I/O only, with everything in flight part of the VM's migrated state.

Host side, the device connects to a service front (postcopy.service.front) at a `unix:`
or `tcp:` URI and speaks frames (postcopy.vm.reqframe) with it. Guest side, two exits
(guests/kvstore.c has the guest's half):

- exchange, `rep insb` of BLOCK_SIZE bytes from EXCHANGE_PORT: the guest's answers come
  in its registers (rax = byte count, at most REGISTER_BYTES; the bytes in rbx, rbp, rsi,
  r8..r15, then xmm0..xmm15); the device keeps them, waits until requests are queued (at
  most WAIT_SECONDS, or until the VM stops), and answers the IN with whole request frames
  followed by zeros. KVM reports the 1 KiB `rep insb` as one exit with the bytes in the
  vCPU's run page (its read-ahead is 1 KiB; `rep outsb` exits once per byte, measured:
  so answers do not go that way), and the registers are read with KVM_GET_REGS (and
  KVM_GET_FPU when more than the general registers' 88 bytes came): one exit carries a
  whole batch both ways, ~60-80 us here however many requests it holds.
- answer, OUT to ANSWER_PORT: the same registers, for answers beyond one exchange's worth.

Why this shape: the host never reads or writes guest RAM (on a destination pages may be
missing, and a Python thread touching one would deadlock the process; KVM's own copy to
the guest's buffer runs in the vCPU thread inside KVM_RUN, which may wait for a page);
and the exit count, not bytes, is the cost (~36-80 us per exit here).

Exactly once across a migration: the device does socket I/O only while its VM runs
(pause() at stop, resume() at cont), and its state holds every request it accepted and
did not answer (queued, or handed to the guest and awaiting an answer), the bytes of an
answer record the guest has only half written, and answers not yet sent. save() of a
stopped VM on the source, load() on the destination: the destination answers exactly
what the source took and did not answer, and says in its HELLO the highest tag it holds,
so the front re-sends exactly the rest. See postcopy.vm.reqframe for the frames.

How many requests one exchange hands over: as many as fit while the guest serves a batch
within BATCH_TARGET_SECONDS; a batch that took longer shrinks the next one in proportion
(to one request at the least), a quick one doubles it. The guest answers a batch at its
end (or each register load of answers), so a batch whose requests wait for missing pages
holds back the answers of all of them: right after a postcopy switchover a full block of
~40 requests, each faulting on a page or two still at the source, answered nothing for
~0.1-0.4 s, though each request waited only a few milliseconds. So a device whose state
arrived by migration (`load`) starts at one request per exchange and grows from there,
as TCP starts a connection slowly; in steady state the batch is the whole block. And
the batch the guest holds when the source stops it would cross with it and be served
where its pages are missing: so before that stop the source `quiesce`s the device (no
new batch; the guest finishes the one it holds, ~1 ms with all its memory local).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from postcopy.linux.kvm import IoDirection, IoExit, KvmVcpu
from postcopy.transport.uri import Uri, parse_uri
from postcopy.vm import reqframe
from postcopy.vm.reqframe import FrameError, FrameReader, Hello

log = logging.getLogger(__name__)

EXCHANGE_PORT = 0x510
ANSWER_PORT = 0x511
BLOCK_SIZE = 1024
GPR_BYTES = 88  # rbx, rbp, rsi, r8..r15
REGISTER_BYTES = GPR_BYTES + 16 * 16  # and xmm0..xmm15: 344
VALUE_MAX = 255  # a record's value length is a u8
WAIT_SECONDS = 0.1  # longest an idle exchange keeps its vCPU in the device
# a batch the guest served slower than this shrinks the next one (see the module docstring)
BATCH_TARGET_SECONDS = 0.002
INBOUND_LIMIT = 256 * 1024  # stop reading from the front while this much is queued
RECONNECT_SECONDS = 0.2
STATE_FORMAT = "postcopy-request-device/1"
_GPRS = struct.Struct("<11Q")


class RequestDevice:
    """See the module docstring. `backend` is the front's URI (None: no front, the guest
    waits forever). Any thread may call the control methods; `io` runs on vCPU threads."""

    name: str = "request-device"
    ports: tuple[int, ...] = (EXCHANGE_PORT, ANSWER_PORT)

    def __init__(
        self, backend: str | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.backend: Uri | None = parse_uri(backend) if backend else None
        self._clock = clock
        self._condition = threading.Condition()
        self._paused = True
        self._holding = False  # quiesce(): no new batch until resume()
        self._closed = False
        self._generation = 0
        self._accepted = 0  # the highest tag accepted (tags grow along the stream)
        self._inbound: deque[bytes] = deque()  # accepted request frames, not delivered
        self._inbound_bytes = 0
        self._pending: deque[int] = deque()  # tags delivered to the guest, not answered
        self._partial = bytearray()  # answer record bytes short of a whole record
        self._outbound = bytearray()  # answer frames not yet sent to the front
        self._control = bytearray()  # hellos, sent before any answer
        # requests per exchange (None: as many as fit); the last batch and when it went
        # in; vCPU threads only (one exchange at a time per guest)
        self.batch_limit: int | None = None
        self._batch = 0
        self._batch_at = 0.0
        self.counters = {
            "accepted": 0,
            "delivered": 0,
            "answered": 0,
            "exchanges": 0,
            "answer-exits": 0,
            "guest-errors": 0,
            "connects": 0,
        }
        self.connected = False
        self.error = ""
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    # -- lifecycle (any thread) ----------------------------------------------------------

    def start(self) -> None:
        if self.backend is not None and self._thread is None:
            self._thread = threading.Thread(target=self._io_main, name="request-io", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """No more socket I/O, and an exchange waiting for requests returns now. Once this
        returns, no request is taken from the front and no answer sent to it."""
        with self._condition:
            self._paused = True
            self._condition.notify_all()

    def quiesce(self, timeout: float) -> bool:
        """Hand the guest no new request, and wait (at most `timeout` s) until it has
        answered every request it holds; True if it has. Called by a migration's source
        just before the stop for the switchover (the next resume() ends it)."""
        with self._condition:
            self._holding = True
            self._condition.notify_all()
            return self._condition.wait_for(lambda: not self._pending or self._paused, timeout)

    def resume(self) -> None:
        with self._condition:
            self._holding = False
            self._condition.notify_all()
            if not self._paused:
                return
            self._paused = False
            self._control += Hello(self._generation, self._accepted, True).encode()
            self._condition.notify_all()
        self._poke()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._paused = True
            self._condition.notify_all()
        self._poke()
        if self._thread is not None:
            self._thread.join(5.0)
        with contextlib.suppress(OSError):
            os.close(self._wake)

    # -- state ---------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """Everything in flight, as JSON-able data; the VM must be stopped (paused)."""
        with self._condition:
            if not self._paused:
                raise RuntimeError("the request device's state is saved only while paused")
            return {
                "format": STATE_FORMAT,
                "generation": self._generation,
                "accepted": self._accepted,
                "inbound": _b64(b"".join(self._inbound)),
                "pending": list(self._pending),
                "partial": _b64(self._partial),
                "outbound": _b64(self._outbound),
                "counters": dict(self.counters),
            }

    def load(self, state: dict[str, Any]) -> None:
        """Take over the state of a device saved on the source (checked first: it came
        over the network). The generation goes up by one: this device is the newer one."""
        loaded = _check_state(state)
        with self._condition:
            if not self._paused:
                raise RuntimeError("the request device's state is loaded only while paused")
            self._generation = loaded["generation"] + 1
            self._accepted = loaded["accepted"]
            self._inbound = deque(loaded["inbound"])
            self._inbound_bytes = sum(len(frame) for frame in self._inbound)
            self._pending = deque(loaded["pending"])
            self._partial = bytearray(loaded["partial"])
            self._outbound = bytearray(loaded["outbound"])
            self.batch_limit = 1  # most of the guest's memory may still be at the source
            for key, value in loaded["counters"].items():
                if key in self.counters and key != "connects":
                    self.counters[key] = value

    def stats(self) -> dict[str, Any]:
        with self._condition:
            return {
                "backend": str(self.backend) if self.backend else None,
                "connected": self.connected,
                "live": not self._paused,
                "generation": self._generation,
                "accepted-tag": self._accepted,
                "queued-requests": len(self._inbound),
                "requests-in-guest": len(self._pending),
                "unsent-answer-bytes": len(self._outbound),
                "error": self.error,
                **self.counters,
            }

    # -- the guest's side (vCPU threads) --------------------------------------------------

    def io(self, vcpu: KvmVcpu, exit: IoExit) -> bytes:
        """Handle an exit on one of `ports`; for an IN, the bytes the guest reads."""
        if exit.port == EXCHANGE_PORT and exit.direction is IoDirection.IN:
            if exit.size != 1:
                return self._guest_error(f"exchange with {exit.size}-byte units", exit)
            regs = vcpu.get_regs()
            if regs.rcx != exit.count:
                # the read-ahead did not cover the instruction: a second exit of the same
                # `rep insb` would bring the same registers again, so take no answers
                return self._guest_error(
                    f"exchange of {regs.rcx} bytes came as {exit.count} (use {BLOCK_SIZE} "
                    "bytes, 1 KiB-aligned)",
                    exit,
                )
            self._adapt_batch()
            self._take_answers(vcpu, regs.rax, regs)
            self.counters["exchanges"] += 1
            return self._fill_block(exit.count)
        if exit.port == ANSWER_PORT and exit.direction is IoDirection.OUT:
            regs = vcpu.get_regs()
            self._take_answers(vcpu, regs.rax, regs)
            self.counters["answer-exits"] += 1
            return b""
        if exit.direction is IoDirection.IN:
            return b"\xff" * (exit.size * exit.count)
        return b""

    def _guest_error(self, what: str, exit: IoExit) -> bytes:
        self.counters["guest-errors"] += 1
        if self.counters["guest-errors"] == 1:
            log.error("request device: the guest broke the protocol: %s", what)
        return bytes(exit.size * exit.count) if exit.direction is IoDirection.IN else b""

    def _take_answers(self, vcpu: KvmVcpu, count: int, regs: Any) -> None:
        if count == 0:
            return
        if count > REGISTER_BYTES:
            self._guest_error(f"{count} answer bytes in registers (at most {REGISTER_BYTES})", _NO)
            return
        data = _GPRS.pack(
            regs.rbx,
            regs.rbp,
            regs.rsi,
            regs.r8,
            regs.r9,
            regs.r10,
            regs.r11,
            regs.r12,
            regs.r13,
            regs.r14,
            regs.r15,
        )
        if count > GPR_BYTES:
            data += bytes(vcpu.get_fpu().xmm)
        answered = 0
        with self._condition:
            partial = self._partial
            partial += data[:count]
            offset = 0
            while len(partial) - offset >= reqframe.RECORD_HEADER_SIZE:
                low, status, length = reqframe.RECORD_HEADER.unpack_from(partial, offset)
                end = offset + reqframe.RECORD_HEADER_SIZE + length
                if len(partial) < end:
                    break
                value = bytes(partial[offset + reqframe.RECORD_HEADER_SIZE : end])
                offset = end
                if not self._pending:
                    self._guest_error("an answer to no request", _NO)
                    continue
                tag = self._pending.popleft()
                if tag & 0xFFFF != low:
                    self._guest_error(
                        f"answer to {low:#06x} where {tag & 0xFFFF:#06x} was next", _NO
                    )
                self._outbound += reqframe.encode(reqframe.KIND_ANSWER, status, tag, value)
                answered += 1
            del partial[:offset]
            self.counters["answered"] += answered
            if self._holding and not self._pending:
                self._condition.notify_all()  # quiesce() waits for this
            paused = self._paused
        if answered and not paused:
            self._poke()

    def _adapt_batch(self) -> None:
        """Size the next batch by how long the guest took to serve the last one."""
        if not self._batch:
            return
        took = self._clock() - self._batch_at
        if took <= BATCH_TARGET_SECONDS:
            if self.batch_limit is not None:
                grown = self.batch_limit * 2
                self.batch_limit = None if grown >= BLOCK_SIZE // reqframe.HEADER_SIZE else grown
        else:
            self.batch_limit = max(1, int(self._batch * BATCH_TARGET_SECONDS / took))

    def _fill_block(self, size: int) -> bytes:
        with self._condition:
            if (not self._inbound or self._holding) and not self._paused:
                self._condition.wait_for(
                    lambda: (bool(self._inbound) and not self._holding) or self._paused,
                    WAIT_SECONDS,
                )
            frames: list[bytes] = []
            used = 0
            limit = 0 if self._holding else self.batch_limit or size
            while self._inbound and used + len(self._inbound[0]) <= size and len(frames) < limit:
                frame = self._inbound.popleft()
                frames.append(frame)
                used += len(frame)
                self._pending.append(reqframe.frame_id(frame))
            self._inbound_bytes -= used
            self.counters["delivered"] += len(frames)
            throttled = used and self._inbound_bytes + used >= INBOUND_LIMIT
        self._batch = len(frames)
        self._batch_at = self._clock()
        if throttled:
            self._poke()
        return b"".join(frames) + bytes(size - used)

    # -- the front's side (the request-io thread) ------------------------------------------

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full (it is a counter: cannot be) or closed
            os.eventfd_write(self._wake, 1)

    def _io_main(self) -> None:
        assert self.backend is not None
        while not self._closed:
            sock = self._connect()
            if sock is None:
                with self._condition:
                    self._condition.wait_for(lambda: self._closed, RECONNECT_SECONDS)
                continue
            try:
                self._serve(sock)
            except (OSError, FrameError) as error:
                with self._condition:
                    self.error = f"service front {self.backend}: {error}"
                log.warning("request device: %s", self.error)
            finally:
                with self._condition:
                    self.connected = False
                sock.close()

    def _connect(self) -> socket.socket | None:
        assert self.backend is not None
        uri = self.backend
        if uri.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = uri.path
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in (uri.host or "") else socket.AF_INET)
            address = (uri.host, uri.port)
        try:
            sock.settimeout(2.0)
            sock.connect(address)
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return None
        with self._condition:
            self.connected = True
            self.counters["connects"] += 1
            # the front hears first who this is; answers queued meanwhile follow
            hello = Hello(self._generation, self._accepted, not self._paused).encode()
            self._control = bytearray(hello)
        return sock

    def _serve(self, sock: socket.socket) -> None:
        reader = FrameReader()
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while True:
            with self._condition:
                if self._closed:
                    return
                want = 0
                if not self._paused and self._inbound_bytes < INBOUND_LIMIT:
                    want |= select.POLLIN
                if self._control or (self._outbound and not self._paused):
                    want |= select.POLLOUT
            poller.register(sock, want | select.POLLRDHUP)
            hangup = False
            for fd, events in poller.poll(1000):
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                elif events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
                    hangup = True
            with self._condition:
                if hangup and (self._paused or self._inbound_bytes >= INBOUND_LIMIT):
                    # not reading while paused: no end of stream would ever show otherwise
                    raise OSError(errno.ECONNRESET, "the front closed the connection")
                reading = not self._paused and self._inbound_bytes < INBOUND_LIMIT
                if reading and not self._receive(sock, reader):
                    raise OSError(errno.ECONNRESET, "the front closed the connection")
                self._send(sock)

    def _receive(self, sock: socket.socket, reader: FrameReader) -> bool:
        """Take the requests the front sent (condition held); False at end of stream."""
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        reader.feed(data)
        taken = 0
        for raw in reader.raw_frames():
            kind = raw[2]
            tag = reqframe.frame_id(raw)
            if kind > reqframe.KIND_REQUEST_MAX:
                raise FrameError(f"kind {kind:#x} from the front: only requests go to a device")
            if tag <= self._accepted:
                raise FrameError(f"request tag {tag} after tag {self._accepted}: tags must grow")
            self._inbound.append(raw)
            self._inbound_bytes += len(raw)
            self._accepted = tag
            taken += 1
        if taken:
            self.counters["accepted"] += taken
            self._condition.notify_all()
        return True

    def _send(self, sock: socket.socket) -> None:
        """Send hellos, then answers while running (condition held; never blocks)."""
        for buffer in (self._control, self._outbound):
            if buffer is self._outbound and self._paused:
                return
            while buffer:
                try:
                    sent = sock.send(buffer)
                except BlockingIOError:
                    return
                del buffer[:sent]


class _NoExit:
    direction = IoDirection.OUT
    size = 0
    count = 0


_NO: Any = _NoExit()


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _check_state(state: Any) -> dict[str, Any]:
    """The device state from a migration stream, every field checked; ValueError names
    the first wrong one."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"request device state format {found!r}, this VM reads {STATE_FORMAT!r}")

    def number(key: str) -> int:
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise ValueError(f"request device state: {key} {value!r} is not a u64")
        return value

    def data(key: str) -> bytes:
        value = state.get(key)
        try:
            if not isinstance(value, str):
                raise TypeError
            return base64.b64decode(value, validate=True)
        except (TypeError, binascii.Error):
            raise ValueError(f"request device state: {key} is not base64 text") from None

    generation, accepted = number("generation"), number("accepted")
    reader = FrameReader()
    reader.feed(data("inbound"))
    try:
        inbound = list(reader.raw_frames())
    except FrameError as error:
        raise ValueError(f"request device state: queued requests: {error}") from None
    if reader.buffered:
        raise ValueError("request device state: queued requests end inside a frame")
    tags = [reqframe.frame_id(raw) for raw in inbound]
    pending = state.get("pending")
    if not isinstance(pending, list) or not all(
        isinstance(tag, int) and not isinstance(tag, bool) for tag in pending
    ):
        raise ValueError("request device state: pending is not a list of tags")
    order = [*pending, *tags]
    if any(not 0 < tag <= accepted for tag in order) or order != sorted(set(order)):
        raise ValueError(
            "request device state: the tags of requests in flight must grow and be at most "
            f"the accepted tag {accepted}"
        )
    if any(raw[2] > reqframe.KIND_REQUEST_MAX for raw in inbound):
        raise ValueError("request device state: a queued frame is not a request")
    partial = data("partial")
    if len(partial) >= reqframe.RECORD_HEADER_SIZE + VALUE_MAX:
        raise ValueError(f"request device state: a partial answer of {len(partial)} bytes")
    outbound = data("outbound")
    out_reader = FrameReader()
    out_reader.feed(outbound)
    try:
        kinds = [raw[2] for raw in out_reader.raw_frames()]
    except FrameError as error:
        raise ValueError(f"request device state: unsent answers: {error}") from None
    if out_reader.buffered or any(kind != reqframe.KIND_ANSWER for kind in kinds):
        raise ValueError("request device state: unsent answers are not whole answer frames")
    counters = state.get("counters", {})
    if not isinstance(counters, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counters.values()
    ):
        raise ValueError("request device state: counters must be non-negative integers")
    return {
        "generation": generation,
        "accepted": accepted,
        "inbound": inbound,
        "pending": pending,
        "partial": partial,
        "outbound": outbound,
        "counters": counters,
    }
