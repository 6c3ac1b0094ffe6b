"""vmsplice(2) and splice(2) through a pipe of our own: memory of this process sent to a
socket by reference, without the copy into the kernel that send(2) makes.

`SplicePipe` is a pipe sized with F_SETPIPE_SZ. `vmsplice` puts a range of this
process's memory into it: the pipe then holds references to those pages, not copies of
their bytes, so a page written after the call is sent with what it holds when the socket
layer (or, on loopback, the receiver) reads it. `splice_to` moves what the pipe holds
into a file descriptor (a socket). Both release the GIL.

Thin bindings, no policy: failures are OSError with the call's errno.
"""

from __future__ import annotations

import ctypes
import fcntl
import os

from postcopy.closing import Closing
from postcopy.linux._libc import libc

SPLICE_F_MOVE = 0x01
SPLICE_F_NONBLOCK = 0x02
SPLICE_F_MORE = 0x04


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# a private prototype: other bindings may declare other argtypes on the shared handle
_vmsplice = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t,
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_uint,
    use_errno=True,
)(("vmsplice", libc))


class SplicePipe(Closing):
    """A pipe for moving memory into a socket by reference (vmsplice, then splice). One
    thread at a time."""

    def __init__(self, size: int) -> None:
        """`size`: the capacity asked for (F_SETPIPE_SZ rounds it up to a power of two
        of pages; `capacity` is what the kernel gave)."""
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            self.close()
            raise
        self._vector = _IoVec()  # one, reused: ctypes objects cost microseconds to make
        self._vector_ref = ctypes.byref(self._vector)

    @property
    def closed(self) -> bool:
        return self._read_fd < 0

    def vmsplice(self, address: int, length: int, flags: int = 0) -> int:
        """Put up to `length` bytes of our memory at `address` into the pipe by reference;
        returns how many went in (at most the room left in the pipe)."""
        self._vector.iov_base = address
        self._vector.iov_len = length
        moved = _vmsplice(self._write_fd, self._vector_ref, 1, flags)
        if moved < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"vmsplice({address:#x}, {length}): {os.strerror(error)}")
        return int(moved)

    def splice_to(self, fd: int, length: int, flags: int = 0) -> int:
        """Move up to `length` bytes from the pipe into `fd`; returns how many moved."""
        return os.splice(self._read_fd, fd, length, flags=flags)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1
