"""The numbers and layouts of <linux/kvm.h> (x86-64) that `kvm` uses, and the exit values.

ioctl request numbers (`Ioctl`), capability and exit-reason numbers, memory-slot and
dirty-log flags, the ctypes structures the ioctls take (each converts to and from plain
JSON-able data, for migrating vCPU state), and the typed exits `KvmVcpu.run` decodes.
No system calls here. tests/test_linux_kvm.py checks each structure's size against the
size encoded in its ioctl number.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self, TypeAlias

KVM_API_VERSION = 12
KVM_DEVICE = "/dev/kvm"

# Memory slot flags (kvm_userspace_memory_region.flags).
MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bits.
MANUAL_PROTECT_ENABLE = 1 << 0
DIRTY_LOG_INITIALLY_SET = 1 << 1

# Dirty ring entry flags and the page offset of the ring in the vCPU mapping.
DIRTY_GFN_F_DIRTY = 1 << 0
DIRTY_GFN_F_RESET = 1 << 1
DIRTY_LOG_PAGE_OFFSET = 64

# The page size dirty logging counts in, whatever the backing of the slot.
DIRTY_LOG_PAGE_SIZE = 4096


class Ioctl(enum.IntEnum):
    """ioctl request numbers (from <linux/kvm.h>, x86-64)."""

    # system fd
    KVM_GET_API_VERSION = 0xAE00
    KVM_CREATE_VM = 0xAE01
    KVM_GET_MSR_INDEX_LIST = 0xC004AE02
    KVM_CHECK_EXTENSION = 0xAE03
    KVM_GET_VCPU_MMAP_SIZE = 0xAE04
    KVM_GET_SUPPORTED_CPUID = 0xC008AE05
    KVM_GET_EMULATED_CPUID = 0xC008AE09
    KVM_GET_MSR_FEATURE_INDEX_LIST = 0xC004AE0A
    # VM fd
    KVM_CREATE_VCPU = 0xAE41
    KVM_GET_DIRTY_LOG = 0x4010AE42
    KVM_SET_USER_MEMORY_REGION = 0x4020AE46
    KVM_SET_TSS_ADDR = 0xAE47
    KVM_SET_IDENTITY_MAP_ADDR = 0x4008AE48
    KVM_CREATE_IRQCHIP = 0xAE60
    KVM_ENABLE_CAP = 0x4068AEA3
    KVM_CLEAR_DIRTY_LOG = 0xC018AEC0
    KVM_RESET_DIRTY_RINGS = 0xAEC7
    # vCPU fd
    KVM_RUN = 0xAE80
    KVM_GET_REGS = 0x8090AE81
    KVM_SET_REGS = 0x4090AE82
    KVM_GET_SREGS = 0x8138AE83
    KVM_SET_SREGS = 0x4138AE84
    KVM_GET_MSRS = 0xC008AE88
    KVM_SET_MSRS = 0x4008AE89
    KVM_SET_SIGNAL_MASK = 0x4004AE8B
    KVM_GET_FPU = 0x81A0AE8C
    KVM_SET_FPU = 0x41A0AE8D
    KVM_SET_CPUID2 = 0x4008AE90
    KVM_GET_CPUID2 = 0xC008AE91
    KVM_GET_MP_STATE = 0x8004AE98
    KVM_SET_MP_STATE = 0x4004AE99
    KVM_GET_VCPU_EVENTS = 0x8040AE9F
    KVM_SET_VCPU_EVENTS = 0x4040AEA0
    KVM_GET_XSAVE = 0x9000AEA4
    KVM_SET_XSAVE = 0x5000AEA5
    KVM_GET_XCRS = 0x8188AEA6
    KVM_SET_XCRS = 0x4188AEA7
    KVM_GET_TSC_KHZ = 0xAEA3
    KVM_SET_TSC_KHZ = 0xAEA2


class Capability(enum.IntEnum):
    """KVM_CAP_* numbers the project asks about (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    SYNC_MMU = 16
    PIT2 = 33
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SYNC_REGS = 74
    READONLY_MEM = 81
    ENABLE_CAP_VM = 98
    CHECK_EXTENSION_VM = 105
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    DIRTY_LOG_RING = 192
    XSAVE2 = 208
    DIRTY_LOG_RING_ACQ_REL = 223
    USER_MEMORY2 = 231


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason values (KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37
    MEMORY_FAULT = 39


class IoDirection(enum.IntEnum):
    IN = 0
    OUT = 1


# --- structures -------------------------------------------------------------------------


class _Struct(ctypes.Structure):
    """A ctypes structure that converts to and from plain (JSON-able) data."""

    def to_dict(self) -> dict[str, Any]:
        return {
            name: _plain(getattr(self, name))
            for name, *_ in self._fields_
            if not name.startswith("pad")
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        value = cls()
        value.update(data)
        return value

    def update(self, data: Mapping[str, Any]) -> None:
        fields = {name: kind for name, kind, *_ in self._fields_}
        for name, item in data.items():
            if name not in fields:
                raise ValueError(f"{type(self).__name__} has no field {name!r}")
            current = getattr(self, name)
            if isinstance(current, _Struct):
                current.update(item)
            elif isinstance(current, ctypes.Array):
                if len(item) != len(current):
                    raise ValueError(
                        f"{type(self).__name__}.{name}: {len(item)} items, expected {len(current)}"
                    )
                for position, element in enumerate(item):
                    if isinstance(current[position], _Struct):
                        current[position].update(element)
                    else:
                        current[position] = element
            else:
                setattr(self, name, item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


def _plain(value: Any) -> Any:
    if isinstance(value, _Struct):
        return value.to_dict()
    if isinstance(value, ctypes.Array):
        return [_plain(item) for item in value]
    return value


class KvmRegs(_Struct):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class KvmSegment(_Struct):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(_Struct):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


class KvmSregs(_Struct):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class KvmFpu(_Struct):
    _fields_ = [
        ("fpr", (ctypes.c_uint8 * 16) * 8),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class KvmMsrEntry(_Struct):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    ]


class KvmCpuidEntry2(_Struct):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


class KvmUserspaceMemoryRegion(_Struct):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmDirtyLog(_Struct):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),
    ]


class KvmClearDirtyLog(_Struct):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    ]


class KvmEnableCap(_Struct):
    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class KvmXsave(_Struct):
    """The legacy 4 KiB XSAVE area (KVM_GET_XSAVE / KVM_SET_XSAVE)."""

    _fields_ = [("region", ctypes.c_uint32 * 1024)]


class KvmXcr(_Struct):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class KvmXcrs(_Struct):
    _fields_ = [
        ("nr_xcrs", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("xcrs", KvmXcr * 16),
        ("padding", ctypes.c_uint64 * 16),
    ]


class KvmMpState(_Struct):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class _EventException(_Struct):
    _fields_ = [
        ("injected", ctypes.c_uint8),
        ("nr", ctypes.c_uint8),
        ("has_error_code", ctypes.c_uint8),
        ("pending", ctypes.c_uint8),
        ("error_code", ctypes.c_uint32),
    ]


class _EventInterrupt(_Struct):
    _fields_ = [
        ("injected", ctypes.c_uint8),
        ("nr", ctypes.c_uint8),
        ("soft", ctypes.c_uint8),
        ("shadow", ctypes.c_uint8),
    ]


class _EventNmi(_Struct):
    _fields_ = [
        ("injected", ctypes.c_uint8),
        ("pending", ctypes.c_uint8),
        ("masked", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class _EventSmi(_Struct):
    _fields_ = [
        ("smm", ctypes.c_uint8),
        ("pending", ctypes.c_uint8),
        ("smm_inside_nmi", ctypes.c_uint8),
        ("latched_init", ctypes.c_uint8),
    ]


class KvmVcpuEvents(_Struct):
    _fields_ = [
        ("exception", _EventException),
        ("interrupt", _EventInterrupt),
        ("nmi", _EventNmi),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi", _EventSmi),
        ("triple_fault_pending", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 26),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    ]


class KvmDirtyGfn(_Struct):
    _fields_ = [("flags", ctypes.c_uint32), ("slot", ctypes.c_uint32), ("offset", ctypes.c_uint64)]


class _RunIo(ctypes.Structure):
    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class _RunMmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class _RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class _RunInternal(ctypes.Structure):
    _fields_ = [
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class _RunSystemEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class _RunHw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", ctypes.c_uint64)]


class _RunExit(ctypes.Union):
    _fields_ = [
        ("hw", _RunHw),
        ("fail_entry", _RunFailEntry),
        ("io", _RunIo),
        ("mmio", _RunMmio),
        ("internal", _RunInternal),
        ("system_event", _RunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """The head of the kvm_run page shared with the kernel (mmap of the vCPU fd)."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", _RunExit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
        ("s", ctypes.c_char * 2048),
    ]


# --- exits ------------------------------------------------------------------------------
# Read-only by convention, not frozen: a frozen dataclass costs twice as much to build,
# and one is built per exit.


@dataclass(slots=True)
class IoExit:
    """Port I/O. For OUT, `data` holds the bytes written (size * count); for IN it is
    empty and the answer goes in with `KvmVcpu.write_io_data` before the next KVM_RUN."""

    direction: IoDirection
    size: int
    port: int
    count: int
    data_offset: int
    data: bytes
    reason: ExitReason = ExitReason.IO


@dataclass(slots=True)
class MmioExit:
    phys_addr: int
    data: bytes
    is_write: bool
    reason: ExitReason = ExitReason.MMIO


@dataclass(slots=True)
class HltExit:
    reason: ExitReason = ExitReason.HLT


@dataclass(slots=True)
class ShutdownExit:
    """The guest triple-faulted (or otherwise asked for a shutdown the CPU way)."""

    reason: ExitReason = ExitReason.SHUTDOWN


@dataclass(slots=True)
class IntrExit:
    """KVM_RUN returned EINTR: a signal or immediate_exit took the vCPU out."""

    reason: ExitReason = ExitReason.INTR


@dataclass(slots=True)
class InternalErrorExit:
    suberror: int
    data: tuple[int, ...]
    reason: ExitReason = ExitReason.INTERNAL_ERROR


@dataclass(slots=True)
class FailEntryExit:
    hardware_entry_failure_reason: int
    cpu: int
    reason: ExitReason = ExitReason.FAIL_ENTRY


@dataclass(slots=True)
class SystemEventExit:
    type: int
    data: tuple[int, ...]
    reason: ExitReason = ExitReason.SYSTEM_EVENT


@dataclass(slots=True)
class UnknownExit:
    """An exit this module does not decode; `reason` is the raw exit_reason."""

    reason: int
    hardware_exit_reason: int = 0


Exit: TypeAlias = (
    IoExit
    | MmioExit
    | HltExit
    | ShutdownExit
    | IntrExit
    | InternalErrorExit
    | FailEntryExit
    | SystemEventExit
    | UnknownExit
)


# --- variable-length structures --------------------------------------------------------


def msrs_struct(count: int) -> type[ctypes.Structure]:
    class KvmMsrs(ctypes.Structure):
        _fields_ = [
            ("nmsrs", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
            ("entries", KvmMsrEntry * count),
        ]

    return KvmMsrs


def cpuid2_struct(count: int) -> type[ctypes.Structure]:
    class KvmCpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", KvmCpuidEntry2 * count),
        ]

    return KvmCpuid2


def msr_list_struct(count: int) -> type[ctypes.Structure]:
    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * count)]

    return KvmMsrList
