"""The host check's items per RAM backend: what each needs of userfaultfd, pool and mounts.

Part of `postcopy check` (hostcheck.py). One item per backend of `vm run --memory-backend`:
`ram` (anonymous memory), `memfd` (shmem), `memfd-hugetlb` (a hugetlb memfd), `file` (a
file: on hugetlbfs as memfd-hugetlb plus a mount, on tmpfs as memfd, anywhere else precopy
only), and `huge pages` (the pool, total and free, and the hugetlbfs mounts). Each names
the userfaultfd features and ioctls the backend needs (migration/backends.py), probes a
registration of that kind of memory, and says how to fix what is missing. Backends the RAM
uses are required; the others are reported for information.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from postcopy.linux import hugepages, memory
from postcopy.linux.hugepages import HUGE_PAGE_2M, PoolError
from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import Feature, Ioctl, UserfaultFd
from postcopy.migration.backends import uffd_needs
from postcopy.migration.hostcheck import CheckItem

MEMORY_OF_BACKEND = {
    "ram": "anonymous",
    "memfd": "shmem",
    "memfd-hugetlb": "hugetlb",
}


@dataclass(frozen=True)
class RamUse:
    """What the RAM to migrate is made of: memory types in use (ram.backend), minor-fault
    mode, its size (for the pool), and whether it is a file on a hugetlbfs mount."""

    memory_types: frozenset[str] = frozenset({"anonymous"})
    minor: bool = False
    ram_bytes: int | None = None
    hugetlbfs_file: bool = False
    huge_page_sizes: tuple[int, ...] = field(default=())


def _names(flags: Feature | Ioctl) -> str:
    return " ".join(member.name for member in type(flags) if member in flags and member.name)


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def _probe(
    working: str,
    available: Feature,
    memory_type: str,
    minor: bool,
    make: Any,
    facts: dict[str, Any],
) -> tuple[bool, str, str | None]:
    """Register one page of `memory_type` as postcopy would; (ok, detail, fix)."""
    needs = uffd_needs(memory_type, minor=minor)
    missing = needs.features & ~available
    parts = [f"needs {needs.describe()}"]
    if missing:
        kernel = "Linux >= 5.13" if minor else "Linux >= 4.11"
        return False, f"{parts[0]}; this kernel lacks {_names(missing)}", f"use {kernel}"
    try:
        with UserfaultFd.open(needs.features, via=working) as uffd, make() as area:
            allowed = uffd.register(area.address, area.length, needs.mode)
            uffd.unregister(area.address, area.length)
    except PoolError as error:
        return True, f"{parts[0]}; not probed: {error.strerror or error}", None
    except OSError as error:
        return False, f"{parts[0]}; registering failed: {error}", "use a newer kernel"
    facts[f"{memory_type}_{'minor_' if minor else ''}register_ioctls"] = _names(allowed).split()
    lacking = needs.ioctls & ~allowed
    parts.append(f"registration offers {_names(allowed)}")
    if lacking:
        return False, "; ".join(parts) + f", not {_names(lacking)}", "use a newer kernel"
    return True, "; ".join(parts), None


def _probe_hugetlb_memfd() -> Mapping:
    if hugepages.hugepages_available(HUGE_PAGE_2M) < 1:
        raise PoolError(0, "no free 2 MiB page to try with")
    try:
        return Mapping.memfd(HUGE_PAGE_2M, "postcopy-check", hugetlb=True)
    except OSError as error:  # taken meanwhile
        raise PoolError(0, f"no free 2 MiB page to try with ({error.strerror})") from None


def backend_items(
    working: str, available: Feature, use: RamUse, facts: dict[str, Any]
) -> list[CheckItem]:
    """The items for every backend; those the RAM uses are required."""
    items = []
    base = memory.page_size()
    for backend, memory_type, make, why in (
        (
            "ram",
            "anonymous",
            lambda: Mapping.anonymous(base),
            "private anonymous RAM, filled by UFFDIO_COPY/ZEROPAGE (or moved back)",
        ),
        (
            "memfd",
            "shmem",
            lambda: Mapping.memfd(base, "postcopy-check"),
            "shared memory: pages placed by COPY, discarded by punching holes",
        ),
        (
            "memfd-hugetlb",
            "hugetlb",
            _probe_hugetlb_memfd,
            "2 MiB pages: requested, sent and placed a whole huge page at a time",
        ),
    ):
        in_use = memory_type in use.memory_types
        minor = use.minor and memory_type != "anonymous"
        ok, detail, fix = _probe(working, available, memory_type, False, make, facts)
        if ok and minor:
            ok, minor_detail, fix = _probe(working, available, memory_type, True, make, facts)
            detail += f"; minor-fault mode: {minor_detail}"
        facts[f"backend_{backend}"] = {"ok": ok, "in_use": in_use, "detail": detail}
        items.append(CheckItem(f"RAM backend {backend}", ok, detail, fix, in_use, why))
    other = "other" in use.memory_types
    items.append(
        CheckItem(
            "RAM backend file",
            not other,
            "the RAM's file is on neither hugetlbfs nor tmpfs: only precopy can move it"
            if other
            else "a file on hugetlbfs is served as memfd-hugetlb (plus a mount), on tmpfs as memfd",
            "put the RAM file on a hugetlbfs or tmpfs mount, or use precopy" if other else None,
            other,
            "userfaultfd serves anonymous memory, shmem and hugetlbfs only",
        )
    )
    items.append(_huge_pageCheckItem(available, use, facts))
    return items


def _huge_pageCheckItem(available: Feature, use: RamUse, facts: dict[str, Any]) -> CheckItem:
    sizes = hugepages.huge_page_sizes()
    mounts = hugepages.hugetlbfs_mounts()
    pools = {size: hugepages.hugepages_reserved(size) for size in sizes}
    facts["huge_page_pools"] = [
        {
            "size": size,
            "total": pools[size][0],
            "free": pools[size][1],
            "mounts": [path for path, mounted in mounts if mounted == size],
        }
        for size in sizes
    ]
    has_feature = Feature.MISSING_HUGETLBFS in available
    pool_text = (
        ", ".join(
            f"{_size(size)}: {pools[size][0]} pages ({pools[size][1]} free), "
            + (
                f"mounted at {', '.join(p for p, s in mounts if s == size)}"
                if any(s == size for _, s in mounts)
                else "no hugetlbfs mount"
            )
            for size in sizes
        )
        or "no huge page sizes"
    )
    detail = f"MISSING_HUGETLBFS {'yes' if has_feature else 'no'}; {pool_text}"
    why = "RAM on huge pages takes them from the pool; a file on huge pages needs a mount"
    needed = sorted(
        set(use.huge_page_sizes) | ({HUGE_PAGE_2M} if "hugetlb" in use.memory_types else set())
    )
    if not needed:
        fix = None if has_feature else "use a kernel with MISSING_HUGETLBFS"
        return CheckItem(
            "huge pages", has_feature, detail + " (RAM uses base pages)", fix, False, why
        )
    problems, fixes = [], []
    if not has_feature:
        problems.append("userfaultfd lacks MISSING_HUGETLBFS")
        fixes.append("use Linux >= 4.11")
    for size in needed:
        label = _size(size)
        if size not in sizes:
            problems.append(f"{label} pages are not offered by this kernel")
            continue
        kib = size // 1024
        total, _ = pools[size]
        free = hugepages.hugepages_available(size)
        wanted = -(-use.ram_bytes // size) if use.ram_bytes else 0
        if free < wanted or total == 0:
            problems.append(
                f"{free} free {label} pages, the RAM needs {wanted or 'some'}"
                + (" (the source and the destination each, on one host)" if wanted else "")
            )
            fixes.append(
                f"`echo {total + wanted - free if wanted else 'N'} > "
                f"/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages`"
            )
        if use.hugetlbfs_file and not any(mounted == size for _, mounted in mounts):
            problems.append(f"no hugetlbfs mount for {label} pages")
            fixes.append(
                f"`mount -t hugetlbfs -o pagesize={kib // 1024}M none /dev/hugepages`"
                if kib % 1024 == 0
                else f"mount hugetlbfs with pagesize={kib}K"
            )
    return CheckItem(
        "huge pages",
        not problems,
        ("; ".join(problems) + " — " if problems else "") + detail,
        " and ".join(fixes) or None,
        True,
        why,
    )


def memory_type_of_backend(kind: str, path: str | None, shared: bool) -> tuple[str, int]:
    """(memory type, page size) of RAM made by a backend (ram.MemoryBackend's kind)."""
    if kind == "file":
        assert path is not None
        return memory_type_of_path(path)
    if kind == "ram" and shared:
        return "shmem", memory.page_size()
    return MEMORY_OF_BACKEND[kind], HUGE_PAGE_2M if kind == "memfd-hugetlb" else memory.page_size()


def memory_type_of_path(path: str) -> tuple[str, int]:
    """(memory type, page size) a `file:PATH` backend would get: hugetlb on a hugetlbfs
    mount, shmem on tmpfs, "other" elsewhere (PATH or the directory it would be made in)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    kind = memory.path_filesystem_type(directory)
    if kind == memory.HUGETLBFS_MAGIC:
        return "hugetlb", os.statvfs(directory).f_bsize
    if kind == memory.TMPFS_MAGIC:
        return "shmem", memory.page_size()
    return "other", memory.page_size()
