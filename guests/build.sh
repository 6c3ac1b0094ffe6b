#!/bin/sh
# Rebuild the built-in guest images (flat x86-64 binaries, loaded at guest physical 0x10000)
# from guests/*.S with binutils. The output is deterministic: the committed images in
# src/postcopy/vm/images/ must be byte-identical to a rebuild (tests/test_vm_guests.py).
#
# usage: guests/build.sh [output-directory]     (default: src/postcopy/vm/images)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../src/postcopy/vm/images"}
load_address=0x10000
max_bytes=458752        # 448 KiB: the image must end below the stacks and page tables

for tool in as ld objcopy nm; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build.sh: $tool (binutils) not found" >&2; exit 1; }
done

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

for source in "$here"/*.S; do
    name=$(basename "$source" .S)
    as --64 -I "$here" -o "$work/$name.o" "$source"
    ld -m elf_x86_64 -static --build-id=none -e _start -Ttext="$load_address" \
        -o "$work/$name.elf" "$work/$name.o"
    # The guest is entered at its first byte, so _start must be the image's first byte.
    entry=$(nm "$work/$name.elf" | awk '$3 == "_start" { print $1 }')
    if [ "$((0x$entry))" -ne "$((load_address))" ]; then
        echo "build.sh: $name: _start is at 0x$entry, not at the load address" >&2
        exit 1
    fi
    objcopy -O binary -j .text "$work/$name.elf" "$work/$name.bin"
    size=$(wc -c < "$work/$name.bin")
    if [ "$size" -gt "$max_bytes" ]; then
        echo "build.sh: $name: $size bytes is over the $max_bytes-byte limit" >&2
        exit 1
    fi
    chmod 644 "$work/$name.bin"
    mv "$work/$name.bin" "$out/$name.bin"
    echo "$name.bin: $size bytes"
done
