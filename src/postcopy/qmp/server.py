"""QMP server: QEMU's Machine Protocol on a Unix socket, so any QMP client drives the VM.

Clients that work against it: qemu.qmp (asyncio ``QMPClient`` and the sync
``qemu.qmp.legacy.QEMUMonitorProtocol``), ``qmp-shell``, ``socat`` by hand, libvirt-style
tools. The protocol follows QEMU's docs/interop/qmp-spec:

* On connect the server greets::

    {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
             "package": "postcopy 0.1.0"}, "capabilities": []}}

  The QEMU version is what we claim to speak, not our own version (tools gate features
  on it); ``package`` is where we name ourselves.
* No capabilities are offered: no ``oob``. Out-of-band execution exists in QEMU so that a
  command can overtake one that is stuck on the same monitor; here every connection has
  its own thread, so a client that needs to act while a command hangs opens a second
  connection. Enabling ``oob`` is refused as in QEMU ("Capability oob not available")
  and ``exec-oob`` is an unexpected member.
* Until ``qmp_capabilities`` succeeds only it is accepted; any other command gets
  ``CommandNotFound`` "Expecting capabilities negotiation with 'qmp_capabilities'".
  Afterwards ``qmp_capabilities`` is ``CommandNotFound`` "Capabilities negotiation is
  already complete, command ignored". Events go only to negotiated clients.
* ``{"execute": name, "arguments": {...}, "id": any}`` is answered by
  ``{"return": value, "id": ...}`` or ``{"error": {"class": ..., "desc": ...}, "id": ...}``;
  ``id`` is echoed verbatim whenever the request was an object that had one. Structural
  and argument errors use QEMU's messages ("QMP input lacks member 'execute'",
  "Parameter 'x' is missing", "Invalid parameter type for 'x', expected: string", ...).
* Input framing is QEMU's, not lines (`framing`): a message ends where its outermost
  ``}`` closes. Bad input of any kind gets an error without ``id`` and the connection
  stays usable. Output lines end with CRLF like QEMU's.

Registering commands (``args`` is the QAPI ``data`` of the command, written as `schema`
describes)::

    server.register("migrate", handle_migrate,
                    args={"uri": str, "detach?": bool, "resume?": bool})

    @server.command("migrate-set-capabilities",
                    args={"capabilities": [{"capability": MigrationCapability,
                                            "state": bool}]})
    def set_caps(args: dict[str, Any]) -> None: ...

The handler gets a new dict of checked arguments and returns a JSON value; ``None`` means
``{}``. It raises ``QmpError(desc, error_class)`` to answer an error; any other exception
becomes a GenericError with its message and is logged.

Threading. Each client has a reader thread, which parses and runs that client's commands
one at a time (so its answers come in order), and a writer thread, which drains the
client's outbox to the socket. ``emit_event`` only serialises once and appends to the
outboxes, so a vCPU or migration thread never blocks on a slow client; a client that lets
more than ``max_pending_output`` bytes pile up is disconnected. A handler may block
(e.g. waiting for an incoming migration to connect) but then blocks only its own client;
anything that waits for long or for ever belongs in a thread the handler starts, with
its progress reported by events or a query command. ``close()`` stops accepting, shuts
every connection down and joins the threads; it may be called from a handler (``quit``),
and it does not wait for a handler that is still running on another client's thread
beyond its timeout.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from postcopy import __version__
from postcopy.qmp.errors import ErrorClass, QmpError
from postcopy.qmp.framing import (
    MAX_MESSAGE_SIZE,
    MAX_NESTING,
    FrameError,
    JsonStreamSplitter,
    ParseError,
    decode_text,
)
from postcopy.qmp.schema import NAME, Struct, compile_arguments

__all__ = [
    "DEFAULT_QEMU_VERSION",
    "FrameError",
    "Handler",
    "JsonStreamSplitter",
    "QmpServer",
    "compile_arguments",
]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], object]
"""A command handler: checked arguments in, a JSON-able value (or None for {}) out."""

DEFAULT_QEMU_VERSION = (7, 2, 0)
"""The QEMU version we claim; libvirt refuses anything older than 7.2 today."""

MAX_PENDING_OUTPUT = 16 << 20
MAX_CLIENTS = 32
RECV_SIZE = 64 << 10

NEGOTIATION_REQUIRED = "Expecting capabilities negotiation with 'qmp_capabilities'"
NEGOTIATION_DONE = "Capabilities negotiation is already complete, command ignored"


class _QmpCapability(enum.StrEnum):
    OOB = "oob"


@dataclass(frozen=True)
class _Command:
    name: str
    arguments: Struct
    run: Callable[[_Client, dict[str, Any]], object]
    # Runs after the success reply has reached the socket (``quit`` must answer before
    # the process starts to go away).
    after_reply: Callable[[], None] | None = None


class _Client:
    """One connection: a reader thread that runs its commands and a writer thread."""

    def __init__(self, server: QmpServer, sock: socket.socket, number: int):
        self.server = server
        self.sock = sock
        self.name = f"qmp-client-{number}"
        self.negotiated = False
        self._cond = threading.Condition()
        self._outbox: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._writing = False
        self._closed = False
        self.reader = threading.Thread(
            target=self._read_loop, name=f"{self.name}-reader", daemon=True
        )
        self.writer = threading.Thread(
            target=self._write_loop, name=f"{self.name}-writer", daemon=True
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self.writer.start()
        self.reader.start()

    def send(self, message: bytes) -> None:
        """Queue a serialised message; never blocks on the peer."""
        with self._cond:
            if self._closed:
                return
            if self._pending_bytes + len(message) > self.server.max_pending_output:
                log.warning(
                    "%s: more than %d bytes of output unread, disconnecting it",
                    self.name,
                    self.server.max_pending_output,
                )
                self._close_locked()
                return
            self._outbox.append(message)
            self._pending_bytes += len(message)
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is on the socket (or the client is gone)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (not self._outbox and not self._writing), timeout
            )

    def close(self) -> None:
        with self._cond:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.clear()
        self._pending_bytes = 0
        # shutdown wakes the reader out of recv() and the writer out of a blocked send;
        # the fd itself is closed by the reader once both threads are done with it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._outbox))
                if self._closed:
                    return
                data = b"".join(self._outbox)
                self._outbox.clear()
                self._pending_bytes = 0
                self._writing = True
            try:
                self.sock.sendall(data, socket.MSG_NOSIGNAL)
            except OSError as exc:
                log.debug("%s: write failed (%s), closing", self.name, exc)
                self.close()
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _read_loop(self) -> None:
        try:
            self.send(self.server.greeting_bytes)
            splitter = JsonStreamSplitter(self.server.max_message_size, self.server.max_nesting)
            while not self._closed:
                try:
                    data = self.sock.recv(RECV_SIZE)
                except OSError:
                    break
                if not data:
                    break
                for text in splitter.feed(data):
                    if self._closed:
                        break
                    self.server._serve(self, text)
        except Exception:
            log.exception("%s: reader failed", self.name)
        finally:
            self.close()
            self.writer.join()
            self.sock.close()
            self.server._forget(self)
            log.debug("%s: disconnected", self.name)


def _dump(message: Mapping[str, object]) -> bytes:
    # QEMU's own spacing and CRLF; allow_nan=False because NaN is not JSON and qemu.qmp
    # would drop the connection on it.
    return json.dumps(message, allow_nan=False).encode("ascii") + b"\r\n"


class QmpServer:
    """A QMP monitor on a Unix socket that any number of clients can use at once.

    ``QmpServer(path)`` then ``.start()`` (or ``with QmpServer(path) as server:``);
    ``.register()`` / ``.command()`` add commands at any time; ``.emit_event()`` from any
    thread; ``.close()`` tears everything down and removes the socket file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        qemu_version: tuple[int, int, int] = DEFAULT_QEMU_VERSION,
        package: str = f"postcopy {__version__}",
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_nesting: int = MAX_NESTING,
        max_pending_output: int = MAX_PENDING_OUTPUT,
        max_clients: int = MAX_CLIENTS,
    ):
        self.path = os.fspath(path)
        major, minor, micro = qemu_version
        self.version_info: dict[str, Any] = {
            "qemu": {"micro": micro, "minor": minor, "major": major},
            "package": package,
        }
        self.greeting_bytes = _dump({"QMP": {"version": self.version_info, "capabilities": []}})
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self.max_pending_output = max_pending_output
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._commands: dict[str, _Command] = {}
        self._clients: set[_Client] = set()
        self._client_numbers = 0
        self._state = "new"
        self._listener: socket.socket | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._wake_read = self._wake_write = -1
        self._accept_thread: threading.Thread | None = None
        self._quit_callback: Callable[[], None] | None = None
        self._add(
            _Command(
                "qmp_capabilities",
                compile_arguments({"enable?": [_QmpCapability]}),
                self._qmp_capabilities,
            )
        )
        self._add(
            _Command(
                "query-version", compile_arguments(None), lambda client, args: self.version_info
            )
        )
        self._add(
            _Command(
                "query-commands",
                compile_arguments(None),
                lambda client, args: [{"name": n} for n in self.commands],
            )
        )

    # ---------------------------------------------------------------- registration

    def register(
        self, name: str, handler: Handler, args: Mapping[str, object] | None = None
    ) -> None:
        """Add command ``name``; ``args`` maps argument names ("x?" optional) to types.

        Raises ValueError for a bad name or schema, or a name already taken.
        """
        checker = compile_arguments(args, name)
        self._add(_Command(name, checker, lambda client, arguments: handler(arguments)))

    def command(
        self, name: str, args: Mapping[str, object] | None = None
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`; returns the function unchanged."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, args)
            return handler

        return decorate

    def unregister(self, name: str) -> None:
        """Remove a command added with :meth:`register`; KeyError if there is none."""
        if name in ("qmp_capabilities", "query-version", "query-commands"):
            raise ValueError(f"{name} is built in")
        with self._lock:
            del self._commands[name]

    def on_quit(self, callback: Callable[[], None]) -> None:
        """Provide ``quit``: it replies ``{}``, flushes the reply, then calls ``callback``.

        The callback runs on the asking client's reader thread and may call
        :meth:`close`. Calling on_quit again replaces the callback.
        """
        with self._lock:
            first = self._quit_callback is None
            self._quit_callback = callback
        if first:
            self._add(
                _Command(
                    "quit",
                    compile_arguments(None),
                    lambda client, args: None,
                    after_reply=self._run_quit,
                )
            )

    @property
    def commands(self) -> list[str]:
        """Names of all commands, sorted."""
        with self._lock:
            return sorted(self._commands)

    @property
    def client_count(self) -> int:
        """Connections currently open."""
        with self._lock:
            return len(self._clients)

    def _add(self, command: _Command) -> None:
        if not NAME.match(command.name):
            raise ValueError(f"bad QMP command name {command.name!r}")
        with self._lock:
            if command.name in self._commands:
                raise ValueError(f"QMP command {command.name!r} is already registered")
            self._commands[command.name] = command

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Bind the socket (mode 0600), listen, and start accepting clients."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"QMP server is {self._state}, cannot start it")
            self._state = "starting"
        try:
            self._remove_stale_socket()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(self.path)
                # chmod before listen(): until listen() nobody can connect, so no client
                # ever sees the socket with the umask's wider mode.
                os.chmod(self.path, 0o600)
                info = os.stat(self.path)
                self._socket_inode = (info.st_dev, info.st_ino)
                listener.listen(16)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                raise
            self._listener = listener
            self._wake_read, self._wake_write = os.pipe()
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name="qmp-accept", daemon=True
            )
            self._accept_thread.start()
        except BaseException:
            with self._lock:
                self._state = "new"
            self._release_listener()
            raise
        with self._lock:
            self._state = "running"
        log.info("QMP server listening on %s", self.path)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every client, join threads, remove the socket.

        Safe to call more than once and from a command handler; a handler still running
        on another client's thread is waited for at most ``timeout`` seconds.
        """
        with self._lock:
            if self._state in ("closing", "closed"):
                return
            started = self._state == "running"
            self._state = "closing"
            clients = list(self._clients)
        if started:
            os.write(self._wake_write, b"x")
            if self._accept_thread is not threading.current_thread():
                assert self._accept_thread is not None
                self._accept_thread.join(timeout)
        self._release_listener()
        for client in clients:
            client.close()
        deadline = time.monotonic() + timeout
        for client in clients:
            if client.reader is threading.current_thread():
                continue
            client.reader.join(max(0.0, deadline - time.monotonic()))
            if client.reader.is_alive():
                log.warning("%s: a command handler is still running after close()", client.name)
        with self._lock:
            self._state = "closed"
        log.info("QMP server on %s closed", self.path)

    def __enter__(self) -> QmpServer:
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remove_stale_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)  # left behind by a process that died
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "QMP socket is in use by a live server", self.path)

    def _release_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                info = os.lstat(self.path)
                # Unlink only our own socket: someone may have replaced it meanwhile.
                if (info.st_dev, info.st_ino) == self._socket_inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while self._state in ("starting", "running"):
                ready = selector.select()
                if any(key.fileobj == self._wake_read for key, _ in ready):
                    return
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    # EMFILE and friends: the listener stays readable, so pause instead
                    # of spinning until a descriptor frees up.
                    log.error("QMP accept on %s failed: %s", self.path, exc)
                    time.sleep(0.1)
                    continue
                conn.setblocking(True)
                self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        with self._lock:
            if self._state not in ("starting", "running"):
                conn.close()
                return
            if len(self._clients) >= self.max_clients:
                log.warning(
                    "QMP server on %s: %d clients already, refusing another",
                    self.path,
                    self.max_clients,
                )
                conn.close()
                return
            self._client_numbers += 1
            client = _Client(self, conn, self._client_numbers)
            self._clients.add(client)
            # Started under the lock so that close() never sees an unstarted thread.
            client.start()
        log.debug("%s: connected", client.name)

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    # ---------------------------------------------------------------- events

    def emit_event(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """Send event ``name`` to every negotiated client; callable from any thread.

        Never blocks on a client. ``data`` is omitted from the message when None, as
        QEMU does for events without data. Raises TypeError/ValueError at once if
        ``data`` is not JSON-able.
        """
        micros = time.time_ns() // 1000
        message: dict[str, object] = {"event": name}
        if data is not None:
            message["data"] = dict(data)
        message["timestamp"] = {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000}
        encoded = _dump(message)
        with self._lock:
            clients = [client for client in self._clients if client.negotiated]
        for client in clients:
            client.send(encoded)

    # ---------------------------------------------------------------- dispatch

    def _serve(self, client: _Client, text: bytes | FrameError) -> None:
        response, command = self._execute(client, text)
        try:
            encoded = _dump(response)
        except (TypeError, ValueError) as exc:
            name = command.name if command else "?"
            log.error(
                "%s: command %s returned a value that is not JSON: %s", client.name, name, exc
            )
            response.pop("return", None)
            response["error"] = {
                "class": "GenericError",
                "desc": f"command {name} returned a value that is not JSON: {exc}",
            }
            command = None
            encoded = _dump(response)
        client.send(encoded)
        if command is not None and command.after_reply is not None and "return" in response:
            client.flush(timeout=2.0)
            command.after_reply()

    def _execute(
        self, client: _Client, text: bytes | FrameError
    ) -> tuple[dict[str, object], _Command | None]:
        if isinstance(text, FrameError):
            return {"error": QmpError(text.desc).to_json()}, None
        try:
            request = decode_text(text)
        except ParseError as exc:
            return {"error": QmpError(str(exc)).to_json()}, None
        if not isinstance(request, dict):
            return {"error": QmpError("QMP input must be a JSON object").to_json()}, None
        log.debug("%s: <- %s", client.name, text[:200])
        response: dict[str, object] = {}
        command = None
        try:
            name, arguments = self._check_request(request)
            if not client.negotiated and name != "qmp_capabilities":
                raise QmpError(NEGOTIATION_REQUIRED, ErrorClass.COMMAND_NOT_FOUND)
            with self._lock:
                command = self._commands.get(name)
            if command is None:
                raise QmpError(
                    f"The command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND
                )
            checked = command.arguments.check(arguments, "")
            result = command.run(client, checked)
            response["return"] = {} if result is None else result
        except QmpError as exc:
            response["error"] = exc.to_json()
        except Exception as exc:
            log.exception(
                "%s: QMP command %s failed", client.name, command.name if command else "?"
            )
            response["error"] = QmpError(str(exc) or type(exc).__name__).to_json()
        if "id" in request:
            response["id"] = request["id"]
        return response, command

    @staticmethod
    def _check_request(request: dict[str, object]) -> tuple[str, dict[str, object]]:
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpError("QMP input lacks member 'execute'")
        arguments = request.get("arguments", {})
        assert isinstance(arguments, dict)
        return typing.cast(str, request["execute"]), arguments

    def _qmp_capabilities(self, client: _Client, args: dict[str, Any]) -> None:
        if client.negotiated:
            raise QmpError(NEGOTIATION_DONE, ErrorClass.COMMAND_NOT_FOUND)
        wanted: Iterable[_QmpCapability] = args.get("enable", [])
        unavailable = list(dict.fromkeys(c.value for c in wanted))  # we offer none
        if unavailable:
            raise QmpError(f"Capability {', '.join(unavailable)} not available")
        client.negotiated = True

    def _run_quit(self) -> None:
        callback = self._quit_callback
        if callback is None:
            return
        try:
            callback()
        except Exception:
            log.exception("QMP quit callback failed")
