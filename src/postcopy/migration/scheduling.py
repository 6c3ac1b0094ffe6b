"""How the migration's threads are scheduled, and why: the policy over `linux.sched`.

Three classes of thread, set by each thread on itself when it starts:
- urgent (`prefer_this_thread`): the three hops of a page request, the destination's
  `fault` and `preempt` and the source's `return-path`. They wake for a few microseconds of
  work, then sleep again in poll or recv. With a busy host a woken normal thread may wait
  for the running one's time slice to end (milliseconds under EEVDF) at each hop; a
  SCHED_FIFO thread runs at once (request p50 ~1-7 ms with preempt before, ~1 ms after;
  blocktime of 1 GiB memtouch ~235 -> ~60 ms). They must never spin: the kernel's
  real-time throttling keeps only 5% of every CPU for normal threads. Without
  CAP_SYS_NICE, or with `realtime` off, nice -10 instead.
- bulk (`set_thread_nice(x-migration-thread-nice)`, -5 by default): the source's
  `migration` thread, the destination's receiver and prefaulter. Below the vCPUs' 0 they
  win a contended CPU.
- background (`set_thread_nice(BACKGROUND_NICE)`): the destination's mover, which must
  never delay a fault.
A bulk thread is urgent for a moment (`urgent_for_a_moment`) where the guest waits for it:
the source's `migration` thread from the stop to the package (or the last pages) sent, the
downtime. Its few milliseconds of work are otherwise interleaved with the destination's
receiver and prefaulter, still applying discards at the same nice on the same two cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from postcopy.linux import sched

URGENT_NICE = -10
URGENT_RT_PRIORITY = 1  # the lowest real-time priority: above every normal thread, no more
BACKGROUND_NICE = 5


def set_thread_nice(nice: int) -> None:
    """Set the calling thread's nice value; below 0 needs CAP_SYS_NICE (without: as is)."""
    with contextlib.suppress(OSError):
        sched.set_nice(nice)


def prefer_this_thread(realtime: bool = True) -> None:
    """Give the calling thread priority over the bulk-transfer threads: SCHED_FIFO at
    priority 1, or nice -10 without CAP_SYS_NICE or with `realtime` off."""
    if realtime:
        with contextlib.suppress(OSError):
            sched.set_policy(sched.Policy.FIFO, URGENT_RT_PRIORITY)
            return
    set_thread_nice(URGENT_NICE)


@contextlib.contextmanager
def urgent_for_a_moment() -> Iterator[None]:
    """The calling thread SCHED_FIFO at priority 1 inside the block (as is without
    CAP_SYS_NICE), then back to its normal policy and nice value. For a bounded piece of
    work only: a real-time thread that spins keeps normal threads off its CPU."""
    nice = sched.get_nice()
    try:
        sched.set_policy(sched.Policy.FIFO, URGENT_RT_PRIORITY)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        sched.set_policy(sched.Policy.OTHER)
        set_thread_nice(nice)
