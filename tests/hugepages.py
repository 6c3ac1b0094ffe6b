"""Test helper: huge pages taken for a test and given back, also when the test fails.

`huge_pages(n)` grows the 2 MiB pool by n pages (`HugePagePool`: relative to what is
there, under a lock, so other users of the machine keep theirs), and checks when it gives
them back that none is still in use; `hugetlbfs_mount(n)` also mounts hugetlbfs in a
temporary directory. Both skip, saying why, only when the
kernel refuses; on this machine (root) that is a failure to investigate.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from postcopy.linux.hugepages import HUGE_PAGE_2M, HugePagePool, PoolError


@contextmanager
def huge_pages(pages: int, *, outlived: bool = False) -> Iterator[HugePagePool]:
    """`pages` more 2 MiB pages, given back at the end; then none may still be in use,
    unless the caller says its mappings `outlived` the reservation (a fixture unmaps them
    later: the kernel frees those pages then)."""
    pool = HugePagePool(pages, HUGE_PAGE_2M)
    try:
        pool.reserve()
    except PoolError as error:
        pytest.skip(f"cannot reserve {pages} 2 MiB huge pages: {error}")
    try:
        yield pool
    except BaseException:
        pool.release()
        raise
    pool.release()
    if outlived:
        return
    # what this test added, not the machine-wide count (others reserve pages meanwhile):
    # every page must leave the pool, none still held by a mapping of the test's
    assert pool.still_in_use == 0, (
        f"{pool.still_in_use} of the {pages} huge pages taken for the test were still in "
        "use when it gave them back (a VM or a mapping outlived the test)"
    )


@contextmanager
def hugetlbfs_mount(pages: int) -> Iterator[str]:
    """A private hugetlbfs mount (2 MiB pages) with `pages` more pages in the pool."""
    with huge_pages(pages):
        directory = tempfile.mkdtemp(prefix="postcopy-hugetlbfs-")
        try:
            result = subprocess.run(
                ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", directory],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                pytest.skip(f"mount -t hugetlbfs refused: {result.stderr.strip()}")
            try:
                yield directory
            finally:
                leftovers = os.listdir(directory)
                unmount(directory)
                assert not leftovers, f"files left on the hugetlbfs mount: {leftovers}"
        finally:
            os.rmdir(directory)


def unmount(directory: str) -> None:
    """Unmount; if something still uses the mount, detach it anyway and fail loudly."""
    result = subprocess.run(["umount", directory], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", directory], check=True)
        raise AssertionError(f"hugetlbfs mount still in use at teardown: {result.stderr.strip()}")
