"""vmsplice and splice through SplicePipe, on the real kernel (linux/splice.py)."""

from __future__ import annotations

import errno
import socket

import pytest

from postcopy.linux.memory import Mapping
from postcopy.linux.splice import SplicePipe

PAGE = 4096


def test_the_pipe_holds_what_it_was_sized_for() -> None:
    with SplicePipe(256 << 10) as pipe, Mapping.anonymous(1 << 20) as memory:
        assert pipe.capacity == 256 << 10
        assert pipe.vmsplice(memory.address, 1 << 20) == 256 << 10  # no more than fits


def test_pages_go_by_reference_not_by_copy() -> None:
    """What the socket gets is what the page holds when splice moves it, not when
    vmsplice took it: the sender's dirty tracking must cover a page until it is read."""
    left, right = socket.socketpair()
    with SplicePipe(64 << 10) as pipe, Mapping.anonymous(2 * PAGE) as memory, left, right:
        memory.view[: 2 * PAGE] = b"a" * (2 * PAGE)
        assert pipe.vmsplice(memory.address, 2 * PAGE) == 2 * PAGE
        memory.view[PAGE : PAGE + 4] = b"late"
        moved = 0
        while moved < 2 * PAGE:
            moved += pipe.splice_to(left.fileno(), 2 * PAGE - moved)
        data = b""
        while len(data) < 2 * PAGE:
            data += right.recv(2 * PAGE)
        assert data == b"a" * PAGE + b"late" + b"a" * (PAGE - 4)


def test_memory_that_is_not_mapped_is_refused() -> None:
    with Mapping.anonymous(PAGE) as memory:
        address = memory.address
    with SplicePipe(PAGE) as pipe, pytest.raises(OSError) as raised:
        pipe.vmsplice(address, PAGE)
    assert raised.value.errno == errno.EFAULT
    assert "vmsplice" in str(raised.value)


def test_close_is_idempotent() -> None:
    pipe = SplicePipe(PAGE)
    pipe.close()
    pipe.close()
    assert pipe.closed
