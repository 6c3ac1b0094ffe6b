"""Tests of postcopy.linux.userfaultfd on the real kernel.

Faults are taken by "toucher" threads doing ctypes.memset/memmove (which release the GIL,
see the GIL rule) and resolved by a handler thread polling the uffd and a quit eventfd,
the shape of the migration's fault thread. Teardown order matters: handlers stop, then
the uffds close (which wakes any toucher still asleep), then touchers are joined.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import select
import threading
from collections.abc import Callable

import pytest

from postcopy.linux import userfaultfd
from postcopy.linux.memory import HUGE_PAGE_2M, Advice, EventFd, Mapping
from postcopy.linux.userfaultfd import (
    Event,
    Feature,
    Fork,
    Ioctl,
    PageExistsError,
    PageFault,
    PageFaultFlags,
    RegisterMode,
    Remap,
    Remove,
    RetryError,
    UffdError,
    UnknownEvent,
    Unmap,
    UserfaultFd,
)

pytestmark = pytest.mark.timeout(60, method="thread")

PAGE = mmap.PAGESIZE
WAIT = 10.0  # seconds before a test gives up on an event that should come at once


class Handler:
    """A fault thread: polls the uffd and a quit eventfd, passes each event to `on_event`."""

    def __init__(self, uffd: UserfaultFd, on_event: Callable[[Event], object]) -> None:
        self.uffd = uffd
        self.on_event = on_event
        self.events: list[Event] = []
        self.errors: list[BaseException] = []
        self.seen = threading.Condition()
        self.quit = EventFd()
        self.thread = threading.Thread(target=self._run, name="uffd-handler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self.quit.fd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.quit.fd in ready:
                return
            for event in self.uffd.read_events():
                try:
                    self.on_event(event)
                except BaseException as error:
                    self.errors.append(error)
                with self.seen:
                    self.events.append(event)
                    self.seen.notify_all()

    def wait_events(self, count: int) -> list[Event]:
        with self.seen:
            assert self.seen.wait_for(lambda: len(self.events) >= count, WAIT), self.events
            return list(self.events)

    def stop(self) -> None:
        self.quit.write()
        self.thread.join(WAIT)
        self.quit.close()
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]


class Toucher:
    """A thread that runs one ctypes memory access (which may fault) and records its TID."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.native_id = 0
        self.done = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(action,), name="toucher", daemon=True
        )
        self.thread.start()
        assert self.started.wait(WAIT)

    def _run(self, action: Callable[[], object]) -> None:
        self.native_id = threading.get_native_id()
        self.started.set()
        action()
        self.done.set()


def write_at(address: int, byte: int, count: int) -> Callable[[], object]:
    return lambda: ctypes.memset(address, byte, count)


def read_at(address: int, into: ctypes.Array[ctypes.c_char]) -> Callable[[], object]:
    return lambda: ctypes.memmove(into, address, len(into))


class Scene:
    """Everything a test starts, cleaned up in a safe order even when the test fails."""

    def __init__(self) -> None:
        self.uffds: list[UserfaultFd] = []
        self.handlers: list[Handler] = []
        self.touchers: list[Toucher] = []
        self.mappings: list[Mapping] = []

    def uffd(
        self,
        features: Feature = userfaultfd.NO_FEATURES,
        *,
        via: str = "auto",
        user_mode_only: bool = False,
        nonblock: bool = True,
    ) -> UserfaultFd:
        uffd = UserfaultFd.open(features, via=via, user_mode_only=user_mode_only, nonblock=nonblock)
        self.uffds.append(uffd)
        return uffd

    def map(self, mapping: Mapping) -> Mapping:
        self.mappings.append(mapping)
        return mapping

    def source(self, length: int, fill: int) -> Mapping:
        mapping = self.map(Mapping.anonymous(length))
        ctypes.memset(mapping.address, fill, length)
        return mapping

    def handle(self, uffd: UserfaultFd, on_event: Callable[[Event], object]) -> Handler:
        handler = Handler(uffd, on_event)
        self.handlers.append(handler)
        return handler

    def touch(self, action: Callable[[], object]) -> Toucher:
        toucher = Toucher(action)
        self.touchers.append(toucher)
        return toucher

    def close(self) -> None:
        errors: list[BaseException] = []
        for handler in self.handlers:
            try:
                handler.stop()
            except BaseException as error:
                errors.append(error)
        for uffd in self.uffds:
            uffd.close()
        for toucher in self.touchers:
            toucher.thread.join(WAIT)
        for mapping in self.mappings:
            mapping.close()
        if errors:
            raise errors[0]


def require(features: Feature) -> None:
    missing = features & ~UserfaultFd.probe_features()
    if missing:
        pytest.skip(f"this kernel's userfaultfd lacks {missing!r}")


def fault_address(event: Event) -> int:
    assert isinstance(event, PageFault), event
    return event.address


def wait_readable(uffd: UserfaultFd) -> None:
    assert select.select([uffd], [], [], WAIT)[0], "no userfaultfd event arrived"


# -- opening and the API handshake ------------------------------------------------------


@pytest.mark.parametrize("via", ["syscall", "/dev/userfaultfd"])
def test_open_does_the_handshake_by_either_way(via: str, scene: Scene) -> None:
    uffd = scene.uffd(Feature.THREAD_ID | Feature.EVENT_REMOVE, via=via)
    assert uffd.opened_via == via
    assert uffd.features == Feature.THREAD_ID | Feature.EVENT_REMOVE
    assert uffd.ioctls & (Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER) == (
        Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER
    )
    assert uffd.available_features == UserfaultFd.probe_features(via=via)
    assert uffd.fileno() == uffd.fd >= 0


def test_probe_reports_what_postcopy_builds_on() -> None:
    available = UserfaultFd.probe_features()
    for feature in (
        Feature.THREAD_ID,
        Feature.MISSING_SHMEM,
        Feature.MISSING_HUGETLBFS,
        Feature.EVENT_REMOVE,
    ):
        assert feature in available


def test_open_user_mode_only_and_blocking(scene: Scene) -> None:
    uffd = scene.uffd(user_mode_only=True, nonblock=False)
    with open(f"/proc/self/fdinfo/{uffd.fd}") as fdinfo:
        flags = int(next(line for line in fdinfo if line.startswith("flags:")).split()[1], 8)
    assert not flags & 0o4000  # O_NONBLOCK


def test_unavailable_feature_is_refused_by_name() -> None:
    unknown = Feature(1 << 40)
    with pytest.raises(UffdError) as raised:
        UserfaultFd.open(unknown)
    assert raised.value.errno == errno.EINVAL
    assert "features not available" in str(raised.value)


def test_open_explains_every_way_that_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userfaultfd, "_SYSCALL_NUMBERS", {})
    monkeypatch.setattr(userfaultfd, "DEV_USERFAULTFD", "/nonexistent/userfaultfd")
    with pytest.raises(UffdError) as raised:
        UserfaultFd.open()
    message = str(raised.value)
    assert "syscall" in message and "/nonexistent/userfaultfd does not exist" in message
    with pytest.raises(ValueError, match="via"):
        UserfaultFd.open(via="telepathy")


def test_wp_async_brings_wp_unpopulated(scene: Scene) -> None:
    require(Feature.WP_ASYNC)
    uffd = scene.uffd(Feature.WP_ASYNC)
    assert Feature.WP_UNPOPULATED in uffd.features


# -- MISSING faults: copy, zeropage, wake ----------------------------------------------------


def test_missing_faults_resolved_by_copy_and_zeropage(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(4 * PAGE))
    source = scene.source(PAGE, 0x5A)
    uffd = scene.uffd(Feature.THREAD_ID)
    allowed = uffd.register(target.address, target.length, RegisterMode.MISSING)
    assert allowed & (Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE) == (
        Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE
    )

    def resolve(event: Event) -> None:
        assert isinstance(event, PageFault)
        if event.is_write:
            assert uffd.copy(event.address, source.address, PAGE) == PAGE
        else:
            assert uffd.zeropage(event.address, PAGE) == PAGE

    handler = scene.handle(uffd, resolve)
    writer = scene.touch(write_at(target.address + PAGE + 100, 0x01, 10))
    assert writer.done.wait(WAIT)
    readback = ctypes.create_string_buffer(16)
    reader = scene.touch(read_at(target.address + 2 * PAGE + 8, readback))
    assert reader.done.wait(WAIT)

    first, second = handler.wait_events(2)
    assert first == PageFault(target.address + PAGE, PageFaultFlags.WRITE, writer.native_id)
    assert second == PageFault(target.address + 2 * PAGE, PageFaultFlags(0), reader.native_id)
    assert readback.raw == bytes(16)
    # Every page touched is now present, so reading through the view is safe.
    page = bytes(target.view[PAGE : 2 * PAGE])
    assert page == b"\x5a" * 100 + b"\x01" * 10 + b"\x5a" * (PAGE - 110)
    assert bytes(target.view[2 * PAGE : 3 * PAGE]) == bytes(PAGE)


def test_thread_id_is_zero_unless_asked_for(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(PAGE))
    uffd = scene.uffd()
    uffd.register(target.address, PAGE, RegisterMode.MISSING)
    handler = scene.handle(uffd, lambda event: uffd.zeropage(target.address, PAGE))
    assert scene.touch(write_at(target.address, 1, 1)).done.wait(WAIT)
    assert handler.wait_events(1) == [PageFault(target.address, PageFaultFlags.WRITE, 0)]


def test_copy_onto_a_present_page_raises_page_exists(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(2 * PAGE))
    source = scene.source(2 * PAGE, 0x11)
    uffd = scene.uffd()
    uffd.register(target.address, target.length, RegisterMode.MISSING)
    uffd.copy(target.address, source.address, PAGE)
    with pytest.raises(PageExistsError) as raised:
        uffd.copy(target.address, source.address, PAGE)
    error = raised.value
    assert isinstance(error, UffdError) and isinstance(error, OSError)
    assert (error.errno, error.done, error.start, error.length) == (
        errno.EEXIST,
        0,
        target.address,
        PAGE,
    )
    assert "UFFDIO_COPY" in str(error) and f"{target.address:#x}" in str(error)
    with pytest.raises(PageExistsError):
        uffd.zeropage(target.address, PAGE)


def test_partial_copy_raises_retry_with_the_bytes_done(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(4 * PAGE))
    source = scene.source(4 * PAGE, 0x22)
    uffd = scene.uffd()
    uffd.register(target.address, target.length, RegisterMode.MISSING)
    uffd.copy(target.address + 2 * PAGE, source.address, PAGE)
    with pytest.raises(RetryError) as raised:
        uffd.copy(target.address, source.address, 4 * PAGE)
    assert raised.value.errno == errno.EAGAIN
    assert raised.value.done == 2 * PAGE
    # Continuing from there meets the present page itself: EEXIST, nothing done.
    with pytest.raises(PageExistsError) as exists:
        uffd.copy(target.address + 2 * PAGE, source.address + 2 * PAGE, 2 * PAGE)
    assert exists.value.done == 0
    assert uffd.copy(target.address + 3 * PAGE, source.address + 3 * PAGE, PAGE) == PAGE
    assert bytes(target.view) == b"\x22" * 4 * PAGE


def test_misaligned_copy_is_a_plain_uffd_error(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(2 * PAGE))
    source = scene.source(2 * PAGE, 0)
    uffd = scene.uffd()
    uffd.register(target.address, target.length, RegisterMode.MISSING)
    with pytest.raises(UffdError) as raised:
        uffd.copy(target.address + 1, source.address, PAGE)
    assert type(raised.value) is UffdError and raised.value.errno == errno.EINVAL


def test_unregister_lets_the_memory_fault_normally(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(2 * PAGE))
    uffd = scene.uffd()
    uffd.register(target.address, target.length, RegisterMode.MISSING)
    uffd.unregister(target.address, target.length)
    target.view[PAGE] = 7  # would deadlock (GIL rule) if the range were still registered
    assert target.view[PAGE] == 7
    with pytest.raises(UffdError) as raised:
        uffd.unregister(target.address + 1, PAGE)
    assert raised.value.errno == errno.EINVAL and "UFFDIO_UNREGISTER" in str(raised.value)


def test_dontwake_copy_leaves_the_thread_asleep_until_wake(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(PAGE))
    source = scene.source(PAGE, 0x33)
    uffd = scene.uffd()
    uffd.register(target.address, PAGE, RegisterMode.MISSING)
    toucher = scene.touch(write_at(target.address, 0x44, 1))
    wait_readable(uffd)
    (event,) = uffd.read_events()
    assert isinstance(event, PageFault)
    assert uffd.copy(target.address, source.address, PAGE, dontwake=True) == PAGE
    assert not toucher.done.wait(0.2)  # placed, but nobody woke it
    uffd.wake(target.address, PAGE)
    assert toucher.done.wait(WAIT)
    assert bytes(target.view[:2]) == b"\x44\x33"


def test_closing_the_uffd_wakes_sleeping_faults(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(PAGE))
    uffd = scene.uffd()
    uffd.register(target.address, PAGE, RegisterMode.MISSING)
    toucher = scene.touch(write_at(target.address, 0x55, 1))
    wait_readable(uffd)
    uffd.close()
    uffd.close()
    assert uffd.closed
    assert toucher.done.wait(WAIT)
    assert target.view[0] == 0x55


def test_read_events_returns_nothing_when_nothing_is_pending(scene: Scene) -> None:
    uffd = scene.uffd()
    assert uffd.read_events() == []
    assert uffd.read_raw() == b""
    assert uffd.read_events(hold_gil=True) == []
    assert uffd.read_raw(hold_gil=True) == b""


def test_the_calls_that_keep_the_gil_read_and_place_as_the_others(scene: Scene) -> None:
    """read_events and copy with hold_gil (the fault thread's read, a requested page's
    placement): the same events, the same placement and the same typed errors."""
    target = scene.map(Mapping.anonymous(2 * PAGE))
    source = scene.source(2 * PAGE, 0x66)
    uffd = scene.uffd(Feature.THREAD_ID)
    uffd.register(target.address, target.length, RegisterMode.MISSING)
    toucher = scene.touch(write_at(target.address + PAGE + 1, 0x77, 1))
    wait_readable(uffd)
    assert uffd.read_events(hold_gil=True) == [
        PageFault(target.address + PAGE, PageFaultFlags.WRITE, toucher.native_id)
    ]
    assert uffd.copy(target.address + PAGE, source.address, PAGE, hold_gil=True) == PAGE
    assert toucher.done.wait(WAIT)
    assert bytes(target.view[PAGE : PAGE + 3]) == b"\x66\x77\x66"
    with pytest.raises(PageExistsError) as exists:
        uffd.copy(target.address + PAGE, source.address, PAGE, hold_gil=True)
    assert (exists.value.errno, exists.value.done) == (errno.EEXIST, 0)
    with pytest.raises(RetryError) as partial:  # the second page is there: one done
        uffd.copy(target.address, source.address, 2 * PAGE, hold_gil=True)
    assert partial.value.done == PAGE
    with pytest.raises(UffdError) as misaligned:
        uffd.copy(target.address + 1, source.address, PAGE, hold_gil=True)
    assert type(misaligned.value) is UffdError and misaligned.value.errno == errno.EINVAL


# -- write protection, minor faults, move, poison ------------------------------------------


def test_write_protect_fault_resolved_by_unprotecting(scene: Scene) -> None:
    require(Feature.PAGEFAULT_FLAG_WP)
    target = scene.map(Mapping.anonymous(2 * PAGE))
    source = scene.source(PAGE, 0x66)
    uffd = scene.uffd(Feature.PAGEFAULT_FLAG_WP | Feature.THREAD_ID)
    allowed = uffd.register(target.address, target.length, RegisterMode.MISSING | RegisterMode.WP)
    assert Ioctl.WRITEPROTECT in allowed
    uffd.copy(target.address, source.address, PAGE, wp=True)  # present, write-protected
    uffd.copy(target.address + PAGE, source.address, PAGE)
    uffd.writeprotect(target.address + PAGE, PAGE, protect=True)
    assert bytes(target.view[:4]) == b"\x66" * 4  # reads are not trapped

    handler = scene.handle(
        uffd, lambda event: uffd.writeprotect(fault_address(event), PAGE, protect=False)
    )
    first = scene.touch(write_at(target.address + 1, 0x77, 1))
    assert first.done.wait(WAIT)
    second = scene.touch(write_at(target.address + PAGE + 1, 0x78, 1))
    assert second.done.wait(WAIT)
    assert handler.wait_events(2) == [
        PageFault(target.address, PageFaultFlags.WRITE | PageFaultFlags.WP, first.native_id),
        PageFault(
            target.address + PAGE, PageFaultFlags.WRITE | PageFaultFlags.WP, second.native_id
        ),
    ]
    assert bytes(target.view[:2]) == b"\x66\x77"
    assert bytes(target.view[PAGE : PAGE + 2]) == b"\x66\x78"


def test_minor_fault_on_shmem_resolved_by_continue(scene: Scene) -> None:
    require(Feature.MINOR_SHMEM)
    target = scene.map(Mapping.memfd(4 * PAGE, "minor"))
    filler = scene.map(target.alias())  # unregistered second mapping of the same pages
    filler.view[PAGE : 2 * PAGE] = b"\x99" * PAGE  # page cache holds it; target has no PTE
    uffd = scene.uffd(Feature.MINOR_SHMEM)
    assert Ioctl.CONTINUE in uffd.register(target.address, target.length, RegisterMode.MINOR)
    handler = scene.handle(uffd, lambda event: uffd.continue_(fault_address(event), PAGE))
    readback = ctypes.create_string_buffer(8)
    toucher = scene.touch(read_at(target.address + PAGE + 16, readback))
    assert toucher.done.wait(WAIT)
    assert handler.wait_events(1) == [PageFault(target.address + PAGE, PageFaultFlags.MINOR, 0)]
    assert readback.raw == b"\x99" * 8


def test_missing_fault_on_shmem_resolved_by_copy(scene: Scene) -> None:
    target = scene.map(Mapping.memfd(2 * PAGE, "missing"))
    source = scene.source(PAGE, 0x42)
    uffd = scene.uffd(Feature.MISSING_SHMEM)
    allowed = uffd.register(target.address, target.length, RegisterMode.MISSING)
    assert allowed & (Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE) == (
        Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE
    )
    scene.handle(uffd, lambda event: uffd.copy(fault_address(event), source.address, PAGE))
    assert scene.touch(write_at(target.address + PAGE, 0x43, 1)).done.wait(WAIT)
    assert bytes(target.view[PAGE : PAGE + 2]) == b"\x43\x42"


def test_move_hands_pages_over_without_copying(scene: Scene) -> None:
    require(Feature.MOVE)
    target = scene.map(Mapping.anonymous(4 * PAGE))
    source = scene.source(4 * PAGE, 0xA1)
    uffd = scene.uffd(Feature.MOVE)
    assert Ioctl.MOVE in uffd.register(target.address, target.length, RegisterMode.MISSING)
    assert uffd.move(target.address, source.address, 2 * PAGE) == 2 * PAGE
    assert bytes(target.view[: 2 * PAGE]) == b"\xa1" * 2 * PAGE
    assert bytes(source.view[: 2 * PAGE]) == bytes(2 * PAGE)  # source pages are gone
    # Holes in the source: refused unless allowed.
    source.madvise(Advice.DONTNEED, 3 * PAGE, PAGE)
    with pytest.raises(UffdError) as raised:
        uffd.move(target.address + 3 * PAGE, source.address + 3 * PAGE, PAGE)
    assert raised.value.errno == errno.ENOENT
    moved = uffd.move(
        target.address + 2 * PAGE, source.address + 2 * PAGE, 2 * PAGE, allow_src_holes=True
    )
    assert moved == 2 * PAGE
    assert bytes(target.view[2 * PAGE : 3 * PAGE]) == b"\xa1" * PAGE


def test_poison_marks_missing_pages(scene: Scene) -> None:
    require(Feature.POISON)
    target = scene.map(Mapping.anonymous(2 * PAGE))
    uffd = scene.uffd(Feature.POISON)
    assert Ioctl.POISON in uffd.register(target.address, target.length, RegisterMode.MISSING)
    assert uffd.poison(target.address, PAGE, dontwake=True) == PAGE
    with pytest.raises(PageExistsError):
        uffd.poison(target.address, PAGE)
    # Never touched: a poisoned page raises SIGBUS on access.


# -- huge pages ------------------------------------------------------------------------------


def test_hugetlbfs_fault_resolved_by_whole_huge_page_copy(
    hugetlbfs_2m: str,
    scene: Scene,  # the mount must outlive the scene
) -> None:
    target = scene.map(Mapping.hugetlbfs(2 * HUGE_PAGE_2M, directory=hugetlbfs_2m))
    source = scene.source(HUGE_PAGE_2M, 0xC3)
    uffd = scene.uffd(Feature.MISSING_HUGETLBFS)
    allowed = uffd.register(target.address, target.length, RegisterMode.MISSING)
    assert allowed & (Ioctl.COPY | Ioctl.WAKE) == Ioctl.COPY | Ioctl.WAKE
    assert Ioctl.ZEROPAGE not in allowed  # no zero huge page: copy a zeroed one instead
    huge = target.address + HUGE_PAGE_2M

    def resolve(event: Event) -> None:
        assert isinstance(event, PageFault)
        with pytest.raises(UffdError) as raised:  # smaller than the page size: EINVAL
            uffd.copy(event.address, source.address, PAGE)
        assert raised.value.errno == errno.EINVAL
        uffd.copy(event.address, source.address, HUGE_PAGE_2M)

    handler = scene.handle(uffd, resolve)
    assert scene.touch(write_at(huge + 12345, 0x3C, 3)).done.wait(WAIT)
    # The fault address is the huge page's start, not the touched base page.
    assert handler.wait_events(1) == [PageFault(huge, PageFaultFlags.WRITE, 0)]
    assert (
        bytes(target.view[HUGE_PAGE_2M + 12344 : HUGE_PAGE_2M + 12349]) == b"\xc3\x3c\x3c\x3c\xc3"
    )


# -- non-cooperative events ----------------------------------------------------------------


def test_dontneed_sends_a_remove_event(scene: Scene) -> None:
    target = scene.map(Mapping.anonymous(4 * PAGE))
    source = scene.source(PAGE, 0x10)
    uffd = scene.uffd(Feature.EVENT_REMOVE)
    uffd.register(target.address, target.length, RegisterMode.MISSING)
    uffd.copy(target.address + PAGE, source.address, PAGE)
    handler = scene.handle(uffd, lambda event: None)
    # madvise waits until the event has been read: it must not run in the reader's thread.
    madvise = scene.touch(lambda: target.madvise(Advice.DONTNEED, PAGE, 2 * PAGE))
    assert madvise.done.wait(WAIT)
    assert handler.wait_events(1) == [Remove(target.address + PAGE, target.address + 3 * PAGE)]


def test_munmap_sends_an_unmap_event(scene: Scene) -> None:
    target = Mapping.anonymous(2 * PAGE)
    address = target.address
    try:
        uffd = scene.uffd(Feature.EVENT_UNMAP)
        uffd.register(target.address, target.length, RegisterMode.MISSING)
        handler = scene.handle(uffd, lambda event: None)
        assert scene.touch(target.close).done.wait(WAIT)
        assert handler.wait_events(1) == [Unmap(address, address + 2 * PAGE)]
    finally:
        target.close()


def test_parse_events_decodes_every_kind() -> None:
    def message(code: int, body: bytes) -> bytes:
        return bytes([code]) + bytes(7) + body.ljust(24, b"\0")

    data = b"".join(
        [
            message(
                0x12,
                (5).to_bytes(8, "little")
                + (0x7000).to_bytes(8, "little")
                + (42).to_bytes(4, "little"),
            ),
            message(0x13, (9).to_bytes(4, "little")),
            message(0x14, b"".join(n.to_bytes(8, "little") for n in (0x1000, 0x9000, 0x2000))),
            message(0x15, b"".join(n.to_bytes(8, "little") for n in (0x1000, 0x3000))),
            message(0x16, b"".join(n.to_bytes(8, "little") for n in (0x4000, 0x5000))),
            message(0x77, b"x"),
        ]
    )
    events = userfaultfd.parse_events(data)
    assert events[:5] == [
        PageFault(0x7000, PageFaultFlags.WRITE | PageFaultFlags.MINOR, 42),
        Fork(9),
        Remap(0x1000, 0x9000, 0x2000),
        Remove(0x1000, 0x3000),
        Unmap(0x4000, 0x5000),
    ]
    assert isinstance(events[5], UnknownEvent) and events[5].event == 0x77
    with pytest.raises(ValueError, match="32-byte"):
        userfaultfd.parse_events(data[:40])


def test_missing_ioctls_names_what_is_lacking() -> None:
    granted = Ioctl.COPY | Ioctl.WAKE
    assert userfaultfd.missing_ioctls(granted, Ioctl.COPY | Ioctl.ZEROPAGE) == Ioctl.ZEROPAGE
    assert userfaultfd.missing_ioctls(granted, Ioctl.COPY) == Ioctl(0)
