"""Huge pages on this host: the sizes offered, the pools (nr_hugepages), hugetlbfs mounts.

Reads /sys/kernel/mm/hugepages and /proc/mounts; `set_hugepages` and `HugePagePool` change
a pool (root). `HugePagePool` is how tests and benchmarks take huge pages on a machine
others share: it adds pages to the pool and later removes exactly those, under a lock.
Thin bindings, no policy; failures are `PoolError` naming the file and the errno.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from postcopy.units import parse_size

MiB = 1 << 20
HUGE_PAGE_2M = 2 * MiB

_SYS_HUGEPAGES = Path("/sys/kernel/mm/hugepages")
_SYS_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class PoolError(OSError):
    """Changing a huge page pool failed; the message says which file and why."""


def transparent_hugepage_mode() -> str | None:
    """The THP mode selected in sysfs ("always", "madvise" or "never"), None if absent."""
    try:
        text = _SYS_THP_ENABLED.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def huge_page_sizes() -> list[int]:
    """The huge page sizes this kernel offers (from /sys/kernel/mm/hugepages), ascending."""
    sizes = []
    try:
        entries = list(_SYS_HUGEPAGES.iterdir())
    except OSError:
        return []
    for entry in entries:
        name = entry.name  # "hugepages-2048kB"
        if name.startswith("hugepages-") and name.endswith("kB"):
            sizes.append(int(name[len("hugepages-") : -2]) * 1024)
    return sorted(sizes)


def _hugepages_dir(size: int) -> Path:
    return _SYS_HUGEPAGES / f"hugepages-{size // 1024}kB"


def hugepages_reserved(size: int = HUGE_PAGE_2M) -> tuple[int, int]:
    """(total, free) huge pages of `size` in the kernel's pool; (0, 0) if the size is absent."""
    directory = _hugepages_dir(size)
    try:
        total = int((directory / "nr_hugepages").read_text())
        free = int((directory / "free_hugepages").read_text())
    except (OSError, ValueError):
        return (0, 0)
    return (total, free)


def hugepages_available(size: int = HUGE_PAGE_2M) -> int:
    """Free huge pages that no mapping has reserved yet: what a new mapping can take."""
    directory = _hugepages_dir(size)
    try:
        free = int((directory / "free_hugepages").read_text())
        reserved = int((directory / "resv_hugepages").read_text())
    except (OSError, ValueError):
        return 0
    return max(free - reserved, 0)


def set_hugepages(total: int, size: int = HUGE_PAGE_2M) -> int:
    """Ask the kernel for a pool of `total` huge pages of `size` (root); returns the total
    it reached, which is lower when memory is too fragmented."""
    path = _hugepages_dir(size) / "nr_hugepages"
    try:
        path.write_text(f"{total}\n")
        return int(path.read_text())
    except OSError as error:
        raise PoolError(
            error.errno or errno.EINVAL, f"write {path} = {total}: {error.strerror}"
        ) from None


POOL_LOCK_PATH = "/tmp/postcopy-hugepages.lock"


class HugePagePool:
    """`pages` more huge pages of `size` in the kernel's pool, for as long as this lives.

    `reserve()` grows the pool by `pages` (so that pages others hold or reserved stay
    theirs) and `release()` shrinks it by exactly what was added, never below what the
    pool held when the reservation began. Both read-modify-write nr_hugepages under an
    flock, so that processes reserving at the same time do not undo each other. Root only.

    `still_in_use`, after `release()`: how many of the pages could not leave the pool
    because a mapping still held them (the kernel keeps them as surplus pages and frees
    them when they are unmapped). It says whether this reservation's users are gone, which
    the machine-wide counts cannot say while others reserve pages too. It errs one way
    only: while others hold free pages in the pool, the kernel may free those instead and
    read 0; it reads more than 0 only when pages are still in use beyond every reservation.
    """

    def __init__(
        self, pages: int, size: int = HUGE_PAGE_2M, *, lock_path: str = POOL_LOCK_PATH
    ) -> None:
        if pages < 0:
            raise ValueError(f"cannot reserve {pages} huge pages")
        self.pages = pages
        self.size = size
        self.added = 0
        self.still_in_use = 0
        self._lock_path = lock_path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def reserve(self) -> HugePagePool:
        """Grow the pool; PoolError (ENOMEM) if the kernel gives fewer pages, with
        the pool left as it was."""
        with self._locked():
            before, _ = hugepages_reserved(self.size)
            reached = set_hugepages(before + self.pages, self.size)
            self.added += max(reached - before, 0)
            if reached < before + self.pages:
                got = reached - before
                self._shrink()
                raise PoolError(
                    errno.ENOMEM,
                    f"huge page pool: the kernel gave {got} of {self.pages} more "
                    f"{self.size >> 10} KiB pages (memory too fragmented or too small)",
                )
        return self

    def release(self) -> None:
        """Give back what `reserve` added (idempotent)."""
        with self._locked():
            self._shrink()

    def _shrink(self) -> None:
        if self.added:
            current, _ = hugepages_reserved(self.size)
            target = max(current - self.added, 0)
            # below the pages in use, the kernel turns the rest into surplus pages, and
            # nr_hugepages reads above the target until they are unmapped
            self.still_in_use = max(set_hugepages(target, self.size) - target, 0)
            self.added = 0

    def __enter__(self) -> HugePagePool:
        return self.reserve()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def default_huge_page_size() -> int | None:
    """Hugepagesize from /proc/meminfo: the size of a hugetlbfs mount without pagesize=."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hugetlbfs_mounts() -> list[tuple[str, int]]:
    """Every hugetlbfs mount in /proc/mounts as (mount point, page size)."""
    mounts = []
    default = default_huge_page_size() or HUGE_PAGE_2M
    try:
        with open("/proc/mounts") as table:
            lines = table.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        size = default
        for option in fields[3].split(","):
            if option.startswith("pagesize="):
                size = parse_size(option.split("=", 1)[1])
        # /proc/mounts escapes spaces in paths as \040.
        mounts.append((fields[1].replace("\\040", " "), size))
    return mounts


def mount_hugetlbfs_path(page_size: int = HUGE_PAGE_2M) -> str | None:
    """The first hugetlbfs mount point serving `page_size` pages, or None."""
    for path, size in hugetlbfs_mounts():
        if size == page_size:
            return path
    return None
