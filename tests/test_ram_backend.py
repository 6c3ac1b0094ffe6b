"""RAM backends on the real kernel: QEMU's names, making each kind of memory, and the
discard that must make a page fault on its next touch whatever the memory is made of.

The regression at the heart of this file: MADV_DONTNEED on shared memory keeps the data and
raises no fault, so a destination that discarded shared RAM that way served stale pages.
`discard_range` punches holes; every backend's discarded page now faults on its next touch.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import pytest

from postcopy.linux import hugepages
from postcopy.linux.hugepages import HUGE_PAGE_2M, HugePagePool, PoolError
from postcopy.linux.memory import (
    HUGETLBFS_MAGIC,
    TMPFS_MAGIC,
    Advice,
    Mapping,
    MappingError,
    filesystem_type,
)
from postcopy.linux.pagemap import Pagemap
from postcopy.linux.userfaultfd import Feature, PageFault, RegisterMode
from postcopy.ram import BackendError, MemoryBackend, RamBlock, discard_range, fold, unfold
from tests.hugepages import huge_pages, hugetlbfs_mount
from tests.test_linux_userfaultfd import WAIT, Scene, read_at

pytestmark = pytest.mark.timeout(60, method="thread")

PAGE = mmap.PAGESIZE


# -- names ---------------------------------------------------------------------------------


def test_backend_names_are_qemus() -> None:
    assert MemoryBackend.parse("ram").qemu_object == "memory-backend-ram,share=off"
    assert MemoryBackend.parse("memfd").qemu_object == "memory-backend-memfd,share=on"
    assert (
        MemoryBackend.parse("memfd-hugetlb").qemu_object
        == "memory-backend-memfd,hugetlb=on,hugetlbsize=2M,share=on"
    )
    spec = MemoryBackend.parse("file:/dev/hugepages", share=True)
    assert spec.qemu_object == "memory-backend-file,mem-path=/dev/hugepages,share=on"
    assert (str(spec), spec.shared) == ("file:/dev/hugepages,share=on", True)
    assert str(MemoryBackend.parse("memfd", share=False)) == "memfd,share=off"
    assert not MemoryBackend.parse("file:/x").shared  # QEMU's default for files: private


def test_prealloc_is_qemus_prealloc_on_and_populates_every_page() -> None:
    backend = MemoryBackend.parse("ram", prealloc=True)
    assert backend.qemu_object == "memory-backend-ram,share=off,prealloc=on"
    assert str(backend) == "ram,prealloc=on"
    with Pagemap() as pagemap:
        for text in ("ram", "memfd"):
            for prealloc in (True, False):
                with MemoryBackend.parse(text, prealloc=prealloc).allocate(64 * PAGE) as mapping:
                    present = pagemap.present(mapping.address, mapping.length)
                    assert bool(present.all()) == prealloc, (text, prealloc)
                    assert prealloc or not present.any()
                    # populated with zeros: what a new VM's RAM must read
                    assert ctypes.string_at(mapping.address, mapping.length).count(0) == 64 * PAGE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("disk", "unknown memory backend 'disk'"),
        ("file", "needs a path"),
        ("file:", "needs a path"),
        ("memfd:/x", "only file takes a path"),
    ],
)
def test_bad_backend_names_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        MemoryBackend.parse(text)


# -- making memory ---------------------------------------------------------------------------


def test_ram_and_memfd_blocks_know_their_backend() -> None:
    for text, shared in (("ram", False), ("memfd", True)):
        with MemoryBackend.parse(text).allocate(8 * PAGE) as mapping:
            block = RamBlock("pc.ram", mapping)
            assert (block.backend, block.page_size, block.shared) == (text, PAGE, shared)
            assert not block.hugetlb
    with MemoryBackend.parse("memfd", share=False).allocate(4 * PAGE) as mapping:
        assert (mapping.kind, mapping.shared) == ("memfd", False)
        assert filesystem_type(mapping.fd or -1) == TMPFS_MAGIC


def test_hugetlb_memfd_takes_its_pages_from_the_pool_and_gives_them_back() -> None:
    with huge_pages(2):
        _, free_before = hugepages.hugepages_reserved()
        with MemoryBackend.parse("memfd-hugetlb").allocate(2 * HUGE_PAGE_2M) as mapping:
            block = RamBlock("pc.ram", mapping)
            assert (block.backend, block.page_size, block.hugetlb) == (
                "memfd-hugetlb",
                HUGE_PAGE_2M,
                True,
            )
            assert block.describe() == "pc.ram: memfd-hugetlb (2 MiB pages, shared)"
            assert filesystem_type(mapping.fd or -1) == HUGETLBFS_MAGIC
            ctypes.memset(mapping.address, 1, mapping.length)
            assert hugepages.hugepages_reserved()[1] == free_before - 2
        assert hugepages.hugepages_reserved()[1] == free_before


def test_a_pool_too_small_fails_at_allocation_with_a_hint() -> None:
    _, free = hugepages.hugepages_reserved()
    with pytest.raises(
        BackendError, match=r"not enough free huge pages .* free of .*postcopy check"
    ):
        MemoryBackend.parse("memfd-hugetlb").allocate((free + 1) * HUGE_PAGE_2M)


def test_file_backend_in_a_directory_or_a_named_file() -> None:
    directory = tempfile.mkdtemp(prefix="postcopy-file-backend-")
    try:
        with MemoryBackend.parse(f"file:{directory}").allocate(4 * PAGE) as mapping:
            assert (mapping.kind, mapping.page_size, mapping.shared) == ("file", PAGE, False)
            assert os.listdir(directory) == []  # a new file, unlinked once mapped
        named = os.path.join(directory, "ram")
        with MemoryBackend.parse(f"file:{named}", share=True).allocate(4 * PAGE) as mapping:
            mapping.view[:4] = b"file"
            with open(named, "rb") as file:
                assert file.read(4) == b"file"
        assert not os.path.exists(named)  # we made it, we removed it
        with open(named, "wb") as file:
            file.write(b"x" * PAGE)
        with pytest.raises(BackendError, match="holds 4096 bytes, less than"):
            MemoryBackend.parse(f"file:{named}").allocate(4 * PAGE)
        assert os.path.exists(named)  # not ours: left alone
        os.unlink(named)
    finally:
        os.rmdir(directory)


def test_file_on_hugetlbfs_has_huge_pages() -> None:
    with (
        hugetlbfs_mount(2) as mount,
        MemoryBackend.parse(f"file:{mount}", share=True).allocate(HUGE_PAGE_2M) as mapping,
    ):
        assert (mapping.kind, mapping.page_size, mapping.hugetlb) == (
            "hugetlbfs",
            HUGE_PAGE_2M,
            True,
        )
        assert RamBlock("pc.ram", mapping).backend == "file"
        with pytest.raises(ValueError, match="multiple of 2097152"):
            Mapping.file(mount, PAGE)


def test_allocate_fills_holes_with_zeros_behind_the_mapping() -> None:
    with Mapping.memfd(4 * PAGE, "allocate") as mapping, mapping.alias() as alias:
        alias.view[:4] = b"keep"
        mapping.allocate(0, 4 * PAGE)
        assert bytes(mapping.view[:4]) == b"keep"  # data stays
        assert bytes(mapping.view[PAGE : PAGE + 4]) == bytes(4)
    with Mapping.anonymous(PAGE) as anonymous, pytest.raises(MappingError, match="anonymous"):
        anonymous.allocate()


# -- the discard regression ------------------------------------------------------------------


def _discarded_page_faults(scene: Scene, mapping: Mapping, discard: str) -> tuple[bool, bytes]:
    """Place a page with UFFDIO_COPY, discard it, then touch it from another thread: did
    the touch fault, and what did it read? A fault is answered with a new page of 0x5A."""
    size = mapping.page_size
    scene.map(mapping)
    old = scene.source(size, 0xA5)
    new = scene.source(size, 0x5A)
    features = Feature.MISSING_HUGETLBFS if mapping.hugetlb else Feature(0)
    if mapping.kind != "anonymous" or mapping.shared:
        features |= Feature.MISSING_SHMEM if not mapping.hugetlb else Feature(0)
    uffd = scene.uffd(features)
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    uffd.copy(mapping.address + size, old.address, size)
    if discard == "policy":
        discard_range(mapping, size, size)
    else:
        mapping.madvise(Advice.DONTNEED, size, size)
    faults: list[PageFault] = []

    def answer(event: object) -> None:
        assert isinstance(event, PageFault)
        faults.append(event)
        uffd.copy(event.address, new.address, size)

    scene.handle(uffd, answer)
    readback = ctypes.create_string_buffer(8)
    toucher = scene.touch(read_at(mapping.address + size + 8, readback))
    assert toucher.done.wait(WAIT)
    return bool(faults), readback.raw


SMALL_BACKENDS = [
    ("memfd shared", lambda: Mapping.memfd(4 * PAGE, "t")),
    ("memfd private", lambda: Mapping.memfd(4 * PAGE, "t", shared=False)),
    ("ram shared", lambda: Mapping.anonymous(4 * PAGE, shared=True)),
    ("ram private", lambda: Mapping.anonymous(4 * PAGE)),
]


@pytest.mark.parametrize(("name", "make"), SMALL_BACKENDS, ids=[n for n, _ in SMALL_BACKENDS])
def test_a_discarded_page_faults_on_its_next_touch(scene: Scene, name: str, make: object) -> None:
    assert callable(make)
    faulted, data = _discarded_page_faults(scene, make(), "policy")
    assert faulted, f"{name}: the discarded page was read without a fault"
    assert data == b"\x5a" * 8, f"{name}: read {data.hex()} after the discard"


def test_dontneed_alone_keeps_shared_pages_the_bug_this_fixes(scene: Scene) -> None:
    faulted, data = _discarded_page_faults(scene, Mapping.memfd(4 * PAGE, "t"), "dontneed")
    assert not faulted and data == b"\xa5" * 8  # stale data, silently


@pytest.mark.parametrize("kind", ["memfd-hugetlb", "hugetlbfs shared", "hugetlbfs private"])
def test_a_discarded_huge_page_faults_and_returns_to_the_pool(kind: str) -> None:
    with hugetlbfs_mount(4) as mount:
        scene = Scene()
        try:
            if kind == "memfd-hugetlb":
                mapping = Mapping.memfd(2 * HUGE_PAGE_2M, "t", hugetlb=True)
            else:
                mapping = Mapping.file(mount, 2 * HUGE_PAGE_2M, shared=kind.endswith("shared"))
            faulted, data = _discarded_page_faults(scene, mapping, "policy")
            assert faulted and data == b"\x5a" * 8
            _, free = hugepages.hugepages_reserved()
            discard_range(mapping, 0, mapping.length)
            assert hugepages.hugepages_reserved()[1] == free + 1  # the placed page is freed
        finally:
            scene.close()


def test_discard_takes_whole_pages_only() -> None:
    with Mapping.memfd(4 * PAGE, "t") as mapping, pytest.raises(ValueError, match="whole"):
        discard_range(mapping, 100, PAGE)


# -- bitmaps at huge page granularity --------------------------------------------------------


def test_a_partly_dirty_huge_page_is_wholly_dirty() -> None:
    import numpy as np

    small = np.zeros(4 * 512, dtype=np.bool_)
    small[513] = True  # one 4 KiB page of the second huge page
    small[3 * 512 + 511] = True  # the last of the fourth
    assert fold(small, 512).tolist() == [False, True, False, True]
    assert fold(small, 1) is small
    assert unfold(fold(small, 512), 512).sum() == 2 * 512
    with pytest.raises(ValueError, match="do not fold"):
        fold(small[:-1], 512)


# -- the pool --------------------------------------------------------------------------------


def test_pool_reservation_adds_and_gives_back_exactly_its_pages() -> None:
    before, _ = hugepages.hugepages_reserved()
    with HugePagePool(3) as pool:
        assert pool.added == 3
        assert hugepages.hugepages_reserved()[0] == before + 3
    assert hugepages.hugepages_reserved()[0] == before


def test_a_release_counts_the_pages_a_mapping_still_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What tests check of their own reservation (tests.hugepages), whatever others
    reserve meanwhile: pages no one holds all leave the pool; below the pages in use the
    kernel keeps them (as surplus pages, freed once unmapped), and nr_hugepages reads above
    the target. That case is simulated: on a shared host another user's free pages may be
    what the kernel frees instead, so a real mapping does not always show."""
    with HugePagePool(2) as unused:
        pass
    assert unused.still_in_use == 0
    real = hugepages.set_hugepages
    calls: list[int] = []

    def two_in_use(total: int, size: int = HUGE_PAGE_2M) -> int:
        calls.append(total)
        reached = real(total, size)
        return reached + 2 if len(calls) == 2 else reached  # the shrink: 2 kept

    monkeypatch.setattr(hugepages, "set_hugepages", two_in_use)
    with HugePagePool(3) as held:
        pass
    assert held.still_in_use == 2 and held.added == 0


def test_a_refused_reservation_leaves_the_pool_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    before, _ = hugepages.hugepages_reserved()
    real = hugepages.set_hugepages

    def stingy(total: int, size: int = HUGE_PAGE_2M) -> int:
        return real(min(total, before + 1), size)  # the kernel gives one page only

    monkeypatch.setattr(hugepages, "set_hugepages", stingy)
    with pytest.raises(PoolError, match="gave 1 of 4 more"):
        HugePagePool(4).reserve()
    assert hugepages.hugepages_reserved()[0] == before
