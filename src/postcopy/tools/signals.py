"""The one way the tools swap SIGINT/SIGTERM handlers for a while, and put them back.

- `interruptible()`: the signals raise KeyboardInterrupt, so that `kill PID` runs the same
  cleanup (`finally`) as Ctrl-C;
- `signals_ignored()`: while releasing resources, so that the cleanup is not cut short;
- `InterruptCounter`: counts them instead, so that a QMP exchange is never cut in half and
  the caller decides what an interrupt means now (`postcopy migrate`: cancel a precopy,
  refuse in postcopy); the third one raises KeyboardInterrupt, the user insists;
- `handling()`: any handler, for anything else.

Only the main thread can set handlers; elsewhere these do nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers
INTERRUPTS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handling(handler: Handler, signals: Sequence[signal.Signals] = INTERRUPTS) -> Iterator[None]:
    """`handler` for `signals` while inside; the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def interruptible(signals: Sequence[signal.Signals] = INTERRUPTS) -> Iterator[None]:
    """`signals` raise KeyboardInterrupt in the main thread while inside."""
    with handling(_interrupt, signals):
        yield


@contextmanager
def signals_ignored(signals: Sequence[signal.Signals] = INTERRUPTS) -> Iterator[None]:
    """`signals` are ignored while inside (a cleanup that must finish)."""
    with handling(signal.SIG_IGN, signals):
        yield


class InterruptCounter:
    """Counts SIGINT/SIGTERM inside `catching()` instead of raising; the third raises."""

    INSIST = 3

    def __init__(self) -> None:
        self.count = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count >= self.INSIST:
            raise KeyboardInterrupt

    @contextmanager
    def catching(self) -> Iterator[None]:
        with handling(self._handler):
            yield
