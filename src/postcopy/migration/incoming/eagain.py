"""EAGAIN from UFFDIO_COPY / ZEROPAGE / MOVE: retried a bounded number of times, never hot.

The kernel answers EAGAIN while the address space is changing (a non-cooperative event,
e.g. a MADV_DONTNEED under Feature.EVENT_REMOVE, is pending until the uffd's reader has
read it: Firecracker's handler meets this) or, for UFFDIO_MOVE, while a page cannot be
taken now (locked, being split). `RetryError.done` says how far it got; the rest must be
tried again. Retrying at once can wait for something only another thread can do, and on
a SCHED_FIFO thread (the fault thread, the preempt receiver) a hot retry loop keeps that
other thread off the CPU. So:
- threads that can wait (the receivers, the mover) retry through a `Retrier`: a pause
  between attempts that make no progress, growing from 0.1 to 10 ms, and an
  `IncomingError` naming the ioctl after MAX_ATTEMPTS of them in a row (~2 s);
- the fault thread never waits: it defers the fault and comes back to it at its next
  poll, DEFER_SECONDS later at most (faults.py; Firecracker's handler defers the same way).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from postcopy.linux.userfaultfd import RetryError
from postcopy.migration.incoming.errors import IncomingError

MAX_ATTEMPTS = 200  # in a row without progress: 0.1+0.2+...+6.4 ms, then 10 ms each: ~2 s
FIRST_PAUSE = 0.0001
LONGEST_PAUSE = 0.01
DEFER_SECONDS = 0.001  # the fault thread's poll timeout while it holds deferred faults


class Retrier:
    """Counts the EAGAINs of one ranged ioctl; pauses between them; gives up in the end."""

    def __init__(
        self,
        what: str,
        *,
        attempts: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.what = what
        self.attempts = MAX_ATTEMPTS if attempts is None else attempts
        self._sleep = sleep
        self.failures = 0  # EAGAINs in a row without progress

    def again(self, error: RetryError) -> None:
        """After an EAGAIN: go on at once if it made progress, else pause (or give up)."""
        if error.done:
            self.failures = 0
            return
        self.failures += 1
        if self.failures > self.attempts:
            raise IncomingError(
                f"{self.what} answered EAGAIN {self.attempts} times in a row: "
                "the destination's guest memory kept changing under the migration"
            )
        self._sleep(min(FIRST_PAUSE * 2 ** (self.failures - 1), LONGEST_PAUSE))
