"""linux.sched on the real kernel: each call changes the thread it names, and only it."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

from postcopy.linux import sched


def on_a_thread(target: Callable[[], object]) -> object:
    """Run `target` on a fresh thread (so the test's own thread keeps its scheduling)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(target())
        except BaseException as error:
            result.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def test_nice_is_per_thread() -> None:
    def lower_priority() -> tuple[int, int]:
        sched.set_nice(7)
        return sched.get_nice(), sched.get_nice(main_tid)

    main_tid = sched.thread_id()
    before = sched.get_nice()
    assert on_a_thread(lower_priority) == (7, before)


def test_fifo_policy_and_back() -> None:
    """As root (these machines, and CI) a thread can go real-time and come back."""

    def go_realtime() -> tuple[tuple[sched.Policy, int], tuple[sched.Policy, int]]:
        sched.set_policy(sched.Policy.FIFO, 1)
        realtime = sched.get_policy()
        sched.set_policy(sched.Policy.OTHER)
        return realtime, sched.get_policy()

    assert on_a_thread(go_realtime) == ((sched.Policy.FIFO, 1), (sched.Policy.OTHER, 0))


def test_a_real_time_priority_of_zero_is_refused() -> None:
    error = on_a_thread(lambda: sched.set_policy(sched.Policy.FIFO, 0))
    assert isinstance(error, OSError) and error.errno == errno.EINVAL


def test_another_thread_by_id() -> None:
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def park() -> None:
        tids.append(sched.thread_id())
        ready.set()
        done.wait()

    thread = threading.Thread(target=park)
    thread.start()
    try:
        ready.wait()
        sched.set_nice(3, tids[0])
        assert sched.get_nice(tids[0]) == 3
    finally:
        done.set()
        thread.join()


def test_an_unknown_thread_is_an_error() -> None:
    with pytest.raises(ProcessLookupError):
        sched.get_nice(2**22 + 12345)
