"""Test helper: a `postcopy vm run` process driven over QMP with qemu.qmp's sync client.

The process is started and awaited by the package's own toolkit (postcopy.tools.vmchild,
as the demo and the bench do); the tests then drive it with a third-party client, as a
user's management code would. Every process started here is ended by its PID when the
test ends, even on failure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from postcopy.tools.vmchild import VmChild, VmChildError, free_port

__all__ = ["QmpCommandError", "VmProcess", "free_port", "vm_processes"]


class VmProcess:
    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.child = VmChild(name, workdir, args)
        self.process = self.child.process
        self.qmp_path = str(self.child.qmp_path)
        self.stderr_path = self.child.stderr_path
        self.console_path = self.child.console_path
        try:
            self.child.wait_until_ready()
            self.qmp = QEMUMonitorProtocol(self.qmp_path)
            self.qmp.connect(negotiate=True)
        except BaseException as error:
            # never appended to a test's list: end it here, or it outlives the test
            self.child.end()
            if isinstance(error, VmChildError):
                raise RuntimeError(f"{error}\nstderr: {self.stderr()}") from None
            raise

    def stderr(self) -> str:
        return self.child.stderr_tail(100_000)

    def console(self) -> bytes:
        return self.child.console()

    def cmd(self, name: str, **args: Any) -> Any:
        response = self.qmp.cmd_raw(name, args or None)
        if "error" in response:
            raise QmpCommandError(name, response["error"]["desc"])
        return response["return"]

    def wait_passes(self, marker: bytes, count: int, timeout: float = 60) -> int:
        """Wait until the console shows `count` of the guest's pass markers; return how many."""
        deadline = time.monotonic() + timeout
        while (seen := self.console().count(marker)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"console has {seen} of {count} {marker!r}")
            time.sleep(0.05)
        return seen

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
        self.child.end()


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
