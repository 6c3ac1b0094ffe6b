"""What placing a 2 MiB huge page costs, as the destination does it, per RAM backend.

Registers a hugetlb memfd MISSING (and, for comparison, a shmem memfd and anonymous memory)
and places 2 MiB at a time through the destination's own placements
(postcopy.migration.incoming.placement: one UFFDIO_COPY per huge page; 512 x 4 KiB copies
on the others; CONTINUE in minor-fault mode). Each placement first receives its data: a
memcpy from a warm buffer stands in for the socket's copy, into the staging buffer (copy
mode) or straight into the page cache (minor-fault mode). Between passes the memory is
emptied by punching holes (or MADV_DONTNEED), or in minor mode with the page cache kept as
the destination's DISCARD keeps it (incoming/keptcache.py), so that the receive lands in
pages already there. Prints p50 in microseconds per 2 MiB of the placement ioctl (the
figure x-huge-page-placement-us reports), of the receive, and the thread's CPU time for
both (on a loaded shared host the wall clock includes waiting for a core; the CPU time does
not); takes its huge pages from the pool and gives them back.

Beside them, the floor in the same run: a plain memcpy of 2 MiB from the same warm staging
buffer into huge pages already mapped, cycling over the same amount of memory (so that the
destination is as cold in the cache as a page being placed). A huge page copy is this
memcpy plus the kernel's bookkeeping, so its ratio to the floor is the figure to compare
across hosts: on a busy shared 2-core cloud VM both move together (the copy is memory
bandwidth; a THP- or hugetlb-backed, pre-touched or freshly written staging buffer each
changed the copy by under 5%). In minor mode the copy is the receive's own: the
placement is only the CONTINUE that maps the page.

    .venv/bin/python benchmarks/huge_placement.py [--mib 64] [--passes 5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import numpy as np

from postcopy.linux.hugepages import HUGE_PAGE_2M, HugePagePool
from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import UserfaultFd
from postcopy.migration.backends import features_for
from postcopy.migration.incoming.keptcache import KeptCache
from postcopy.migration.incoming.placement import placement_for
from postcopy.ram import RamBlock, discard_range

MiB = 1 << 20


def measure(
    make: str, size: int, passes: int, minor: bool = False, kept: bool = False
) -> dict[str, float | int]:
    """Place `size` bytes 2 MiB at a time, `passes` times, emptying the memory in between.

    Each placement first receives its data (a memcpy from a warm buffer stands in for the
    socket's copy): into the staging buffer in copy mode, into the page cache in minor-fault
    mode; then places it. `kept`: minor mode's discard, which keeps the page cache
    (keptcache.py), so the receive writes into pages already there."""
    if make == "memfd-hugetlb":
        mapping = Mapping.memfd(size, "bench", hugetlb=True)
    elif make == "memfd":
        mapping = Mapping.memfd(size, "bench")
    else:
        mapping = Mapping.anonymous(size)
    staging = Mapping.anonymous(HUGE_PAGE_2M, noreserve=False)
    wire = Mapping.anonymous(HUGE_PAGE_2M, noreserve=False)  # what the socket would hold
    ctypes.memset(staging.address, 0x5A, HUGE_PAGE_2M)
    ctypes.memset(wire.address, 0x5A, HUGE_PAGE_2M)
    block = RamBlock("pc.ram", mapping)
    place: list[float] = []
    fill: list[float] = []
    cpu: list[float] = []
    try:
        with UserfaultFd.open(features_for([block], minor=minor)) as uffd:
            received = np.zeros(block.pages, dtype=np.bool_)
            kept_cache = KeptCache([block], enabled=kept)
            placement = placement_for(block, uffd, received, minor=minor)
            placement.register()
            per_huge = HUGE_PAGE_2M // block.page_size
            zero = np.zeros(per_huge, dtype=np.bool_)
            for number in range(passes):
                if kept and number > 0:
                    kept_cache.discard(0, 0, block.pages)
                else:
                    discard_range(mapping)
                if minor:
                    placement.close()
                    stale = kept_cache.stale[0]
                    placement = placement_for(block, uffd, received, minor=True, stale=stale)
                for first in range(0, block.pages, per_huge):
                    started = time.perf_counter()
                    started_cpu = time.thread_time()
                    landing = placement.landing(first, zero)
                    targets = [staging.view] if landing.views is None else landing.views
                    for view in targets:  # the receive: into staging, or the page cache
                        ctypes.memmove(
                            ctypes.addressof(ctypes.c_char.from_buffer(view)),
                            wire.address,
                            view.nbytes,
                        )
                    received_at = time.perf_counter()
                    placement.place(first, zero, staging.address, landing)
                    done = time.perf_counter()
                    if kept and number == 0:
                        continue  # the first pass fills holes: not what is measured
                    fill.append(received_at - started)
                    place.append(done - received_at)
                    cpu.append(time.thread_time() - started_cpu)
            placement.close()
            uffd.unregister(mapping.address, mapping.length)
    finally:
        mapping.close()
        staging.close()
        wire.close()
    return {
        "place_p50_us": _p50(place),
        "place_p99_us": round(float(np.percentile(np.array(place) * 1e6, 99)), 1),
        "receive_p50_us": _p50(fill),
        "total_cpu_p50_us": _p50(cpu),
        "count": len(place),
    }


def _p50(seconds: list[float]) -> float:
    return round(float(np.percentile(np.array(seconds) * 1e6, 50)), 1)


def memcpy_floor(size: int, passes: int) -> dict[str, float | int]:
    """memcpy 2 MiB from a warm staging buffer into mapped huge pages, cycling over `size`."""
    target = Mapping.memfd(size, "floor", hugetlb=True)
    staging = Mapping.anonymous(HUGE_PAGE_2M, noreserve=False)
    samples: list[float] = []
    cpu: list[float] = []
    try:
        ctypes.memset(staging.address, 0x5A, HUGE_PAGE_2M)
        ctypes.memset(target.address, 0, size)  # map every huge page first
        for _ in range(passes):
            for offset in range(0, size, HUGE_PAGE_2M):
                started = time.perf_counter()
                started_cpu = time.thread_time()
                ctypes.memmove(target.address + offset, staging.address, HUGE_PAGE_2M)
                samples.append(time.perf_counter() - started)
                cpu.append(time.thread_time() - started_cpu)
    finally:
        target.close()
        staging.close()
    p50, p99 = np.percentile(np.array(samples) * 1e6, [50, 99])
    return {
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "cpu_p50_us": round(float(np.percentile(np.array(cpu) * 1e6, 50)), 1),
        "count": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    size = args.mib * MiB
    results = {}
    with HugePagePool(2 * size // HUGE_PAGE_2M):
        results["memfd-hugetlb copy 2 MiB"] = measure("memfd-hugetlb", size, args.passes)
        results["floor: memcpy 2 MiB into huge pages"] = memcpy_floor(size, args.passes)
        results["memfd-hugetlb minor, holes punched"] = measure(
            "memfd-hugetlb", size, args.passes, minor=True
        )
        results["memfd-hugetlb minor, page cache kept"] = measure(
            "memfd-hugetlb", size, args.passes, minor=True, kept=True
        )
    results["memfd 512 x 4 KiB copy"] = measure("memfd", size, args.passes)
    results["memfd 4 KiB minor, page cache kept"] = measure(
        "memfd", size, args.passes, minor=True, kept=True
    )
    results["ram 512 x 4 KiB copy"] = measure("ram", size, args.passes)
    for name, figures in results.items():
        print(f"{name:40s} {json.dumps(figures)}")
    copy = results["memfd-hugetlb copy 2 MiB"]
    floor = results["floor: memcpy 2 MiB into huge pages"]["cpu_p50_us"]
    minor = results["memfd-hugetlb minor, page cache kept"]
    print(f"huge page copy / memcpy floor, CPU time p50: {copy['place_p50_us'] / floor:.2f}x")
    print(
        f"minor (page cache kept) / copy, placement p50: "
        f"{minor['place_p50_us'] / copy['place_p50_us']:.2f}x; receive + placement, CPU p50: "
        f"{minor['total_cpu_p50_us'] / copy['total_cpu_p50_us']:.2f}x"
    )


if __name__ == "__main__":
    main()
