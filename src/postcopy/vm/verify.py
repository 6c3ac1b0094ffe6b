"""Verifiers of the built-in guests: is the RAM of a stopped VM what its guest could leave?

Each verifier models its guest (guests/*.S) and checks RAM vectorised with numpy. `ram` is
the whole guest RAM from guest physical 0 (the "pc.ram" block's view, or any buffer with
the same bytes) and must be complete: these functions read every page, so never run them
while pages can still be missing on a userfaultfd (a fault taken by this thread could
deadlock; see the GIL rule in docs/ARCHITECTURE.md).

- memtouch: QEMU's check_guests_ram, per vCPU share (verify_memtouch).
- randwrite: every non-zero word sits where its own value sends it (verify_randwrite),
  valid for a VM whose RAM above 1 MiB was zero when the guest started.
- scan: the checksum lines it printed equal the host's checksum (verify_scan_console).
- kvstore: its hash table's integrity (postcopy.vm.kvstore.verify_kvstore).
- all: `ram_digest` for comparing the source's RAM with the destination's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from postcopy.vm.guests import GUEST_PAGE_SIZE, USABLE_BASE, guest_info
from postcopy.vm.kvstore import verify_kvstore

RamBuffer = memoryview | bytes | bytearray | np.ndarray
U64Array = npt.NDArray[np.uint64]

DIGEST_CHUNK = 4 << 20
_CHUNK_WORDS = 8 << 20  # words per numpy step: bounds temporaries at 64 MiB each

RANDWRITE_GOLDEN = 0x9E3779B97F4A7C15
RANDWRITE_DEFAULT_PPM = 100_000
_U64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    detail: str
    digest: str | None = None


def _byte_view(ram: RamBuffer) -> memoryview:
    view = ram.data if isinstance(ram, np.ndarray) else memoryview(ram)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _ram_bytes(ram: RamBuffer, ram_size: int) -> npt.NDArray[np.uint8]:
    view = _byte_view(ram)
    if ram_size < 0 or len(view) < ram_size:
        raise ValueError(f"RAM buffer of {len(view)} bytes is smaller than ram_size {ram_size}")
    return np.frombuffer(view, dtype=np.uint8, count=ram_size)


def _usable_words(ram: RamBuffer, ram_size: int) -> U64Array:
    """The u64 words of RAM from USABLE_BASE up to ram_size."""
    data = _ram_bytes(ram, ram_size)
    end = ram_size - ram_size % 8
    if end <= USABLE_BASE:
        return np.zeros(0, dtype=np.uint64)
    return data[USABLE_BASE:end].view(np.uint64)


# --- memtouch ---------------------------------------------------------------------------


def memtouch_shares(ram_size: int, vcpus: int) -> list[tuple[int, int]]:
    """(guest physical address, pages) of each vCPU's share, as memtouch.S computes them."""
    if vcpus < 1:
        raise ValueError(f"vcpus must be at least 1, not {vcpus}")
    total = max(ram_size - USABLE_BASE, 0) // GUEST_PAGE_SIZE
    share = total // vcpus
    shares = []
    for index in range(vcpus):
        first = index * share
        pages = total - first if index == vcpus - 1 else share
        shares.append((USABLE_BASE + first * GUEST_PAGE_SIZE, pages))
    return shares


def verify_memtouch(ram: RamBuffer, ram_size: int, vcpus: int) -> VerifyResult:
    """QEMU's check_guests_ram, for each vCPU's share of a stopped memtouch VM.

    memtouch increments the first byte of the pages of a share in ascending order, so
    each page's first byte equals the previous page's, except at one place at most where
    it is one lower (mod 256): the page the vCPU was about to touch when it stopped.
    """
    data = _ram_bytes(ram, ram_size)
    found = []
    for vcpu, (address, pages) in enumerate(memtouch_shares(ram_size, vcpus)):
        if pages == 0:
            found.append(f"vCPU {vcpu}: no pages")
            continue
        firsts = data[address : address + pages * GUEST_PAGE_SIZE : GUEST_PAGE_SIZE]
        drops = firsts[:-1] - firsts[1:]  # previous minus this, mod 256
        edges = drops == 1
        bad = (drops > 1) | (edges & (np.cumsum(edges) > 1))
        if bad.any():
            page = int(np.argmax(bad)) + 1
            why = "a second edge" if drops[page - 1] == 1 else "not equal to or one below it"
            return VerifyResult(
                False,
                f"memtouch: vCPU {vcpu}'s share: page {address + page * GUEST_PAGE_SIZE:#x} "
                f"holds {int(firsts[page]):#04x} after {int(firsts[page - 1]):#04x} on the "
                f"page before ({why}); the share starts {address:#x} with "
                f"{int(firsts[0]):#04x}; {int(np.count_nonzero(bad))} bad page(s) in the share",
            )
        if edges.any():
            page = int(np.argmax(edges)) + 1
            found.append(
                f"vCPU {vcpu}: {int(firsts[0]):#04x} up to {address + page * GUEST_PAGE_SIZE:#x}, "
                f"{int(firsts[page]):#04x} from there"
            )
        else:
            found.append(f"vCPU {vcpu}: {int(firsts[0]):#04x} on all {pages} pages")
    return VerifyResult(True, "memtouch consistent: " + "; ".join(found))


# --- randwrite --------------------------------------------------------------------------


def randwrite_working_set_pages(ram_size: int, working_set_ppm: int = 0) -> int:
    """Pages of randwrite's working set, as randwrite.S computes it."""
    ppm = working_set_ppm or RANDWRITE_DEFAULT_PPM
    ppm = min(ppm, 1_000_000)
    total = max(ram_size - USABLE_BASE, 0) // GUEST_PAGE_SIZE
    return max(total * ppm // 1_000_000, 1)


def randwrite_seed(seed: int, vcpu_index: int) -> int:
    state = (seed ^ ((vcpu_index + 1) * RANDWRITE_GOLDEN)) & _U64_MASK
    return state or RANDWRITE_GOLDEN


def randwrite_sequence(seed: int, vcpu_index: int, count: int) -> U64Array:
    """The first `count` values vCPU `vcpu_index` writes (a Python loop: for tests)."""
    state = randwrite_seed(seed, vcpu_index)
    values = np.empty(count, dtype=np.uint64)
    for position in range(count):
        state ^= (state << 13) & _U64_MASK
        state ^= state >> 7
        state ^= (state << 17) & _U64_MASK
        values[position] = state
    return values


def _mulhi(values: U64Array, factor: int) -> U64Array:
    """(values * factor) >> 64 exactly, for factor < 2**32, in 64-bit numpy arithmetic."""
    if not 0 <= factor < 1 << 32:
        raise ValueError(f"factor {factor} must be below 2**32")
    high = values >> np.uint64(32)
    low = values & np.uint64(0xFFFFFFFF)
    scale = np.uint64(factor)
    # high*factor + (low*factor >> 32) < 2**64 for 32-bit halves and factor: no overflow.
    return (high * scale + ((low * scale) >> np.uint64(32))) >> np.uint64(32)


def randwrite_addresses(values: U64Array, working_set_pages: int) -> U64Array:
    """The guest physical address randwrite stores each value at."""
    pages = _mulhi(values, working_set_pages)
    return (
        np.uint64(USABLE_BASE)
        + (pages << np.uint64(12))
        + (values & np.uint64(GUEST_PAGE_SIZE - 8))
    )


def verify_randwrite(ram: RamBuffer, ram_size: int, working_set_ppm: int = 0) -> VerifyResult:
    """Every non-zero u64 above 1 MiB must be a value randwrite stores at that address.

    Holds for a VM whose RAM above 1 MiB was zero when randwrite started (any fresh VM):
    randwrite only ever stores non-zero values, each where the value itself points.
    Catches a page placed at the wrong offset, torn or foreign data, and writes outside
    the working set; a stale but once-valid page passes (compare ram_digest for that).
    """
    words = _usable_words(ram, ram_size)
    working_set = randwrite_working_set_pages(ram_size, working_set_ppm)
    written = 0
    pages_written = 0
    for start in range(0, len(words), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        positions = np.flatnonzero(chunk)
        if positions.size == 0:
            continue
        values = chunk[positions]
        addresses = USABLE_BASE + (start + positions.astype(np.uint64)) * np.uint64(8)
        misplaced = randwrite_addresses(values, working_set) != addresses
        if misplaced.any():
            first = int(np.argmax(misplaced))
            value = int(values[first])
            home = int(randwrite_addresses(values[first : first + 1], working_set)[0])
            return VerifyResult(
                False,
                f"randwrite: word at {int(addresses[first]):#x} (page "
                f"{int(addresses[first]) & ~(GUEST_PAGE_SIZE - 1):#x}) holds {value:#018x}, "
                f"which randwrite stores at {home:#x}; "
                f"{int(np.count_nonzero(misplaced))} misplaced word(s) in this 64 MiB chunk",
            )
        written += int(positions.size)
        pages_written += int(np.unique(addresses >> np.uint64(12)).size)
    return VerifyResult(
        True,
        f"randwrite consistent: {written} words written in {pages_written} of the "
        f"{working_set}-page working set, all where their values put them",
    )


# --- scan ---------------------------------------------------------------------------------


def scan_checksum(ram: RamBuffer, ram_size: int) -> int:
    """sum((n - i) * word[i]) mod 2**64 over the n u64 words above 1 MiB, as scan.S does."""
    words = _usable_words(ram, ram_size)
    count = len(words)
    total = 0
    for start in range(0, count, _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        weights = np.uint64(count - start) - np.arange(len(chunk), dtype=np.uint64)
        total += int(np.multiply(chunk, weights).sum(dtype=np.uint64))
    return total & _U64_MASK


def parse_scan_console(output: bytes) -> list[int]:
    """The checksums scan printed; a last line still without its newline is ignored."""
    lines = output.split(b"\n")[:-1]
    checksums = []
    for number, line in enumerate(lines):
        if len(line) != 16 or line.strip(b"0123456789abcdef"):
            raise ValueError(f"scan console line {number}: {line!r} is not 16 lowercase hex digits")
        checksums.append(int(line, 16))
    return checksums


def verify_scan_console(output: bytes, expected: int, passes: int | None = None) -> VerifyResult:
    """Every checksum line scan printed equals `expected` (and there are `passes` of them)."""
    try:
        checksums = parse_scan_console(output)
    except ValueError as error:
        return VerifyResult(False, str(error))
    if not checksums:
        return VerifyResult(False, "scan printed no checksum line")
    if passes is not None and len(checksums) != passes:
        return VerifyResult(False, f"scan printed {len(checksums)} checksum lines, not {passes}")
    for number, checksum in enumerate(checksums):
        if checksum != expected:
            return VerifyResult(
                False, f"scan pass {number}: checksum {checksum:016x}, expected {expected:016x}"
            )
    return VerifyResult(True, f"scan: {len(checksums)} passes, all {expected:016x}")


# --- all guests -----------------------------------------------------------------------------


def ram_digest(ram: RamBuffer) -> str:
    """SHA-256 tree digest of all of `ram`, as hex: the source and the destination of a
    migration must agree. Chunks of DIGEST_CHUNK bytes are hashed in parallel threads
    (hashlib releases the GIL), then their digests, with the length, are hashed together.
    """
    view = _byte_view(ram)
    chunks = [view[start : start + DIGEST_CHUNK] for start in range(0, len(view), DIGEST_CHUNK)]

    def chunk_digest(chunk: memoryview) -> bytes:
        return hashlib.sha256(chunk).digest()

    workers = min(len(chunks), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(chunk_digest, chunks))
    else:
        digests = [chunk_digest(chunk) for chunk in chunks]
    top = hashlib.sha256(len(view).to_bytes(8, "little"))
    for digest in digests:
        top.update(digest)
    return top.hexdigest()


def verify(
    guest_name: str,
    ram: RamBuffer,
    ram_size: int,
    vcpus: int,
    params: Sequence[int] = (),
) -> VerifyResult:
    """Verify the RAM of a stopped VM that ran `guest_name` with `params`.

    memtouch and randwrite get their own checks; scan leaves RAM as it was, so it is
    checked by comparing digests (and its console with verify_scan_console). The result
    always carries `digest` (ram_digest over ram_size bytes) for comparing two sides.
    """
    guest_info(guest_name)
    digest = ram_digest(_ram_bytes(ram, ram_size))
    if guest_name == "memtouch":
        result = verify_memtouch(ram, ram_size, vcpus)
    elif guest_name == "randwrite":
        result = verify_randwrite(ram, ram_size, params[0] if params else 0)
    elif guest_name == "kvstore":
        report = verify_kvstore(_ram_bytes(ram, ram_size), ram_size, params)
        result = VerifyResult(report.ok, report.detail)
    else:
        result = VerifyResult(True, f"scan: checksum {scan_checksum(ram, ram_size):016x}")
    return VerifyResult(result.ok, f"{result.detail}; digest {digest[:16]}", digest)
