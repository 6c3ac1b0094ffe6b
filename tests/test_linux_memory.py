"""Tests of postcopy.linux.memory on the real kernel: each mapping kind, madvise, mlock,
hole punching, the host's page size reports and eventfd."""

from __future__ import annotations

import mmap
import os
import select
import threading

import pytest

from postcopy.linux import hugepages, memory
from postcopy.linux.memory import HUGE_PAGE_2M, Advice, EventFd, Mapping, MappingError

pytestmark = pytest.mark.timeout(60, method="thread")

PAGE = mmap.PAGESIZE


def smaps_kib(address: int, field: str) -> int:
    """A field of /proc/self/smaps for the mapping that starts at `address`, in KiB."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == address
            elif inside and head == f"{field}:":
                return int(line.split()[1])
    raise AssertionError(f"no {field} for a mapping at {address:#x}")


def vm_locked_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


# -- anonymous ---------------------------------------------------------------------------


def test_anonymous_mapping_is_page_aligned_writable_and_private() -> None:
    with Mapping.anonymous(16 * PAGE) as mapping:
        assert mapping.kind == "anonymous"
        assert mapping.page_size == PAGE == memory.page_size()
        assert mapping.address % PAGE == 0
        assert not mapping.shared and mapping.fd is None
        view = mapping.view
        assert (view.format, view.itemsize, len(view), view.readonly) == ("B", 1, 16 * PAGE, False)
        view[PAGE : PAGE + 5] = b"hello"
        assert bytes(view[PAGE : PAGE + 5]) == b"hello"
        # The view really is the memory at .address.
        assert (memory.ctypes.c_char * 5).from_address(mapping.address + PAGE).raw == b"hello"


def test_dontneed_empties_private_anonymous_memory() -> None:
    with Mapping.anonymous(4 * PAGE) as mapping:
        mapping.view[:] = b"\xab" * mapping.length
        mapping.madvise(Advice.DONTNEED, PAGE, PAGE)
        assert bytes(mapping.view[PAGE : 2 * PAGE]) == bytes(PAGE)
        assert bytes(mapping.view[:PAGE]) == b"\xab" * PAGE
        assert bytes(mapping.view[2 * PAGE :]) == b"\xab" * 2 * PAGE


def test_shared_anonymous_memory_survives_dontneed() -> None:
    with Mapping.anonymous(2 * PAGE, shared=True) as mapping:
        assert mapping.shared
        mapping.view[:4] = b"keep"
        mapping.madvise(Advice.DONTNEED)
        assert bytes(mapping.view[:4]) == b"keep"


def test_close_is_idempotent_and_invalidates_the_view() -> None:
    mapping = Mapping.anonymous(PAGE)
    exported = mapping.view[:16]  # an export that blocks memoryview.release()
    mapping.close()
    mapping.close()
    assert mapping.closed
    with pytest.raises(ValueError, match="closed"):
        _ = mapping.view
    with pytest.raises(ValueError, match="closed"):
        mapping.madvise(Advice.DONTNEED)
    del exported


def test_length_must_be_a_positive_multiple_of_the_page_size() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Mapping.anonymous(PAGE + 1)
    with pytest.raises(ValueError):
        Mapping.anonymous(0)


# -- madvise, mlock ------------------------------------------------------------------------


def test_madvise_errors_name_the_advice_range_and_errno() -> None:
    with Mapping.anonymous(4 * PAGE) as mapping:
        mapping.madvise(Advice.NOHUGEPAGE)
        mapping.madvise(Advice.HUGEPAGE)
        mapping.madvise(Advice.POPULATE_WRITE, 0, PAGE)
        # MADV_REMOVE needs shared memory: EINVAL on private anonymous memory.
        with pytest.raises(MappingError) as raised:
            mapping.madvise(Advice.REMOVE, PAGE, PAGE)
        assert raised.value.errno == 22
        assert isinstance(raised.value, OSError)
        message = str(raised.value)
        assert "madvise REMOVE" in message and f"{mapping.address + PAGE:#x}" in message
        with pytest.raises(ValueError, match="outside"):
            mapping.madvise(Advice.DONTNEED, 2 * PAGE, 4 * PAGE)


def test_mlock_counts_the_range_as_locked_and_munlock_releases_it() -> None:
    length = 64 * PAGE
    with Mapping.anonymous(length) as mapping:
        before = vm_locked_kib()
        mapping.mlock()
        try:
            assert vm_locked_kib() - before == length // 1024
        finally:
            mapping.munlock()
        assert vm_locked_kib() == before


# -- memfd -----------------------------------------------------------------------------


def test_memfd_is_shared_and_an_alias_sees_the_same_pages() -> None:
    with Mapping.memfd(8 * PAGE, "test-ram") as mapping, mapping.alias() as alias:
        assert (mapping.kind, mapping.shared, mapping.page_size) == ("memfd", True, PAGE)
        assert mapping.fd is not None and alias.fd is not None and alias.fd != mapping.fd
        assert alias.address != mapping.address
        assert os.readlink(f"/proc/self/fd/{mapping.fd}").startswith("/memfd:test-ram")
        mapping.view[3 * PAGE : 3 * PAGE + 4] = b"seen"
        assert bytes(alias.view[3 * PAGE : 3 * PAGE + 4]) == b"seen"
        # DONTNEED drops only this mapping's page table entries; the file keeps the data.
        mapping.madvise(Advice.DONTNEED)
        assert bytes(mapping.view[3 * PAGE : 3 * PAGE + 4]) == b"seen"
        mapping.punch_hole(3 * PAGE, PAGE)
        assert bytes(alias.view[3 * PAGE : 3 * PAGE + 4]) == bytes(4)


def test_alias_and_punch_hole_refuse_private_anonymous_memory() -> None:
    with Mapping.anonymous(PAGE) as mapping:
        with pytest.raises(MappingError):
            mapping.alias()
        with pytest.raises(MappingError, match="PUNCH_HOLE"):
            mapping.punch_hole()


# -- huge pages ------------------------------------------------------------------------------


def test_host_page_size_reports() -> None:
    assert memory.page_size() == PAGE
    assert hugepages.transparent_hugepage_mode() in {"always", "madvise", "never", None}
    sizes = hugepages.huge_page_sizes()
    assert HUGE_PAGE_2M in sizes and sizes == sorted(sizes)
    total, free = hugepages.hugepages_reserved(HUGE_PAGE_2M)
    assert 0 <= free <= total
    assert hugepages.hugepages_reserved(3 * 4096) == (0, 0)  # no such size
    assert hugepages.default_huge_page_size() == HUGE_PAGE_2M


def test_hugetlbfs_mapping_uses_the_mount_and_its_pool(hugetlbfs_2m: str) -> None:
    assert (hugetlbfs_2m, HUGE_PAGE_2M) in hugepages.hugetlbfs_mounts()
    assert hugepages.mount_hugetlbfs_path(HUGE_PAGE_2M) is not None
    with Mapping.hugetlbfs(2 * HUGE_PAGE_2M, directory=hugetlbfs_2m) as mapping:
        assert (mapping.kind, mapping.page_size, mapping.shared) == (
            "hugetlbfs",
            HUGE_PAGE_2M,
            False,
        )
        assert mapping.address % HUGE_PAGE_2M == 0
        assert os.listdir(hugetlbfs_2m) == []  # unlinked once mapped
        mapping.view[HUGE_PAGE_2M + 7 : HUGE_PAGE_2M + 10] = b"big"
        assert bytes(mapping.view[HUGE_PAGE_2M + 7 : HUGE_PAGE_2M + 10]) == b"big"
        assert smaps_kib(mapping.address, "Private_Hugetlb") == 2048
        mapping.madvise(Advice.DONTNEED, HUGE_PAGE_2M, HUGE_PAGE_2M)
        assert smaps_kib(mapping.address, "Private_Hugetlb") == 0
        assert bytes(mapping.view[HUGE_PAGE_2M + 7 : HUGE_PAGE_2M + 10]) == bytes(3)


def test_hugetlbfs_shared_mapping_and_memfd_hugetlb(hugetlbfs_2m: str) -> None:
    with (
        Mapping.hugetlbfs(HUGE_PAGE_2M, directory=hugetlbfs_2m, shared=True) as mapping,
        mapping.alias() as alias,
    ):
        mapping.view[:5] = b"share"
        assert bytes(alias.view[:5]) == b"share"
        mapping.punch_hole()
        assert bytes(alias.view[:5]) == bytes(5)
    with Mapping.memfd(HUGE_PAGE_2M, "huge", hugetlb=True) as mapping:
        assert (mapping.kind, mapping.page_size) == ("memfd", HUGE_PAGE_2M)
        mapping.view[-3:] = b"end"
        assert bytes(mapping.view[-3:]) == b"end"


def test_hugetlbfs_without_a_mount_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MappingError) as raised:
        Mapping.hugetlbfs(HUGE_PAGE_2M, directory="/nonexistent-hugetlbfs")
    assert raised.value.errno == 2 and "/nonexistent-hugetlbfs" in str(raised.value)
    with monkeypatch.context() as patch:
        patch.setattr(memory, "mount_hugetlbfs_path", lambda size: None)
        with pytest.raises(MappingError, match="no hugetlbfs mount"):
            Mapping.hugetlbfs(HUGE_PAGE_2M)


def test_huge_mapping_length_must_be_whole_huge_pages() -> None:
    with pytest.raises(ValueError, match="multiple of 2097152"):
        Mapping.hugetlbfs(PAGE, directory="/unused")


# -- eventfd -----------------------------------------------------------------------------


def test_eventfd_counts_and_reads_zero_when_empty() -> None:
    with EventFd() as event:
        assert event.read() == 0
        assert select.select([event], [], [], 0)[0] == []
        event.write(3)
        event.write()
        assert select.select([event], [], [], 0)[0] == [event]
        assert event.read() == 4
        assert event.read() == 0
    assert event.fd == -1
    event.close()
    with pytest.raises(ValueError, match="closed"):
        event.write()


def test_eventfd_semaphore_mode_reads_one_at_a_time() -> None:
    with EventFd(2, semaphore=True) as event:
        assert [event.read(), event.read(), event.read()] == [1, 1, 0]


def test_blocking_eventfd_read_waits_for_a_writer() -> None:
    with EventFd(nonblock=False) as event:
        results: list[int] = []
        reader = threading.Thread(target=lambda: results.append(event.read()))
        reader.start()
        try:
            event.write(7)
        finally:
            reader.join(10)
        assert results == [7]
