"""Test helper: a `postcopy vm run` process driven over QMP with qemu.qmp's sync client.

Every process started here is ended by its PID when the test ends, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VmProcess:
    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.stderr_path = workdir / f"{name}.stderr"
        self.console_path = workdir / f"{name}.console"
        command = [
            sys.executable,
            "-m",
            "postcopy",
            "vm",
            "run",
            "--qmp",
            self.qmp_path,
            "--console",
            str(self.console_path),
            *args,
        ]
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr)
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited {self.process.returncode}: {self.stderr()}")
            if os.path.exists(self.qmp_path):
                try:
                    self.qmp.connect(negotiate=True)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no QMP socket after 30 s: {self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def console(self) -> bytes:
        return self.console_path.read_bytes() if self.console_path.exists() else b""

    def cmd(self, name: str, **args: Any) -> Any:
        response = self.qmp.cmd_raw(name, args or None)
        if "error" in response:
            raise QmpCommandError(name, response["error"]["desc"])
        return response["return"]

    def wait_migration(self, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in statuses:
                return dict(info)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"migration still {info.get('status')} after {timeout} s: {info}"
                    f"\nstderr: {self.stderr()}"
                )
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stderr.close()


class QmpCommandError(RuntimeError):
    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.desc = desc


@contextmanager
def vm_processes(workdir: Path) -> Iterator[list[VmProcess]]:
    started: list[VmProcess] = []
    try:
        yield started
    finally:
        for vm in started:
            vm.close()
