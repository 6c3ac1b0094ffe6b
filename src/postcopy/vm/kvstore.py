"""The kvstore guest's model: its requests and answers, its table, and the table's verifier.

guests/kvstore.c is the guest; this module restates its numbers (layout, hash, checksum,
preload values, operations) for the host: the load generator builds requests and checks
answers with it (postcopy.service), and `verify_kvstore` checks the table of a stopped
VM vectorised with numpy, reading RAM only when every page is present (x-verify).

Requests are request-device frames (postcopy.vm.reqframe) of kind GET, PUT, DELETE or
INFO with body u64 key [+ value]; answers have flags = a status and body = a value.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from postcopy.vm import reqframe

GET, PUT, DELETE, INFO = 1, 2, 3, 4
OPS = {GET: "get", PUT: "put", DELETE: "delete", INFO: "info"}
OK, NOT_FOUND, BAD, FULL = 0, 1, 2, 3
STATUSES = {OK: "ok", NOT_FOUND: "not-found", BAD: "bad", FULL: "full"}

HEADER_ADDRESS = 0x100000
SLOTS_ADDRESS = 0x110000
SLOT_BYTES = 64
VALUE_MAX = 48
PRELOAD_VALUE_BYTES = 16
MAGIC = int.from_bytes(b"KVSTORE1", "little")
HEADER_FIELDS = (
    "magic",
    "slots",
    "preloaded",
    "entries",
    "busy",
    "requests",
    "gets",
    "puts",
    "deletes",
    "infos",
    "bad",
    "full",
    "ready",
)
DEFAULT_TABLE_PPM = 900_000
DEFAULT_FILL_PPM = 250_000

GOLDEN = 0x9E3779B97F4A7C15
CHECK_SALT = 0x6B7673746F726521
PRELOAD_SALT0 = 0x0123456789ABCDEF
PRELOAD_SALT1 = 0xFEDCBA9876543210
_M64 = (1 << 64) - 1
_KEY = struct.Struct("<Q")

U64Array = npt.NDArray[np.uint64]


# --- requests and answers -----------------------------------------------------------------


def request(op: int, id: int, key: int, value: bytes = b"") -> bytes:
    """One request frame (id: the client's request id, or the front's tag)."""
    if op not in OPS:
        raise ValueError(f"operation {op} is not one of {sorted(OPS)}")
    if op == PUT and not 1 <= len(value) <= VALUE_MAX:
        raise ValueError(f"a PUT value has 1 to {VALUE_MAX} bytes, not {len(value)}")
    if op != PUT and value:
        raise ValueError(f"a {OPS[op].upper()} carries no value")
    return reqframe.encode(op, 0, id, _KEY.pack(key) + value)


@dataclass(frozen=True)
class Info:
    slots: int
    preloaded: int
    entries: int
    requests: int


def decode_info(value: bytes) -> Info:
    if len(value) != 32:
        raise ValueError(f"an INFO answer has 32 bytes, not {len(value)}")
    return Info(*struct.unpack("<4Q", value))


# --- the hash, the checksum and the preload, as the guest computes them --------------------


def mix64(x: int) -> int:
    z = (x + GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix64_array(x: U64Array) -> U64Array:
    """mix64 of every element (uint64 arithmetic wraps, as in C), in place on a copy: one
    temporary instead of eight (the verifier runs it over millions of slots)."""
    z = x + np.uint64(GOLDEN)
    shifted = np.empty_like(z)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(z, np.uint64(shift), out=shifted)
        z ^= shifted
        np.multiply(z, np.uint64(factor), out=z)
    np.right_shift(z, np.uint64(31), out=shifted)
    z ^= shifted
    return z


def preload_value(key: int) -> bytes:
    """The value key `key` (1..preloaded) holds until a client writes it."""
    return struct.pack("<QQ", mix64(key ^ PRELOAD_SALT0), mix64(key ^ PRELOAD_SALT1))


def geometry(ram_size: int, table_ppm: int = 0, fill_ppm: int = 0) -> tuple[int, int]:
    """(slots, preloaded keys) of a kvstore guest with this RAM and these parameters."""
    table_ppm = min(table_ppm or DEFAULT_TABLE_PPM, 1_000_000)
    fill_ppm = min(fill_ppm or DEFAULT_FILL_PPM, 900_000)
    if ram_size <= SLOTS_ADDRESS + 2 * SLOT_BYTES:
        return 0, 0
    slots = max((ram_size - SLOTS_ADDRESS) * table_ppm // 1_000_000 // SLOT_BYTES, 2)
    return slots, slots * fill_ppm // 1_000_000


def _homes(keys: U64Array, slots: int) -> U64Array:
    """mulhi(mix64(key), slots) for slots < 2**32, exactly, in 64-bit numpy arithmetic."""
    if not 0 < slots < 1 << 32:
        raise ValueError(f"{slots} slots: the table has fewer than 2**32")
    hashed = mix64_array(keys)
    high = hashed >> np.uint64(32)
    low = hashed & np.uint64(0xFFFFFFFF)
    scale = np.uint64(slots)
    with np.errstate(over="ignore"):
        return (high * scale + ((low * scale) >> np.uint64(32))) >> np.uint64(32)


def _checks(words: U64Array) -> U64Array:
    """The guest's slot checksum of each row of (n, 8) slot words."""
    vlen = words[:, 1] & np.uint64(0xFF)
    h = mix64_array(words[:, 0] ^ (vlen << np.uint64(56)) ^ np.uint64(CHECK_SALT))
    for column in range(2, 8):
        h = mix64_array(h ^ words[:, column])
    return (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


# --- the verifier ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableReport:
    ok: bool
    detail: str
    header: dict[str, int]


def read_header(ram: npt.NDArray[np.uint8]) -> dict[str, int]:
    words = ram[HEADER_ADDRESS : HEADER_ADDRESS + 8 * len(HEADER_FIELDS)].view(np.uint64)
    return dict(zip(HEADER_FIELDS, (int(w) for w in words), strict=True))


def verify_kvstore(ram: npt.NDArray[np.uint8], ram_size: int, params: Sequence[int]) -> TableReport:
    """Check the table of a stopped kvstore VM: header, every slot's checksum and padding,
    unique keys, the entry count, and that no empty slot lies between a key and its home.

    A VM stopped inside an update (header.busy) is reported as such, not checked: the
    guest changes the table only while it serves a batch, so stop it when no load runs.
    """
    table_ppm, fill_ppm = [*params, 0, 0][:2]
    slots, preloaded = geometry(ram_size, table_ppm, fill_ppm)
    header = read_header(ram)

    def bad(detail: str) -> TableReport:
        return TableReport(False, f"kvstore: {detail}", header)

    if header["magic"] != MAGIC:
        return bad(f"no table header at {HEADER_ADDRESS:#x} (magic {header['magic']:#x})")
    if (header["slots"], header["preloaded"]) != (slots, preloaded):
        return bad(
            f"header says {header['slots']} slots and {header['preloaded']} preloaded keys; "
            f"this RAM size and these parameters make {slots} and {preloaded}"
        )
    if not header["ready"]:
        return bad("the guest was still filling its table (not ready)")
    if header["busy"]:
        return bad("stopped inside an update (busy): stop it again while no load runs")
    words = ram[SLOTS_ADDRESS : SLOTS_ADDRESS + slots * SLOT_BYTES].view(np.uint64).reshape(-1, 8)
    keys = words[:, 0]
    occupied = keys != 0
    entries = int(np.count_nonzero(occupied))
    if entries != header["entries"]:
        return bad(f"{entries} occupied slots, the header counts {header['entries']} entries")
    # one pass over the table, no copy of it (an OR of each slot's other seven words)
    dirty_empty = ~occupied & (np.bitwise_or.reduce(words[:, 1:], axis=1) != 0)
    if dirty_empty.any():
        row = int(np.argmax(dirty_empty))
        return bad(f"empty slot {row} (at {SLOTS_ADDRESS + row * SLOT_BYTES:#x}) is not all zero")
    positions = np.flatnonzero(occupied)
    full = np.take(words, positions, axis=0)
    vlen = (full[:, 1] & np.uint64(0xFF)).astype(np.int64)
    wrong = (
        (vlen < 1) | (vlen > VALUE_MAX) | ((full[:, 1] >> np.uint64(8)) & np.uint64(0xFFFFFF) != 0)
    )
    if wrong.any():
        row = int(positions[np.argmax(wrong)])
        return bad(f"slot {row} has value length {int(words[row, 1] & 0xFF)} or bad padding")
    # bytes of the value beyond its length must be zero: per value word, the bytes it
    # may hold are its low min(max(vlen - 8j, 0), 8)
    beyond = np.zeros(len(full), dtype=np.bool_)
    for word in range(VALUE_MAX // 8):
        kept = np.clip(vlen - 8 * word, 0, 8).astype(np.uint64)
        low = np.where(
            kept >= 8,
            np.uint64(_M64),
            (np.uint64(1) << (np.uint64(8) * np.minimum(kept, np.uint64(7)))) - np.uint64(1),
        )
        beyond |= (full[:, 2 + word] & ~low) != 0
    if beyond.any():
        row = int(positions[np.argmax(beyond)])
        return bad(f"slot {row} holds bytes beyond its value's length")
    stored = full[:, 1] >> np.uint64(32)
    mismatch = _checks(full) != stored
    if mismatch.any():
        row = int(positions[np.argmax(mismatch)])
        return bad(
            f"slot {row} (key {int(words[row, 0])}) fails its checksum: "
            f"{int(np.count_nonzero(mismatch))} slot(s) corrupt"
        )
    # sorted neighbours, not np.unique: numpy 2.4's unique took ~14 s for 4M keys here,
    # a sort 0.4 s
    ordered = np.sort(full[:, 0])
    twice = int(np.count_nonzero(ordered[1:] == ordered[:-1]))
    if twice:
        return bad(f"{twice} key(s) stored twice")
    del ordered
    # linear probing: from a key's home to its slot, no empty slot
    homes = _homes(full[:, 0], slots).astype(np.int64)
    del full
    empties = np.flatnonzero(~occupied)
    if empties.size == 0:
        return bad("no empty slot: the table is full, which the guest never lets happen")
    # the nearest empty slot before each entry (before the first empty: the last one,
    # one table length back, as probing wraps around)
    nearest = np.searchsorted(empties, positions) - 1
    before = np.where(nearest >= 0, empties[nearest], empties[-1] - slots)
    distance = (positions - homes) % slots
    reachable = distance < positions - before
    if not reachable.all():
        row = int(positions[np.argmin(reachable)])
        return bad(
            f"key {int(words[row, 0])} in slot {row} is not reachable from its home slot "
            f"{int(homes[np.argmin(reachable)])}: an empty slot lies between"
        )
    return TableReport(
        True,
        f"kvstore consistent: {entries} entries in {slots} slots, all checksums good, "
        f"every key reachable; {header['requests']} requests answered "
        f"({header['gets']} get, {header['puts']} put, {header['deletes']} delete)",
        header,
    )
