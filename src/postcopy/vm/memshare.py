"""Guest RAM shared with another process, and that process's userfaultfd handed back.

A vhost-user backend maps the VM's memfd RAM (QEMU sends the fds in SET_MEM_TABLE) and, for
postcopy, opens a userfaultfd of its own and sends it to QEMU (POSTCOPY_ADVISE, over
SCM_RIGHTS), so that QEMU serves its faults like a vCPU's (migration/shared.py). This is
that exchange, reduced to what postcopy needs, on a Unix socket (`vm run
--x-memory-socket PATH`):

1. server -> client: one JSON line `{"blocks": [{"name", "size", "page_size", "fd"}],
   "mode": "missing" | "minor"}` with the blocks' file descriptors (SCM_RIGHTS, in
   order; `fd` is the index of a block's descriptor, null for RAM with no file behind it).
2. client: maps every block it was given MAP_SHARED, opens a userfaultfd and registers
   the mappings (MISSING, or MISSING|MINOR in mode "minor").
3. client -> server: one JSON line `{"name": str, "bases": [address or null]}` with the
   userfaultfd (SCM_RIGHTS). The server adopts it (SharedClients.add) and answers
   `{"ok": true}` (or `{"error": "..."}` and closes).
4. When postcopy ends the server unregisters the client's ranges through that userfaultfd
   and sends `{"event": "postcopy-end"}`; when the client closes the socket it is dropped.

`MemoryShareServer` is the VM's side; `MemoryShareClient` is a client (what a backend
does, and what the tests run in a second process). Every message is checked before use.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import Feature, Ioctl, RegisterMode, UserfaultFd
from postcopy.migration.shared import SharedClient, SharedClients
from postcopy.ram import RamList

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_FDS = 64


class MemoryShareError(RuntimeError):
    """A malformed or refused exchange; the message says which part and why."""


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sock.sendmsg([data], ancillary)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One JSON line and the descriptors that came with it (EOF: MemoryShareError)."""
    data = b""
    fds: list[int] = []
    while not data.endswith(b"\n"):
        chunk, ancillary, _flags, _address = sock.recvmsg(
            MAX_LINE, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise MemoryShareError("the peer closed the memory socket")
        data += chunk
        if len(data) > MAX_LINE:
            for fd in fds:
                os.close(fd)
            raise MemoryShareError(f"a memory socket message longer than {MAX_LINE} bytes")
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        raise MemoryShareError("a memory socket message that is not a JSON object")
    return message, fds


class MemoryShareServer:
    """The VM's side: gives clients its RAM's fds and adopts their userfaultfds."""

    def __init__(
        self, path: str, ram: RamList, clients: SharedClients, mode: Callable[[], str]
    ) -> None:
        self.path = path
        self._ram = ram
        self._clients = clients
        self._mode = mode
        self._sockets: dict[SharedClient, socket.socket] = {}
        self._lock = threading.Lock()
        self._closed = False
        clients.on_end(self.postcopy_ended)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            os.chmod(path, 0o600)
            self._listener.listen(8)
        except OSError:
            self._listener.close()
            raise
        threading.Thread(target=self._accept, name="memshare", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(connection,), name="memshare-client", daemon=True
            ).start()

    def _serve(self, connection: socket.socket) -> None:
        client: SharedClient | None = None
        try:
            client = self._handshake(connection)
            while True:  # the client's end: EOF (or anything it sends) drops it
                if not connection.recv(4096):
                    break
        except (OSError, MemoryShareError) as error:
            log.warning("memory socket client: %s", error)
            with contextlib.suppress(OSError):
                _send(connection, {"error": str(error)})
        finally:
            if client is not None:
                with self._lock:
                    self._sockets.pop(client, None)
                self._clients.remove(client)
            connection.close()

    def _handshake(self, connection: socket.socket) -> SharedClient:
        blocks: list[dict[str, Any]] = []
        fds: list[int] = []
        for block in self._ram:
            fd = block.mapping.fd if block.shared else None
            blocks.append(
                {
                    "name": block.name,
                    "size": block.length,
                    "page_size": block.page_size,
                    "fd": None if fd is None else len(fds),
                }
            )
            if fd is not None:
                fds.append(fd)
        mode = self._mode()
        _send(connection, {"blocks": blocks, "mode": mode}, fds)
        reply, received = _receive(connection)
        if len(received) != 1:
            for fd in received:
                os.close(fd)
            raise MemoryShareError(f"expected one userfaultfd, got {len(received)} descriptors")
        # the client did the API handshake: adopt the fd as it is
        uffd = UserfaultFd(
            received[0],
            opened_via="memory socket",
            features=Feature(0),
            available_features=Feature(0),
            ioctls=Ioctl(0),
        )
        try:
            name = reply.get("name")
            bases = reply.get("bases")
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise MemoryShareError("the client's name must be a string of 1 to 64 characters")
            if not isinstance(bases, list) or len(bases) != len(self._ram):
                raise MemoryShareError(
                    f"the client's bases must be a list of {len(self._ram)} addresses or null"
                )
            for index, base in enumerate(bases):
                given = blocks[index]["fd"] is not None
                if base is None:
                    continue
                if not given or not isinstance(base, int) or isinstance(base, bool) or base <= 0:
                    raise MemoryShareError(f"the client's base of block {index} is not valid")
            client = self._clients.add(name, uffd, bases, minor=mode == "minor")
        except BaseException:
            uffd.close()
            raise
        with self._lock:
            self._sockets[client] = connection
        _send(connection, {"ok": True})
        log.info("memory socket: client %s joined", name)
        return client

    def postcopy_ended(self) -> None:
        """Tell every client postcopy is over (its ranges are unregistered already)."""
        with self._lock:
            sockets = list(self._sockets.values())
        for connection in sockets:
            with contextlib.suppress(OSError):
                _send(connection, {"event": "postcopy-end"})

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets.values())
        for connection in sockets:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class MemoryShareClient:
    """A process that maps a VM's RAM and lets its postcopy serve its faults."""

    def __init__(self, path: str, name: str = "client") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.mappings: list[Mapping | None] = []
        self.uffd: UserfaultFd | None = None
        try:
            self.sock.connect(path)
            offer, fds = _receive(self.sock)
            blocks = offer.get("blocks")
            self.mode = offer.get("mode")
            if not isinstance(blocks, list) or self.mode not in ("missing", "minor"):
                raise MemoryShareError("the server's offer has no blocks or no mode")
            self.blocks = blocks
            for block in blocks:
                index = block.get("fd")
                if index is None:
                    self.mappings.append(None)
                    continue
                self.mappings.append(Mapping.map_fd(os.dup(fds[index]), int(block["size"])))
            for fd in fds:
                os.close(fd)
            huge = any(int(b["page_size"]) > os.sysconf("SC_PAGE_SIZE") for b in blocks)
            small = any(int(b["page_size"]) == os.sysconf("SC_PAGE_SIZE") for b in blocks)
            features = Feature(0)
            mode = RegisterMode.MISSING
            if huge:
                features |= Feature.MISSING_HUGETLBFS
            if small:
                features |= Feature.MISSING_SHMEM
            if self.mode == "minor":
                mode |= RegisterMode.MINOR
                features |= Feature.MINOR_HUGETLBFS if huge else Feature(0)
                features |= Feature.MINOR_SHMEM if small else Feature(0)
            self.uffd = UserfaultFd.open(features)
            for mapping in self.mappings:
                if mapping is not None:
                    self.uffd.register(mapping.address, mapping.length, mode)
            bases = [None if m is None else m.address for m in self.mappings]
            _send(self.sock, {"name": name, "bases": bases}, [self.uffd.fileno()])
            answer, extra = _receive(self.sock)
            for fd in extra:
                os.close(fd)
            if not answer.get("ok"):
                raise MemoryShareError(f"the VM refused: {answer.get('error')}")
        except BaseException:
            self.close()
            raise

    def wait_end(self, timeout: float | None = None) -> bool:
        """Wait for the server's postcopy-end; True if it came."""
        self.sock.settimeout(timeout)
        try:
            message, fds = _receive(self.sock)
        except (TimeoutError, MemoryShareError):
            return False
        for fd in fds:
            os.close(fd)
        return message.get("event") == "postcopy-end"

    def close(self) -> None:
        if self.uffd is not None:
            self.uffd.close()
        for mapping in self.mappings:
            if mapping is not None:
                mapping.close()
        self.sock.close()
