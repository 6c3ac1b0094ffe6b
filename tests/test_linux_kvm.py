"""Tests of the KVM bindings against the real /dev/kvm, with a hand-assembled CPL3 guest."""

from __future__ import annotations

import ctypes
import errno
import mmap
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from postcopy.linux import kvm, kvm_abi
from postcopy.linux.kvm import Kvm, KvmError, KvmVcpu, KvmVm
from postcopy.linux.kvm_abi import Capability, IntrExit, IoDirection, IoExit

pytestmark = pytest.mark.timeout(60)

MEMORY_SIZE = 8 << 20
CODE = 0x10000
# The guest (as(1) syntax), assembled once by hand:
#   start: movabs $0x200000,%rax; movq $0x1234,(%rax)     write page 512 (2nd 2 MiB page)
#          movabs $0x403000,%rbx; movq $0x5678,(%rbx)     write page 1027 (3rd 2 MiB page)
#          mov $0x3f8,%dx; mov $0x41,%al; out %al,(%dx)   exit 1: OUT 'A' to 0x3f8
#          mov $0x502,%dx; in (%dx),%eax                  exit 2: IN 4 bytes from 0x502
#          mov %eax,8(%rbx)                               store the answer at 0x403008
#          mov $0x501,%dx; out %eax,(%dx)                 exit 3: OUT the answer to 0x501
#          jmp start
#   spin:  inc %rax; jmp spin                             (at +0x38: never exits)
GUEST = bytes.fromhex(
    "48b80000200000000000"
    "48c70034120000"
    "48bb0030400000000000"
    "48c70378560000"
    "66baf803"
    "b041"
    "ee"
    "66ba0205"
    "ed"
    "894308"
    "66ba0105"
    "ef"
    "ebc8"
    "48ffc0"
    "ebfb"
)
SPIN = CODE + 0x38
WRITTEN_PAGES = {0x200000 // 4096, 0x403000 // 4096}
PAGE_TABLE_PAGES = {1, 2, 3}
PTE_FLAGS = 0x7  # present, writable, user
ACCESSED_DIRTY = 0x60


@dataclass
class Guest:
    kvm: Kvm
    vm: KvmVm
    vcpu: KvmVcpu
    memory: mmap.mmap
    words: np.ndarray  # the memory as u64 (host writes only: nothing here is uffd-backed)

    @property
    def address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.memory))

    def u64(self, guest_address: int) -> int:
        return int(self.words[guest_address // 8])


def write_page_tables(words: np.ndarray, size: int, preset_accessed_dirty: bool) -> None:
    extra = ACCESSED_DIRTY if preset_accessed_dirty else 0
    words[0x1000 // 8] = 0x2000 | PTE_FLAGS | extra
    words[0x2000 // 8] = 0x3000 | PTE_FLAGS | extra
    for index in range(size >> 21):
        words[0x3000 // 8 + index] = (index << 21) | PTE_FLAGS | 0x80 | extra


def set_long_mode_cpl3(vcpu: KvmVcpu, rip: int) -> None:
    sregs = vcpu.get_sregs()
    data = dict(
        base=0, limit=0xFFFFFFFF, selector=0x23, type=3, present=1, dpl=3, db=1, s=1, l=0, g=1
    )
    for name in ("ds", "es", "fs", "gs", "ss"):
        getattr(sregs, name).update(data)
    sregs.cs.update(dict(data, selector=0x1B, type=0xB, db=0, l=1))
    sregs.cr3 = 0x1000
    sregs.cr4 = 0x620  # PAE, OSFXSR, OSXMMEXCPT
    sregs.cr0 = 0x80000033  # PG, NE, ET, MP, PE
    sregs.efer = 0x500  # LME, LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = rip
    regs.rflags = 0x3002  # IOPL 3
    regs.rsp = 0x100000
    vcpu.set_regs(regs)


def make_guest(
    *,
    dirty_log: bool = False,
    preset_accessed_dirty: bool = True,
    manual_protect: bool = False,
    dirty_ring_bytes: int = 0,
) -> Guest:
    system = Kvm()
    memory = mmap.mmap(-1, MEMORY_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    words = np.frombuffer(memory, dtype=np.uint64)
    write_page_tables(words, MEMORY_SIZE, preset_accessed_dirty)
    memory[CODE : CODE + len(GUEST)] = GUEST
    vm = system.create_vm()
    if manual_protect:
        vm.enable_cap(Capability.MANUAL_DIRTY_LOG_PROTECT2, kvm_abi.MANUAL_PROTECT_ENABLE)
    if dirty_ring_bytes:
        vm.enable_cap(Capability.DIRTY_LOG_RING, dirty_ring_bytes)
    vm.set_tss_addr(0xFFFBD000)
    guest = Guest(system, vm, None, memory, words)  # type: ignore[arg-type]
    vm.set_user_memory_region(
        0, 0, MEMORY_SIZE, guest.address, kvm_abi.MEM_LOG_DIRTY_PAGES if dirty_log else 0
    )
    guest.vcpu = vm.create_vcpu(0)
    guest.vcpu.set_cpuid2(system.supported_cpuid())
    set_long_mode_cpl3(guest.vcpu, CODE)
    return guest


def close_guest(guest: Guest) -> None:
    if guest.vcpu is not None:
        guest.vcpu.close()
    guest.vm.close()
    guest.kvm.close()
    del guest.words
    guest.memory.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    value = make_guest(dirty_log=True)
    try:
        yield value
    finally:
        close_guest(value)


def dirty_pages(bitmap: np.ndarray) -> set[int]:
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    return {int(page) for page in np.flatnonzero(bits)}


def run_to_first_three_exits(guest: Guest) -> tuple[IoExit, IoExit, IoExit]:
    first = guest.vcpu.run()
    assert isinstance(first, IoExit)
    second = guest.vcpu.run()
    assert isinstance(second, IoExit)
    guest.vcpu.write_io_data(second, (0xCAFEF00D).to_bytes(4, "little"))
    third = guest.vcpu.run()
    assert isinstance(third, IoExit)
    return first, second, third


# --- structures and the system fd ----------------------------------------------------------


STRUCT_OF_IOCTL = {
    "KVM_GET_REGS": kvm_abi.KvmRegs,
    "KVM_SET_REGS": kvm_abi.KvmRegs,
    "KVM_GET_SREGS": kvm_abi.KvmSregs,
    "KVM_SET_SREGS": kvm_abi.KvmSregs,
    "KVM_GET_FPU": kvm_abi.KvmFpu,
    "KVM_SET_FPU": kvm_abi.KvmFpu,
    "KVM_GET_XSAVE": kvm_abi.KvmXsave,
    "KVM_SET_XSAVE": kvm_abi.KvmXsave,
    "KVM_GET_XCRS": kvm_abi.KvmXcrs,
    "KVM_SET_XCRS": kvm_abi.KvmXcrs,
    "KVM_GET_VCPU_EVENTS": kvm_abi.KvmVcpuEvents,
    "KVM_SET_VCPU_EVENTS": kvm_abi.KvmVcpuEvents,
    "KVM_GET_MP_STATE": kvm_abi.KvmMpState,
    "KVM_SET_MP_STATE": kvm_abi.KvmMpState,
    "KVM_SET_USER_MEMORY_REGION": kvm_abi.KvmUserspaceMemoryRegion,
    "KVM_GET_DIRTY_LOG": kvm_abi.KvmDirtyLog,
    "KVM_CLEAR_DIRTY_LOG": kvm_abi.KvmClearDirtyLog,
    "KVM_ENABLE_CAP": kvm_abi.KvmEnableCap,
}


@pytest.mark.parametrize("name", sorted(STRUCT_OF_IOCTL))
def test_structure_sizes_match_the_ioctl_numbers(name: str) -> None:
    number = kvm_abi.Ioctl[name]
    assert (number >> 16) & 0x3FFF == ctypes.sizeof(STRUCT_OF_IOCTL[name])


def test_kvm_run_layout_matches_the_kernel() -> None:
    assert kvm_abi.KvmRun.immediate_exit.offset == 1
    assert kvm_abi.KvmRun.exit_reason.offset == 8
    assert kvm_abi.KvmRun.exit.offset == 32
    assert kvm_abi.KvmRun.kvm_valid_regs.offset == 0x120
    assert ctypes.sizeof(kvm_abi.KvmRun) == 0x930
    assert ctypes.sizeof(kvm_abi.KvmCpuidEntry2) == 40
    assert ctypes.sizeof(kvm_abi.KvmSegment) == 24


def test_system_fd_answers_queries() -> None:
    with Kvm() as system:
        assert system.api_version() == kvm_abi.KVM_API_VERSION
        assert system.check_extension(Capability.USER_MEMORY) >= 1
        assert system.check_extension(Capability.IMMEDIATE_EXIT) >= 1
        assert system.check_extension(Capability.NR_MEMSLOTS) > 1
        assert system.vcpu_mmap_size() >= 4096
        leaves = {entry.function for entry in system.supported_cpuid()}
        assert 0 in leaves and 1 in leaves
        assert 0x10 in system.get_msr_index_list()  # IA32_TSC
    assert system.closed
    system.close()  # idempotent


def test_missing_device_is_a_clear_kvm_error(tmp_path: object) -> None:
    with pytest.raises(KvmError) as caught:
        Kvm("/nonexistent/kvm")
    assert caught.value.errno == errno.ENOENT
    assert "KVM is not available" in str(caught.value)


def test_a_device_that_is_not_kvm_names_the_failing_ioctl() -> None:
    with pytest.raises(KvmError) as caught:
        Kvm("/dev/null")
    assert caught.value.ioctl == "KVM_GET_API_VERSION"


def test_too_small_cpuid_table_is_e2big() -> None:
    with Kvm() as system, pytest.raises(KvmError) as caught:
        system.supported_cpuid(max_entries=1)
    assert caught.value.errno == errno.E2BIG


# --- running a guest -----------------------------------------------------------------------


def test_guest_exits_carry_port_and_data_and_memory_is_written(guest: Guest) -> None:
    console, query, done = run_to_first_three_exits(guest)
    assert (console.direction, console.port, console.size, console.data) == (
        IoDirection.OUT,
        0x3F8,
        1,
        b"A",
    )
    assert (query.direction, query.port, query.size, query.data) == (IoDirection.IN, 0x502, 4, b"")
    assert (done.direction, done.port, done.size) == (IoDirection.OUT, 0x501, 4)
    assert done.data == (0xCAFEF00D).to_bytes(4, "little")
    assert guest.u64(0x200000) == 0x1234
    assert guest.u64(0x403000) == 0x5678
    assert guest.u64(0x403008) == 0xCAFEF00D


def test_io_answer_must_fit_the_exit(guest: Guest) -> None:
    console = guest.vcpu.run()
    assert isinstance(console, IoExit)
    with pytest.raises(ValueError):
        guest.vcpu.write_io_data(console, b"x")
    query = guest.vcpu.run()
    assert isinstance(query, IoExit)
    with pytest.raises(ValueError):
        guest.vcpu.write_io_data(query, b"12")


def test_dirty_log_reports_exactly_the_guest_written_pages(guest: Guest) -> None:
    bitmap = np.zeros(kvm.dirty_bitmap_words(MEMORY_SIZE), dtype=np.uint64)
    # The first pass maps every page the guest touches. Because the page tables come with
    # accessed/dirty preset, KVM maps even a page that is only read (the code) writable at
    # once, and so logs it: the first pass is not exact. Later passes are.
    run_to_first_three_exits(guest)
    guest.vm.get_dirty_log(0, bitmap)
    assert dirty_pages(bitmap) >= WRITTEN_PAGES
    guest.memory[0x600000:0x600008] = b"hostdata"  # host writes are not logged
    run_to_first_three_exits(guest)
    guest.vm.get_dirty_log(0, bitmap)
    assert dirty_pages(bitmap) == WRITTEN_PAGES
    guest.vm.get_dirty_log(0, bitmap)  # without manual protection, GET cleared the log
    assert dirty_pages(bitmap) == set()


def test_dirty_log_includes_page_tables_the_mmu_updates() -> None:
    guest = make_guest(dirty_log=True, preset_accessed_dirty=False)
    try:
        bitmap = np.zeros(kvm.dirty_bitmap_words(MEMORY_SIZE), dtype=np.uint64)
        run_to_first_three_exits(guest)
        guest.vm.get_dirty_log(0, bitmap)
        pages = dirty_pages(bitmap)
        assert pages >= WRITTEN_PAGES
        assert pages <= WRITTEN_PAGES | PAGE_TABLE_PAGES
        assert CODE // 4096 not in pages  # executed and read, never written
    finally:
        close_guest(guest)


def test_manual_protect_keeps_bits_until_cleared() -> None:
    guest = make_guest(dirty_log=False, manual_protect=True)
    try:
        guest.vm.set_user_memory_region(
            0, 0, MEMORY_SIZE, guest.address, kvm_abi.MEM_LOG_DIRTY_PAGES
        )
        words = kvm.dirty_bitmap_words(MEMORY_SIZE)
        bitmap = np.zeros(words, dtype=np.uint64)
        run_to_first_three_exits(guest)  # maps the pages (see the test above)
        guest.vm.get_dirty_log(0, bitmap)
        guest.vm.clear_dirty_log(0, 0, MEMORY_SIZE // 4096, bitmap)
        run_to_first_three_exits(guest)
        guest.vm.get_dirty_log(0, bitmap)
        assert dirty_pages(bitmap) == WRITTEN_PAGES
        again = np.zeros(words, dtype=np.uint64)
        guest.vm.get_dirty_log(0, again)
        assert dirty_pages(again) == WRITTEN_PAGES
        guest.vm.clear_dirty_log(0, 0, MEMORY_SIZE // 4096, bitmap)
        guest.vm.get_dirty_log(0, again)
        assert dirty_pages(again) == set()
        run_to_first_three_exits(guest)  # writes the same pages: protected again, so logged
        guest.vm.get_dirty_log(0, again)
        assert dirty_pages(again) == WRITTEN_PAGES
    finally:
        close_guest(guest)


def test_dirty_log_checks_slot_and_bitmap(guest: Guest) -> None:
    with pytest.raises(KvmError):
        guest.vm.get_dirty_log(5, np.zeros(64, dtype=np.uint64))
    with pytest.raises(ValueError):
        guest.vm.get_dirty_log(0, np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError):
        guest.vm.get_dirty_log(0, np.zeros(kvm.dirty_bitmap_words(MEMORY_SIZE), np.uint32))


def test_dirty_ring_lists_written_pages() -> None:
    with Kvm() as system:
        if not system.check_extension(Capability.DIRTY_LOG_RING):
            pytest.skip("no KVM dirty ring on this host")
    ring_bytes = 4096 * ctypes.sizeof(kvm_abi.KvmDirtyGfn)
    guest = make_guest(dirty_log=True, dirty_ring_bytes=ring_bytes)
    try:
        ring = guest.vcpu.mmap_dirty_ring(ring_bytes)

        def harvest(cursor: int) -> tuple[int, list[tuple[int, int]]]:
            found = []
            while ring[cursor % len(ring)].flags & kvm_abi.DIRTY_GFN_F_DIRTY:
                entry = ring[cursor % len(ring)]
                found.append((entry.slot, entry.offset))
                entry.flags = kvm_abi.DIRTY_GFN_F_RESET
                cursor += 1
            return cursor, found

        run_to_first_three_exits(guest)
        cursor, _first_pass = harvest(0)  # the first pass also logs the code page (see above)
        guest.vm.reset_dirty_rings()
        run_to_first_three_exits(guest)
        cursor, harvested = harvest(cursor)
        assert {offset for _slot, offset in harvested} == WRITTEN_PAGES
        assert guest.vm.reset_dirty_rings() == len(harvested)
    finally:
        close_guest(guest)


def test_immediate_exit_returns_at_once_without_running(guest: Guest) -> None:
    guest.vcpu.immediate_exit = True
    assert guest.vcpu.immediate_exit
    assert guest.vcpu.run_struct.immediate_exit == 1
    before = guest.vcpu.get_regs().rip
    assert isinstance(guest.vcpu.run(), IntrExit)
    assert guest.vcpu.get_regs().rip == before == CODE
    assert guest.u64(0x200000) == 0
    guest.vcpu.immediate_exit = False
    assert isinstance(guest.vcpu.run(), IoExit)


def test_immediate_exit_after_io_exit_leaves_the_instruction_completed(guest: Guest) -> None:
    console = guest.vcpu.run()
    assert isinstance(console, IoExit)
    guest.vcpu.immediate_exit = True
    assert isinstance(guest.vcpu.run(), IntrExit)
    # The OUT at +0x28 is complete: the guest continues after it.
    assert guest.vcpu.get_regs().rip == CODE + 0x29


def test_signal_kicks_a_spinning_vcpu_out_of_kvm_run(guest: Guest) -> None:
    regs = guest.vcpu.get_regs()
    regs.rip = SPIN
    regs.rax = 0
    guest.vcpu.set_regs(regs)
    kick = signal.SIGUSR1
    exits: list[object] = []
    thread_id: list[int] = []
    entered = threading.Event()

    def run() -> None:
        # Blocked in the thread, unblocked only inside KVM_RUN: the kick is never
        # delivered as a signal, it stays pending and is consumed here.
        current = signal.pthread_sigmask(signal.SIG_BLOCK, [kick])
        guest.vcpu.set_signal_mask([s for s in current if s != kick])
        thread_id.append(threading.get_ident())
        entered.set()
        exits.append(guest.vcpu.run())
        signal.sigtimedwait([kick], 0)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert entered.wait(10)
        time.sleep(0.05)
        signal.pthread_kill(thread_id[0], kick)
        thread.join(10)
        assert not thread.is_alive()
    finally:
        if thread.is_alive():
            guest.vcpu.immediate_exit = True
            signal.pthread_kill(thread_id[0], kick)
            thread.join()
    assert isinstance(exits[0], IntrExit)
    assert guest.vcpu.get_regs().rax > 0  # it did spin


def test_regs_and_sregs_round_trip(guest: Guest) -> None:
    regs = guest.vcpu.get_regs()
    regs.rbx = 0x1122334455667788
    regs.r15 = 0xFFFF_FFFF_FFFF_FFFF
    guest.vcpu.set_regs(regs)
    assert guest.vcpu.get_regs().to_dict() == regs.to_dict()
    sregs = guest.vcpu.get_sregs()
    sregs.fs.base = 0x7000_0000
    sregs.gs.base = 0x7100_0000
    guest.vcpu.set_sregs(sregs)
    back = guest.vcpu.get_sregs()
    assert back.to_dict() == sregs.to_dict()
    assert kvm_abi.KvmSregs.from_dict(back.to_dict()).to_dict() == back.to_dict()


def test_fpu_xsave_msrs_events_round_trip(guest: Guest) -> None:
    vcpu = guest.vcpu
    area = bytearray(bytes(vcpu.get_xsave()))
    assert int.from_bytes(area[24:28], "little") == 0x1F80  # MXCSR at reset
    area[160 + 3 * 16] = 0x5A  # XMM3, byte 0
    area[512] |= 2  # XSTATE_BV: SSE state present
    vcpu.set_xsave(kvm_abi.KvmXsave.from_buffer_copy(area))
    assert bytes(vcpu.get_xsave())[160 + 3 * 16] == 0x5A
    fpu = vcpu.get_fpu()
    assert fpu.xmm[3][0] == 0x5A
    # KVM_SET_FPU does not mark SSE state present: it only sticks once XSAVE did (above);
    # and KVM_GET/SET_FPU leave MXCSR out. The VM saves XSAVE for these reasons.
    fpu.xmm[4][1] = 0x66
    vcpu.set_fpu(fpu)
    assert vcpu.get_fpu().xmm[4][1] == 0x66
    vcpu.set_msrs({0xC0000102: 0x1234_5000})  # KERNEL_GS_BASE
    assert vcpu.get_msrs([0xC0000102, 0x10])[0xC0000102] == 0x1234_5000
    with pytest.raises(KvmError) as caught:
        vcpu.get_msrs([0xDEAD])
    assert "0xdead" in str(caught.value)
    vcpu.set_xcrs(vcpu.get_xcrs())
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    assert vcpu.get_mp_state() == 0


def test_duplicate_vcpu_is_an_error_naming_the_ioctl(guest: Guest) -> None:
    with pytest.raises(KvmError) as caught:
        guest.vm.create_vcpu(0)
    assert caught.value.ioctl == "KVM_CREATE_VCPU"


def test_closed_vcpu_refuses_calls(guest: Guest) -> None:
    guest.vcpu.close()
    guest.vcpu.close()
    with pytest.raises(KvmError):
        guest.vcpu.get_regs()
    with pytest.raises(KvmError):
        guest.vcpu.run_struct  # noqa: B018
