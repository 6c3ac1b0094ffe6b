"""Memory the migration moves and the small kernel objects around it.

`Mapping` is one mmap of anonymous memory, of a memfd (shmem or hugetlb), or of a file
(on hugetlbfs, tmpfs or any file system), made with libc's mmap through ctypes: its
address never moves and `close()` always unmaps, even while memoryviews or numpy arrays
still point into it (Python's `mmap.mmap` refuses to close then). `madvise`, `mlock`,
`punch_hole` and `allocate` act on ranges of it. Module functions report the host's page
size and file systems (the huge page pools and mounts are in `postcopy.linux.hugepages`).
`EventFd` wraps eventfd(2), which the fault thread polls next to the userfaultfd to be
told to quit.

Thin bindings, no policy: every failure is a `MappingError` naming the call, the range
and the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import os

from postcopy.closing import Closing
from postcopy.linux._libc import libc
from postcopy.linux.hugepages import HUGE_PAGE_2M, mount_hugetlbfs_path

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MAP_FAILED = ctypes.c_void_p(-1).value
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# statfs(2) f_type of the file systems whose mappings userfaultfd serves (linux/magic.h)
HUGETLBFS_MAGIC = 0x958458F6
TMPFS_MAGIC = 0x01021994


# Private prototypes, so that other bindings declaring different argtypes on the shared
# libc handle cannot change how these are called.
_mmap = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
    use_errno=True,
)(("mmap", libc))
_munmap = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, use_errno=True)(
    ("munmap", libc)
)
_mremap = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
    use_errno=True,
)(("mremap", libc))
_madvise = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, use_errno=True
)(("madvise", libc))
_mlock = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, use_errno=True)(
    ("mlock", libc)
)
_munlock = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, use_errno=True)(
    ("munlock", libc)
)
_fallocate = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long, use_errno=True
)(("fallocate", libc))
_mincore = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, use_errno=True
)(("mincore", libc))
# fstatfs(2) into a buffer as large as struct statfs (120 bytes on 64-bit); f_type first
_fstatfs = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, use_errno=True)(
    ("fstatfs", libc)
)


class Advice(enum.IntEnum):
    """madvise(2) advice values (include/uapi/asm-generic/mman-common.h)."""

    NORMAL = 0
    RANDOM = 1
    SEQUENTIAL = 2
    WILLNEED = 3
    DONTNEED = 4
    FREE = 8
    REMOVE = 9
    DONTFORK = 10
    DOFORK = 11
    MERGEABLE = 12
    UNMERGEABLE = 13
    HUGEPAGE = 14
    NOHUGEPAGE = 15
    DONTDUMP = 16
    DODUMP = 17
    WIPEONFORK = 18
    KEEPONFORK = 19
    COLD = 20
    PAGEOUT = 21
    POPULATE_READ = 22
    POPULATE_WRITE = 23
    DONTNEED_LOCKED = 24
    COLLAPSE = 25


class MappingError(OSError):
    """A memory system call failed; the message names the call, the range and the errno."""

    def __init__(
        self, err: int, operation: str, address: int | None = None, length: int | None = None
    ) -> None:
        where = "" if address is None else f" [{address:#x}, +{length or 0:#x})"
        super().__init__(err, f"{operation}{where}: {os.strerror(err)}")
        self.operation = operation
        self.address = address
        self.range_length = length


def page_size() -> int:
    """The host's base page size in bytes."""
    return os.sysconf("SC_PAGE_SIZE")


def filesystem_type(fd: int) -> int:
    """The statfs f_type of the file system holding `fd` (HUGETLBFS_MAGIC, TMPFS_MAGIC...)."""
    buffer = (ctypes.c_long * 32)()
    if _fstatfs(fd, ctypes.addressof(buffer)) != 0:
        raise MappingError(ctypes.get_errno(), "fstatfs")
    return int(buffer[0]) & 0xFFFFFFFF


_statfs = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, use_errno=True)(
    ("statfs", libc)
)


def path_filesystem_type(path: str) -> int:
    """The statfs f_type of the file system holding `path`."""
    buffer = (ctypes.c_long * 32)()
    if _statfs(os.fsencode(path), ctypes.addressof(buffer)) != 0:
        raise MappingError(ctypes.get_errno(), f"statfs {path}")
    return int(buffer[0]) & 0xFFFFFFFF


def file_page_size(fd: int) -> int:
    """The page size a mapping of `fd` uses: the huge page size on hugetlbfs (its
    st_blksize, QEMU's qemu_fd_getpagesize), the base page size anywhere else."""
    if filesystem_type(fd) == HUGETLBFS_MAGIC:
        return os.fstat(fd).st_blksize
    return page_size()


def _map(length: int, prot: int, flags: int, fd: int, what: str, offset: int = 0) -> int:
    address = _mmap(None, length, prot, flags, fd, offset)
    if address is None or address == MAP_FAILED:
        raise MappingError(ctypes.get_errno(), f"mmap {what}", None, length)
    return int(address)


def map_shared_fd(fd: int, length: int, offset: int, what: str) -> int:
    """The address of a shared read-write mapping of length bytes of fd from offset.

    For pages a kernel object exports (a vCPU's kvm_run, its dirty ring); guest RAM is a
    `Mapping`. Undo with `unmap`.
    """
    return _map(length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, what, offset)


def unmap(address: int, length: int) -> None:
    """munmap(address, length); MappingError if the kernel refuses."""
    if _munmap(address, length) != 0:
        raise MappingError(ctypes.get_errno(), "munmap", address, length)


class Mapping(Closing):
    """One mmap'ed region of memory: anonymous, memfd or a file. Create with the classmethods.

    `kind` is "anonymous", "memfd", "hugetlbfs" (a file on a hugetlbfs mount) or "file"
    (any other file); `hugetlb` says whether its pages are huge (`page_size`); `shared`
    whether it is MAP_SHARED. `view` is a writable memoryview (format "B") over the whole
    region. It and anything built from it (slices, numpy arrays) must not be used after
    `close()`: the memory is unmapped regardless, and touching it then crashes the process.
    """

    address: int
    length: int
    page_size: int
    kind: str
    shared: bool
    fd: int | None

    def __init__(
        self,
        address: int,
        length: int,
        *,
        page_size: int,
        kind: str,
        shared: bool,
        fd: int | None,
        remove_on_close: str | None = None,
    ) -> None:
        """Adopt an existing mapping (its munmap and the fd's close become ours, and the
        removal of the file `remove_on_close`, one this mapping created)."""
        self.address = address
        self.length = length
        self.page_size = page_size
        self.kind = kind
        self.shared = shared
        self.fd = fd
        self.remove_on_close = remove_on_close
        self._array = (ctypes.c_ubyte * length).from_address(address)
        self._view: memoryview | None = memoryview(self._array).cast("B")
        self._closed = False

    @property
    def hugetlb(self) -> bool:
        """Its pages are huge pages (hugetlbfs or a hugetlb memfd), not base pages."""
        return self.page_size > page_size()

    # -- constructors ----------------------------------------------------------------

    @classmethod
    def anonymous(cls, length: int, *, shared: bool = False, noreserve: bool = True) -> Mapping:
        """Anonymous memory, private by default (what postcopy migrates), base pages."""
        base = page_size()
        _check_length(length, base, "anonymous")
        flags = MAP_ANONYMOUS | (MAP_SHARED if shared else MAP_PRIVATE)
        if noreserve:
            flags |= MAP_NORESERVE
        address = _map(length, PROT_READ | PROT_WRITE, flags, -1, "anonymous")
        return cls(address, length, page_size=base, kind="anonymous", shared=shared, fd=None)

    @classmethod
    def memfd(
        cls,
        length: int,
        name: str = "ram",
        *,
        hugetlb: bool = False,
        huge_page_size: int = HUGE_PAGE_2M,
        shared: bool = True,
    ) -> Mapping:
        """A mapping of a new memfd (shmem, or hugetlb pages with `hugetlb`), MAP_SHARED
        unless `shared` is False (QEMU's memory-backend-memfd share=off).

        The fd stays open (`.fd`) so the same memory can be mapped again (`alias()`),
        passed to another process, or have holes punched in it. A hugetlb memfd takes its
        pages from the pool at mmap (ENOMEM there, not SIGBUS later, when it is too small).
        """
        size = huge_page_size if hugetlb else page_size()
        _check_length(length, size, "memfd")
        flags = os.MFD_CLOEXEC
        if hugetlb:
            flags |= os.MFD_HUGETLB | (size.bit_length() - 1) << MAP_HUGE_SHIFT
        try:
            fd = os.memfd_create(name, flags)
        except OSError as error:
            raise MappingError(error.errno or errno.EINVAL, f"memfd_create {name!r}") from None
        try:
            os.ftruncate(fd, length)
            address = _map(
                length,
                PROT_READ | PROT_WRITE,
                MAP_SHARED if shared else MAP_PRIVATE,
                fd,
                f"memfd {name!r}",
            )
        except OSError as error:
            os.close(fd)
            if isinstance(error, MappingError):
                raise
            raise MappingError(
                error.errno or errno.EINVAL, f"ftruncate memfd {name!r}", None, length
            ) from None
        return cls(address, length, page_size=size, kind="memfd", shared=shared, fd=fd)

    @classmethod
    def file(cls, path: str, length: int, *, shared: bool = False) -> Mapping:
        """A mapping of the file `path`, QEMU's memory-backend-file mem-path.

        If `path` is a directory (e.g. a hugetlbfs mount), a new file is made there and
        unlinked once mapped; a file that does not exist is created, sized, and removed
        again by `close()`; an existing file must be empty (it is sized) or hold at least
        `length` bytes. The page size is the file system's: huge pages on hugetlbfs.
        Private (MAP_PRIVATE) unless `shared` (QEMU's share=on).
        """
        remove: str | None = None
        unlink_now = os.path.isdir(path)
        if unlink_now:
            path = os.path.join(path, f"postcopy-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            if not unlink_now:
                remove = path
        except FileExistsError:
            if unlink_now:
                raise MappingError(errno.EEXIST, f"open {path}") from None
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as error:
                raise MappingError(error.errno or errno.EINVAL, f"open {path}") from None
        except OSError as error:
            raise MappingError(error.errno or errno.EINVAL, f"open {path}") from None
        try:
            on_hugetlbfs = filesystem_type(fd) == HUGETLBFS_MAGIC
            size = file_page_size(fd)
            _check_length(length, size, f"file {path}")
            current = os.fstat(fd).st_size
            if current == 0:
                os.ftruncate(fd, length)
            elif current < length:
                raise MappingError(
                    errno.EINVAL,
                    f"file {path} holds {current} bytes, less than the {length} needed",
                )
            flags = MAP_SHARED if shared else MAP_PRIVATE
            address = _map(length, PROT_READ | PROT_WRITE, flags, fd, f"file {path}")
        except BaseException as error:
            os.close(fd)
            if remove is not None:
                os.unlink(remove)
            if isinstance(error, OSError) and not isinstance(error, MappingError):
                raise MappingError(
                    error.errno or errno.EINVAL, f"ftruncate {path}", None, length
                ) from None
            raise
        finally:
            if unlink_now:
                os.unlink(path)
        kind = "hugetlbfs" if on_hugetlbfs else "file"
        return cls(
            address, length, page_size=size, kind=kind, shared=shared, fd=fd, remove_on_close=remove
        )

    @classmethod
    def map_fd(cls, fd: int, length: int, *, shared: bool = True) -> Mapping:
        """Map `length` bytes of an open memfd or file (another process's RAM, received
        over a socket); the mapping owns `fd` from here on, also if this fails."""
        try:
            kind = "hugetlbfs" if filesystem_type(fd) == HUGETLBFS_MAGIC else "memfd"
            size = file_page_size(fd)
            _check_length(length, size, "shared")
            flags = MAP_SHARED if shared else MAP_PRIVATE
            address = _map(length, PROT_READ | PROT_WRITE, flags, fd, f"fd {fd}")
        except BaseException:
            os.close(fd)
            raise
        return cls(address, length, page_size=size, kind=kind, shared=shared, fd=fd)

    @classmethod
    def hugetlbfs(
        cls,
        length: int,
        *,
        directory: str | None = None,
        page_size: int = HUGE_PAGE_2M,
        shared: bool = False,
    ) -> Mapping:
        """Huge pages from a new file on a hugetlbfs mount, unlinked once mapped.

        `directory` defaults to the first hugetlbfs mount serving `page_size` pages (see
        `mount_hugetlbfs_path`). Private by default, like QEMU's file-backed RAM without
        share=on: MADV_DONTNEED then really empties a private page, which postcopy needs.
        """
        _check_length(length, page_size, "hugetlbfs")
        if directory is None:
            directory = mount_hugetlbfs_path(page_size)
            if directory is None:
                raise MappingError(
                    errno.ENOENT, f"hugetlbfs: no hugetlbfs mount with {page_size} byte pages"
                )
        if not os.path.isdir(directory):
            raise MappingError(errno.ENOENT, f"open {directory}")
        mapping = cls.file(directory, length, shared=shared)
        if mapping.kind != "hugetlbfs" or mapping.page_size != page_size:
            mapping.close()
            raise MappingError(
                errno.EINVAL, f"hugetlbfs: {directory} is not a mount of {page_size} byte pages"
            )
        return mapping

    def alias(self) -> Mapping:
        """A second MAP_SHARED mapping of the same memfd/hugetlbfs file, at another address.

        Lets one mapping be registered with userfaultfd (MINOR faults) while the other
        fills the page cache behind it. The alias owns a dup of the fd.
        """
        if self.fd is None or not self.shared:
            raise MappingError(
                errno.EINVAL, f"alias of a {self.kind} private mapping", self.address, self.length
            )
        fd = os.dup(self.fd)
        try:
            address = _map(self.length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, "alias")
        except MappingError:
            os.close(fd)
            raise
        return Mapping(
            address, self.length, page_size=self.page_size, kind=self.kind, shared=True, fd=fd
        )

    def move_pages_out(self) -> Mapping:
        """mremap(MREMAP_MAYMOVE | MREMAP_DONTUNMAP): move every page of this private
        anonymous mapping into a new mapping (returned), leaving this range mapped and
        empty, so its next accesses are missing-page faults. Page tables move; no data is
        copied. Linux 5.13+ for anonymous memory."""
        if self.kind != "anonymous" or self.shared:
            raise MappingError(
                errno.EINVAL, f"move_pages_out of a {self.kind} mapping", self.address, self.length
            )
        start, length = self._range(0, None)
        address = _mremap(start, length, length, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, None)
        if address is None or address == MAP_FAILED:
            raise MappingError(ctypes.get_errno(), "mremap DONTUNMAP", start, length)
        return Mapping(
            int(address), length, page_size=self.page_size, kind=self.kind, shared=False, fd=None
        )

    # -- operations ------------------------------------------------------------------

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("mapping is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._closed

    def _range(self, offset: int, length: int | None) -> tuple[int, int]:
        if self._closed:
            raise ValueError("mapping is closed")
        if length is None:
            length = self.length - offset
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"range +{offset:#x} len {length:#x} outside mapping of {self.length:#x} bytes"
            )
        return self.address + offset, length

    def madvise(self, advice: Advice, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) on [offset, offset+length) of this mapping (default: to its end)."""
        address, length = self._range(offset, length)
        if _madvise(address, length, int(advice)) != 0:
            raise MappingError(
                ctypes.get_errno(), f"madvise {Advice(advice).name}", address, length
            )

    def mlock(self, offset: int = 0, length: int | None = None) -> None:
        """mlock(2): fault the range in and keep it resident."""
        address, length = self._range(offset, length)
        if _mlock(address, length) != 0:
            raise MappingError(ctypes.get_errno(), "mlock", address, length)

    def munlock(self, offset: int = 0, length: int | None = None) -> None:
        address, length = self._range(offset, length)
        if _munlock(address, length) != 0:
            raise MappingError(ctypes.get_errno(), "munlock", address, length)

    def punch_hole(self, offset: int = 0, length: int | None = None) -> None:
        """Free the backing file's pages in the range (fallocate PUNCH_HOLE|KEEP_SIZE).

        The discard for memfd/hugetlbfs memory: MADV_DONTNEED on a shared mapping only
        drops this process's page table entries, the file keeps the data.
        """
        address, length = self._range(offset, length)
        if self.fd is None:
            raise MappingError(
                errno.EINVAL, "fallocate PUNCH_HOLE on anonymous memory", address, length
            )
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            raise MappingError(ctypes.get_errno(), "fallocate PUNCH_HOLE", address, length)

    def resident(self, offset: int = 0, length: int | None = None) -> bytearray:
        """mincore(2): one byte per base page of the range, bit 0 set if the page is in
        memory. For a shared file mapping that is the page cache, also for pages this
        process never mapped (a shmem page swapped out reads as absent)."""
        address, length = self._range(offset, length)
        vector = bytearray(-(-length // page_size()))
        buffer = (ctypes.c_ubyte * len(vector)).from_buffer(vector)
        if _mincore(address, length, ctypes.addressof(buffer)) != 0:
            raise MappingError(ctypes.get_errno(), "mincore", address, length)
        return vector

    def allocate(self, offset: int = 0, length: int | None = None) -> None:
        """Give the backing file zeroed pages in the range where it has holes (fallocate
        KEEP_SIZE), without mapping them here: the way to fill a page with zeros behind a
        mapping registered for MINOR faults, which then needs only UFFDIO_CONTINUE."""
        address, length = self._range(offset, length)
        if self.fd is None:
            raise MappingError(errno.EINVAL, "fallocate on anonymous memory", address, length)
        if _fallocate(self.fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            raise MappingError(ctypes.get_errno(), "fallocate", address, length)

    def close(self) -> None:
        """Unmap and close the fd. Idempotent; views into the mapping become invalid."""
        if self._closed:
            return
        self._closed = True
        if self._view is not None:
            # Exported (slices, numpy) views cannot be released: unmapped all the same.
            with contextlib.suppress(BufferError):
                self._view.release()
            self._view = None
        result = _munmap(self.address, self.length)
        err = ctypes.get_errno()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.remove_on_close is not None:
            path, self.remove_on_close = self.remove_on_close, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if result != 0:
            raise MappingError(err, "munmap", self.address, self.length)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address:#x}"
        return (
            f"<Mapping {self.kind} {state} length={self.length:#x} "
            f"page_size={self.page_size} shared={self.shared}>"
        )


def _check_length(length: int, unit: int, what: str) -> None:
    if length <= 0 or length % unit:
        raise ValueError(f"{what} mapping length {length} must be a positive multiple of {unit}")


class EventFd(Closing):
    """An eventfd(2) counter: `write(n)` adds n, `read()` takes the whole count (or 1).

    Non-blocking by default; `read()` on a non-blocking, empty counter returns 0 (a real
    read never returns 0, so 0 unambiguously means "nothing pending"). A blocking one
    waits, without the GIL.
    """

    def __init__(self, initval: int = 0, *, nonblock: bool = True, semaphore: bool = False) -> None:
        flags = os.EFD_CLOEXEC
        if nonblock:
            flags |= os.EFD_NONBLOCK
        if semaphore:
            flags |= os.EFD_SEMAPHORE
        self.fd: int = os.eventfd(initval, flags)
        self.nonblock = nonblock
        self.semaphore = semaphore

    def fileno(self) -> int:
        return self.fd

    def write(self, n: int = 1) -> None:
        os.eventfd_write(self._fd(), n)

    def read(self) -> int:
        try:
            return os.eventfd_read(self._fd())
        except BlockingIOError:
            return 0

    def _fd(self) -> int:
        if self.fd < 0:
            raise ValueError("eventfd is closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
