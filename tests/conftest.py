"""Fixtures shared by the test modules that start VM processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hugepages import hugetlbfs_mount
from tests.vmprocess import VmProcess, vm_processes


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
