"""Thin bindings to the KVM API: the /dev/kvm system fd, VM fds and vCPU fds.

Shaped after rust-vmm's kvm-ioctls: one object per kernel file descriptor (`Kvm`, `KvmVm`,
`KvmVcpu`), one method per ioctl named after it, capabilities as an enum, exits decoded
into typed values, errors as `KvmError` naming the ioctl. No policy lives here: how a
guest is laid out and run is the micro-VM's business (`postcopy.vm`).

Every pointer-taking ioctl goes through ctypes, which releases the GIL for the call: a
vCPU thread sits in KVM_RUN for a long time, and a guest that touches a userfaultfd-missing
page blocks inside KVM_RUN until another Python thread places the page.

The numbers, structures and exit types of <linux/kvm.h> (x86-64) are in `kvm_abi`; this
module re-exports the public ones, so callers import everything from here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from postcopy.closing import Closing
from postcopy.linux._libc import libc
from postcopy.linux.kvm_abi import (
    DIRTY_LOG_PAGE_OFFSET,
    DIRTY_LOG_PAGE_SIZE,
    KVM_API_VERSION,
    KVM_DEVICE,
    Capability,
    Exit,
    ExitReason,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    Ioctl,
    IoDirection,
    IoExit,
    KvmClearDirtyLog,
    KvmCpuidEntry2,
    KvmDirtyGfn,
    KvmDirtyLog,
    KvmEnableCap,
    KvmFpu,
    KvmMpState,
    KvmRegs,
    KvmRun,
    KvmSregs,
    KvmUserspaceMemoryRegion,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    cpuid2_struct,
    msr_list_struct,
    msrs_struct,
)
from postcopy.linux.memory import map_shared_fd, unmap

__all__ = ["Kvm", "KvmError", "KvmVcpu", "KvmVm", "MemorySlot", "dirty_bitmap_words"]


class KvmError(OSError):
    """A KVM ioctl (or opening /dev/kvm) failed; `.ioctl` names the call."""

    def __init__(self, error: int, ioctl: str, detail: str = "") -> None:
        message = f"{ioctl}: {os.strerror(error)}"
        if detail:
            message += f" ({detail})"
        super().__init__(error, message)
        self.ioctl = ioctl


_INTR_EXIT = IntrExit()
_DIRECTIONS = (IoDirection.IN, IoDirection.OUT)
_U32 = struct.Struct("<I")
_RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_EXIT_REASON_OFFSET = 8
_EXIT_OFFSET = 32


# --- ioctl plumbing ---------------------------------------------------------------------

# A private function object (libc[...] is not cached) so that our argtypes cannot clash
# with another module's use of the shared CDLL.
_ioctl = libc["ioctl"]
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def _call(fd: int, request: Ioctl, arg: int | None = None, detail: str = "") -> int:
    """ioctl(fd, request, arg) with arg a pointer or plain integer; raises KvmError."""
    result = _ioctl(fd, request, arg)
    if result < 0:
        raise KvmError(ctypes.get_errno(), request.name, detail)
    return int(result)


def _call_struct(
    fd: int, request: Ioctl, struct: ctypes.Structure | ctypes.Array[Any], detail: str = ""
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


class _Fd(Closing):
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

    def __del__(self) -> None:
        # Best effort only: objects are meant to be closed explicitly.
        with contextlib.suppress(Exception):
            self.close()

    def _check_extension(self, cap: Capability | int) -> int:
        return _call(self.fd, Ioctl.KVM_CHECK_EXTENSION, int(cap), f"capability {int(cap)}")

    def _enable_cap(self, cap: Capability | int, args: Sequence[int], flags: int) -> None:
        if len(args) > 4:
            raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
        request = KvmEnableCap(cap=int(cap), flags=flags)
        for position, value in enumerate(args):
            request.args[position] = value
        _call_struct(self.fd, Ioctl.KVM_ENABLE_CAP, request, f"capability {int(cap)}")


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
        return _call(self.fd, Ioctl.KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: Capability | int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else 1 or a capability-specific value."""
        return self._check_extension(cap)

    def vcpu_mmap_size(self) -> int:
        return _call(self.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE, 0)

    def supported_cpuid(self, max_entries: int = 256) -> list[KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID; E2BIG when `max_entries` is too small."""
        return self._cpuid(Ioctl.KVM_GET_SUPPORTED_CPUID, max_entries)

    def _cpuid(self, request: Ioctl, max_entries: int) -> list[KvmCpuidEntry2]:
        table = cpuid2_struct(max_entries)()
        table.nent = max_entries
        _call_struct(self.fd, request, table, f"room for {max_entries} entries")
        return [KvmCpuidEntry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        return self._msr_list(Ioctl.KVM_GET_MSR_INDEX_LIST)

    def _msr_list(self, request: Ioctl) -> list[int]:
        probe = msr_list_struct(0)()
        result = _ioctl(self.fd, request, ctypes.addressof(probe))
        if result < 0 and ctypes.get_errno() != errno.E2BIG:
            raise KvmError(ctypes.get_errno(), request.name)
        listing = msr_list_struct(probe.nmsrs)()
        listing.nmsrs = probe.nmsrs
        _call_struct(self.fd, request, listing)
        return list(listing.indices[: listing.nmsrs])

    def create_vm(self, machine_type: int = 0) -> KvmVm:
        fd = _call(self.fd, Ioctl.KVM_CREATE_VM, machine_type)
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
            Ioctl.KVM_SET_USER_MEMORY_REGION,
            region,
            f"slot {slot}, guest {guest_phys:#x}+{size:#x}, host {userspace_addr:#x}",
        )
        if size:
            self._slots[slot] = MemorySlot(slot, guest_phys, size, userspace_addr, flags)
        else:
            self._slots.pop(slot, None)

    def set_tss_addr(self, address: int) -> None:
        _call(self.fd, Ioctl.KVM_SET_TSS_ADDR, address, f"address {address:#x}")

    def create_vcpu(self, index: int) -> KvmVcpu:
        fd = _call(self.fd, Ioctl.KVM_CREATE_VCPU, index, f"vCPU {index}")
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
        _call_struct(self.fd, Ioctl.KVM_GET_DIRTY_LOG, log, f"slot {slot}")

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
            self.fd, Ioctl.KVM_CLEAR_DIRTY_LOG, log, f"slot {slot}, pages {first_page}+{num_pages}"
        )

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect harvested ring entries; returns their count."""
        return _call(self.fd, Ioctl.KVM_RESET_DIRTY_RINGS, 0)


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
        what = f"vCPU {self.index} fd at page {page_offset}"
        return map_shared_fd(self.fd, length, page_offset * mmap.PAGESIZE, what)

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
        if _ioctl(self._fd, Ioctl.KVM_RUN, 0) < 0:
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
        _call_struct(self.fd, Ioctl.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _call_struct(self.fd, Ioctl.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> KvmFpu:
        fpu = KvmFpu()
        _call_struct(self.fd, Ioctl.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: KvmFpu) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_FPU, fpu)

    def get_xsave(self) -> KvmXsave:
        xsave = KvmXsave()
        _call_struct(self.fd, Ioctl.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: KvmXsave) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> KvmXcrs:
        xcrs = KvmXcrs()
        _call_struct(self.fd, Ioctl.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: KvmXcrs) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        events = KvmVcpuEvents()
        _call_struct(self.fd, Ioctl.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        state = KvmMpState()
        _call_struct(self.fd, Ioctl.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        _call_struct(self.fd, Ioctl.KVM_SET_MP_STATE, KvmMpState(mp_state=mp_state))

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; raises KvmError naming the first MSR KVM would not read."""
        wanted = list(indices)
        table = msrs_struct(len(wanted))()
        table.nmsrs = len(wanted)
        for position, index in enumerate(wanted):
            table.entries[position].index = index
        done = _call_struct(self.fd, Ioctl.KVM_GET_MSRS, table)
        if done < len(wanted):
            raise KvmError(errno.EINVAL, "KVM_GET_MSRS", f"MSR {wanted[done]:#x} not readable")
        return {entry.index: int(entry.data) for entry in table.entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS; raises KvmError naming the first MSR KVM refused."""
        items = list(values.items())
        table = msrs_struct(len(items))()
        table.nmsrs = len(items)
        for position, (index, value) in enumerate(items):
            table.entries[position].index = index
            table.entries[position].data = value
        done = _call_struct(self.fd, Ioctl.KVM_SET_MSRS, table)
        if done < len(items):
            index, value = items[done]
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", f"MSR {index:#x} refused value {value:#x}")

    def set_cpuid2(self, entries: Sequence[KvmCpuidEntry2]) -> None:
        table = cpuid2_struct(len(entries))()
        table.nent = len(entries)
        for position, entry in enumerate(entries):
            table.entries[position] = entry
        _call_struct(self.fd, Ioctl.KVM_SET_CPUID2, table)

    def set_signal_mask(self, signals: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN.

        None removes the mask (the thread's own mask applies in KVM_RUN too).
        """
        if signals is None:
            _call(self.fd, Ioctl.KVM_SET_SIGNAL_MASK, None)
            return
        mask = 0
        for signal_number in signals:
            mask |= 1 << (int(signal_number) - 1)

        class KvmSignalMask(ctypes.Structure):
            # The kernel's sigset_t is 64 bits on x86-64 (not glibc's 1024), right after len.
            _pack_ = 4
            _fields_ = [("len", ctypes.c_uint32), ("sigset", ctypes.c_uint64)]

        _call_struct(self.fd, Ioctl.KVM_SET_SIGNAL_MASK, KvmSignalMask(len=8, sigset=mask))

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
                unmap(self._ring_address, self._ring_size)
                self._ring_address = 0
            if self._run_address:
                if self._run_view is not None:
                    self._run_view.release()
                    self._run_view = None
                unmap(self._run_address, self._run_size)
                self._run_address = 0
            super().close()
