"""A `postcopy vm run` process started by a tool (demo, bench, tests), and a free port.

`VmChild` starts the process in its own session (a terminal's Ctrl-C reaches only the tool,
which ends its children in order, by PID), with its QMP socket, console and stderr in a
working directory, and waits until the QMP socket accepts, or says in one line why the
VM never got there (the last line it wrote on stderr). `end()` closes QMP, sends SIGTERM
to the PID, SIGKILL if it does not go, and removes a socket a killed process left.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from postcopy.tools.qmpclient import QmpClient, QmpClientError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for a VM process to offer its QMP socket
STOP_TIMEOUT = 10.0  # seconds for a VM process to exit after SIGTERM or quit
VM_RUN = (sys.executable, "-m", "postcopy", "vm", "run")


class VmChildError(Exception):
    """The VM process exited or never offered its QMP socket; one line for the user."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at this moment (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class VmChild:
    """One `postcopy vm run` process; `args` are the options after --qmp/--console."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        args: Sequence[str],
        *,
        trace: bool = False,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.console_path = workdir / f"{name}.console"
        self.stderr_path = workdir / f"{name}.stderr"
        self.trace_path: Path | None = workdir / f"{name}.trace.jsonl" if trace else None
        self.client: QmpClient | None = None
        command = [
            *VM_RUN,
            "--qmp",
            str(self.qmp_path),
            "--console",
            str(self.console_path),
            *(["--trace", str(self.trace_path)] if self.trace_path is not None else []),
            *args,
        ]
        if wrap is not None:
            command = wrap(command)  # e.g. `ip netns exec NS ...`, which execs: same PID
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_tail(self, limit: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def last_error(self) -> str:
        lines = self.stderr_tail().strip().splitlines()
        return lines[-1] if lines else "no error output"

    def console(self) -> bytes:
        try:
            return self.console_path.read_bytes()
        except FileNotFoundError:
            return b""

    def passes(self, guest: str) -> int:
        """Pass markers a built-in guest wrote on this VM's console."""
        from postcopy.vm.guests import pass_count

        return pass_count(guest, self.console())

    def connect(self, timeout: float = START_TIMEOUT, *, client_timeout: float = 30.0) -> QmpClient:
        """Wait until the QMP socket accepts and negotiate (kept as `client`)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise VmChildError(
                    f"the {self.name} VM exited with status "
                    f"{self.process.returncode}: {self.last_error()}"
                )
            if self.qmp_path.exists():
                try:
                    self.client = QmpClient.connect_to(
                        str(self.qmp_path), name=f"{self.name} QMP", timeout=client_timeout
                    )
                    return self.client
                except QmpClientError:
                    pass
            if time.monotonic() > deadline:
                raise VmChildError(
                    f"the {self.name} VM offered no QMP socket within "
                    f"{timeout:g} s: {self.last_error()}"
                )
            time.sleep(0.05)

    def wait_until_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the QMP socket accepts, for a caller with a QMP client of its own."""
        self.connect(timeout).close()
        self.client = None

    def quit(self, grace: float = STOP_TIMEOUT) -> None:
        """QMP `quit`, then `end()` whatever is left."""
        if self.client is not None and self.alive():
            with contextlib.suppress(QmpClientError):
                self.client.execute("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        self.end(grace)

    def end(self, grace: float = STOP_TIMEOUT) -> None:
        """Close QMP, SIGTERM the process by its PID, SIGKILL it if it does not go."""
        if self.client is not None:
            self.client.close()
            self.client = None
        end_process(self.process, grace)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()  # a VM that was killed leaves its socket behind


def end_process(process: subprocess.Popen[bytes], grace: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process by its PID, then SIGKILL if it does not exit within `grace`."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0f s: killing it", process.pid, grace)
        process.kill()
        process.wait(grace)
