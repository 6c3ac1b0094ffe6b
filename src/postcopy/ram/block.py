"""Named RAM blocks and the RAM list: the guest memory that migration moves.

A RamBlock is one contiguous host mapping with a name (QEMU's idstr, e.g. "pc.ram"), a
guest physical base address, a backend (ram, memfd, memfd-hugetlb, file: see ram.backend)
and a page size (4 KiB, or the huge page size of its backing: QEMU's host page size, the
unit migration sends, discards and places). Offsets are bytes from the block's start;
page numbers count the block's pages.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from postcopy.linux.memory import Mapping
from postcopy.ram.backend import backend_name, describe, discard_range, memory_type


@dataclass(eq=False)
class RamBlock:
    name: str
    mapping: Mapping
    guest_physical: int = 0
    kvm_slot: int | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 255:
            raise ValueError(f"RAM block name {self.name!r} must be 1..255 bytes")
        if self.mapping.length % self.page_size:
            raise ValueError(
                f"RAM block {self.name!r}: length {self.mapping.length} is not a multiple "
                f"of its page size {self.page_size}"
            )

    @property
    def host_address(self) -> int:
        return self.mapping.address

    @property
    def length(self) -> int:
        return self.mapping.length

    @property
    def page_size(self) -> int:
        return self.mapping.page_size

    @property
    def pages(self) -> int:
        return self.length // self.page_size

    @property
    def shared(self) -> bool:
        return self.mapping.shared

    @property
    def backend(self) -> str:
        """ram, memfd, memfd-hugetlb or file (ram.backend)."""
        return backend_name(self.mapping)

    @property
    def hugetlb(self) -> bool:
        return self.mapping.hugetlb

    @property
    def memory_type(self) -> str:
        """anonymous, shmem, hugetlb or other: what userfaultfd sees (ram.backend)."""
        return memory_type(self.mapping)

    def describe(self) -> str:
        """ "pc.ram: memfd-hugetlb (2 MiB pages, shared)", for messages."""
        return f"{self.name}: {describe(self.mapping)}"

    def discard(self, first_page: int, count: int) -> None:
        """Empty the pages so that their next touch faults (ram.backend.discard_range)."""
        if first_page < 0 or count < 0 or first_page + count > self.pages:
            raise IndexError(f"pages {first_page}+{count} outside RAM block {self.name!r}")
        discard_range(self.mapping, first_page * self.page_size, count * self.page_size)

    @property
    def view(self) -> memoryview:
        return self.mapping.view

    def contains_host(self, address: int) -> bool:
        return self.mapping.address <= address < self.mapping.address + self.length

    def contains_guest(self, guest_address: int) -> bool:
        return self.guest_physical <= guest_address < self.guest_physical + self.length

    def page_view(self, first_page: int, count: int) -> memoryview:
        start = first_page * self.page_size
        end = start + count * self.page_size
        if first_page < 0 or count < 0 or end > self.length:
            raise IndexError(f"pages {first_page}+{count} outside RAM block {self.name!r}")
        return self.mapping.view[start:end]


class RamList(Sequence[RamBlock]):
    """The VM's RAM blocks, in order, with lookups by name, host and guest address."""

    def __init__(self, blocks: Sequence[RamBlock] = ()) -> None:
        self._blocks: list[RamBlock] = []
        self._by_name: dict[str, RamBlock] = {}
        self._host_starts: list[int] = []
        self._host_sorted: list[RamBlock] = []
        for block in blocks:
            self.add(block)

    def add(self, block: RamBlock) -> None:
        if block.name in self._by_name:
            raise ValueError(f"duplicate RAM block name {block.name!r}")
        for other in self._blocks:
            if (
                block.guest_physical < other.guest_physical + other.length
                and other.guest_physical < block.guest_physical + block.length
            ):
                raise ValueError(
                    f"RAM block {block.name!r} overlaps {other.name!r} in guest memory"
                )
        self._blocks.append(block)
        self._by_name[block.name] = block
        self._host_sorted = sorted(self._blocks, key=lambda b: b.host_address)
        self._host_starts = [b.host_address for b in self._host_sorted]

    def __getitem__(self, index: int) -> RamBlock:  # type: ignore[override]
        return self._blocks[index]

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self._blocks)

    def index(self, block: object, start: int = 0, stop: int | None = None) -> int:
        return self._blocks.index(block, start, len(self._blocks) if stop is None else stop)  # type: ignore[arg-type]

    def by_name(self, name: str) -> RamBlock:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no RAM block named {name!r}") from None

    @property
    def total_bytes(self) -> int:
        return sum(block.length for block in self._blocks)

    def find_host(self, address: int) -> tuple[RamBlock, int]:
        """The block holding host `address` and the offset within it."""
        position = bisect.bisect_right(self._host_starts, address) - 1
        if position >= 0:
            block = self._host_sorted[position]
            if block.contains_host(address):
                return block, address - block.host_address
        raise LookupError(f"host address {address:#x} is in no RAM block")

    def find_guest(self, guest_address: int) -> tuple[RamBlock, int]:
        """The block holding guest physical `guest_address` and the offset within it."""
        for block in self._blocks:
            if block.contains_guest(guest_address):
                return block, guest_address - block.guest_physical
        raise LookupError(f"guest physical address {guest_address:#x} is in no RAM block")

    def close(self) -> None:
        for block in self._blocks:
            block.mapping.close()
