"""A small synchronous QMP client, so `postcopy bench` needs nothing beyond the package.

QMP is JSON objects over a Unix socket, one per line: the server's greeting, then the
`qmp_capabilities` handshake, then commands answered by {"return": ...} or {"error": ...}
with the command's "id" echoed, and asynchronous {"event": ...} messages in between
(kept in `events`).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
from typing import Any


class QmpError(RuntimeError):
    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc


class QmpClient:
    """One QMP connection; `cmd()` sends a command and returns its "return" value."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self._sock = sock
        self._sock.settimeout(timeout)
        self._buffer = b""
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError("greeting", f"not a QMP server: {self.greeting}")
        self.cmd("qmp_capabilities")

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        process: subprocess.Popen[bytes] | None = None,
        wait: float = 60.0,
        timeout: float = 30.0,
    ) -> QmpClient:
        """Connect to `path`, waiting up to `wait` seconds for the socket to appear while
        `process` (the server) is alive."""
        deadline = time.monotonic() + wait
        while True:
            if process is not None and process.poll() is not None:
                raise ConnectionError(f"QMP server process exited with {process.returncode}")
            if os.path.exists(path):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                    return cls(sock, timeout)
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no QMP server on {path} after {wait:.0f} s")
            time.sleep(0.05)

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("QMP server closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError("read", f"not a JSON object: {line[:200]!r}")
        return message

    def cmd(self, name: str, **arguments: Any) -> Any:
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": name, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != request_id:
                continue
            if "error" in message:
                raise QmpError(name, str(message["error"].get("desc", message["error"])))
            return message.get("return")

    def close(self) -> None:
        self._sock.close()
