"""The micro-VM's guest memory layout, page tables and boot state: the guest ABI.

This docstring is the authoritative statement of the ABI (guests/abi.inc and
postcopy.vm.guests restate its numbers for the guests' side).

Guest ABI
---------
A guest is a flat x86-64 binary of at most 448 KiB, loaded at guest physical 0x10000 and
entered at its first byte on every vCPU at once, in 64-bit long mode at CPL3 (or at CPL0
with `--guest-cpl 0`, as QEMU's own test guest runs; a KVM that runs inside a cloud VM
through PVM runs only CPL3 code natively and emulates CPL0 code, ~200 times slower).
A VM made with cpl=0 enters the same image at CPL0 instead: the privilege QEMU's own
migration test guest runs at, so on this host a guest as slow as that one (memtouch: ~1 s
per GiB pass instead of ~5 ms). Nothing else differs; the CPL travels with the vCPU state.

On entry:

- RDI = RAM size in bytes, RSI = vCPU index (0-based), RDX = vCPU count,
  RCX = 0xF000, the guest physical address of the parameter block: u64 params[0..511],
  the values the VM was given, the rest zero. All other general registers are zero.
- RSP = top of the vCPU's own 16 KiB stack below 1 MiB: vCPU i has 0x100000 - i*0x4000
  (16-byte aligned; nothing has been pushed).
- RFLAGS = 0x3002: IOPL=3, so IN/OUT do not fault but exit to the VMM; interrupts off.
- SSE is usable (CR0.MP set, CR0.EM clear, CR4.OSFXSR|OSXMMEXCPT); no AVX (CR4.OSXSAVE clear).
- All RAM is identity-mapped (virtual = guest physical), readable, writable and
  executable at CPL3, with 2 MiB pages; the U/S bit is set at every level; the accessed
  and dirty bits are preset, so the CPU never writes the page tables.
- There is no IDT and no GDT in memory: any exception triple-faults the vCPU, which the
  VM reports as an internal error. HLT and other privileged instructions fault at CPL3.

Memory (guest physical):

    0x00000-0x00FFF  unused
    0x01000          PML4 (one entry)
    0x02000          PDPT (one entry per GiB of RAM)
    0x03000-0x0EFFF  page directories, one 4 KiB PD per GiB (12 GiB at most)
    0x0F000          parameter block (4 KiB: 512 u64)
    0x10000-0x7FFFF  the guest image (448 KiB at most)
    0x80000-0xFFFFF  vCPU stacks, 16 KiB each, from the top down (32 vCPUs at most)
    0x100000-        RAM that is the guest's to use (up to the RAM size)

The guest must not write below 1 MiB other than its own stack.

I/O ports:

- OUT to 0x3F8 (byte, or the low byte of each unit of a wider OUT): a console byte.
  IN from 0x3FD (the UART's line status) answers 0x60: transmitter always ready.
- OUT to 0x501 (any value, any size): "this vCPU is done". The vCPU stops for good;
  when every vCPU is done the VM's status becomes "shutdown". A guest should repeat the
  OUT in a loop, in case it is ever resumed.
- With the request device (`vm run --service URI`, always for the kvstore guest):
  `rep insb` of 1024 bytes from 0x510 into a 1 KiB-aligned buffer is an exchange (the
  answers of the last batch in rax = count, at most 344, and the bytes in rbx, rbp,
  rsi, r8-r15, xmm0-xmm15; whole request frames come back, then zeros; it waits for
  requests while there are none); OUT to 0x511 hands over answers alone, in the same
  registers. postcopy.vm.requestdev and guests/kvstore.c have the details.
- Any other OUT is ignored; any other IN reads all ones.

Every I/O exit is a round trip through Python (~30-60 us): print rarely.

RAM size: a multiple of 2 MiB, from 2 MiB to 12 GiB.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from postcopy.linux.kvm_abi import KvmCpuidEntry2, KvmRegs, KvmSregs
from postcopy.units import format_bytes

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PML4_ADDRESS = 0x1000
PDPT_ADDRESS = 0x2000
PD_ADDRESS = 0x3000
PARAMS_ADDRESS = 0xF000
PARAMS_MAX = 512
IMAGE_LOAD_ADDRESS = 0x10000
IMAGE_MAX_BYTES = 448 * KiB
STACKS_TOP = 0x100000
STACK_SIZE = 16 * KiB
USABLE_BASE = 0x100000
MAX_VCPUS = (STACKS_TOP - (IMAGE_LOAD_ADDRESS + IMAGE_MAX_BYTES)) // STACK_SIZE

PAGE_SIZE = 4096
LARGE_PAGE_SIZE = 2 * MiB
MIN_RAM_SIZE = 2 * MiB
MAX_RAM_SIZE = 12 * GiB

CONSOLE_PORT = 0x3F8
CONSOLE_LINE_STATUS_PORT = CONSOLE_PORT + 5
CONSOLE_LINE_STATUS_READY = 0x60  # THRE | TEMT
DONE_PORT = 0x501

# KVM on x86 wants a TSS address before the first KVM_RUN (three pages; QEMU's choice
# just below 4 GiB). KVM uses it only to emulate real mode, which these guests never run.
TSS_ADDRESS = 0xFFFBD000

# Page table entry bits.
_PRESENT = 1 << 0
_WRITABLE = 1 << 1
_USER = 1 << 2
_ACCESSED = 1 << 5
_DIRTY = 1 << 6
_LARGE = 1 << 7
_TABLE_FLAGS = _PRESENT | _WRITABLE | _USER | _ACCESSED
_LARGE_PAGE_FLAGS = _PRESENT | _WRITABLE | _USER | _ACCESSED | _DIRTY | _LARGE

# Control registers.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
BOOT_CR0 = CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE  # caching enabled: no CD/NW
BOOT_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
BOOT_EFER = EFER_LME | EFER_LMA
BOOT_RFLAGS = 0x3002  # IOPL=3, reserved bit 1
CODE_SELECTOR = 0x1B  # GDT entry 3, RPL 3
DATA_SELECTOR = 0x23  # GDT entry 4, RPL 3
GUEST_CPLS = (0, 3)


def check_config(ram_size: int, vcpus: int, max_vcpus: int = MAX_VCPUS) -> None:
    """Raise ValueError unless the RAM size and vCPU count fit this layout."""
    if not isinstance(ram_size, int) or isinstance(ram_size, bool):
        raise ValueError("the RAM size must be a whole number of bytes")
    if ram_size % LARGE_PAGE_SIZE or not MIN_RAM_SIZE <= ram_size <= MAX_RAM_SIZE:
        raise ValueError(
            f"a RAM size of {format_bytes(ram_size)} is not possible: it must be a multiple "
            "of 2 MiB, from 2 MiB to 12 GiB"
        )
    limit = min(max_vcpus, MAX_VCPUS)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= limit:
        raise ValueError(f"{vcpus} vCPUs are not possible: from 1 to {limit}")


ELF_MAGIC = b"\x7fELF"


def check_image(image: bytes, params: Sequence[int]) -> None:
    if image[:4] == ELF_MAGIC:
        raise ValueError(
            "this is an ELF file, and the VM loads a flat binary: convert it with "
            "`objcopy -O binary guest.elf guest.bin` (or link with --oformat binary), "
            f"linked at {IMAGE_LOAD_ADDRESS:#x} (README, `Build your own guest`)"
        )
    if not 0 < len(image) <= IMAGE_MAX_BYTES:
        raise ValueError(
            f"a guest image of {format_bytes(len(image))} does not fit: it must be 1 byte to "
            f"{format_bytes(IMAGE_MAX_BYTES)} (loaded at {IMAGE_LOAD_ADDRESS:#x}, below the "
            f"vCPU stacks at {IMAGE_LOAD_ADDRESS + IMAGE_MAX_BYTES:#x})"
        )
    if len(params) > PARAMS_MAX:
        raise ValueError(f"{len(params)} parameters: the block holds at most {PARAMS_MAX}")
    for value in params:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise ValueError(f"parameter {value!r} is not a u64")


def stack_top(index: int) -> int:
    return STACKS_TOP - index * STACK_SIZE


def page_directory_count(ram_size: int) -> int:
    return (ram_size + GiB - 1) // GiB


def write_boot_memory(address: int, ram_size: int, image: bytes, params: Sequence[int]) -> None:
    """Write page tables, parameter block and image into RAM at host `address`.

    RAM must be fresh (zero) and must not be on a userfaultfd: it is written directly.
    """
    check_image(image, params)
    low = (ctypes.c_uint64 * (IMAGE_LOAD_ADDRESS // 8)).from_address(address)
    words = np.frombuffer(memoryview(low).cast("B"), dtype=np.uint64)
    directories = page_directory_count(ram_size)
    words[PML4_ADDRESS // 8] = PDPT_ADDRESS | _TABLE_FLAGS
    pd_addresses = PD_ADDRESS + PAGE_SIZE * np.arange(directories, dtype=np.uint64)
    words[PDPT_ADDRESS // 8 : PDPT_ADDRESS // 8 + directories] = pd_addresses | _TABLE_FLAGS
    large_pages = ram_size // LARGE_PAGE_SIZE
    frames = np.arange(large_pages, dtype=np.uint64) * np.uint64(LARGE_PAGE_SIZE)
    # The PDs are consecutive, so entry k of the whole run maps 2 MiB page k.
    words[PD_ADDRESS // 8 : PD_ADDRESS // 8 + large_pages] = frames | _LARGE_PAGE_FLAGS
    if params:
        words[PARAMS_ADDRESS // 8 : PARAMS_ADDRESS // 8 + len(params)] = np.array(
            params, dtype=np.uint64
        )
    ctypes.memmove(address + IMAGE_LOAD_ADDRESS, image, len(image))


def boot_sregs(reset: KvmSregs, cpl: int = 3) -> KvmSregs:
    """The special registers every vCPU starts with (from its reset state), at `cpl`."""
    if cpl not in GUEST_CPLS:
        raise ValueError(f"guest CPL {cpl!r} must be one of {GUEST_CPLS}")
    sregs = KvmSregs.from_buffer_copy(reset)
    # the same GDT entries either way; the selectors' RPL and the descriptors' DPL say CPL
    rpl_mask = ~3
    data = dict(
        base=0,
        limit=0xFFFFFFFF,
        selector=(DATA_SELECTOR & rpl_mask) | cpl,
        type=0x3,
        present=1,
        dpl=cpl,
        db=1,
        s=1,
        l=0,
        g=1,
        avl=0,
        unusable=0,
    )
    for name in ("ds", "es", "fs", "gs", "ss"):
        getattr(sregs, name).update(data)
    sregs.cs.update(dict(data, selector=(CODE_SELECTOR & rpl_mask) | cpl, type=0xB, db=0, l=1))
    sregs.cr0 = BOOT_CR0
    sregs.cr3 = PML4_ADDRESS
    sregs.cr4 = BOOT_CR4
    sregs.efer = BOOT_EFER
    return sregs


def boot_regs(index: int, count: int, ram_size: int) -> KvmRegs:
    """The general registers vCPU `index` of `count` starts with."""
    return KvmRegs(
        rip=IMAGE_LOAD_ADDRESS,
        rflags=BOOT_RFLAGS,
        rsp=stack_top(index),
        rdi=ram_size,
        rsi=index,
        rdx=count,
        rcx=PARAMS_ADDRESS,
    )


def vcpu_cpuid(supported: Sequence[KvmCpuidEntry2], index: int) -> list[KvmCpuidEntry2]:
    """KVM's supported CPUID with this vCPU's APIC ids filled in (leaves 1, 0xB, 0x1F)."""
    entries = [KvmCpuidEntry2.from_buffer_copy(entry) for entry in supported]
    for entry in entries:
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | ((index & 0xFF) << 24)
        elif entry.function in (0xB, 0x1F):
            entry.edx = index
    return entries
