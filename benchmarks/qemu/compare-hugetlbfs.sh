#!/bin/bash
# Ours against QEMU 7.2 with guest RAM on hugetlbfs (2 MiB pages), in one session,
# alternating so both see the same host load: 1 GiB memtouch, 1 vCPU, loopback, postcopy
# after the first precopy round, each with and without postcopy-preempt. Each run takes
# its huge pages from the pool (touched once) and a hugetlbfs mount of its own, and gives
# them back. QEMU gets downtime-limit 1 ms so that its precopy does not converge before the
# switch (on huge pages it otherwise completes in precopy); ours switches after one round.
#   benchmarks/qemu/compare-hugetlbfs.sh OUT_DIR [ROUNDS]   (from the repository root, as root)
# EXTRA="memtouch-1g-1cpu-postcopy1-hugetlb-minor ..." adds scenarios of ours to each round
# (e.g. minor-fault mode, which needs shared RAM: a hugetlb memfd, QEMU's memory-backend-memfd).
# Results: OUT_DIR/ours.jsonl (postcopy bench records), OUT_DIR/qemu-hugetlbfs*.jsonl (run.py).
set -eu
out=${1:?usage: compare-hugetlbfs.sh OUT_DIR [ROUNDS]}
rounds=${2:-3}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for _ in $(seq "$rounds"); do
  "$python" -m postcopy bench memtouch-1g-1cpu-postcopy1-hugetlbfs \
    memtouch-1g-1cpu-postcopy1-preempt-hugetlbfs ${EXTRA:-} \
    --repeat 1 --out "$out/ours.jsonl" >> "$out/ours.log" 2>&1
  "$python" benchmarks/qemu/run.py --ram 1G --repeat 1 --hugetlbfs --downtime-limit 1 \
    --out "$out/qemu-hugetlbfs.jsonl" >> "$out/qemu.log" 2>&1
  "$python" benchmarks/qemu/run.py --ram 1G --repeat 1 --hugetlbfs --preempt --downtime-limit 1 \
    --out "$out/qemu-hugetlbfs-preempt.jsonl" >> "$out/qemu.log" 2>&1
done
echo "done: $out"
