"""How fast UserfaultFd.copy()/zeropage() place pages, against a bare fcntl.ioctl loop.

Registers anonymous memory MISSING, places every page with one ioctl per 4 KiB (and one
per 2 MiB), empties it with MADV_DONTNEED between passes, reports the median of the
passes. The bare loop (one preallocated bytearray, no method call, no error handling)
is the ceiling the binding is measured against.

    /work/venv/bin/python benchmarks/uffd_copy.py [--mib 256] [--passes 5]
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import time
from collections.abc import Callable

from postcopy.linux.memory import Advice, Mapping
from postcopy.linux.userfaultfd import _COPY, UFFDIO_COPY, RegisterMode, UserfaultFd

KiB = 1024
MiB = 1024 * KiB


def timed_passes(passes: int, target: Mapping, place: Callable[[], None]) -> float:
    """Median seconds of `place()` over passes, emptying the target before each."""
    times = []
    for _ in range(passes):
        target.madvise(Advice.DONTNEED)
        started = time.perf_counter()
        place()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the target region")
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    length = args.mib * MiB

    with (
        Mapping.anonymous(length) as target,
        Mapping.anonymous(2 * MiB) as source,
        UserfaultFd.open() as uffd,
    ):
        source.view[:] = b"\xa5" * source.length  # present, non-zero source pages
        target.madvise(Advice.NOHUGEPAGE)
        uffd.register(target.address, length, RegisterMode.MISSING)
        base, src = target.address, source.address

        def copy_small() -> None:
            copy = uffd.copy
            for address in range(base, base + length, 4 * KiB):
                copy(address, src, 4 * KiB)

        def copy_bare() -> None:
            buffer = bytearray(_COPY.size)
            pack, ioctl, fd = _COPY.pack_into, fcntl.ioctl, uffd.fd
            for address in range(base, base + length, 4 * KiB):
                pack(buffer, 0, address, src, 4 * KiB, 0, 0)
                ioctl(fd, UFFDIO_COPY, buffer, True)

        def copy_huge() -> None:
            copy = uffd.copy
            for address in range(base, base + length, 2 * MiB):
                copy(address, src, 2 * MiB)

        def zero_small() -> None:
            zeropage = uffd.zeropage
            for address in range(base, base + length, 4 * KiB):
                zeropage(address, 4 * KiB)

        def zero_huge() -> None:
            zeropage = uffd.zeropage
            for address in range(base, base + length, 2 * MiB):
                zeropage(address, 2 * MiB)

        pages = length // (4 * KiB)
        for name, place, per_call in (
            ("copy 4 KiB, UserfaultFd.copy", copy_small, 4 * KiB),
            ("copy 4 KiB, bare fcntl.ioctl loop", copy_bare, 4 * KiB),
            ("copy 2 MiB, UserfaultFd.copy", copy_huge, 2 * MiB),
            ("zeropage 4 KiB", zero_small, 4 * KiB),
            ("zeropage 2 MiB", zero_huge, 2 * MiB),
        ):
            seconds = timed_passes(args.passes, target, place)
            calls = length // per_call
            print(
                f"{name:36s} {calls / seconds:12,.0f} ioctls/s "
                f"{pages / seconds:12,.0f} pages/s {length / seconds / 1e9:6.2f} GB/s"
            )


if __name__ == "__main__":
    main()
