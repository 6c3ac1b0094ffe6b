"""Tests of the built-in guests: reproducible images, the catalogue, the verifiers on
synthetic RAM, and every guest run for real in a micro-VM (when KVM is usable)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
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
    sources = {path.stem for path in GUEST_SOURCES.glob("*.S")}
    images = {path.stem for path in IMAGES.glob("*.bin")}
    assert sources == set(GUESTS) == images


@pytest.mark.timeout(60)
def test_committed_images_are_a_reproducible_build(tmp_path: Path) -> None:
    missing = [tool for tool in ("as", "ld", "objcopy", "nm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"binutils tools not installed: {', '.join(missing)}")
    subprocess.run(
        ["sh", str(GUEST_SOURCES / "build.sh"), str(tmp_path)],
        check=True, capture_output=True, timeout=60,
    )
    for name in GUESTS:
        rebuilt = (tmp_path / f"{name}.bin").read_bytes()
        assert rebuilt == (IMAGES / f"{name}.bin").read_bytes(), (
            f"{name}.bin differs from a rebuild of guests/{name}.S: run guests/build.sh and commit"
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
    with pytest.raises(ValueError, match="u64"):
        guests.pack_params("scan", passes=-1)
    with pytest.raises(ValueError, match="u64"):
        guests.pack_params("scan", passes=1 << 64)
    assert "params[2] writes" in GUESTS["randwrite"].params_help()


def test_params_block_is_little_endian_u64() -> None:
    assert guests.params_block([1, 2]) == (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    with pytest.raises(ValueError):
        guests.params_block([0] * (guests.PARAMS_MAX + 1))


def test_parse_guest_spec() -> None:
    assert guests.parse_guest_spec("memtouch") == ("memtouch", [0])
    assert guests.parse_guest_spec("randwrite:working_set_ppm=50_000, seed=0x10") == (
        "randwrite", [50_000, 16, 0]
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
        (USABLE_BASE, 3), (USABLE_BASE + 3 * PAGE, 3), (USABLE_BASE + 6 * PAGE, 4)
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


@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=50),
       st.integers(1, (1 << 32) - 1))
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
