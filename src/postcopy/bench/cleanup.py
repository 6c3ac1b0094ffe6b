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
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import IO, Any

log = logging.getLogger(__name__)

TERMINATE_GRACE = 10.0


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


def end_process(process: subprocess.Popen[bytes], grace: float = TERMINATE_GRACE) -> None:
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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def _handling(handler: signal.Handlers | Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` while inside; the previous handlers after."""
    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread while inside."""
    with _handling(_interrupt):
        yield


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Defer SIGINT/SIGTERM while releasing resources (only possible in the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _handling(signal.SIG_IGN):
        yield


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
