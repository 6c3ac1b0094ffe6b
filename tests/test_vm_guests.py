"""Tests of the built-in guests: reproducible images, the catalogue, the verifiers on
synthetic RAM, and every guest run for real in a micro-VM (when KVM is usable)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.vm import guests, verify
from postcopy.vm.guests import GUESTS, USABLE_BASE, load_guest_image
from postcopy.vm.verify import (
    memtouch_shares,
    parse_scan_console,
    ram_digest,
    randwrite_addresses,
    randwrite_sequence,
    randwrite_working_set_pages,
    scan_checksum,
    verify_memtouch,
    verify_randwrite,
    verify_scan_console,
)

ROOT = Path(__file__).resolve().parent.parent
GUEST_SOURCES = ROOT / "guests"
IMAGES = ROOT / "src" / "postcopy" / "vm" / "images"
PAGE = 4096
MiB = 1 << 20


# --- images and catalogue -------------------------------------------------------------------


def test_every_source_is_catalogued_and_shipped() -> None:
    sources = {path.stem for path in [*GUEST_SOURCES.glob("*.S"), *GUEST_SOURCES.glob("*.c")]}
    images = {path.stem for path in IMAGES.glob("*.bin")}
    assert sources == set(GUESTS) == images


@pytest.mark.timeout(60)
def test_committed_images_are_a_reproducible_build(tmp_path: Path) -> None:
    missing = [t for t in ("as", "ld", "objcopy", "nm", "gcc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"binutils tools not installed: {', '.join(missing)}")
    subprocess.run(
        ["sh", str(GUEST_SOURCES / "build.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in GUESTS:
        rebuilt = (tmp_path / f"{name}.bin").read_bytes()
        assert rebuilt == (IMAGES / f"{name}.bin").read_bytes(), (
            f"{name}.bin differs from a rebuild of guests/{name}: run guests/build.sh and commit"
        )


def test_abi_constants_agree_with_the_assembly() -> None:
    text = (GUEST_SOURCES / "abi.inc").read_text()
    defined = {
        name: int(value, 0)
        for name, value in re.findall(r"^\s*\.set\s+(\w+),\s*(\w+)\s*$", text, re.MULTILINE)
    }
    assert defined["USABLE_BASE"] == guests.USABLE_BASE
    assert defined["PAGE_SIZE"] == guests.GUEST_PAGE_SIZE == 1 << defined["PAGE_SHIFT"]
    assert defined["CONSOLE_PORT"] == guests.CONSOLE_PORT
    assert defined["DONE_PORT"] == guests.DONE_PORT


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_images_load_and_fit(name: str) -> None:
    image = load_guest_image(name)
    assert 0 < len(image) <= guests.IMAGE_MAX_BYTES
    assert GUESTS[name].image == image
    assert guests.IMAGE_LOAD_ADDRESS + len(image) <= USABLE_BASE


def test_unknown_guest_is_named() -> None:
    with pytest.raises(KeyError, match="nosuch"):
        load_guest_image("nosuch")


def test_pack_params_fills_defaults_and_checks_values() -> None:
    assert GUESTS["randwrite"].default_params == [100_000, 0, 0]
    assert guests.pack_params("randwrite", seed=7, writes=5) == [100_000, 7, 5]
    assert guests.pack_params("memtouch", {"passes": 3}) == [3]
    with pytest.raises(KeyError, match="working_set_ppm"):
        guests.pack_params("randwrite", passes=1)
    with pytest.raises(ValueError, match="not a number from 0 to 2"):
        guests.pack_params("scan", passes=-1)
    with pytest.raises(ValueError, match="not a number from 0 to 2"):
        guests.pack_params("scan", passes=1 << 64)
    assert "params[2] writes" in GUESTS["randwrite"].params_help()


def test_params_block_is_little_endian_u64() -> None:
    assert guests.params_block([1, 2]) == (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    with pytest.raises(ValueError):
        guests.params_block([0] * (guests.PARAMS_MAX + 1))


def test_parse_guest_spec() -> None:
    assert guests.parse_guest_spec("memtouch") == ("memtouch", [0])
    assert guests.parse_guest_spec("randwrite:working_set_ppm=50_000, seed=0x10") == (
        "randwrite",
        [50_000, 16, 0],
    )
    with pytest.raises(ValueError, match="key=value"):
        guests.parse_guest_spec("scan:passes")
    with pytest.raises(ValueError, match="integer"):
        guests.parse_guest_spec("scan:passes=many")
    with pytest.raises(KeyError):
        guests.parse_guest_spec("bogus:passes=1")


def test_pass_count_counts_each_guest_marker() -> None:
    assert guests.pass_count("memtouch", b"AABBBB") == 4
    assert guests.pass_count("randwrite", b"WW") == 2
    assert guests.pass_count("scan", b"0123456789abcdef\n0123456789abcdef\n01") == 2


# --- memtouch verifier ---------------------------------------------------------------------


def memtouch_ram(ram_size: int, vcpus: int, values: list[tuple[int, int, int]]) -> bytearray:
    """RAM as memtouch leaves it: for each share, (value before edge, edge page, value from
    the edge) with the edge page index counted within the share."""
    ram = bytearray(ram_size)
    view = np.frombuffer(ram, dtype=np.uint8)
    for (address, pages), (before, edge, after) in zip(
        memtouch_shares(ram_size, vcpus), values, strict=True
    ):
        firsts = view[address : address + pages * PAGE : PAGE]
        firsts[:edge] = before
        firsts[edge:] = after
    return ram


def test_memtouch_shares_split_pages_and_give_the_rest_to_the_last() -> None:
    ram_size = USABLE_BASE + 10 * PAGE
    assert memtouch_shares(ram_size, 3) == [
        (USABLE_BASE, 3),
        (USABLE_BASE + 3 * PAGE, 3),
        (USABLE_BASE + 6 * PAGE, 4),
    ]
    assert memtouch_shares(USABLE_BASE, 2) == [(USABLE_BASE, 0), (USABLE_BASE, 0)]


@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_memtouch_consistent_images_pass(vcpus: int) -> None:
    ram_size = 4 * MiB
    edges = [(5, 0, 5), (0, 7, 255), (9, 11, 8)][:vcpus]  # boundary, wrap, mid-pass
    result = verify_memtouch(memtouch_ram(ram_size, vcpus, edges), ram_size, vcpus)
    assert result.ok, result.detail


def test_memtouch_untouched_ram_passes() -> None:
    assert verify_memtouch(bytearray(2 * MiB), 2 * MiB, 2).ok


@pytest.mark.parametrize(
    ("bad_value", "to_share_end", "why"),
    [(7, False, "not equal to or one below"), (2, True, "a second edge")],
)
def test_memtouch_wrong_byte_fails_naming_the_page(
    bad_value: int, to_share_end: bool, why: str
) -> None:
    ram_size = 4 * MiB
    ram = memtouch_ram(ram_size, 2, [(4, 10, 3), (6, 0, 6)])
    share_address, share_pages = memtouch_shares(ram_size, 2)[0]
    bad_page = share_address + 100 * PAGE
    last = share_address + share_pages * PAGE if to_share_end else bad_page + 1
    np.frombuffer(ram, dtype=np.uint8)[bad_page:last:PAGE] = bad_value
    result = verify_memtouch(ram, ram_size, 2)
    assert not result.ok
    assert f"page {bad_page:#x}" in result.detail
    assert f"holds {bad_value:#04x}" in result.detail
    assert why in result.detail


def test_memtouch_checks_each_share_on_its_own() -> None:
    ram_size = 4 * MiB
    ram = memtouch_ram(ram_size, 2, [(4, 10, 3), (9, 0, 9)])
    assert verify_memtouch(ram, ram_size, 2).ok
    # Seen as one vCPU, the jump from 3 to 9 at the second share is an error.
    one = verify_memtouch(ram, ram_size, 1)
    assert not one.ok
    assert f"page {memtouch_shares(ram_size, 2)[1][0]:#x}" in one.detail


# --- randwrite verifier ----------------------------------------------------------------------


def randwrite_ram(ram_size: int, ppm: int, vcpus: int, writes: int, seed: int = 0) -> bytearray:
    ram = bytearray(ram_size)
    words = np.frombuffer(ram, dtype=np.uint64)
    working_set = randwrite_working_set_pages(ram_size, ppm)
    for vcpu in range(vcpus):
        values = randwrite_sequence(seed, vcpu, writes)
        words[randwrite_addresses(values, working_set) // np.uint64(8)] = values
    return ram


@given(
    st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=50), st.integers(1, (1 << 32) - 1)
)
def test_multiply_high_is_exact(values: list[int], factor: int) -> None:
    array = np.array(values, dtype=np.uint64)
    expected = [(value * factor) >> 64 for value in values]
    assert verify._mulhi(array, factor).tolist() == expected


def test_randwrite_sequence_is_xorshift64() -> None:
    state = verify.randwrite_seed(5, 1)
    assert state == 5 ^ ((2 * verify.RANDWRITE_GOLDEN) & ((1 << 64) - 1))
    state ^= (state << 13) & ((1 << 64) - 1)
    state ^= state >> 7
    state ^= (state << 17) & ((1 << 64) - 1)
    assert int(randwrite_sequence(5, 1, 1)[0]) == state
    assert verify.randwrite_seed(verify.RANDWRITE_GOLDEN, 0) == verify.RANDWRITE_GOLDEN


def test_randwrite_working_set() -> None:
    ram_size = USABLE_BASE + 1000 * PAGE
    assert randwrite_working_set_pages(ram_size, 0) == 100
    assert randwrite_working_set_pages(ram_size, 5_000_000) == 1000
    assert randwrite_working_set_pages(ram_size, 1) == 1


def test_randwrite_consistent_image_passes() -> None:
    ram_size = 8 * MiB
    result = verify_randwrite(randwrite_ram(ram_size, 200_000, 2, 3000), ram_size, 200_000)
    assert result.ok, result.detail
    assert "6000 words" in result.detail or "words written" in result.detail


def test_randwrite_misplaced_page_fails() -> None:
    ram_size = 8 * MiB
    ram = randwrite_ram(ram_size, 200_000, 1, 3000)
    words = np.frombuffer(ram, dtype=np.uint64)
    first = USABLE_BASE // 8
    written_page = (int(np.flatnonzero(words[first:])[0]) * 8 + USABLE_BASE) // PAGE * PAGE
    # Swap a written page with its neighbour, as a placement at the wrong offset would.
    a, b = written_page, written_page + PAGE
    ram[a : a + PAGE], ram[b : b + PAGE] = ram[b : b + PAGE], ram[a : a + PAGE]
    result = verify_randwrite(ram, ram_size, 200_000)
    assert not result.ok
    assert "which randwrite stores at" in result.detail


def test_randwrite_write_outside_the_working_set_fails() -> None:
    ram_size = 8 * MiB
    ram = randwrite_ram(ram_size, 100_000, 1, 100)
    ram[ram_size - 8 : ram_size] = (12345).to_bytes(8, "little")
    result = verify_randwrite(ram, ram_size, 100_000)
    assert not result.ok
    assert f"{ram_size - 8:#x}" in result.detail


# --- scan verifier ----------------------------------------------------------------------------


def test_scan_checksum_matches_its_definition() -> None:
    ram_size = USABLE_BASE + 64 * 1024
    ram = bytearray(np.random.default_rng(3).integers(0, 256, ram_size, dtype=np.uint8))
    words = np.frombuffer(ram, dtype=np.uint64)[USABLE_BASE // 8 :].tolist()
    a = b = 0
    for word in words:
        a = (a + word) % (1 << 64)
        b = (b + a) % (1 << 64)
    assert scan_checksum(ram, ram_size) == b


def test_scan_checksum_sees_moved_pages() -> None:
    ram_size = USABLE_BASE + 4 * PAGE
    ram = bytearray(ram_size)
    ram[USABLE_BASE] = 1
    moved = bytearray(ram)
    moved[USABLE_BASE], moved[USABLE_BASE + PAGE] = 0, 1
    assert scan_checksum(ram, ram_size) != scan_checksum(moved, ram_size)


def test_scan_console_parsing_and_verification() -> None:
    output = b"00000000000000ff\n00000000000000ff\n0000"
    assert parse_scan_console(output) == [255, 255]
    assert verify_scan_console(output, 255, passes=2).ok
    assert not verify_scan_console(output, 255, passes=3).ok
    bad = verify_scan_console(b"00000000000000ff\n00000000000000fe\n", 255)
    assert not bad.ok and "pass 1" in bad.detail
    assert not verify_scan_console(b"", 0).ok
    assert not verify_scan_console(b"B\n", 0).ok


# --- digest and dispatcher -----------------------------------------------------------------------


def test_ram_digest_sees_every_byte_and_takes_any_buffer() -> None:
    size = 3 * verify.DIGEST_CHUNK + PAGE
    ram = bytearray(np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8))
    digest = ram_digest(ram)
    assert digest == ram_digest(bytes(ram)) == ram_digest(np.frombuffer(ram, dtype=np.uint64))
    ram[size - 1] ^= 1
    assert ram_digest(ram) != digest
    assert ram_digest(bytes(size)) != ram_digest(bytes(size + PAGE))


def test_verify_dispatches_and_always_gives_a_digest() -> None:
    ram_size = 4 * MiB
    ram = memtouch_ram(ram_size, 2, [(1, 0, 1), (2, 3, 1)])
    result = verify.verify("memtouch", ram, ram_size, 2)
    assert result.ok and result.digest == ram_digest(ram)
    assert not verify.verify("randwrite", ram, ram_size, 2, [0]).ok
    scan = verify.verify("scan", ram, ram_size, 2)
    assert scan.ok and f"{scan_checksum(ram, ram_size):016x}" in scan.detail
    with pytest.raises(KeyError):
        verify.verify("bogus", ram, ram_size, 1)


# --- the guests, run for real -----------------------------------------------------------------

VM_RAM = 64 * MiB


class GuestRun:
    """A MicroVM running a built-in guest, with its console collected."""

    def __init__(self, vm: Any, name: str, params: list[int]) -> None:
        self.vm = vm
        self.name = name
        self.params = params
        self._console = bytearray()
        self._changed = threading.Condition()

    def on_console(self, data: bytes) -> None:
        with self._changed:
            self._console += data
            self._changed.notify_all()

    @property
    def console(self) -> bytes:
        with self._changed:
            return bytes(self._console)

    @property
    def ram(self) -> memoryview:
        view: memoryview = self.vm.ram.by_name("pc.ram").view
        return view

    def wait_console(self, marker: bytes, count: int, timeout: float = 30.0) -> None:
        with self._changed:
            arrived = self._changed.wait_for(lambda: self._console.count(marker) >= count, timeout)
        assert arrived, f"{self.name}: {count} x {marker!r} not seen; console {self.console!r}"

    def wait_done(self, timeout: float = 30.0) -> None:
        done = self.vm.wait_shutdown(timeout)
        assert done, f"{self.name} not done: status {self.vm.status} {self.vm.error}"


@pytest.fixture
def run_guest() -> Iterator[Callable[..., GuestRun]]:
    try:
        from postcopy.vm.machine import MicroVM
    except ImportError as error:
        pytest.skip(f"the micro-VM is not available: {error}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is missing or not accessible")
    runs: list[GuestRun] = []

    def start(
        name: str,
        vcpus: int,
        params: list[int],
        ram_size: int = VM_RAM,
        prefill: Callable[[memoryview], None] | None = None,
        before_start: Callable[[Any], None] | None = None,
    ) -> GuestRun:
        run = GuestRun(None, name, params)
        run.vm = MicroVM(
            ram_size=ram_size,
            vcpus=vcpus,
            image=load_guest_image(name),
            params=params,
            console=run.on_console,
        )
        runs.append(run)
        if prefill is not None:
            prefill(run.ram)  # before the first KVM_RUN: all of RAM is plain memory
        if before_start is not None:
            before_start(run.vm)
        run.vm.cont()
        return run

    try:
        yield start
    finally:
        for run in runs:
            run.vm.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_memtouch_runs_its_passes_and_verifies(
    run_guest: Callable[..., GuestRun], vcpus: int
) -> None:
    run = run_guest("memtouch", vcpus, guests.pack_params("memtouch", passes=3))
    run.wait_done()
    assert run.console.count(b"A") == vcpus
    assert guests.pass_count("memtouch", run.console) == 3 * vcpus
    result = verify_memtouch(run.ram, VM_RAM, vcpus)
    assert result.ok, result.detail
    firsts = np.frombuffer(run.ram, dtype=np.uint8)[USABLE_BASE::PAGE]
    assert (firsts == 3).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_memtouch_stopped_mid_pass_verifies(run_guest: Callable[..., GuestRun], vcpus: int) -> None:
    run = run_guest("memtouch", vcpus, guests.pack_params("memtouch", passes=0))
    digests = []
    for round_ in range(3):
        # The console arrives in batches: ask for passes made after the last resume.
        run.wait_console(b"B", run.console.count(b"B") + 20 * vcpus)
        time.sleep(0.002 * round_)  # vary where in a pass the stop lands
        run.vm.stop()
        result = verify_memtouch(run.ram, VM_RAM, vcpus)
        assert result.ok, result.detail
        digests.append(ram_digest(run.ram))
        run.vm.cont()
    run.vm.stop()
    assert len(set(digests)) == 3, "memtouch made no progress between stops"


def test_guest_and_vm_layout_agree() -> None:
    try:
        from postcopy.vm import layout
    except ImportError as error:
        pytest.skip(f"the micro-VM is not available: {error}")
    for name in (
        "IMAGE_LOAD_ADDRESS",
        "IMAGE_MAX_BYTES",
        "PARAMS_ADDRESS",
        "PARAMS_MAX",
        "USABLE_BASE",
        "CONSOLE_PORT",
        "DONE_PORT",
    ):
        assert getattr(guests, name) == getattr(layout, name), name
    assert guests.GUEST_PAGE_SIZE == layout.PAGE_SIZE


def randwrite_written_pages(ram: memoryview, ram_size: int) -> npt.NDArray[np.bool_]:
    """Per page of RAM: does it hold a non-zero byte?"""
    pages = np.frombuffer(ram, dtype=np.uint64, count=ram_size // 8).reshape(-1, PAGE // 8)
    return np.bitwise_or.reduce(pages, axis=1) != 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_randwrite_dirties_only_its_working_set(
    run_guest: Callable[..., GuestRun], vcpus: int
) -> None:
    ppm = 50_000
    writes = 3 << 20
    params = guests.pack_params("randwrite", working_set_ppm=ppm, seed=99, writes=writes)
    run = run_guest("randwrite", vcpus, params, before_start=lambda vm: vm.start_dirty_log())
    run.wait_done()
    dirty = run.vm.sync_dirty_log()["pc.ram"]
    run.vm.stop_dirty_log()
    assert guests.pass_count("randwrite", run.console) == 3 * vcpus
    result = verify_randwrite(run.ram, VM_RAM, ppm)
    assert result.ok, result.detail

    first = USABLE_BASE // PAGE
    working_set = randwrite_working_set_pages(VM_RAM, ppm)
    written = randwrite_written_pages(run.ram, VM_RAM)
    assert not written[first + working_set :].any(), "a write landed outside the working set"
    # 3 Mi writes over ~800 pages leave none untouched (each is missed with p ~ e**-3900).
    assert written[first : first + working_set].all()
    # KVM's log agrees: above 1 MiB exactly the written pages. Below it the guest writes
    # nothing (no stack use; page tables have A/D preset), but with logging on from the
    # start KVM reports the parameter and image pages: the first read fault on a page
    # the host has populated maps it writable (its guest PTE is dirty) and logs it.
    assert np.array_equal(dirty[first:], written[first:])
    image_pages = -(-len(load_guest_image("randwrite")) // PAGE)
    readable = {guests.PARAMS_ADDRESS // PAGE} | {
        guests.IMAGE_LOAD_ADDRESS // PAGE + page for page in range(image_pages)
    }
    assert set(np.flatnonzero(dirty[:first]).tolist()) <= readable


@pytest.mark.timeout(60)
def test_randwrite_stores_exactly_its_sequence(run_guest: Callable[..., GuestRun]) -> None:
    seed, writes = 12345, 20_000
    params = guests.pack_params("randwrite", working_set_ppm=2_000, seed=seed, writes=writes)
    run = run_guest("randwrite", 1, params)
    run.wait_done()
    values = randwrite_sequence(seed, 0, writes)
    addresses = randwrite_addresses(values, randwrite_working_set_pages(VM_RAM, 2_000))
    # Where one address is written twice the later value stays: keep each last occurrence.
    _, last_from_end = np.unique(addresses[::-1], return_index=True)
    keep = writes - 1 - last_from_end
    expected = np.zeros(VM_RAM // 8, dtype=np.uint64)
    expected[addresses[keep] // np.uint64(8)] = values[keep]
    actual = np.frombuffer(run.ram, dtype=np.uint64)
    assert np.array_equal(actual[USABLE_BASE // 8 :], expected[USABLE_BASE // 8 :])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_scan_reports_the_host_checksum_and_writes_nothing(
    run_guest: Callable[..., GuestRun], vcpus: int
) -> None:
    pattern = np.random.default_rng(vcpus).integers(0, 256, VM_RAM - USABLE_BASE, dtype=np.uint8)
    checksum_before: list[int] = []
    digest_before: list[str] = []

    def prefill(ram: memoryview) -> None:
        np.frombuffer(ram, dtype=np.uint8)[USABLE_BASE:] = pattern
        digest_before.append(ram_digest(ram[USABLE_BASE:]))
        checksum_before.append(scan_checksum(ram, VM_RAM))

    run = run_guest("scan", vcpus, guests.pack_params("scan", passes=2), prefill=prefill)
    run.wait_done()
    result = verify_scan_console(run.console, checksum_before[0], passes=2)
    assert result.ok, f"{result.detail}; console {run.console!r}"
    assert checksum_before[0] != 0
    assert ram_digest(run.ram[USABLE_BASE:]) == digest_before[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "params", "marker_count"),
    [("memtouch", [1], 2), ("randwrite", [1_000_000, 0, 1 << 20], 2), ("scan", [1], 1)],
)
def test_guests_run_in_the_smallest_vm(
    run_guest: Callable[..., GuestRun], name: str, params: list[int], marker_count: int
) -> None:
    run = run_guest(name, 2, params, ram_size=2 * MiB)
    run.wait_done()
    assert guests.pass_count(name, run.console) == marker_count
    assert verify.verify(name, run.ram, 2 * MiB, 2, params).ok
