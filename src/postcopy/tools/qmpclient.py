"""A small synchronous QMP client for the commands, the bench and the tests' helpers.

The commands must run from a plain install (`make demo` installs qemu.qmp for the README's
tour, but the package does not depend on it); this is the few lines of QMP they need: the
greeting, the capabilities negotiation, `execute` with answers matched by id, and events
kept aside for whoever asks. Any QMP server works, ours or QEMU's. Errors are one sentence
each, fit to print as a command's single line of failure.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import time
from typing import Any

# how long `connect_to` waits by default for a socket that is about to appear
DEFAULT_WAIT = 0.0


class QmpClientError(Exception):
    """Talking to a QMP socket failed (not there, nobody listening, closed, not QMP)."""


class QmpCommandError(QmpClientError):
    """The server answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    """One negotiated connection to a QMP Unix socket.

    `execute()` returns the command's "return" value or raises QmpCommandError; events
    that arrive meanwhile are kept in `events` (oldest first) until `take_events()`.
    """

    def __init__(self, path: str, *, timeout: float = 10.0, name: str = "QMP") -> None:
        self.path = str(path)
        self.name = name
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    @classmethod
    def connect_to(
        cls,
        path: str,
        *,
        timeout: float = 10.0,
        name: str = "QMP",
        wait: float = DEFAULT_WAIT,
        process: subprocess.Popen[bytes] | None = None,
    ) -> QmpClient:
        """Connect and negotiate. Up to `wait` seconds are allowed for a socket that is not
        there yet or not accepting yet (a VM that is still starting); with `process`, the
        wait ends as soon as that process has exited."""
        client = cls(path, timeout=timeout, name=name)
        deadline = time.monotonic() + wait
        while True:
            try:
                client.connect()
                return client
            except QmpCommandError:
                raise
            except QmpClientError as error:
                if process is not None and process.poll() is not None:
                    raise QmpClientError(
                        f"the process serving the {name} socket {path} exited "
                        f"(status {process.returncode})"
                    ) from None
                if time.monotonic() >= deadline:
                    if wait > 0:
                        raise QmpClientError(f"{error}; waited {wait:g} s for it") from None
                    raise
                time.sleep(0.05)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise QmpClientError(
                f"no {self.name} socket at {self.path} (is the VM running? "
                "`postcopy vm run --qmp PATH` creates it)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise QmpClientError(
                f"nothing listens on the {self.name} socket {self.path} (the VM has exited?)"
            ) from None
        except OSError as error:
            sock.close()
            raise QmpClientError(
                f"cannot connect to the {self.name} socket {self.path}: {error.strerror or error}"
            ) from None
        self._sock = sock
        self._buffer = b""
        greeting = self._read_message()
        if not isinstance(greeting.get("QMP"), dict):
            self.close()
            raise QmpClientError(
                f"{self.path} does not speak QMP (its first message is not a QMP greeting)"
            )
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._sock is None:
            raise QmpClientError(f"the {self.name} connection is closed")
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as error:
            raise QmpClientError(
                f"{self.name} connection lost ({error.strerror or error})"
            ) from None
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
            elif message.get("id", request_id) != request_id:
                continue  # the answer to a command that timed out before
            elif "return" in message:
                return message["return"]
            elif "error" in message:
                answer = message["error"]
                if not isinstance(answer, dict):
                    answer = {"desc": str(answer)}
                raise QmpCommandError(
                    command, str(answer.get("class", "GenericError")), str(answer.get("desc", ""))
                )

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise QmpClientError(
                    f"the {self.name} server did not answer within {self.timeout:g} s"
                ) from None
            except OSError as error:
                raise QmpClientError(
                    f"{self.name} connection lost ({error.strerror or error})"
                ) from None
            if not data:
                raise QmpClientError(
                    f"the {self.name} server closed the connection (the VM has exited?)"
                )
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpClientError(f"{self.name} sent a line that is not JSON") from None
        if not isinstance(message, dict):
            raise QmpClientError(f"{self.name} sent a JSON value that is not an object")
        return message
