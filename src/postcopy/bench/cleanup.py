"""Everything a bench run starts is ended here: processes by PID, namespaces, files.

A `Cleanup` is an undo stack: each resource registers how to release it the moment it
exists, and `close()` releases them in reverse order, continuing past failures. The
bench's signal handler turns SIGTERM into KeyboardInterrupt so that the `finally` that
closes the stack runs on Ctrl-C and on `kill` alike; while the stack is being closed,
further SIGINT/SIGTERM are ignored so that cleanup itself is not cut short.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from typing import IO, Any

from postcopy.tools.signals import signals_ignored
from postcopy.tools.vmchild import end_process

log = logging.getLogger(__name__)


class Cleanup:
    """An undo stack of releases, run newest first by `close()`."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def push(self, what: str, release: Callable[[], None]) -> None:
        self._undo.append((what, release))

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = None,
        name: str = "",
    ) -> subprocess.Popen[bytes]:
        """Start a process in its own session (a terminal's Ctrl-C reaches only us; we
        end it, by its PID, in order) and register its end."""
        process = subprocess.Popen(
            list(argv),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes.append(process)
        self.push(f"process {name or argv[0]} (pid {process.pid})", lambda: end_process(process))
        return process

    def close(self) -> None:
        with signals_ignored():
            while self._undo:
                what, release = self._undo.pop()
                try:
                    release()
                except Exception as error:
                    log.warning("cleanup of %s failed: %s", what, error)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
