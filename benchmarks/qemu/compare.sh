#!/bin/bash
# Ours against QEMU 7.2 in one session, alternating so both see the same host load:
# 1 GiB memtouch, 1 vCPU, loopback, postcopy after the first precopy round; the native
# (CPL3) guest and QEMU's classic CPL0 one, each with and without postcopy-preempt.
#   benchmarks/qemu/compare.sh OUT_DIR [ROUNDS]     (from the repository root, as root)
# Results: OUT_DIR/ours.jsonl (postcopy bench records), OUT_DIR/qemu-*.jsonl (run.py).
set -eu
out=${1:?usage: compare.sh OUT_DIR [ROUNDS]}
rounds=${2:-3}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for _ in $(seq "$rounds"); do
  "$python" -m postcopy bench memtouch-1g-1cpu-postcopy1 memtouch-1g-1cpu-postcopy1-preempt \
    memtouch-1g-1cpu-postcopy1-cpl0 memtouch-1g-1cpu-postcopy1-preempt-cpl0 \
    --repeat 1 --out "$out/ours.jsonl" >> "$out/ours.log" 2>&1
  "$python" benchmarks/qemu/run.py --ram 1G --repeat 1 --out "$out/qemu-cpl3.jsonl" >> "$out/qemu.log" 2>&1
  "$python" benchmarks/qemu/run.py --ram 1G --repeat 1 --preempt --out "$out/qemu-cpl3-preempt.jsonl" >> "$out/qemu.log" 2>&1
  "$python" benchmarks/qemu/run.py --ram 1G --repeat 1 --guest pm32 --out "$out/qemu-pm32.jsonl" >> "$out/qemu.log" 2>&1
  "$python" benchmarks/qemu/run.py --ram 1G --repeat 1 --guest pm32 --preempt --out "$out/qemu-pm32-preempt.jsonl" >> "$out/qemu.log" 2>&1
done
echo "done: $out"
