"""The C library handle and the ioctl helpers shared by the bindings.

`fcntl.ioctl` parses an int argument as a C int (pointers >= 2**31 overflow) and holds the
GIL for mutable buffers over 1024 bytes, so pointer-taking ioctls go through ctypes, which
releases the GIL for the duration of the call.
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
