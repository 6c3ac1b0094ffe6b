"""Thread scheduling: the nice value and the scheduling policy of one thread (sched(7)).

Linux schedules threads, not processes: setpriority(2) with PRIO_PROCESS and
sched_setscheduler(2) given a thread id change that thread only. A tid of 0 is the
calling thread. Going below nice 0, or into a real-time policy, needs CAP_SYS_NICE (or an
RLIMIT_NICE / RLIMIT_RTPRIO that allows it); otherwise these raise OSError (EACCES,
EPERM). No policy here: which thread gets what is `migration/scheduling.py`.
"""

from __future__ import annotations

import enum
import os
import threading


class Policy(enum.IntEnum):
    OTHER = os.SCHED_OTHER
    FIFO = os.SCHED_FIFO
    RR = os.SCHED_RR
    BATCH = os.SCHED_BATCH
    IDLE = os.SCHED_IDLE


def thread_id() -> int:
    """The calling thread's kernel thread id (gettid)."""
    return threading.get_native_id()


def set_nice(nice: int, tid: int = 0) -> None:
    """setpriority(PRIO_PROCESS, tid, nice): the thread's nice value, -20..19."""
    os.setpriority(os.PRIO_PROCESS, tid or thread_id(), nice)


def get_nice(tid: int = 0) -> int:
    """getpriority(PRIO_PROCESS, tid)."""
    return os.getpriority(os.PRIO_PROCESS, tid or thread_id())


def set_policy(policy: Policy, priority: int = 0, tid: int = 0) -> None:
    """sched_setscheduler(tid, policy, priority): priority 1..99 for FIFO and RR, else 0."""
    os.sched_setscheduler(tid or thread_id(), policy, os.sched_param(priority))


def get_policy(tid: int = 0) -> tuple[Policy, int]:
    """sched_getscheduler and sched_getparam: the thread's policy and real-time priority."""
    tid = tid or thread_id()
    return Policy(os.sched_getscheduler(tid)), os.sched_getparam(tid).sched_priority


def runnable_seconds(tid: int) -> float:
    """How long a thread of this process has been runnable, on a CPU or waiting for one
    (/proc/self/task/TID/schedstat: run time + run-queue wait, ns): the rest of its life
    it slept (blocked in the kernel: a userfault, a futex, I/O)."""
    with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as stat:
        run, wait, _slices = stat.read().split()
    return (int(run) + int(wait)) / 1e9
