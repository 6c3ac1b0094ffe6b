"""Fixtures shared by test modules: VM processes, huge pages, threads and things to close."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.handshakes import Closing
from tests.hugepages import hugetlbfs_mount
from tests.test_linux_userfaultfd import Scene
from tests.vmprocess import VmProcess, vm_processes


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"pytest got signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A suite ended by SIGTERM (timeout(1), a CI job cancelled) ends as Ctrl-C does, with
    every fixture's teardown: Python's default for SIGTERM is to die where it stands, and
    the VM processes a test had started lived on (one for 43 minutes, its parent gone)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[VmProcess]]:
    """A list to put started VM processes in; every one is closed when the test ends."""
    with vm_processes(tmp_path) as started:
        yield started


@pytest.fixture
def hugetlbfs_2m() -> Iterator[str]:
    """A private hugetlbfs mount with 4 more 2 MiB pages in the pool; undone afterwards."""
    with hugetlbfs_mount(4) as directory:
        yield directory


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for the other end of a connection (the accepting side, a peer)."""
    with ThreadPoolExecutor(4) as executor:
        yield executor


@pytest.fixture
def closing() -> Iterator[Closing]:
    """Everything appended here is closed at the end of the test, whatever happened."""
    things: Closing = []
    yield things
    for thing in reversed(things):
        thing.close()


@pytest.fixture
def scene() -> Iterator[Scene]:
    """Userfaultfds, handlers, touching threads and mappings, cleaned up in a safe order."""
    scene = Scene()
    try:
        yield scene
    finally:
        scene.close()
