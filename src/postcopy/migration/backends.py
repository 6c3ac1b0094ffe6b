"""Postcopy on each kind of RAM: what userfaultfd must offer, how pages land, how they go.

What the kernel offers differs by memory (measured on this host, see
../shared/research/memory-backends.md and docs/ARCHITECTURE.md):

- anonymous: MISSING; normal pages by COPY (or MOVE from the side mapping: the incoming
  RAM swap), zero pages by ZEROPAGE; discard MADV_DONTNEED.
- shmem (memfd, tmpfs): MISSING_SHMEM; COPY (MOVE is EINVAL), ZEROPAGE; discard punches a
  hole (and MADV_DONTNEED for a private mapping).
- hugetlb (hugetlb memfd, hugetlbfs): MISSING_HUGETLBFS; one COPY per whole huge page, zero
  huge pages copied from a zero buffer (no ZEROPAGE; a 4 KiB copy is EINVAL); discard
  punches a hole, which gives the page back to the pool.
- minor mode (shmem or hugetlb, shared): + MINOR_SHMEM / MINOR_HUGETLBFS, registered
  MISSING|MINOR; data read into a second mapping, then CONTINUE; zero pages fallocated,
  then CONTINUE.

A RAM block's page is its host page (2 MiB on hugetlb): the source sends, discards and
re-sends whole huge pages, faults are reported at the huge page's start and requests name
it, so a huge page always arrives in one piece, in one RAM run, on one channel; the
receiver reads it whole into its staging buffer (QEMU's tmp_huge_page) and it is placed
with one UFFDIO_COPY, which wakes every vCPU waiting anywhere in it.

Minor-fault mode (`x-postcopy-minor-faults`, beyond QEMU, for shared memfd and hugetlb
RAM): RAM is registered MISSING|MINOR; a run is read straight into a second mapping of the
same file (the page cache, no staging copy) and UFFDIO_CONTINUE maps it into guest RAM.
MINOR alone would let a hole read as zeros with no fault; with MISSING too a hole faults.
The guest mapping cannot see a page before CONTINUE, so a half-written page is never read;
a page already placed is never written again (each page is claimed once, under a lock).

`uffd_needs` is what `postcopy check` reports and LISTEN checks; the destination's
placement per backend is incoming/placement.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from postcopy.linux.userfaultfd import Feature, Ioctl, RegisterMode
from postcopy.ram import RamBlock


class BackendUnsupported(ValueError):
    """Postcopy cannot serve this RAM; the message says why and what to use instead."""


@dataclass(frozen=True)
class UffdNeeds:
    """What a RAM block needs of userfaultfd: features, registration mode, ioctls."""

    features: Feature
    mode: RegisterMode
    ioctls: Ioctl

    def describe(self) -> str:
        features = "+".join(f.name for f in Feature if f in self.features and f.name) or "none"
        ioctls = "/".join(i.name for i in Ioctl if i in self.ioctls and i.name)
        modes = "|".join(m.name for m in RegisterMode if m in self.mode and m.name)
        return f"features {features}, register {modes} with {ioctls}"


def uffd_needs(memory_type: str, *, minor: bool = False) -> UffdNeeds:
    """What postcopy needs of userfaultfd for RAM of `memory_type` (ram.backend)."""
    if memory_type == "other":
        raise BackendUnsupported(
            "userfaultfd serves only anonymous memory, shmem (memfd, tmpfs) and hugetlbfs: "
            "put the RAM file on a hugetlbfs or tmpfs mount, or use precopy"
        )
    if minor and memory_type == "anonymous":
        raise BackendUnsupported(
            "minor faults need RAM with a page cache (memfd, memfd-hugetlb, a shared file): "
            "private anonymous RAM has none"
        )
    features = {
        "anonymous": Feature(0),
        "shmem": Feature.MISSING_SHMEM,
        "hugetlb": Feature.MISSING_HUGETLBFS,
    }[memory_type]
    ioctls = Ioctl.COPY | Ioctl.WAKE
    if memory_type != "hugetlb":
        ioctls |= Ioctl.ZEROPAGE
    mode = RegisterMode.MISSING
    if minor:
        features |= Feature.MINOR_HUGETLBFS if memory_type == "hugetlb" else Feature.MINOR_SHMEM
        mode |= RegisterMode.MINOR
        ioctls = Ioctl.CONTINUE | Ioctl.WAKE
    return UffdNeeds(features, mode, ioctls)


def minor_possible(block: RamBlock) -> bool:
    """Minor-fault mode needs a page cache and a second shared mapping of it."""
    return (
        block.memory_type in ("shmem", "hugetlb") and block.shared and block.mapping.fd is not None
    )


def features_for(blocks: list[RamBlock], *, minor: bool = False) -> Feature:
    """The userfaultfd features to ask for at the API handshake for these blocks."""
    features = Feature(0)
    for block in blocks:
        features |= uffd_needs(block.memory_type, minor=minor and minor_possible(block)).features
    return features
