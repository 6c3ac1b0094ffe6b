"""The catalogue of the micro-VM's built-in guests: names, images, parameters and markers.

A guest is a flat x86-64 binary (sources in guests/*.S, built by guests/build.sh into
postcopy/vm/images/<name>.bin) that the micro-VM loads at IMAGE_LOAD_ADDRESS and enters on
every vCPU at CPL3 with rdi = RAM size, rsi = vCPU index, rdx = vCPU count and rcx =
PARAMS_ADDRESS, the guest physical address of a block of u64 parameters (unused entries
zero). RAM from USABLE_BASE up is the guest's; it prints through OUT to CONSOLE_PORT and
says "this vCPU is done" with OUT to DONE_PORT, repeated if the vCPU is resumed.

- memtouch: QEMU's migration test guest; increments the first byte of every page of its
  vCPU's share, pass after pass; 'A' at start, 'B' after each pass.
- randwrite: random 64-bit writes at full speed over a working set; 'W' per 2**20 writes.
- scan: reads all RAM and checksums it; vCPU 0 prints the checksum as a hex line per pass.
- kvstore: a key-value service (C, guests/kvstore.c) answering GET/PUT/DELETE through the
  request device (postcopy.vm.requestdev); 'R' once its table is filled.

Their verifiers are in postcopy.vm.verify.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

# The guest ABI, as the guests see it (guests/abi.inc holds the same numbers).
IMAGE_LOAD_ADDRESS = 0x10000
IMAGE_MAX_BYTES = 448 * 1024
PARAMS_ADDRESS = 0xF000
PARAMS_MAX = 512  # the parameter block is the 4 KiB page below the image
USABLE_BASE = 0x100000
GUEST_PAGE_SIZE = 4096
CONSOLE_PORT = 0x3F8
DONE_PORT = 0x501

U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class GuestParam:
    """One u64 of a guest's parameter block."""

    name: str
    index: int
    default: int
    help: str


@dataclass(frozen=True)
class GuestInfo:
    """A built-in guest: what it does, its parameters and its console pass marker."""

    name: str
    description: str
    params: tuple[GuestParam, ...]
    pass_marker: bytes
    pass_help: str

    @property
    def image(self) -> bytes:
        return load_guest_image(self.name)

    @property
    def default_params(self) -> list[int]:
        return self.pack_params()

    def param(self, name: str) -> GuestParam:
        for param in self.params:
            if param.name == name:
                return param
        known = ", ".join(p.name for p in self.params) or "none"
        raise KeyError(f"the guest {self.name} has no parameter {name} (it has: {known})")

    def pack_params(self, values: Mapping[str, int] | None = None, **more: int) -> list[int]:
        """The parameter block as a list of u64, defaults filled in, every value checked."""
        merged = {**(values or {}), **more}
        packed = [0] * (max((p.index for p in self.params), default=-1) + 1)
        for param in self.params:
            packed[param.index] = param.default
        for name, value in merged.items():
            param = self.param(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
                raise ValueError(
                    f"the guest {self.name}: {name}={value} is not a number from 0 to 2**64-1"
                )
            packed[param.index] = value
        return packed

    def identity(self, params: Sequence[int]) -> str:
        """What runs in the VM, as both ends of a migration compare it: the name and every
        parameter, e.g. "memtouch(passes=0)"."""
        values = list(params) + [0] * len(self.params)
        named = ",".join(f"{p.name}={values[p.index]}" for p in self.params)
        return f"{self.name}({named})"

    def params_help(self) -> str:
        return "\n".join(
            f"params[{p.index}] {p.name} (default {p.default}): {p.help}" for p in self.params
        )


GUESTS: dict[str, GuestInfo] = {
    guest.name: guest
    for guest in (
        GuestInfo(
            name="memtouch",
            description=(
                "QEMU's migration test guest: RAM above 1 MiB is split into equal page-aligned "
                "shares, one per vCPU (the last takes the remainder); each vCPU increments the "
                "first byte of every 4 KiB page of its share in ascending order, pass after pass."
            ),
            params=(
                GuestParam("passes", 0, 0, "passes after which each vCPU is done; 0 = forever"),
            ),
            pass_marker=b"B",
            pass_help="'A' once per vCPU at start, then 'B' per vCPU per completed pass",
        ),
        GuestInfo(
            name="randwrite",
            description=(
                "Random 64-bit writes at full speed: each vCPU stores the values of its own "
                "xorshift64 sequence, each at the page and offset that value selects, within a "
                "working set at the start of RAM above 1 MiB."
            ),
            params=(
                GuestParam(
                    "working_set_ppm",
                    0,
                    100_000,
                    "working set, parts per million of the pages above 1 MiB (0 = 100000)",
                ),
                GuestParam("seed", 1, 0, "seed, mixed with the vCPU index"),
                GuestParam("writes", 2, 0, "writes after which each vCPU is done; 0 = forever"),
            ),
            pass_marker=b"W",
            pass_help="'W' per vCPU per 2**20 writes",
        ),
        GuestInfo(
            name="scan",
            description=(
                "Read-only: every vCPU reads all RAM above 1 MiB in order, pass after pass, "
                "computing sum((n - i) * word[i]) mod 2**64 over its n u64 words; vCPU 0 alone "
                "prints it after each pass as 16 lowercase hex digits and a newline."
            ),
            params=(
                GuestParam("passes", 0, 0, "passes after which each vCPU is done; 0 = forever"),
            ),
            pass_marker=b"\n",
            pass_help="one checksum line per pass of vCPU 0",
        ),
        GuestInfo(
            name="kvstore",
            description=(
                "A key-value service: GET/PUT/DELETE on a hash table spread over RAM above "
                "1 MiB (linear probing, 64-byte slots), filled at start with keys 1..P, served "
                "by vCPU 0 through the request device (vm run --service URI); the other "
                "vCPUs are done at once."
            ),
            params=(
                GuestParam(
                    "table_ppm",
                    0,
                    900_000,
                    "table size, parts per million of the RAM above 1 MiB (0 = 900000)",
                ),
                GuestParam(
                    "fill_ppm",
                    1,
                    250_000,
                    "keys preloaded at start, parts per million of the slots (0 = 250000)",
                ),
            ),
            pass_marker=b"R",
            pass_help="'R' once the table is filled and the service is up, "
            "then '.' per 65536 requests answered",
        ),
    )
}


def guest_info(name: str) -> GuestInfo:
    try:
        return GUESTS[name]
    except KeyError:
        raise KeyError(f"no built-in guest {name!r} (known: {', '.join(GUESTS)})") from None


@functools.cache
def load_guest_image(name: str) -> bytes:
    """The flat binary of built-in guest `name`, as shipped in postcopy/vm/images."""
    guest_info(name)
    resource = resources.files("postcopy.vm").joinpath("images", f"{name}.bin")
    try:
        image = resource.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"guest image {name}.bin is missing from the package; rebuild with guests/build.sh"
        ) from None
    if not 0 < len(image) <= IMAGE_MAX_BYTES:
        raise ValueError(f"guest image {name}.bin is {len(image)} bytes, not 1..{IMAGE_MAX_BYTES}")
    return image


def pack_params(name: str, values: Mapping[str, int] | None = None, **more: int) -> list[int]:
    """Parameter block of guest `name` from named values (see GuestInfo.pack_params)."""
    return guest_info(name).pack_params(values, **more)


def params_block(params: Sequence[int]) -> bytes:
    """The bytes the VMM writes at PARAMS_ADDRESS: little-endian u64s."""
    if len(params) > PARAMS_MAX:
        raise ValueError(f"{len(params)} parameters: the block holds at most {PARAMS_MAX}")
    for value in params:
        if not 0 <= value <= U64_MAX:
            raise ValueError(f"parameter {value!r} is not a u64")
    return struct.pack(f"<{len(params)}Q", *params)


def pass_count(name: str, console: bytes) -> int:
    """How many pass markers of guest `name` the console output holds (all vCPUs together;
    for scan, the checksum lines of vCPU 0)."""
    return console.count(guest_info(name).pass_marker)


def parse_guest_spec(spec: str) -> tuple[str, list[int]]:
    """Parse "name" or "name:key=value,key=value" (values decimal or 0x hex) into the
    guest's name and its packed parameter block, e.g. "randwrite:working_set_ppm=50000"."""
    name, _, rest = spec.partition(":")
    info = guest_info(name.strip())
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, text = item.partition("=")
        if not equals:
            raise ValueError(f"guest spec {spec!r}: {item!r} is not key=value")
        try:
            values[key.strip()] = int(text.strip(), 0)
        except ValueError:
            raise ValueError(f"guest spec {spec!r}: {text.strip()!r} is not an integer") from None
    return info.name, info.pack_params(values)
