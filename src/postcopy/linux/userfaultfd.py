"""userfaultfd(2): the kernel interface that lets a thread resolve another thread's page faults.

One `UserfaultFd` per file descriptor, one method per UFFDIO_* ioctl, typed events and
typed errors, no policy (the model is userfaultfd-rs). How a fault travels:

1. `UserfaultFd.open(features)` opens the fd (syscall, or /dev/userfaultfd) and does the
   UFFDIO_API handshake; `register(start, length, RegisterMode.MISSING)` arms a range.
2. A thread touching a missing page sleeps in the kernel; the fd becomes readable and
   `read_events()` returns a `PageFault` with the address (and the thread id).
3. `copy()` (or `zeropage()`, `continue_()` for MINOR faults) places the page atomically
   and wakes the sleeper, unless DONTWAKE was asked, then `wake()` does it later.

The result fields of copy/zeropage/continue/poison/move are signed: a negative value is
-errno. A partial operation fails with `RetryError` (EAGAIN) whose `.done` counts the bytes
placed before it stopped; the caller continues from there. A page already present fails
with `PageExistsError` (EEXIST), which a postcopy placer racing its own background push
treats as success. A multi-page copy that meets a present page after placing some stops
there with RetryError(done = bytes before it); the next call from there raises
PageExistsError (done = 0) for that page (verified in tests/test_linux_userfaultfd.py).

Non-cooperative events (EVENT_REMOVE, UNMAP, REMAP, FORK) make the thread doing the
madvise/munmap/mremap/fork wait until the event has been read: never do those in the
thread that reads the events.

Hot path: copy() and zeropage() issue `fcntl.ioctl` on a small bytearray (faster than
ctypes; CPython copies buffers up to 1024 bytes and releases the GIL during the call).
The bytearrays are preallocated per thread (a threading.local: allocating one per call
costs more than a third of the binding's overhead), so every method is safe to call
from any number of threads at once. (Not from a signal handler interrupting a call.)
`copy(..., hold_gil=True)` and `read_raw(..., hold_gil=True)` keep the GIL instead
(`_libc.held_libc`), for a thread that must not queue for it again after a few
microseconds in the kernel (a page request's hops).

The GIL rule: a Python thread that touches a registered missing page while holding the
GIL deadlocks the process when the handler is a thread of the same process. Fault such
pages only from ctypes calls or KVM guests.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import platform
import struct
import threading
from dataclasses import dataclass

from postcopy.closing import Closing
from postcopy.linux._libc import held_libc, libc

# -- constants (include/uapi/linux/userfaultfd.h) ---------------------------------------

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
USERFAULTFD_IOC_NEW = 0xAA00
DEV_USERFAULTFD = "/dev/userfaultfd"

UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_MOVE = 0xC028AA05
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_CONTINUE = 0xC020AA07
UFFDIO_POISON = 0xC020AA08

UFFDIO_COPY_MODE_DONTWAKE = 1
UFFDIO_COPY_MODE_WP = 2
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1
UFFDIO_MOVE_MODE_DONTWAKE = 1
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2
UFFDIO_CONTINUE_MODE_DONTWAKE = 1
UFFDIO_CONTINUE_MODE_WP = 2
UFFDIO_POISON_MODE_DONTWAKE = 1

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

MSG_SIZE = 32

# userfaultfd's syscall number per architecture; elsewhere only /dev/userfaultfd is tried.
_SYSCALL_NUMBERS = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "i686": 374, "i386": 374}

_API = struct.Struct("=QQQ")  # api, features, ioctls
_RANGE = struct.Struct("=QQ")  # start, len
_REGISTER = struct.Struct("=QQQQ")  # start, len, mode, ioctls (out)
_COPY = struct.Struct("=QQQQq")  # dst, src, len, mode, copy (out)
_RANGE_MODE_RESULT = struct.Struct("=QQQq")  # zeropage / continue / poison
_WRITEPROTECT = struct.Struct("=QQQ")  # start, len, mode
_MSG_PAGEFAULT = struct.Struct("=8xQQI4x")  # flags, address, ptid
_MSG_AS_PAGEFAULT = struct.Struct("=B7xQQI4x")  # event, then a page fault's fields
_MSG_FORK = struct.Struct("=8xI20x")
_MSG_REMAP = struct.Struct("=8xQQQ")
_MSG_REMOVE = struct.Struct("=8xQQ8x")  # also UNMAP


class _Scratch(threading.local):
    """Per-thread argument buffers for the result-bearing ioctls (see the module doc)."""

    def __init__(self) -> None:
        self.copy = bytearray(_COPY.size)
        self.range_mode_result = bytearray(_RANGE_MODE_RESULT.size)
        # for the calls that keep the GIL (`hold_gil`): C memory, passed by address
        self.held_copy = ctypes.create_string_buffer(_COPY.size)
        self.held_copy_address = ctypes.addressof(self.held_copy)
        self.events = ctypes.create_string_buffer(MSG_SIZE * _HELD_READ_EVENTS)
        self.events_address = ctypes.addressof(self.events)


_HELD_READ_EVENTS = 64  # the most a read that keeps the GIL takes at once


_scratch = _Scratch()

# Where the signed result sits in each result-bearing struct.
_COPY_RESULT_OFFSET = 32
_RANGE_MODE_RESULT_OFFSET = 24


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits, requested at the UFFDIO_API handshake."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


NO_FEATURES = Feature(0)


class RegisterMode(enum.IntFlag):
    """UFFDIO_REGISTER_MODE_*: which faults on a range are reported."""

    MISSING = 1
    WP = 2
    MINOR = 4


class Ioctl(enum.IntFlag):
    """The ioctl bitmask returned by UFFDIO_API and UFFDIO_REGISTER: 1 << _UFFDIO_*."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class PageFaultFlags(enum.IntFlag):
    """UFFD_PAGEFAULT_FLAG_*: what kind of access faulted."""

    WRITE = 1
    WP = 2
    MINOR = 4


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread touched a registered page.

    `address` is aligned to the mapping's page: the base page for anonymous memory and
    shmem, the huge page's start for hugetlbfs (exact with Feature.EXACT_ADDRESS).
    """

    address: int
    flags: PageFaultFlags
    thread_id: int  # the faulting thread's TID with Feature.THREAD_ID, else 0

    @property
    def is_write(self) -> bool:
        return bool(self.flags & PageFaultFlags.WRITE)


@dataclass(frozen=True, slots=True)
class Fork:
    """The process forked (Feature.EVENT_FORK); `ufd` is a new userfaultfd for the child."""

    ufd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """mremap moved a registered range (Feature.EVENT_REMAP)."""

    from_: int
    to: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """MADV_DONTNEED/REMOVE emptied [start, end) of a registered range (Feature.EVENT_REMOVE)."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """munmap removed [start, end) of a registered range (Feature.EVENT_UNMAP)."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """A message with an event code this binding does not know; `raw` is the 32 bytes."""

    event: int
    raw: bytes


Event = PageFault | Fork | Remap | Remove | Unmap | UnknownEvent


# the flags of a page fault, decoded once per value: an IntFlag made from an int costs
# microseconds (enum machinery), and the fault thread decodes every fault on a page
# request's path
_FAULT_FLAGS: dict[int, PageFaultFlags] = {}


def _fault_flags(value: int) -> PageFaultFlags:
    flags = _FAULT_FLAGS.get(value)
    if flags is None:
        flags = PageFaultFlags(value)
        if len(_FAULT_FLAGS) < 64:  # the kernel's flags are few; never grow without bound
            _FAULT_FLAGS[value] = flags
    return flags


def parse_events(data: bytes | bytearray | memoryview) -> list[Event]:
    """Decode consecutive 32-byte uffd_msg records."""
    if len(data) % MSG_SIZE:
        raise ValueError(f"{len(data)} bytes is not a whole number of {MSG_SIZE}-byte messages")
    events: list[Event] = []
    for offset in range(0, len(data), MSG_SIZE):
        # read as a page fault (the fault thread's every event, on a page request's path:
        # one unpack), and as what it is if it is not one
        code, flags, address, ptid = _MSG_AS_PAGEFAULT.unpack_from(data, offset)
        if code == UFFD_EVENT_PAGEFAULT:
            events.append(PageFault(address, _fault_flags(flags), ptid))
        elif code == UFFD_EVENT_REMOVE:
            events.append(Remove(*_MSG_REMOVE.unpack_from(data, offset)))
        elif code == UFFD_EVENT_UNMAP:
            events.append(Unmap(*_MSG_REMOVE.unpack_from(data, offset)))
        elif code == UFFD_EVENT_REMAP:
            events.append(Remap(*_MSG_REMAP.unpack_from(data, offset)))
        elif code == UFFD_EVENT_FORK:
            events.append(Fork(*_MSG_FORK.unpack_from(data, offset)))
        else:
            events.append(UnknownEvent(code, bytes(data[offset : offset + MSG_SIZE])))
    return events


# -- errors ----------------------------------------------------------------------------


class UffdError(OSError):
    """A userfaultfd operation failed: the message names the operation, the range and errno.

    `done` is the number of bytes the operation completed before failing (copy, zeropage,
    continue, poison and move can stop part-way), `start`/`length` the range asked for.
    """

    def __init__(
        self,
        err: int,
        operation: str,
        start: int | None = None,
        length: int | None = None,
        done: int = 0,
        detail: str = "",
    ) -> None:
        where = "" if start is None else f" [{start:#x}, +{length or 0:#x})"
        partly = f" after {done:#x} bytes" if done else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(err, f"{operation}{where}{partly}: {os.strerror(err)}{extra}")
        self.operation = operation
        self.start = start
        self.length = length
        self.done = done


class PageExistsError(UffdError):
    """EEXIST: the destination page is already present (normal when placements race)."""


class RetryError(UffdError):
    """EAGAIN: the address space is changing (or the operation stopped part-way); retry
    from `start + done`."""


def _error(
    err: int,
    operation: str,
    start: int | None = None,
    length: int | None = None,
    done: int = 0,
    detail: str = "",
) -> UffdError:
    kind = {errno.EEXIST: PageExistsError, errno.EAGAIN: RetryError}.get(err, UffdError)
    return kind(err, operation, start, length, done, detail)


# -- the file descriptor ---------------------------------------------------------------


def _open_syscall(flags: int) -> int:
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd syscall number for {platform.machine()}")
    fd = int(libc.syscall(ctypes.c_long(number), ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _open_device(flags: int) -> int:
    device = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(device, USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(device)


def _why(error: OSError, via: str) -> str:
    err = error.errno or 0
    if via == "syscall" and err == errno.EPERM:
        return (
            "userfaultfd(2) refused (EPERM): vm.unprivileged_userfaultfd=0 and no "
            "CAP_SYS_PTRACE; open with user_mode_only, or run as root"
        )
    if via == DEV_USERFAULTFD and err in (errno.EACCES, errno.EPERM):
        return f"{DEV_USERFAULTFD} is not accessible to this user"
    if err == errno.ENOENT:
        return f"{DEV_USERFAULTFD} does not exist"
    if err == errno.ENOSYS:
        return f"{via}: not available in this kernel ({error.strerror})"
    return f"{via}: {error.strerror or os.strerror(err)}"


class UserfaultFd(Closing):
    """One userfaultfd: open with `UserfaultFd.open()`; every ioctl is a method."""

    fd: int
    opened_via: str
    features: Feature
    available_features: Feature
    ioctls: Ioctl

    def __init__(
        self,
        fd: int,
        *,
        opened_via: str,
        features: Feature,
        available_features: Feature,
        ioctls: Ioctl,
    ) -> None:
        """Adopt an fd whose API handshake is done (use `open()` or `from_fd()`)."""
        self.fd = fd
        self.opened_via = opened_via
        self.features = features
        self.available_features = available_features
        self.ioctls = ioctls

    @staticmethod
    def open_raw(
        *, user_mode_only: bool = False, nonblock: bool = True, via: str = "auto"
    ) -> tuple[int, str]:
        """Open a userfaultfd without the handshake: (fd, "syscall" | "/dev/userfaultfd").

        `via` is "auto" (syscall first, then the device), "syscall" or "/dev/userfaultfd".
        """
        if via not in ("auto", "syscall", DEV_USERFAULTFD):
            raise ValueError(f"via must be 'auto', 'syscall' or {DEV_USERFAULTFD!r}, not {via!r}")
        flags = os.O_CLOEXEC
        if nonblock:
            flags |= os.O_NONBLOCK
        if user_mode_only:
            flags |= UFFD_USER_MODE_ONLY
        reasons: list[str] = []
        first_errno = errno.ENOSYS
        for method, opener in (("syscall", _open_syscall), (DEV_USERFAULTFD, _open_device)):
            if via not in ("auto", method):
                continue
            try:
                return opener(flags), method
            except OSError as error:
                if not reasons:
                    first_errno = error.errno or errno.EPERM
                reasons.append(_why(error, method))
        raise _error(first_errno, "open userfaultfd", detail="; ".join(reasons))

    @classmethod
    def open(
        cls,
        features: Feature = NO_FEATURES,
        *,
        user_mode_only: bool = False,
        nonblock: bool = True,
        via: str = "auto",
    ) -> UserfaultFd:
        """Open a userfaultfd and do the UFFDIO_API handshake asking for `features`.

        Raises UffdError if the fd cannot be opened (with the reasons for each way tried)
        or a requested feature is not available (EINVAL, naming the missing features).
        """
        fd, opened_via = cls.open_raw(user_mode_only=user_mode_only, nonblock=nonblock, via=via)
        try:
            return cls.from_fd(fd, features, opened_via=opened_via)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(
        cls, fd: int, features: Feature = NO_FEATURES, *, opened_via: str = "inherited"
    ) -> UserfaultFd:
        """Do the API handshake on an already open userfaultfd and adopt it."""
        buffer = bytearray(_API.size)
        _API.pack_into(buffer, 0, UFFD_API, int(features), 0)
        try:
            fcntl.ioctl(fd, UFFDIO_API, buffer, True)
        except OSError as error:
            err = error.errno or errno.EINVAL
            detail = ""
            if err == errno.EINVAL:
                probed = cls.probe_features(via=opened_via if opened_via != "inherited" else "auto")
                missing = Feature(int(features) & ~int(probed))
                if missing:
                    detail = f"features not available: {missing!r}"
            elif err == errno.EPERM and features & Feature.EVENT_FORK:
                detail = "EVENT_FORK needs CAP_SYS_PTRACE"
            raise _error(err, f"UFFDIO_API features={int(features):#x}", detail=detail) from None
        _, available, ioctls = _API.unpack(buffer)
        granted = Feature(int(features))
        if granted & Feature.WP_ASYNC:
            granted |= Feature.WP_UNPOPULATED  # the kernel implies it
        return cls(
            fd,
            opened_via=opened_via,
            features=granted,
            available_features=Feature(available),
            ioctls=Ioctl(ioctls),
        )

    @classmethod
    def probe_features(cls, *, via: str = "auto") -> Feature:
        """Every feature this kernel offers (a handshake asking for none reports them all)."""
        with cls.open(via=via) as probe:
            return probe.available_features

    # -- ioctls -----------------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> Ioctl:
        """UFFDIO_REGISTER: report `mode` faults on [start, start+length); returns the
        ioctls the range supports (e.g. COPY|ZEROPAGE|WAKE for anonymous MISSING)."""
        buffer = bytearray(_REGISTER.size)
        _REGISTER.pack_into(buffer, 0, start, length, int(mode), 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, buffer, True)
        except OSError as error:
            raise _error(
                error.errno or errno.EINVAL, f"UFFDIO_REGISTER {mode!r}", start, length
            ) from None
        return Ioctl(_REGISTER.unpack(buffer)[3])

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER: stop reporting faults on the range (sleepers are woken)."""
        self._range_ioctl(UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER", start, length)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake the threads sleeping on faults in the range."""
        self._range_ioctl(UFFDIO_WAKE, "UFFDIO_WAKE", start, length)

    def _range_ioctl(self, request: int, name: str, start: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, request, _RANGE.pack(start, length))
        except OSError as error:
            raise _error(error.errno or errno.EINVAL, name, start, length) from None

    def copy(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        dontwake: bool = False,
        wp: bool = False,
        hold_gil: bool = False,
    ) -> int:
        """UFFDIO_COPY: atomically fill missing [dst, dst+length) from src; bytes copied.

        `wp` leaves the new pages write-protected (range registered with WP). `hold_gil`:
        the call keeps the GIL (no other thread of the process runs Python meanwhile),
        for a page or a few on a thread that must not wait to take it back. Safe under
        the GIL rule: the kernel fills the missing pages; src must be present memory
        that no userfaultfd of this process watches.
        """
        mode = (UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0) | (UFFDIO_COPY_MODE_WP if wp else 0)
        if hold_gil:
            return self._copy_holding_gil(dst, src, length, mode)
        buffer = _scratch.copy
        _COPY.pack_into(buffer, 0, dst, src, length, mode, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_COPY, buffer, True)
        except OSError as error:
            raise self._result_error(
                error, buffer, _COPY_RESULT_OFFSET, "UFFDIO_COPY", dst, length
            ) from None
        return length

    def _copy_holding_gil(self, dst: int, src: int, length: int, mode: int) -> int:
        scratch = _scratch
        buffer = scratch.held_copy
        _COPY.pack_into(buffer, 0, dst, src, length, mode, 0)
        if held_libc.ioctl(self.fd, UFFDIO_COPY, scratch.held_copy_address) < 0:
            err = ctypes.get_errno()
            raise self._result_error(
                OSError(err, os.strerror(err)),
                buffer,
                _COPY_RESULT_OFFSET,
                "UFFDIO_COPY",
                dst,
                length,
            )
        return length

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE: map zero pages on missing [start, start+length); bytes done.

        Not for hugetlbfs (the kernel has no huge zero page here): copy a zeroed page."""
        return self._range_mode_result(
            UFFDIO_ZEROPAGE,
            "UFFDIO_ZEROPAGE",
            start,
            length,
            UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0,
        )

    def continue_(
        self, start: int, length: int, *, dontwake: bool = False, wp: bool = False
    ) -> int:
        """UFFDIO_CONTINUE: resolve MINOR faults by mapping the pages already in the page
        cache (filled through another mapping of the same file); bytes mapped."""
        mode = (UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0) | (
            UFFDIO_CONTINUE_MODE_WP if wp else 0
        )
        return self._range_mode_result(UFFDIO_CONTINUE, "UFFDIO_CONTINUE", start, length, mode)

    def poison(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_POISON: mark missing pages poisoned (touching them raises SIGBUS)."""
        return self._range_mode_result(
            UFFDIO_POISON,
            "UFFDIO_POISON",
            start,
            length,
            UFFDIO_POISON_MODE_DONTWAKE if dontwake else 0,
        )

    def _range_mode_result(
        self, request: int, name: str, start: int, length: int, mode: int
    ) -> int:
        buffer = _scratch.range_mode_result
        _RANGE_MODE_RESULT.pack_into(buffer, 0, start, length, mode, 0)
        try:
            fcntl.ioctl(self.fd, request, buffer, True)
        except OSError as error:
            raise self._result_error(
                error, buffer, _RANGE_MODE_RESULT_OFFSET, name, start, length
            ) from None
        return length

    def move(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        dontwake: bool = False,
        allow_src_holes: bool = False,
    ) -> int:
        """UFFDIO_MOVE: move src's pages (anonymous, private) to missing dst without a copy;
        bytes moved. With `allow_src_holes`, holes in src are skipped instead of ENOENT."""
        mode = (UFFDIO_MOVE_MODE_DONTWAKE if dontwake else 0) | (
            UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0
        )
        buffer = _scratch.copy
        _COPY.pack_into(buffer, 0, dst, src, length, mode, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_MOVE, buffer, True)
        except OSError as error:
            raise self._result_error(
                error, buffer, _COPY_RESULT_OFFSET, "UFFDIO_MOVE", dst, length
            ) from None
        return length

    def writeprotect(
        self, start: int, length: int, *, protect: bool, dontwake: bool = False
    ) -> None:
        """UFFDIO_WRITEPROTECT: set (`protect`) or clear write protection on the range;
        clearing it wakes threads blocked on WP faults there unless `dontwake`."""
        mode = (UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        try:
            fcntl.ioctl(self.fd, UFFDIO_WRITEPROTECT, _WRITEPROTECT.pack(start, length, mode))
        except OSError as error:
            raise _error(
                error.errno or errno.EINVAL,
                f"UFFDIO_WRITEPROTECT {'protect' if protect else 'unprotect'}",
                start,
                length,
            ) from None

    @staticmethod
    def _result_error(
        error: OSError,
        buffer: bytearray | ctypes.Array[ctypes.c_char],
        offset: int,
        name: str,
        start: int,
        length: int,
    ) -> UffdError:
        # The kernel writes the signed result before failing: > 0 is a partial count
        # (the ioctl then fails with EAGAIN), < 0 is -errno; fcntl copies it back to us.
        (result,) = struct.unpack_from("=q", buffer, offset)
        err = error.errno or errno.EINVAL
        done = result if result > 0 else 0
        return _error(err, name, start, length, done)

    # -- events -----------------------------------------------------------------------

    def read_raw(self, max_events: int = 64, *, hold_gil: bool = False) -> bytes:
        """Up to `max_events` raw 32-byte messages; b"" when none are pending (non-blocking
        fd). A blocking fd waits (without the GIL) for at least one. `hold_gil`: the read
        keeps the GIL (at most 64 messages), for a non-blocking fd only."""
        if hold_gil:
            scratch = _scratch
            size = MSG_SIZE * min(max_events, _HELD_READ_EVENTS)
            count = held_libc.read(self.fd, scratch.events_address, size)
            if count < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return b""
                raise OSError(err, os.strerror(err))
            return ctypes.string_at(scratch.events_address, count)
        try:
            return os.read(self.fd, MSG_SIZE * max_events)
        except BlockingIOError:
            return b""

    def read_events(self, max_events: int = 64, *, hold_gil: bool = False) -> list[Event]:
        """Up to `max_events` decoded events; [] when none are pending (non-blocking fd)."""
        return parse_events(self.read_raw(max_events, hold_gil=hold_gil))

    # -- lifetime ---------------------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the fd (idempotent). Registered ranges are unregistered by the kernel and
        threads sleeping on their faults are woken to retry."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"<UserfaultFd fd={self.fd} via={self.opened_via} features={int(self.features):#x}>"


def missing_ioctls(granted: Ioctl, needed: Ioctl) -> Ioctl:
    """The ioctls of `needed` that `granted` lacks (Ioctl(0) when all are present)."""
    return Ioctl(int(needed) & ~int(granted))
