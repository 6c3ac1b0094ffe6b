"""RAM backends: what guest RAM is made of, with QEMU's names, and how to empty a range of it.

QEMU's memory backends, by the names `vm run --memory-backend` takes:

- `ram`: memory-backend-ram; private anonymous memory, 4 KiB pages (share=on: MAP_SHARED
  anonymous memory).
- `memfd`: memory-backend-memfd; a shmem memfd, 4 KiB pages, shared by default (share=off:
  MAP_PRIVATE).
- `memfd-hugetlb`: memory-backend-memfd,hugetlb=on,hugetlbsize=2M; a hugetlb memfd, 2 MiB
  pages from the pool, shared by default.
- `file:PATH`: memory-backend-file,mem-path=PATH; a file (a new one, unlinked at once, if
  PATH is a directory such as a hugetlbfs mount), the file system's pages (2 MiB on
  hugetlbfs), private by default.

Any of them with `prealloc` (QEMU's prealloc=on, -mem-prealloc): every page populated when
the RAM is made (MADV_POPULATE_WRITE), so the guest, and on a destination the migration,
write to memory the host has already backed; on a host that backs its own memory lazily (a
cloud VM) the first touch is several times slower than a write to backed memory.

`discard_range` is QEMU's ram_block_discard_range: after it, the next touch of any page in
the range faults (on userfaultfd-registered memory: a MISSING fault) instead of reading the
old data. MADV_DONTNEED alone does that only for private memory: on a shared mapping it drops
this process's page table entries and the next touch maps the file's old page again, with
no fault. So memory with a file behind it gets its hole punched (which frees the pages,
huge pages back to the pool), and a private mapping also drops its copy-on-write copies.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from postcopy.linux.hugepages import HUGE_PAGE_2M, hugepages_reserved
from postcopy.linux.memory import TMPFS_MAGIC, Advice, Mapping, MappingError, filesystem_type

BACKEND_KINDS = ("ram", "memfd", "memfd-hugetlb", "file")

QEMU_OBJECTS = {
    "ram": "memory-backend-ram",
    "memfd": "memory-backend-memfd",
    "memfd-hugetlb": "memory-backend-memfd",
    "file": "memory-backend-file",
}


class BackendError(ValueError):
    """A memory backend that cannot be parsed or made; the message says what and why."""


@dataclass(frozen=True)
class MemoryBackend:
    """A RAM backend as the user names it: kind, mem-path for `file`, and share=on/off."""

    kind: str = "ram"
    path: str | None = None
    share: bool | None = None  # None: QEMU's default for the kind
    prealloc: bool = False  # QEMU's prealloc=on: populate all of it when it is made

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise BackendError(
                f"unknown memory backend {self.kind!r}: expected ram, memfd, "
                "memfd-hugetlb or file:PATH"
            )
        if (self.kind == "file") != bool(self.path):
            raise BackendError(
                "memory backend file needs a path (file:PATH)"
                if self.kind == "file"
                else f"memory backend {self.kind} takes no path"
            )

    @classmethod
    def parse(cls, text: str, share: bool | None = None, prealloc: bool = False) -> MemoryBackend:
        """`ram`, `memfd`, `memfd-hugetlb` or `file:PATH`."""
        kind, separator, path = text.partition(":")
        if separator and kind != "file":
            raise BackendError(f"memory backend {text!r}: only file takes a path (file:PATH)")
        if kind == "file" and not path:
            raise BackendError("memory backend file needs a path: file:PATH")
        return cls(kind, path or None, share, prealloc)

    @property
    def shared(self) -> bool:
        """MAP_SHARED: share=on, or QEMU's default (on for memfd, off otherwise)."""
        if self.share is not None:
            return self.share
        return self.kind in ("memfd", "memfd-hugetlb")

    @property
    def qemu_object(self) -> str:
        """The QEMU -object that makes the same memory (without id and size)."""
        parts = [QEMU_OBJECTS[self.kind]]
        if self.kind == "memfd-hugetlb":
            parts.append("hugetlb=on,hugetlbsize=2M")
        if self.kind == "file":
            parts.append(f"mem-path={self.path}")
        parts.append(f"share={'on' if self.shared else 'off'}")
        if self.prealloc:
            parts.append("prealloc=on")
        return ",".join(parts)

    def allocate(self, size: int, name: str = "pc.ram") -> Mapping:
        """Map `size` bytes of this backend. A hugetlb backend takes its pages from the pool
        now (an error here, not a SIGBUS later, when the pool is too small). With `prealloc`,
        every page is populated before this returns."""
        try:
            mapping = self._map(size, name)
        except MappingError as error:
            raise BackendError(f"memory backend {self}: {_explain(self, size, error)}") from None
        except ValueError as error:
            raise BackendError(f"memory backend {self}: {error}") from None
        if self.prealloc:
            try:
                mapping.madvise(Advice.POPULATE_WRITE)
            except MappingError as error:
                mapping.close()
                raise BackendError(
                    f"memory backend {self}: cannot preallocate {size >> 20} MiB: "
                    + _explain_prealloc(size, error)
                ) from None
        return mapping

    def _map(self, size: int, name: str) -> Mapping:
        if self.kind == "ram":
            return Mapping.anonymous(size, shared=self.shared)
        if self.kind in ("memfd", "memfd-hugetlb"):
            return Mapping.memfd(
                size, name, hugetlb=self.kind == "memfd-hugetlb", shared=self.shared
            )
        assert self.path is not None
        return Mapping.file(self.path, size, shared=self.shared)

    def __str__(self) -> str:
        text = f"file:{self.path}" if self.kind == "file" else self.kind
        if self.share is not None and self.share != (self.kind in ("memfd", "memfd-hugetlb")):
            text += f",share={'on' if self.share else 'off'}"
        if self.prealloc:
            text += ",prealloc=on"
        return text


def _explain(backend: MemoryBackend, size: int, error: MappingError) -> str:
    if error.errno == errno.ENOMEM and error.operation.startswith("mmap"):
        total, free = hugepages_reserved(HUGE_PAGE_2M)
        if backend.kind == "memfd-hugetlb" or total:
            return (
                f"not enough free huge pages for {size >> 20} MiB of RAM (the 2 MiB pool "
                f"has {free} free of {total}); `postcopy check` says how to grow it"
            )
    return str(error)


def _explain_prealloc(size: int, error: MappingError) -> str:
    if error.errno == errno.EINVAL:
        return "this kernel has no MADV_POPULATE_WRITE (Linux 5.14)"
    if error.errno in (errno.ENOMEM, errno.EFAULT):
        return f"not enough memory for {size >> 20} MiB ({error})"
    return str(error)


def backend_name(mapping: Mapping) -> str:
    """The kind of backend a mapping is: ram, memfd, memfd-hugetlb or file."""
    if mapping.kind == "anonymous":
        return "ram"
    if mapping.kind == "memfd":
        return "memfd-hugetlb" if mapping.hugetlb else "memfd"
    return "file"


MEMORY_TYPES = ("anonymous", "shmem", "hugetlb", "other")


def memory_type(mapping: Mapping) -> str:
    """What the kernel's userfaultfd sees: "anonymous" (private anonymous memory), "shmem"
    (a memfd, shared anonymous memory, a file on tmpfs), "hugetlb" (a hugetlb memfd, a
    file on hugetlbfs) or "other" (a file elsewhere, which userfaultfd cannot serve)."""
    if mapping.hugetlb:
        return "hugetlb"
    if mapping.kind == "anonymous":
        return "shmem" if mapping.shared else "anonymous"
    if mapping.kind == "memfd":
        return "shmem"
    if mapping.fd is not None and filesystem_type(mapping.fd) == TMPFS_MAGIC:
        return "shmem"
    return "other"


def describe(mapping: Mapping) -> str:
    """One phrase for messages: "memfd-hugetlb (2 MiB pages, shared)"."""
    size = mapping.page_size
    pages = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
    where = " on hugetlbfs" if mapping.kind == "hugetlbfs" else ""
    share = "shared" if mapping.shared else "private"
    return f"{backend_name(mapping)}{where} ({pages} pages, {share})"


def discard_range(mapping: Mapping, offset: int = 0, length: int | None = None) -> None:
    """Empty [offset, offset+length) so that its next touch faults (ram_block_discard_range).

    Memory with a file behind it (memfd, hugetlbfs, any file) has its hole punched; a
    private mapping also drops its copy-on-write copies (MADV_DONTNEED), shared anonymous
    memory gets MADV_REMOVE, private anonymous memory MADV_DONTNEED. Ranges must be whole
    pages of the mapping (huge pages for hugetlb).
    """
    if length is None:
        length = mapping.length - offset
    if offset % mapping.page_size or length % mapping.page_size:
        raise ValueError(
            f"discard [{offset:#x}, +{length:#x}) is not whole {mapping.page_size}-byte pages"
        )
    if length == 0:
        return
    if mapping.fd is not None:
        mapping.punch_hole(offset, length)
        if not mapping.shared:
            mapping.madvise(Advice.DONTNEED, offset, length)
    elif mapping.shared:
        mapping.madvise(Advice.REMOVE, offset, length)
    else:
        mapping.madvise(Advice.DONTNEED, offset, length)


def default_hugetlbfs_mount() -> str | None:
    """Where a `file:` backend on 2 MiB huge pages can go on this host, if anywhere."""
    from postcopy.linux.hugepages import mount_hugetlbfs_path

    path = mount_hugetlbfs_path(HUGE_PAGE_2M)
    return path if path is not None and os.path.isdir(path) else None
