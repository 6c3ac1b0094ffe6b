#!/bin/sh
# Assemble bootblock.S into a raw 512-byte boot sector image for benchmarks/qemu/run.py.
#
# usage: build.sh [--mode cpl3|pm32] RAM_END OUTPUT.img [HIGH_END]
#   RAM_END   first address below 4 GiB the guest does not touch (decimal or 0x hex):
#             0x40000000 for -m 1G; 0xC0000000 for -m 4G (the pc machine puts RAM beyond
#             3 GiB above 4 GiB)
#   HIGH_END  end of the RAM above 4 GiB to touch from 4 GiB up, 0 or absent for none
#             (0x140000000 for -m 4G); at most 8 GiB; cpl3 mode only
#   --mode    cpl3 (default): 64-bit long mode at CPL3, native speed under PVM;
#             pm32: 32-bit protected mode at CPL0 without paging (emulated under PVM)
set -eu

mode=cpl3
if [ "${1:-}" = "--mode" ]; then
    mode=${2:?--mode needs cpl3 or pm32}
    shift 2
fi
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 [--mode cpl3|pm32] RAM_END OUTPUT.img [HIGH_END]" >&2
    exit 2
fi
ram_end=$1
output=$2
high_end=${3:-0}
case $mode in
    cpl3) cpl3=1 ;;
    pm32) cpl3=0 ;;
    *) echo "$0: unknown mode $mode" >&2; exit 2 ;;
esac
if [ $((ram_end)) -gt $((0xFFFFF000)) ]; then
    echo "$0: RAM_END $ram_end is not below 4 GiB" >&2
    exit 2
fi
if [ $((high_end)) -ne 0 ]; then
    if [ $cpl3 -eq 0 ] || [ $((high_end)) -gt $((0x200000000)) ]; then
        echo "$0: HIGH_END needs --mode cpl3 and at most 8 GiB" >&2
        exit 2
    fi
fi

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

as --64 --defsym CPL3="$cpl3" --defsym RAM_END="$ram_end" --defsym HIGH_END="$high_end" \
    -o "$work/bootblock.o" "$here/bootblock.S"
# linked at 0x7c00, where the BIOS loads a boot sector, so absolute addresses are right
ld -m elf_x86_64 -Ttext 0x7c00 -e _start --oformat binary -o "$work/bootblock.bin" "$work/bootblock.o"

size=$(wc -c < "$work/bootblock.bin")
if [ "$size" -ne 512 ]; then
    echo "$0: boot sector is $size bytes, not 512" >&2
    exit 1
fi
signature=$(od -An -tx1 -j510 -N2 "$work/bootblock.bin" | tr -d ' \n')
if [ "$signature" != "55aa" ]; then
    echo "$0: missing 0x55AA signature (got $signature)" >&2
    exit 1
fi
cp "$work/bootblock.bin" "$output"
