#!/bin/bash
# Ours against QEMU 7.2 in one session, alternating so both see the same host load:
# memtouch, 1 vCPU, loopback, postcopy after the first precopy pass. By default the switch
# is made as libvirt makes it on both sides (query-migrate every 10 ms, migrate-start-postcopy
# once dirty-sync-count >= 2: our `-libvirt` scenarios, run.py's default).
#   benchmarks/qemu/compare.sh OUT_DIR [ROUNDS] [SETUP...]   (from the repository root, as root)
# SETUPs: 1g (CPL3), 1g-cpl0 (QEMU's classic CPL0 guest), 4g (CPL3); default all three.
# PREEMPT=1 adds postcopy-preempt on both sides; SWITCH=source has our source switch by
# itself (x-postcopy-after-rounds 1, the old comparison) while QEMU keeps libvirt's.
# PREALLOC=1 starts both VMs on both sides with all RAM populated (our --mem-prealloc,
# QEMU's -mem-prealloc: libvirt's <allocation mode='immediate'/>), so that neither
# destination receives into memory the host backs only on its first touch.
# Results: OUT_DIR/ours.jsonl (postcopy bench records), OUT_DIR/qemu-SETUP[-preempt][-prealloc].jsonl
# (run.py); `benchmarks/qemu/summary.py OUT_DIR` prints the medians side by side.
set -eu
out=${1:?usage: compare.sh OUT_DIR [ROUNDS] [SETUP...]}
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
setups=${*:-1g 1g-cpl0 4g}
python=${PYTHON:-.venv/bin/python}
preempt=${PREEMPT:-0}
switch=${SWITCH:-libvirt}
prealloc=${PREALLOC:-0}
mkdir -p "$out"
for _ in $(seq "$rounds"); do
  for setup in $setups; do
    case $setup in
      1g) ram=1g; qram=1G; guest=cpl3; cpl="" ;;
      1g-cpl0) ram=1g; qram=1G; guest=pm32; cpl="-cpl0" ;;
      4g) ram=4g; qram=4G; guest=cpl3; cpl="" ;;
      *) echo "unknown setup $setup (1g, 1g-cpl0, 4g)" >&2; exit 2 ;;
    esac
    name="memtouch-$ram-1cpu-postcopy1"
    [ "$switch" = libvirt ] && name="$name-libvirt"
    qargs=(--ram "$qram" --guest "$guest" --repeat 1)
    suffix=""
    if [ "$preempt" = 1 ]; then name="$name-preempt"; qargs+=(--preempt); suffix="-preempt"; fi
    name="$name$cpl"
    if [ "$prealloc" = 1 ]; then name="$name-prealloc"; qargs+=(--prealloc); suffix="$suffix-prealloc"; fi
    "$python" -m postcopy bench "$name" --repeat 1 --out "$out/ours.jsonl" >> "$out/ours.log" 2>&1 || true
    "$python" benchmarks/qemu/run.py "${qargs[@]}" --out "$out/qemu-$setup$suffix.jsonl" >> "$out/qemu.log" 2>&1 || true
  done
done
echo "done: $out"
