"""The C library handle and the ioctl helpers shared by the bindings.

`fcntl.ioctl` parses an int argument as a C int (pointers >= 2**31 overflow) and holds the
GIL for mutable buffers over 1024 bytes, so pointer-taking ioctls go through ctypes, which
releases the GIL for the duration of the call. `held_libc` is the exception: calls that
keep the GIL, for non-blocking calls only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int
libc.syscall.restype = ctypes.c_long

# The same C library through PyDLL: its calls keep the GIL. Only for calls that cannot
# block (a non-blocking fd, MSG_DONTWAIT) on a thread that must not give the GIL away in
# the middle of its work: a thread releasing it around a system call of a few
# microseconds often waits hundreds for it back, behind the threads that took it
# meanwhile (a woken thread loses the race for the GIL to the running ones).
held_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
held_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
held_libc.ioctl.restype = ctypes.c_int
held_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
held_libc.read.restype = ctypes.c_ssize_t
held_libc.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
held_libc.send.restype = ctypes.c_ssize_t


def ioctl_ptr(fd: int, request: int, arg: int | ctypes.c_void_p | None) -> int:
    """Issue ioctl(fd, request, arg) with a pointer or large integer argument.

    Returns the ioctl's non-negative result; raises OSError(errno) on failure.
    The GIL is released during the call.
    """
    result = libc.ioctl(fd, request, arg)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def ioctl_struct(fd: int, request: int, struct: ctypes.Structure | ctypes.Array[Any]) -> int:
    """Issue ioctl(fd, request, &struct); the structure is read and written in place."""
    return ioctl_ptr(fd, request, ctypes.addressof(struct))
