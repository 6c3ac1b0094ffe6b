"""Test helper: a stand-in for the fault thread's userfaultfd, for tests of its policy.

`QueuedFaults` hands out the faults a test queues (`fault`) through an eventfd that the
fault thread polls, as the real userfaultfd's fd becomes readable; ZEROPAGE and WAKE
succeed. Tests that need the kernel to answer otherwise subclass it.
"""

from __future__ import annotations

from postcopy.linux.memory import EventFd
from postcopy.linux.userfaultfd import PageFault, PageFaultFlags


class QueuedFaults:
    """Hands out queued faults through an eventfd."""

    def __init__(self) -> None:
        self._ready = EventFd()
        self._faults: list[PageFault] = []

    def fault(self, address: int, thread_id: int = 0) -> None:
        self._faults.append(PageFault(address, PageFaultFlags.WRITE, thread_id))
        self._ready.write(1)

    def fileno(self) -> int:
        return self._ready.fileno()

    def read_events(self, max_events: int, *, hold_gil: bool = False) -> list[PageFault]:
        self._ready.read()
        faults, self._faults = self._faults, []
        return faults

    def zeropage(self, start: int, length: int) -> int:
        return length

    def wake(self, start: int, length: int) -> None:
        pass

    def close(self) -> None:
        self._ready.close()
