#!/bin/sh
# Rebuild the built-in guest images (flat x86-64 binaries, loaded at guest physical 0x10000)
# from guests/*.S with binutils and guests/*.c with gcc (freestanding, linked by guest.ld).
# The output is deterministic: the committed images in src/postcopy/vm/images/ must be
# byte-identical to a rebuild (tests/test_vm_guests.py).
#
# usage: guests/build.sh [output-directory]     (default: src/postcopy/vm/images)
#        guests/build.sh --source FILE.S|FILE.c OUTPUT.bin
#                                        one guest of one's own, built the same way
#                                        (`make guest SRC=... OUT=...`)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
one_source=
if [ "${1:-}" = "--source" ]; then
    [ $# -eq 3 ] || { echo "usage: build.sh --source FILE.S|FILE.c OUTPUT.bin" >&2; exit 2; }
    one_source=$2
    one_output=$3
    [ -f "$one_source" ] || { echo "build.sh: $one_source: no such file" >&2; exit 1; }
fi
[ -n "$one_source" ] || out=${1:-"$here/../src/postcopy/vm/images"}
load_address=0x10000
max_bytes=458752        # 448 KiB: the image must end below the stacks and page tables
# A C guest runs at CPL3 with no libc, no red zone guarantees from an OS, no PIC loader:
# code and constants only, at the load address (guest.ld), general registers only in C.
cflags="-std=gnu11 -O2 -ffreestanding -fno-builtin -nostdlib -fno-pic -fno-pie
        -mno-red-zone -mgeneral-regs-only -fno-stack-protector -fno-asynchronous-unwind-tables
        -fno-tree-loop-distribute-patterns -fno-ident -Wall -Wextra -Werror"

for tool in as ld objcopy nm; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build.sh: $tool (binutils) not found" >&2; exit 1; }
done
if ls "$here"/*.c >/dev/null 2>&1; then
    command -v gcc >/dev/null 2>&1 || { echo "build.sh: gcc not found (C guests)" >&2; exit 1; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# build_one SOURCE OUTPUT.bin: assemble or compile, link at the load address, check that
# _start is the first byte, cut the flat image out and check its size
build_one() {
    source=$1
    case "$source" in
    *.S)
        name=$(basename "$source" .S)
        as --64 -I "$here" -o "$work/$name.o" "$source"
        ld -m elf_x86_64 -static --build-id=none -e _start -Ttext="$load_address" \
            -o "$work/$name.elf" "$work/$name.o"
        ;;
    *.c)
        name=$(basename "$source" .c)
        # shellcheck disable=SC2086  # cflags is a list of words
        gcc $cflags -c -o "$work/$name.o" "$source"
        ld -m elf_x86_64 -static --build-id=none -T "$here/guest.ld" \
            -o "$work/$name.elf" "$work/$name.o"
        ;;
    *)
        echo "build.sh: $source: a guest is an assembler (.S) or C (.c) source" >&2
        exit 1
        ;;
    esac
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
    mv "$work/$name.bin" "$2"
    echo "$2: $size bytes"
}

if [ -n "$one_source" ]; then
    build_one "$one_source" "$one_output"
    exit 0
fi
mkdir -p "$out"
for source in "$here"/*.S "$here"/*.c; do
    [ -e "$source" ] || continue
    build_one "$source" "$out/$(basename "${source%.*}").bin"
done
