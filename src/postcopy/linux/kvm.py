"""Thin bindings to the KVM API: the /dev/kvm system fd, VM fds and vCPU fds.

Shaped after rust-vmm's kvm-ioctls: one object per kernel file descriptor (`Kvm`, `KvmVm`,
`KvmVcpu`), one method per ioctl named after it, capabilities as an enum, exits decoded
into typed values, errors as `KvmError` naming the ioctl. No policy lives here: how a
guest is laid out and run is the micro-VM's business (`postcopy.vm`).

Every pointer-taking ioctl goes through ctypes, which releases the GIL for the call: a
vCPU thread sits in KVM_RUN for a long time, and a guest that touches a userfaultfd-missing
page blocks inside KVM_RUN until another Python thread places the page.

Numbers and layouts are those of <linux/kvm.h> for x86-64; tests/test_linux_kvm.py checks
each structure's size against the size encoded in its ioctl number.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeAlias

import numpy as np
import numpy.typing as npt

from postcopy.linux._libc import libc

__all__ = [
    "KVM_API_VERSION",
    "MEM_LOG_DIRTY_PAGES",
    "MEM_READONLY",
    "Capability",
    "Exit",
    "ExitReason",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "IntrExit",
    "IoDirection",
    "IoExit",
    "Kvm",
    "KvmCpuidEntry2",
    "KvmDirtyGfn",
    "KvmDtable",
    "KvmError",
    "KvmFpu",
    "KvmMpState",
    "KvmRegs",
    "KvmRun",
    "KvmSegment",
    "KvmSregs",
    "KvmVcpu",
    "KvmVcpuEvents",
    "KvmVm",
    "KvmXcrs",
    "KvmXsave",
    "MmioExit",
    "ShutdownExit",
    "SystemEventExit",
    "UnknownExit",
    "dirty_bitmap_words",
]

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


class _Ioctl(enum.IntEnum):
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


class KvmError(OSError):
    """A KVM ioctl (or opening /dev/kvm) failed; `.ioctl` names the call."""

    def __init__(self, error: int, ioctl: str, detail: str = "") -> None:
        message = f"{ioctl}: {os.strerror(error)}"
        if detail:
            message += f" ({detail})"
        super().__init__(error, message)
        self.ioctl = ioctl


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


_INTR_EXIT = IntrExit()
_DIRECTIONS = (IoDirection.IN, IoDirection.OUT)
_U32 = struct.Struct("<I")
_RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_EXIT_REASON_OFFSET = 8
_EXIT_OFFSET = 32

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


# --- ioctl plumbing ---------------------------------------------------------------------

# Private function objects (libc[...] is not cached) so that our argtypes cannot clash
# with another module's use of the shared CDLL.
_ioctl = libc["ioctl"]
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_mmap = libc["mmap"]
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_mmap.restype = ctypes.c_void_p
_munmap = libc["munmap"]
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def _call(fd: int, request: _Ioctl, arg: int | None = None, detail: str = "") -> int:
    """ioctl(fd, request, arg) with arg a pointer or plain integer; raises KvmError."""
    result = _ioctl(fd, request, arg)
    if result < 0:
        raise KvmError(ctypes.get_errno(), request.name, detail)
    return int(result)


def _call_struct(
    fd: int, request: _Ioctl, struct: ctypes.Structure | ctypes.Array[Any], detail: str = ""
) -> int:
    return _call(fd, request, ctypes.addressof(struct), detail)


def _checked_fd(fd: int, what: str) -> int:
    if fd < 0:
        raise KvmError(errno.EBADF, what, "file descriptor is closed")
    return fd


def dirty_bitmap_words(memory_size: int) -> int:
    """The number of u64 words a dirty bitmap of a slot of `memory_size` bytes needs."""
    pages = (memory_size + DIRTY_LOG_PAGE_SIZE - 1) // DIRTY_LOG_PAGE_SIZE
    return (pages + 63) // 64


def _msrs_struct(count: int) -> type[ctypes.Structure]:
    class KvmMsrs(ctypes.Structure):
        _fields_ = [
            ("nmsrs", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
            ("entries", KvmMsrEntry * count),
        ]

    return KvmMsrs


def _cpuid2_struct(count: int) -> type[ctypes.Structure]:
    class KvmCpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", KvmCpuidEntry2 * count),
        ]

    return KvmCpuid2


def _msr_list_struct(count: int) -> type[ctypes.Structure]:
    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * count)]

    return KvmMsrList


class _Fd:
    """Owns one file descriptor; close() is idempotent."""

    _what = "fd"

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        return _checked_fd(self._fd, self._what)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only: objects are meant to be closed explicitly.
        with contextlib.suppress(Exception):
            self.close()

    def _check_extension(self, cap: Capability | int) -> int:
        return _call(self.fd, _Ioctl.KVM_CHECK_EXTENSION, int(cap), f"capability {int(cap)}")

    def _enable_cap(self, cap: Capability | int, args: Sequence[int], flags: int) -> None:
        if len(args) > 4:
            raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
        request = KvmEnableCap(cap=int(cap), flags=flags)
        for position, value in enumerate(args):
            request.args[position] = value
        _call_struct(self.fd, _Ioctl.KVM_ENABLE_CAP, request, f"capability {int(cap)}")


# --- system -----------------------------------------------------------------------------


class Kvm(_Fd):
    """The /dev/kvm system file descriptor."""

    _what = "/dev/kvm"

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(
                errno.ENOENT,
                f"open {path}",
                "KVM is not available: load the kvm module or enable "
                "virtualisation for this machine",
            ) from None
        except PermissionError as error:
            raise KvmError(
                error.errno or errno.EACCES,
                f"open {path}",
                "no permission: run as root or add the user to the group that "
                f"owns {path} (usually 'kvm': usermod -aG kvm $USER)",
            ) from None
        super().__init__(fd)
        version = self.api_version()
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError(
                errno.EINVAL,
                "KVM_GET_API_VERSION",
                f"API version {version}, expected {KVM_API_VERSION}",
            )

    def api_version(self) -> int:
        return _call(self.fd, _Ioctl.KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: Capability | int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else 1 or a capability-specific value."""
        return self._check_extension(cap)

    def vcpu_mmap_size(self) -> int:
        return _call(self.fd, _Ioctl.KVM_GET_VCPU_MMAP_SIZE, 0)

    def supported_cpuid(self, max_entries: int = 256) -> list[KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID; E2BIG when `max_entries` is too small."""
        return self._cpuid(_Ioctl.KVM_GET_SUPPORTED_CPUID, max_entries)

    def emulated_cpuid(self, max_entries: int = 256) -> list[KvmCpuidEntry2]:
        return self._cpuid(_Ioctl.KVM_GET_EMULATED_CPUID, max_entries)

    def _cpuid(self, request: _Ioctl, max_entries: int) -> list[KvmCpuidEntry2]:
        table = _cpuid2_struct(max_entries)()
        table.nent = max_entries
        _call_struct(self.fd, request, table, f"room for {max_entries} entries")
        return [KvmCpuidEntry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        return self._msr_list(_Ioctl.KVM_GET_MSR_INDEX_LIST)

    def get_msr_feature_index_list(self) -> list[int]:
        return self._msr_list(_Ioctl.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def _msr_list(self, request: _Ioctl) -> list[int]:
        probe = _msr_list_struct(0)()
        result = _ioctl(self.fd, request, ctypes.addressof(probe))
        if result < 0 and ctypes.get_errno() != errno.E2BIG:
            raise KvmError(ctypes.get_errno(), request.name)
        listing = _msr_list_struct(probe.nmsrs)()
        listing.nmsrs = probe.nmsrs
        _call_struct(self.fd, request, listing)
        return list(listing.indices[: listing.nmsrs])

    def create_vm(self, machine_type: int = 0) -> KvmVm:
        fd = _call(self.fd, _Ioctl.KVM_CREATE_VM, machine_type)
        try:
            return KvmVm(fd, self.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise


# --- VM ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySlot:
    slot: int
    guest_phys: int
    size: int
    userspace_addr: int
    flags: int


class KvmVm(_Fd):
    """A VM file descriptor (from `Kvm.create_vm`)."""

    _what = "KVM VM"

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self._vcpu_mmap_size = vcpu_mmap_size
        self._slots: dict[int, MemorySlot] = {}

    @property
    def memory_slots(self) -> dict[int, MemorySlot]:
        return dict(self._slots)

    def check_extension(self, cap: Capability | int) -> int:
        return self._check_extension(cap)

    def enable_cap(self, cap: Capability | int, *args: int, flags: int = 0) -> None:
        self._enable_cap(cap, args, flags)

    def set_user_memory_region(
        self, slot: int, guest_phys: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot."""
        region = KvmUserspaceMemoryRegion(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys,
            memory_size=size,
            userspace_addr=userspace_addr,
        )
        _call_struct(
            self.fd,
            _Ioctl.KVM_SET_USER_MEMORY_REGION,
            region,
            f"slot {slot}, guest {guest_phys:#x}+{size:#x}, host {userspace_addr:#x}",
        )
        if size:
            self._slots[slot] = MemorySlot(slot, guest_phys, size, userspace_addr, flags)
        else:
            self._slots.pop(slot, None)

    def set_tss_addr(self, address: int) -> None:
        _call(self.fd, _Ioctl.KVM_SET_TSS_ADDR, address, f"address {address:#x}")

    def set_identity_map_addr(self, address: int) -> None:
        value = ctypes.c_uint64(address)
        _call_struct(self.fd, _Ioctl.KVM_SET_IDENTITY_MAP_ADDR, value)  # type: ignore[arg-type]

    def create_irqchip(self) -> None:
        _call(self.fd, _Ioctl.KVM_CREATE_IRQCHIP, 0)

    def create_vcpu(self, index: int) -> KvmVcpu:
        fd = _call(self.fd, _Ioctl.KVM_CREATE_VCPU, index, f"vCPU {index}")
        try:
            return KvmVcpu(fd, index, self._vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise

    def _slot_words(self, slot: int) -> int:
        try:
            return dirty_bitmap_words(self._slots[slot].size)
        except KeyError:
            raise KvmError(
                errno.ENOENT, "KVM dirty log", f"slot {slot} was not set through this KvmVm"
            ) from None

    def get_dirty_log(self, slot: int, bitmap: npt.NDArray[np.uint64]) -> None:
        """KVM_GET_DIRTY_LOG into `bitmap` (u64 words, bit i = page i of the slot).

        Without manual protection this also clears the log and write-protects the pages;
        with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled, `clear_dirty_log` does that.
        """
        words = self._slot_words(slot)
        _check_bitmap(bitmap, words, "KVM_GET_DIRTY_LOG")
        log = KvmDirtyLog(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        _call_struct(self.fd, _Ioctl.KVM_GET_DIRTY_LOG, log, f"slot {slot}")

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: npt.NDArray[np.uint64]
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear (and re-protect) the pages whose bits are set.

        Bit 0 of `bitmap` is `first_page`; `first_page` must be a multiple of 64 and
        `num_pages` too unless the range ends at the end of the slot.
        """
        self._slot_words(slot)
        _check_bitmap(bitmap, (num_pages + 63) // 64, "KVM_CLEAR_DIRTY_LOG")
        log = KvmClearDirtyLog(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap.ctypes.data
        )
        _call_struct(
            self.fd, _Ioctl.KVM_CLEAR_DIRTY_LOG, log, f"slot {slot}, pages {first_page}+{num_pages}"
        )

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect harvested ring entries; returns their count."""
        return _call(self.fd, _Ioctl.KVM_RESET_DIRTY_RINGS, 0)


def _check_bitmap(bitmap: npt.NDArray[np.uint64], words: int, ioctl: str) -> None:
    # The kernel writes `words` words through the pointer: a short or strided array
    # would be memory corruption, not an error.
    if bitmap.dtype != np.uint64 or not bitmap.flags.c_contiguous or bitmap.size < words:
        raise ValueError(
            f"{ioctl} needs a contiguous uint64 array of at least {words} words, "
            f"not {bitmap.dtype} x {bitmap.size}"
        )
    if not bitmap.flags.writeable:
        raise ValueError(f"{ioctl} needs a writable bitmap")


# --- vCPU -------------------------------------------------------------------------------


class KvmVcpu(_Fd):
    """A vCPU file descriptor with its shared kvm_run mapping (from `KvmVm.create_vcpu`)."""

    _what = "KVM vCPU"

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.index = index
        self._run_size = mmap_size
        self._run_address = self._map(mmap_size, 0)
        self._run = KvmRun.from_address(self._run_address)
        # The hot path (one decode per exit) reads the page with struct, not ctypes fields.
        self._run_view: memoryview | None = memoryview(
            (ctypes.c_ubyte * mmap_size).from_address(self._run_address)
        ).cast("B")
        self._ring_address = 0
        self._ring_size = 0
        self._close_lock = threading.Lock()

    def _map(self, length: int, page_offset: int) -> int:
        address = _mmap(
            None,
            length,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_SHARED,
            self.fd,
            page_offset * mmap.PAGESIZE,
        )
        if address is None or address == _MAP_FAILED:
            raise KvmError(ctypes.get_errno(), "mmap vCPU fd", f"offset page {page_offset}")
        return int(address)

    @property
    def run_struct(self) -> KvmRun:
        """The kvm_run structure shared with the kernel (valid until close)."""
        if self._run_address == 0:
            raise KvmError(errno.EBADF, self._what, "vCPU is closed")
        return self._run

    @property
    def run_address(self) -> int:
        return self._run_address

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def run(self) -> Exit:
        """KVM_RUN (GIL released) and the decoded exit. EINTR gives an `IntrExit`."""
        # self._fd, not self.fd: once closed it is -1 and the ioctl fails with EBADF.
        if _ioctl(self._fd, _Ioctl.KVM_RUN, 0) < 0:
            error = ctypes.get_errno()
            if error == errno.EINTR:
                return _INTR_EXIT
            raise KvmError(error, "KVM_RUN", f"vCPU {self.index}")
        return self._decode_exit()

    def _decode_exit(self) -> Exit:
        view = self._run_view
        if view is None:
            raise KvmError(errno.EBADF, self._what, "vCPU is closed")
        reason = _U32.unpack_from(view, _EXIT_REASON_OFFSET)[0]
        if reason == ExitReason.IO:
            direction, size, port, count, offset = _RUN_IO.unpack_from(view, _EXIT_OFFSET)
            data = bytes(view[offset : offset + size * count]) if direction else b""
            return IoExit(_DIRECTIONS[direction], size, port, count, offset, data)
        run = self._run
        if reason == ExitReason.MMIO:
            mmio = run.exit.mmio
            return MmioExit(mmio.phys_addr, bytes(mmio.data)[: mmio.len], bool(mmio.is_write))
        if reason == ExitReason.HLT:
            return HltExit()
        if reason == ExitReason.SHUTDOWN:
            return ShutdownExit()
        if reason == ExitReason.INTR:
            return IntrExit()
        if reason == ExitReason.INTERNAL_ERROR:
            internal = run.exit.internal
            return InternalErrorExit(
                internal.suberror, tuple(internal.data[: min(internal.ndata, 16)])
            )
        if reason == ExitReason.FAIL_ENTRY:
            fail = run.exit.fail_entry
            return FailEntryExit(fail.hardware_entry_failure_reason, fail.cpu)
        if reason == ExitReason.SYSTEM_EVENT:
            event = run.exit.system_event
            return SystemEventExit(event.type, tuple(event.data[: min(event.ndata, 16)]))
        return UnknownExit(reason, run.exit.hw.hardware_exit_reason)

    def write_io_data(self, exit: IoExit, data: bytes) -> None:
        """Answer an IN exit: the bytes the guest reads, written before the next KVM_RUN."""
        if exit.direction is not IoDirection.IN:
            raise ValueError(f"port {exit.port:#x}: only an IN exit takes data")
        if len(data) != exit.size * exit.count:
            raise ValueError(
                f"port {exit.port:#x}: IN of {exit.count} x {exit.size} bytes "
                f"needs {exit.size * exit.count} bytes, not {len(data)}"
            )
        ctypes.memmove(self.run_address + exit.data_offset, data, len(data))

    def check_extension(self, cap: Capability | int) -> int:
        return self._check_extension(cap)

    def enable_cap(self, cap: Capability | int, *args: int, flags: int = 0) -> None:
        self._enable_cap(cap, args, flags)

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        _call_struct(self.fd, _Ioctl.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _call_struct(self.fd, _Ioctl.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> KvmFpu:
        fpu = KvmFpu()
        _call_struct(self.fd, _Ioctl.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: KvmFpu) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_FPU, fpu)

    def get_xsave(self) -> KvmXsave:
        xsave = KvmXsave()
        _call_struct(self.fd, _Ioctl.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: KvmXsave) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> KvmXcrs:
        xcrs = KvmXcrs()
        _call_struct(self.fd, _Ioctl.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: KvmXcrs) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        events = KvmVcpuEvents()
        _call_struct(self.fd, _Ioctl.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        state = KvmMpState()
        _call_struct(self.fd, _Ioctl.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        _call_struct(self.fd, _Ioctl.KVM_SET_MP_STATE, KvmMpState(mp_state=mp_state))

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; raises KvmError naming the first MSR KVM would not read."""
        wanted = list(indices)
        table = _msrs_struct(len(wanted))()
        table.nmsrs = len(wanted)
        for position, index in enumerate(wanted):
            table.entries[position].index = index
        done = _call_struct(self.fd, _Ioctl.KVM_GET_MSRS, table)
        if done < len(wanted):
            raise KvmError(errno.EINVAL, "KVM_GET_MSRS", f"MSR {wanted[done]:#x} not readable")
        return {entry.index: int(entry.data) for entry in table.entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS; raises KvmError naming the first MSR KVM refused."""
        items = list(values.items())
        table = _msrs_struct(len(items))()
        table.nmsrs = len(items)
        for position, (index, value) in enumerate(items):
            table.entries[position].index = index
            table.entries[position].data = value
        done = _call_struct(self.fd, _Ioctl.KVM_SET_MSRS, table)
        if done < len(items):
            index, value = items[done]
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", f"MSR {index:#x} refused value {value:#x}")

    def set_cpuid2(self, entries: Sequence[KvmCpuidEntry2]) -> None:
        table = _cpuid2_struct(len(entries))()
        table.nent = len(entries)
        for position, entry in enumerate(entries):
            table.entries[position] = entry
        _call_struct(self.fd, _Ioctl.KVM_SET_CPUID2, table)

    def get_cpuid2(self, max_entries: int = 256) -> list[KvmCpuidEntry2]:
        table = _cpuid2_struct(max_entries)()
        table.nent = max_entries
        _call_struct(self.fd, _Ioctl.KVM_GET_CPUID2, table)
        return [KvmCpuidEntry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def set_signal_mask(self, signals: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN.

        None removes the mask (the thread's own mask applies in KVM_RUN too).
        """
        if signals is None:
            _call(self.fd, _Ioctl.KVM_SET_SIGNAL_MASK, None)
            return
        mask = 0
        for signal_number in signals:
            mask |= 1 << (int(signal_number) - 1)

        class KvmSignalMask(ctypes.Structure):
            # The kernel's sigset_t is 64 bits on x86-64 (not glibc's 1024), right after len.
            _pack_ = 4
            _fields_ = [("len", ctypes.c_uint32), ("sigset", ctypes.c_uint64)]

        _call_struct(self.fd, _Ioctl.KVM_SET_SIGNAL_MASK, KvmSignalMask(len=8, sigset=mask))

    def get_tsc_khz(self) -> int:
        return _call(self.fd, _Ioctl.KVM_GET_TSC_KHZ, 0)

    def mmap_dirty_ring(self, size_bytes: int) -> ctypes.Array[KvmDirtyGfn]:
        """Map this vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING enabled with `size_bytes`)."""
        if self._ring_address:
            raise KvmError(errno.EEXIST, "mmap dirty ring", "already mapped")
        self._ring_address = self._map(size_bytes, DIRTY_LOG_PAGE_OFFSET)
        self._ring_size = size_bytes
        entries = size_bytes // ctypes.sizeof(KvmDirtyGfn)
        return (KvmDirtyGfn * entries).from_address(self._ring_address)

    def close(self) -> None:
        """Unmap kvm_run (and the dirty ring) and close the fd; idempotent.

        Must not race a KVM_RUN on this vCPU: the caller stops its thread first.
        """
        with self._close_lock:
            if self._ring_address:
                _munmap(self._ring_address, self._ring_size)
                self._ring_address = 0
            if self._run_address:
                if self._run_view is not None:
                    self._run_view.release()
                    self._run_view = None
                _munmap(self._run_address, self._run_size)
                self._run_address = 0
            super().close()
