"""The micro-VM: guest RAM, vCPU threads in KVM_RUN, a console, dirty logging, state.

`MicroVM` implements `postcopy.migration.machine.Machine`, the whole of what migration needs
of a VM. Its guest ABI (where the image goes, what the registers hold, the ports) is in
`postcopy.vm.layout`. RAM is one RamBlock "pc.ram" at guest physical 0 in KVM memory slot 0,
made by its memory backend (postcopy.ram.backend: private anonymous memory by default, or a
memfd, a hugetlb memfd, a file). KVM logs dirty pages at 4 KiB; `sync_dirty_log` reports
them in the block's pages, so a partly dirty huge page is wholly dirty.

The status is a `RunState`, named as QEMU's RunState (what query-status reports): prelaunch
(created, not started), running, paused, inmigrate (incoming, waiting for state),
postmigrate (source after a completed migration, see `mark_postmigrate`), shutdown (every
vCPU said it was done) and internal-error (a vCPU triple-faulted or KVM failed; the others
are stopped).
`on_event(name, data)` receives QEMU's events: "STOP" and "RESUME" (data {}), and
"SHUTDOWN" ({"guest": True, "reason": "guest-shutdown"}). After an internal error "STOP"
is emitted too and `error` says what happened. Callbacks (`console`, `on_event`) run on
whichever thread caused them, vCPU threads included: they must be quick and must not call
`stop()` (a vCPU thread cannot wait for itself; stop() refuses).

Any thread may create, drive and close a MicroVM: vCPUs are kicked without a signal
handler (see postcopy.vm.vcpu).
"""

from __future__ import annotations

import base64
import ctypes
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from postcopy.closing import Closing
from postcopy.linux import kvm_abi
from postcopy.linux.kvm import Kvm, KvmVcpu, KvmVm, dirty_bitmap_words
from postcopy.linux.kvm_abi import Capability, IoExit
from postcopy.linux.memory import Mapping
from postcopy.ram import Bitmap, MemoryBackend, RamBlock, RamList, fold
from postcopy.vm import layout
from postcopy.vm.vcpu import VcpuState, VcpuThread

log = logging.getLogger(__name__)

RAM_BLOCK_NAME = "pc.ram"
RAM_SLOT = 0
STATE_FORMAT = "postcopy-microvm/1"
CONSOLE_TAIL_BYTES = 64 * 1024
THREAD_JOIN_SECONDS = 10.0

# The MSRs a CPL3 guest can change or observe and that KVM saves (filtered by what this
# host's KVM lists): TSC, SYSENTER_CS/ESP/EIP, PAT, STAR, LSTAR, CSTAR, SFMASK,
# KERNEL_GS_BASE, TSC_AUX. FS/GS base travel in the segment registers.
SAVED_MSRS = (
    0x10,
    0x174,
    0x175,
    0x176,
    0x277,
    0xC0000081,
    0xC0000082,
    0xC0000083,
    0xC0000084,
    0xC0000102,
    0xC0000103,
)


class RunState(enum.StrEnum):
    """The VM's status, by QEMU's RunState names (a StrEnum: query-status sends the name).

    Only the states this VM reaches: it has no finish-migrate (a source stopped for the
    switchover is paused until `mark_postmigrate`), no save-vm or restore-vm, no suspend.
    """

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


_STOPPED_FOR_GOOD = frozenset({RunState.SHUTDOWN, RunState.INTERNAL_ERROR})

ConsoleCallback = Callable[[bytes], None]
EventCallback = Callable[[str, dict[str, Any]], None]
Events = list[tuple[str, dict[str, object]]]


class PortDevice(Protocol):
    """A device on I/O ports (postcopy.vm.requestdev.RequestDevice is one). It does I/O
    outside the VM only between resume() (cont) and pause() (stop), and its state moves
    with the vCPUs' in save_state/load_state."""

    name: str
    ports: tuple[int, ...]

    def io(self, vcpu: KvmVcpu, exit: IoExit) -> bytes: ...
    def start(self) -> None: ...
    def pause(self) -> None: ...
    def quiesce(self, timeout: float) -> bool: ...
    def resume(self) -> None: ...
    def save(self) -> dict[str, Any]: ...
    def load(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class MicroVM(Closing):
    """A KVM virtual machine running a flat CPL3 guest image; see the module docstring."""

    def __init__(
        self,
        *,
        ram_size: int,
        vcpus: int = 1,
        image: bytes | None = None,
        params: Sequence[int] = (),
        incoming: bool = False,
        cpl: int = 3,
        memory_backend: MemoryBackend | None = None,
        console: ConsoleCallback | None = None,
        on_event: EventCallback | None = None,
        devices: Sequence[PortDevice] = (),
    ) -> None:
        layout.check_config(ram_size, vcpus)
        self._devices = list(devices)
        self._ports = _port_map(self._devices)
        if cpl not in layout.GUEST_CPLS:
            raise ValueError(f"guest CPL {cpl!r} must be one of {layout.GUEST_CPLS}")
        self._cpl = cpl
        if not incoming:
            if image is None:
                raise ValueError("a VM that is not incoming needs a guest image")
            layout.check_image(image, params)
        self._ram_size = ram_size
        self._backend = memory_backend or MemoryBackend()
        self._vcpu_count = vcpus
        self._incoming = incoming
        self._console_callback = console
        self._event_callback = on_event
        self._condition = threading.Condition()
        self._console_lock = threading.RLock()  # the console callback may read console_tail
        self._dirty_lock = threading.Lock()
        self._console_bytes = 0
        self._console_tail = bytearray()
        self._status = RunState.INMIGRATE if incoming else RunState.PRELAUNCH
        self._error = ""
        self._closed = False
        self._has_run = False
        self._kvm: Kvm | None = None
        self._vm: KvmVm | None = None
        self._mapping: Mapping | None = None
        self._ram = RamList()
        self._vcpus: list[KvmVcpu] = []
        self._threads: list[VcpuThread] = []
        self._dirty_logging = False
        self._dirty_words = np.zeros(0, dtype=np.uint64)
        try:
            self._build(image, params)
        except BaseException:
            self.close()
            raise

    def _build(self, image: bytes | None, params: Sequence[int]) -> None:
        self._kvm = Kvm()
        max_vcpus = self._kvm.check_extension(Capability.MAX_VCPUS) or self._kvm.check_extension(
            Capability.NR_VCPUS
        )
        layout.check_config(self._ram_size, self._vcpu_count, max_vcpus)
        self._vm = self._kvm.create_vm()
        manual = self._vm.check_extension(Capability.MANUAL_DIRTY_LOG_PROTECT2)
        self._manual_protect = bool(manual & kvm_abi.MANUAL_PROTECT_ENABLE)
        if self._manual_protect:
            # With INITIALLY_SET, enabling the log write-protects nothing up front; the
            # first clear (in start_dirty_log) protects what it clears.
            self._vm.enable_cap(
                Capability.MANUAL_DIRTY_LOG_PROTECT2,
                manual & (kvm_abi.MANUAL_PROTECT_ENABLE | kvm_abi.DIRTY_LOG_INITIALLY_SET),
            )
        self._vm.set_tss_addr(layout.TSS_ADDRESS)
        self._mapping = self._backend.allocate(self._ram_size, RAM_BLOCK_NAME)
        self._ram = RamList(
            [RamBlock(RAM_BLOCK_NAME, self._mapping, guest_physical=0, kvm_slot=RAM_SLOT)]
        )
        self._vm.set_user_memory_region(RAM_SLOT, 0, self._ram_size, self._mapping.address)
        if not self._incoming:
            assert image is not None
            layout.write_boot_memory(self._mapping.address, self._ram_size, image, params)
        self._xsave = bool(self._kvm.check_extension(Capability.XSAVE))
        self._xcrs = bool(self._kvm.check_extension(Capability.XCRS))
        listed = set(self._kvm.get_msr_index_list())
        self._saved_msrs = [index for index in SAVED_MSRS if index in listed]
        supported = self._kvm.supported_cpuid()
        for index in range(self._vcpu_count):
            vcpu = self._vm.create_vcpu(index)
            self._vcpus.append(vcpu)
            vcpu.set_cpuid2(layout.vcpu_cpuid(supported, index))
            if not self._incoming:
                vcpu.set_sregs(layout.boot_sregs(vcpu.get_sregs(), self._cpl))
                vcpu.set_regs(layout.boot_regs(index, self._vcpu_count, self._ram_size))
        for vcpu in self._vcpus:
            thread = VcpuThread(
                vcpu,
                self._condition,
                console=self._on_console,
                on_final_state=self._on_final_state,
                emit=self._emit,
                ports=self._ports,
            )
            self._threads.append(thread)
            thread.start()
        for device in self._devices:
            device.start()

    # -- Machine protocol --------------------------------------------------------------

    @property
    def ram(self) -> RamList:
        return self._ram

    @property
    def vcpu_count(self) -> int:
        return self._vcpu_count

    @property
    def ram_size(self) -> int:
        return self._ram_size

    @property
    def memory_backend(self) -> MemoryBackend:
        return self._backend

    @property
    def running(self) -> bool:
        return self._status == RunState.RUNNING

    @property
    def status(self) -> RunState:
        return self._status

    @property
    def error(self) -> str:
        """What put the VM in "internal-error" (empty otherwise)."""
        return self._error

    @property
    def incoming(self) -> bool:
        return self._incoming

    def stop(self, timeout: float | None = None) -> float:
        """Kick every vCPU out of KVM_RUN, wait until all are parked; seconds it took.

        Harmless when nothing runs. A stopped vCPU has finished its last instruction
        (pending I/O is completed), so save_state sees a consistent CPU.

        A vCPU waiting in KVM_RUN for a userfaultfd-missing page is kicked out of the wait
        when the page is guest data, but not when it is one of the guest's page-table pages
        (KVM's walk of the guest page tables sleeps uninterruptibly here): it parks only once
        that page is placed. With `timeout`, TimeoutError names such vCPUs; they stay asked
        to park, the VM stays "running", and stop() or cont() may be called again.
        """
        started = time.perf_counter()
        events: Events = []
        with self._condition:
            self._check_open()
            self._check_not_vcpu_thread("stop")
            for thread in self._threads:
                if thread.state in (VcpuState.PARKED, VcpuState.RUNNING):
                    thread.request_park()
            for device in self._devices:  # no more I/O outside; waits inside end now
                device.pause()
            if not self._condition.wait_for(
                lambda: not any(t.active for t in self._threads), timeout
            ):
                stuck = [t.index for t in self._threads if t.active]
                raise TimeoutError(
                    f"vCPUs {stuck} still in KVM_RUN after {timeout} s "
                    "(waiting for a missing page?)"
                )
            if self._status == RunState.RUNNING:
                self._status = RunState.PAUSED
                events.append(("STOP", {}))
        self._emit_all(events)
        return time.perf_counter() - started

    def quiesce_devices(self, timeout: float) -> None:
        """Before a stop for a migration's switchover: every device hands the guest no new
        work and waits until the guest has finished what it holds (all of them within
        `timeout` s), so that no half-done work crosses to a destination where the
        guest's memory is still missing. cont() ends it. Nothing while not running."""
        if self._status != RunState.RUNNING:
            return
        deadline = time.monotonic() + timeout
        for device in self._devices:
            device.quiesce(max(0.0, deadline - time.monotonic()))

    def cont(self) -> None:
        """Start or resume every vCPU that is not done."""
        with self._condition:
            self._check_open()
            if self._status == RunState.RUNNING:
                # Withdraw what a timed-out stop() asked of vCPUs that have not parked yet.
                for thread in self._threads:
                    thread.request_run()
                for device in self._devices:
                    device.resume()
                return
            if self._status in _STOPPED_FOR_GOOD:
                raise RuntimeError(
                    f"cannot resume a VM in status '{self._status}'"
                    + (f": {self._error}" if self._error else "")
                )
            if self._status == RunState.INMIGRATE:
                raise RuntimeError("an incoming VM runs only after load_state()")
            for thread in self._threads:
                thread.request_run()
            for device in self._devices:
                device.resume()
            self._status = RunState.RUNNING
            self._has_run = True
        self._emit("RESUME", {})

    def start_dirty_log(self) -> None:
        """Log guest writes to "pc.ram" from now on; everything counts as clean."""
        with self._dirty_lock:
            vm, mapping = self._require_vm()
            vm.set_user_memory_region(
                RAM_SLOT, 0, self._ram_size, mapping.address, kvm_abi.MEM_LOG_DIRTY_PAGES
            )
            self._dirty_words = np.zeros(dirty_bitmap_words(self._ram_size), dtype=np.uint64)
            self._dirty_logging = True
            self._collect_dirty()

    def sync_dirty_log(self, rearm: bool = True) -> dict[str, Bitmap]:
        """Pages of "pc.ram" the guest wrote since the last sync (or start); clears them
        and write-protects them again, unless `rearm` is False (see Machine)."""
        with self._dirty_lock:
            if not self._dirty_logging:
                raise RuntimeError("sync_dirty_log() before start_dirty_log()")
            self._collect_dirty(rearm)
            pages = self._ram_size // layout.PAGE_SIZE
            bits = np.unpackbits(self._dirty_words.view(np.uint8), bitorder="little", count=pages)
            block = self._ram.by_name(RAM_BLOCK_NAME)
            # KVM logs 4 KiB pages; the block's page (a huge page) is dirty if any part is
            return {RAM_BLOCK_NAME: fold(bits.view(np.bool_), block.page_size // layout.PAGE_SIZE)}

    def stop_dirty_log(self) -> None:
        with self._dirty_lock:
            if not self._dirty_logging:
                return
            vm, mapping = self._require_vm()
            vm.set_user_memory_region(RAM_SLOT, 0, self._ram_size, mapping.address)
            self._dirty_logging = False

    def _collect_dirty(self, rearm: bool = True) -> None:
        vm, _mapping = self._require_vm()
        vm.get_dirty_log(RAM_SLOT, self._dirty_words)
        if rearm and self._manual_protect and self._dirty_words.any():
            # Cleared (and write-protected again) before anyone reads these pages, so a
            # write that lands after the clear is logged for the next round.
            vm.clear_dirty_log(RAM_SLOT, 0, self._ram_size // layout.PAGE_SIZE, self._dirty_words)

    def save_state(self) -> dict[str, Any]:
        """vCPU and VM state of a stopped VM as JSON-able plain data."""
        with self._condition:
            self._check_open()
            if self._status == RunState.RUNNING or any(t.active for t in self._threads):
                raise RuntimeError("save_state() needs a stopped VM: call stop() first")
            cpus = [
                self._save_vcpu(vcpu, thread)
                for vcpu, thread in zip(self._vcpus, self._threads, strict=True)
            ]
        with self._console_lock:
            console = {"bytes": self._console_bytes}
        devices = {"devices": {d.name: d.save() for d in self._devices}} if self._devices else {}
        return {
            "format": STATE_FORMAT,
            "ram_size": self._ram_size,
            "vcpus": self._vcpu_count,
            "ram_blocks": [
                {
                    "name": block.name,
                    "size": block.length,
                    "page_size": block.page_size,
                    "backend": block.backend,
                }
                for block in self._ram
            ],
            "console": console,
            "cpus": cpus,
            **devices,
        }

    def _save_vcpu(self, vcpu: KvmVcpu, thread: VcpuThread) -> dict[str, Any]:
        state: dict[str, Any] = {
            "index": vcpu.index,
            "done": thread.state is VcpuState.DONE,
            "regs": vcpu.get_regs().to_dict(),
            "sregs": vcpu.get_sregs().to_dict(),
            "msrs": {
                f"{index:#x}": value for index, value in vcpu.get_msrs(self._saved_msrs).items()
            },
            "events": vcpu.get_vcpu_events().to_dict(),
            "mp_state": vcpu.get_mp_state(),
        }
        if self._xsave:
            state["xsave"] = base64.b64encode(bytes(vcpu.get_xsave())).decode("ascii")
        else:
            state["fpu"] = vcpu.get_fpu().to_dict()
        if self._xcrs:
            state["xcrs"] = vcpu.get_xcrs().to_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Load `save_state()` output of a VM with the same RAM size and vCPU count."""
        with self._condition:
            self._check_open()
            if not self._incoming:
                raise RuntimeError("load_state() needs a VM created with incoming=True")
            if self._has_run or self._status not in (RunState.INMIGRATE, RunState.PAUSED):
                raise RuntimeError(
                    f"load_state() on a VM in status '{self._status}' that has already run"
                )
            self._check_state_matches(state)
            for device in self._devices:
                device.load(state["devices"][device.name])
            for vcpu, saved in zip(self._vcpus, state["cpus"], strict=True):
                self._load_vcpu(vcpu, saved)
            for thread, saved in zip(self._threads, state["cpus"], strict=True):
                if saved["done"]:
                    thread.mark_done()
            self._status = (
                RunState.SHUTDOWN
                if all(t.state is VcpuState.DONE for t in self._threads)
                else RunState.PAUSED
            )
        with self._console_lock:
            self._console_bytes = int(state.get("console", {}).get("bytes", 0))

    def _check_state_matches(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"state format {state.get('format')!r}, this VM reads {STATE_FORMAT!r}"
            )
        for key, mine in (("ram_size", self._ram_size), ("vcpus", self._vcpu_count)):
            if state.get(key) != mine:
                raise ValueError(f"state has {key}={state.get(key)!r}, this VM has {key}={mine}")
        cpus = state.get("cpus")
        if not isinstance(cpus, list) or [c.get("index") for c in cpus] != list(
            range(self._vcpu_count)
        ):
            found = None if not isinstance(cpus, list) else [c.get("index") for c in cpus]
            raise ValueError(
                f"state has vCPUs {found}, this VM has {list(range(self._vcpu_count))}"
            )
        if self._xsave and any("xsave" not in cpu for cpu in cpus):
            raise ValueError("state has no XSAVE area, this VM needs one")
        theirs = state.get("devices", {})
        ours = sorted(d.name for d in self._devices)
        if not isinstance(theirs, dict) or sorted(theirs) != ours:
            found = sorted(theirs) if isinstance(theirs, dict) else theirs
            raise ValueError(
                f"state has devices {found or 'none'}, this VM has {ours or 'none'} "
                "(a kvstore guest needs --service on both sides)"
            )

    def _load_vcpu(self, vcpu: KvmVcpu, saved: dict[str, Any]) -> None:
        vcpu.set_sregs(kvm_abi.KvmSregs.from_dict(saved["sregs"]))
        vcpu.set_regs(kvm_abi.KvmRegs.from_dict(saved["regs"]))
        if "xsave" in saved:
            vcpu.set_xsave(kvm_abi.KvmXsave.from_buffer_copy(base64.b64decode(saved["xsave"])))
        elif "fpu" in saved:
            vcpu.set_fpu(kvm_abi.KvmFpu.from_dict(saved["fpu"]))
        if self._xcrs and "xcrs" in saved:
            vcpu.set_xcrs(kvm_abi.KvmXcrs.from_dict(saved["xcrs"]))
        vcpu.set_msrs({int(index, 16): int(value) for index, value in saved["msrs"].items()})
        vcpu.set_vcpu_events(kvm_abi.KvmVcpuEvents.from_dict(saved["events"]))
        vcpu.set_mp_state(int(saved["mp_state"]))

    def vcpu_thread_ids(self) -> list[int]:
        return [thread.native_id for thread in self._threads]

    # -- beyond the protocol -----------------------------------------------------------

    def mark_postmigrate(self) -> None:
        """The source's status after a completed migration (QEMU's "postmigrate")."""
        with self._condition:
            if self._status == RunState.RUNNING:
                raise RuntimeError("postmigrate needs a stopped VM")
            self._status = RunState.POSTMIGRATE

    def wait_shutdown(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU is done; False on timeout or after an internal error."""
        with self._condition:
            self._condition.wait_for(
                lambda: self._status in _STOPPED_FOR_GOOD or self._closed, timeout
            )
            return self._status == RunState.SHUTDOWN

    def vcpu_states(self) -> list[str]:
        with self._condition:
            return [thread.state.value for thread in self._threads]

    @property
    def devices(self) -> list[PortDevice]:
        return list(self._devices)

    @property
    def console_bytes(self) -> int:
        """How many console bytes the guest has written (carried across migration)."""
        return self._console_bytes

    @property
    def console_tail(self) -> bytes:
        """The last console bytes written on this side (at most 64 KiB)."""
        with self._console_lock:
            return bytes(self._console_tail)

    def flush_console(self) -> None:
        """Pass on console bytes a vCPU has held back waiting for more (call it now and
        then: `vm run` does every 0.1 s), so that a guest that prints once and computes
        is seen at once."""
        for thread in list(self._threads):
            thread.flush_stale_console()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the vCPU threads, close the vCPU, VM and KVM fds, unmap RAM. Idempotent."""
        with self._condition:
            if self._closed:
                return
            self._check_not_vcpu_thread("close")
            self._closed = True
            self._dirty_logging = False
            for thread in self._threads:
                thread.request_quit()
            self._condition.notify_all()
        for device in self._devices:  # also ends a vCPU's wait inside the device
            device.close()
        stuck = [t.index for t in self._threads if not t.join(THREAD_JOIN_SECONDS)]
        if stuck:
            # Unmapping kvm_run or RAM under a thread still in KVM_RUN would crash the
            # process: leak them instead and say so.
            raise RuntimeError(
                f"vCPU threads {stuck} did not stop; their fds and RAM are left open"
            )
        for vcpu in self._vcpus:
            vcpu.close()
        if self._vm is not None:
            self._vm.close()
        if self._kvm is not None:
            self._kvm.close()
        if self._mapping is not None:
            self._mapping.close()

    def __repr__(self) -> str:
        return (
            f"MicroVM(ram_size={self._ram_size}, vcpus={self._vcpu_count}, status='{self._status}')"
        )

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the VM is closed")

    def _check_not_vcpu_thread(self, what: str) -> None:
        for thread in self._threads:
            if thread.is_current_thread:
                raise RuntimeError(f"{what}() called from vCPU {thread.index}'s own thread")

    def _require_vm(self) -> tuple[KvmVm, Mapping]:
        self._check_open()
        assert self._vm is not None and self._mapping is not None
        return self._vm, self._mapping

    def _on_final_state(self, index: int, state: VcpuState, detail: str) -> Events:
        """A vCPU thread ended as DONE or FAILED (called with the condition held)."""
        if state is VcpuState.FAILED:
            if self._status == RunState.INTERNAL_ERROR:
                return []
            self._error = detail or f"vCPU {index} failed"
            log.error("internal error: %s", self._error)
            for thread in self._threads:
                if thread.index != index and thread.state in (VcpuState.PARKED, VcpuState.RUNNING):
                    thread.request_park()
            was_running = self._status == RunState.RUNNING
            self._status = RunState.INTERNAL_ERROR
            return [("STOP", {})] if was_running else []
        if all(thread.state is VcpuState.DONE for thread in self._threads):
            self._status = RunState.SHUTDOWN
            return [("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]
        return []

    def _on_console(self, index: int, data: bytes) -> None:
        with self._console_lock:
            self._console_bytes += len(data)
            self._console_tail += data
            if len(self._console_tail) > CONSOLE_TAIL_BYTES:
                del self._console_tail[:-CONSOLE_TAIL_BYTES]
            if self._console_callback is not None:
                self._console_callback(data)

    def _emit(self, event: str, data: dict[str, object]) -> None:
        if self._event_callback is None:
            return
        try:
            self._event_callback(event, dict(data))
        except Exception:  # an observer must not break the VM
            log.exception("event callback failed for %s", event)

    def _emit_all(self, events: Events) -> None:
        for event, data in events:
            self._emit(event, data)


def _port_map(devices: Sequence[PortDevice]) -> dict[int, Any]:
    taken = {layout.CONSOLE_PORT: "the console", layout.DONE_PORT: "the done port"}
    ports: dict[int, Any] = {}
    for device in devices:
        for port in device.ports:
            if port in taken or port in ports:
                owner = taken.get(port) or next(d.name for d in devices if port in d.ports)
                raise ValueError(f"{device.name}: port {port:#x} is already {owner}'s")
            ports[port] = device.io
    return ports


def copy_ram(source: MicroVM, destination: MicroVM) -> None:
    """Copy all RAM of a stopped VM into another VM of the same size (no userfaultfd
    involved: a plain memmove, GIL released)."""
    if source.ram_size != destination.ram_size:
        raise ValueError(f"RAM sizes differ: {source.ram_size} and {destination.ram_size}")
    for mine, theirs in zip(source.ram, destination.ram, strict=True):
        ctypes.memmove(theirs.host_address, mine.host_address, mine.length)


__all__ = ["MicroVM", "RunState", "copy_ram"]
