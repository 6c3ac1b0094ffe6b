"""Tests of the micro-VM on the real /dev/kvm: vCPU threads, stop/cont, state, dirty log."""

from __future__ import annotations

import ctypes
import json
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from postcopy.migration.machine import Machine
from postcopy.vm import layout
from postcopy.vm.guests import GUESTS
from postcopy.vm.machine import MicroVM, copy_ram

pytestmark = pytest.mark.timeout(120)

RAM = 16 << 20
# The counting guest (as(1) syntax), assembled once by hand. Each vCPU owns the page at
# 0x100000 + index * 0x1000: it stores its index at +8 and the vCPU count at +16, then
# counts in r8 forever, storing the count at +0, and prints '0' + index to the console
# every 2**24 counts. params[0] = prints after which the vCPU is done (0 = never).
#   _start: mov %rsi,%rbx; shl $12,%rbx; add $0x100000,%rbx
#           mov %rsi,8(%rbx); mov %rdx,16(%rbx); mov (%rcx),%r12
#           xor %r13,%r13; mov %esi,%r9d; add $0x30,%r9d; xor %r8,%r8
#   loop:   inc %r8; mov %r8,(%rbx); test $0xffffff,%r8d; jne loop
#           mov $0x3f8,%dx; mov %r9d,%eax; out %al,(%dx)
#           inc %r13; test %r12,%r12; je loop; cmp %r12,%r13; jb loop
#   done:   mov $0x501,%dx; out %al,(%dx); jmp done
COUNTER = bytes.fromhex(
    "4889f3"
    "48c1e30c"
    "4881c300001000"
    "48897308"
    "48895310"
    "4c8b21"
    "4d31ed"
    "4189f1"
    "4183c130"
    "4d31c0"
    "49ffc0"
    "4c8903"
    "41f7c0ffffff00"
    "75f1"
    "66baf803"
    "4489c8"
    "ee"
    "49ffc5"
    "4d85e4"
    "74e1"
    "4d39e5"
    "72dc"
    "66ba0105"
    "ee"
    "ebf9"
)
COUNTS_PER_PRINT = 1 << 24
HLT = b"\xf4"  # #GP at CPL3; with no IDT a triple fault


def vcpu_page(index: int) -> int:
    return layout.USABLE_BASE + index * 0x1000


def read_u64(vm: MicroVM, guest_address: int) -> int:
    # Through ctypes, not a memoryview, so no buffer export outlives the VM.
    return int(ctypes.c_uint64.from_address(vm.ram[0].host_address + guest_address).value)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class Recorder:
    """Console bytes and events a VM reported (from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.console = bytearray()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def on_console(self, data: bytes) -> None:
        with self._lock:
            self.console += data

    def on_event(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((name, data))

    @property
    def event_names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.events]

    def output(self) -> bytes:
        with self._lock:
            return bytes(self.console)


VmFactory = Callable[..., tuple[MicroVM, Recorder]]


@pytest.fixture
def make_vm() -> Iterator[VmFactory]:
    made: list[MicroVM] = []

    def make(**kwargs: Any) -> tuple[MicroVM, Recorder]:
        recorder = Recorder()
        kwargs.setdefault("ram_size", RAM)
        if not kwargs.get("incoming"):
            kwargs.setdefault("image", COUNTER)
        vm = MicroVM(console=recorder.on_console, on_event=recorder.on_event, **kwargs)
        made.append(vm)
        return vm, recorder

    try:
        yield make
    finally:
        for vm in made:
            vm.close()


def test_microvm_is_a_machine(make_vm: VmFactory) -> None:
    vm, _ = make_vm()
    machine: Machine = vm
    assert machine.vcpu_count == 1
    assert [block.name for block in machine.ram] == ["pc.ram"]
    assert machine.ram[0].length == RAM
    assert machine.ram[0].page_size == 4096
    assert machine.ram[0].kvm_slot == 0


def test_boot_memory_holds_page_tables_params_and_image(make_vm: VmFactory) -> None:
    vm, _ = make_vm(params=[7, 8, 9])
    assert vm.status == "prelaunch" and not vm.running
    assert read_u64(vm, layout.PML4_ADDRESS) & ~0xFFF == layout.PDPT_ADDRESS
    assert read_u64(vm, layout.PDPT_ADDRESS) & ~0xFFF == layout.PD_ADDRESS
    second_large_page = read_u64(vm, layout.PD_ADDRESS + 8)
    assert second_large_page & ~0xFFF == 2 << 20 and second_large_page & 0x87 == 0x87
    assert read_u64(vm, layout.PD_ADDRESS + 8 * (RAM >> 21)) == 0  # nothing beyond RAM
    assert [read_u64(vm, layout.PARAMS_ADDRESS + 8 * i) for i in range(4)] == [7, 8, 9, 0]
    start = vm.ram[0].host_address + layout.IMAGE_LOAD_ADDRESS
    assert ctypes.string_at(start, len(COUNTER)) == COUNTER


def test_two_vcpus_run_see_their_index_and_print(make_vm: VmFactory) -> None:
    vm, recorder = make_vm(vcpus=2)
    ids = vm.vcpu_thread_ids()
    assert len(set(ids)) == 2 and all(os.path.exists(f"/proc/self/task/{t}") for t in ids)
    vm.cont()
    assert vm.status == "running"
    wait_until(lambda: b"0" in recorder.output() and b"1" in recorder.output())
    vm.stop()
    for index in range(2):
        assert read_u64(vm, vcpu_page(index) + 8) == index
        assert read_u64(vm, vcpu_page(index) + 16) == 2
        assert read_u64(vm, vcpu_page(index)) >= COUNTS_PER_PRINT
    assert set(recorder.output()) == {ord("0"), ord("1")}
    assert vm.console_bytes == len(recorder.output())
    assert vm.console_tail == recorder.output()


def test_stop_parks_every_vcpu_and_a_second_stop_is_harmless(make_vm: VmFactory) -> None:
    vm, recorder = make_vm(vcpus=2)
    vm.cont()
    wait_until(lambda: read_u64(vm, vcpu_page(1)) > 0)
    seconds = vm.stop()
    assert seconds >= 0
    assert vm.status == "paused" and not vm.running
    assert vm.vcpu_states() == ["parked", "parked"]
    counts = [read_u64(vm, vcpu_page(i)) for i in range(2)]
    time.sleep(0.1)
    assert [read_u64(vm, vcpu_page(i)) for i in range(2)] == counts
    vm.stop()
    assert vm.status == "paused"
    assert recorder.event_names == ["RESUME", "STOP"]


def test_cont_after_save_state_keeps_counting(make_vm: VmFactory) -> None:
    vm, recorder = make_vm()
    vm.cont()
    wait_until(lambda: read_u64(vm, vcpu_page(0)) > 0)
    vm.stop()
    saved = vm.save_state()
    count = saved["cpus"][0]["regs"]["r8"]
    assert read_u64(vm, vcpu_page(0)) in (count, count - 1)  # stopped between inc and mov?
    vm.cont()
    wait_until(lambda: read_u64(vm, vcpu_page(0)) > count + COUNTS_PER_PRINT)
    vm.stop()
    assert recorder.event_names == ["RESUME", "STOP", "RESUME", "STOP"]


def test_save_state_needs_a_stopped_vm(make_vm: VmFactory) -> None:
    vm, _ = make_vm()
    vm.cont()
    with pytest.raises(RuntimeError, match="stop"):
        vm.save_state()


def test_state_and_ram_move_to_an_incoming_vm_which_continues(make_vm: VmFactory) -> None:
    source, source_recorder = make_vm(vcpus=2)
    source.cont()
    wait_until(lambda: len(source_recorder.output()) >= 4)
    source.stop()
    state = json.loads(json.dumps(source.save_state()))
    counts = [cpu["regs"]["r8"] for cpu in state["cpus"]]
    assert all(read_u64(source, vcpu_page(i)) in (counts[i], counts[i] - 1) for i in range(2))
    stored = [read_u64(source, vcpu_page(i)) for i in range(2)]

    destination, recorder = make_vm(vcpus=2, incoming=True)
    assert destination.status == "inmigrate"
    assert read_u64(destination, layout.PML4_ADDRESS) == 0  # incoming: RAM left alone
    with pytest.raises(RuntimeError, match="load_state"):
        destination.cont()
    copy_ram(source, destination)
    destination.load_state(state)
    assert destination.status == "paused"
    assert destination.console_bytes == source.console_bytes
    destination.cont()
    wait_until(
        lambda: all(
            read_u64(destination, vcpu_page(i)) > counts[i] + COUNTS_PER_PRINT for i in range(2)
        )
    )
    destination.stop()
    after = destination.save_state()
    assert all(cpu["regs"]["r8"] > count for cpu, count in zip(after["cpus"], counts, strict=True))
    assert set(recorder.output()) == {ord("0"), ord("1")}
    assert [read_u64(source, vcpu_page(i)) for i in range(2)] == stored  # source stayed put
    with pytest.raises(RuntimeError):
        destination.load_state(state)  # it has run since


def test_a_cpl0_guest_runs_at_cpl0_and_stays_there_after_a_move(make_vm: VmFactory) -> None:
    memtouch = GUESTS["memtouch"]
    source, source_recorder = make_vm(cpl=0, image=memtouch.image, params=memtouch.default_params)
    source.cont()
    # emulated on this host (~1 s per GiB pass): slower, but it runs
    wait_until(lambda: source_recorder.output().count(b"B") >= 2)
    source.stop()
    state = json.loads(json.dumps(source.save_state()))
    cs = state["cpus"][0]["sregs"]["cs"]
    assert (cs["dpl"], cs["selector"] & 3) == (0, 0)
    destination, recorder = make_vm(incoming=True)
    copy_ram(source, destination)
    destination.load_state(state)
    destination.cont()
    wait_until(lambda: recorder.output().count(b"B") >= 2)
    destination.stop()
    assert destination.save_state()["cpus"][0]["sregs"]["cs"]["dpl"] == 0


def test_a_cpl3_guest_starts_at_cpl3(make_vm: VmFactory) -> None:
    vm, _ = make_vm()
    cs = vm.save_state()["cpus"][0]["sregs"]["cs"]
    assert (cs["dpl"], cs["selector"] & 3) == (3, 3)


def test_load_state_refuses_a_different_configuration(make_vm: VmFactory) -> None:
    source, _ = make_vm()
    state = source.save_state()
    bigger, _ = make_vm(ram_size=2 * RAM, incoming=True)
    with pytest.raises(ValueError, match=rf"ram_size={RAM}.*ram_size={2 * RAM}"):
        bigger.load_state(state)
    wider, _ = make_vm(vcpus=2, incoming=True)
    with pytest.raises(ValueError, match=r"vcpus=1.*vcpus=2"):
        wider.load_state(state)
    with pytest.raises(RuntimeError, match="incoming"):
        source.load_state(state)


def test_dirty_log_is_empty_while_stopped_and_not_while_running(make_vm: VmFactory) -> None:
    vm, _ = make_vm(vcpus=2)
    with pytest.raises(RuntimeError):
        vm.sync_dirty_log()
    vm.cont()
    wait_until(lambda: read_u64(vm, vcpu_page(1)) > 0)
    vm.stop()
    vm.start_dirty_log()
    time.sleep(0.05)
    stopped = vm.sync_dirty_log()
    assert list(stopped) == ["pc.ram"]
    assert stopped["pc.ram"].dtype == np.bool_ and stopped["pc.ram"].size == RAM // 4096
    assert not stopped["pc.ram"].any()
    # each vCPU's counter moved on since the stop: the console had its bytes long before
    counts = [read_u64(vm, vcpu_page(index)) for index in (0, 1)]
    vm.cont()
    wait_until(lambda: all(read_u64(vm, vcpu_page(i)) > count for i, count in enumerate(counts)))
    vm.stop()
    dirty = vm.sync_dirty_log()["pc.ram"]
    pages = set(np.flatnonzero(dirty).tolist())
    assert {vcpu_page(0) // 4096, vcpu_page(1) // 4096} <= pages
    assert layout.IMAGE_LOAD_ADDRESS // 4096 not in pages
    assert not vm.sync_dirty_log()["pc.ram"].any()  # read and cleared
    counts = [read_u64(vm, vcpu_page(i)) for i in range(2)]
    vm.cont()
    wait_until(lambda: all(read_u64(vm, vcpu_page(i)) > counts[i] for i in range(2)))
    vm.stop()
    last = vm.sync_dirty_log(rearm=False)["pc.ram"]  # the final sync of a stopped VM
    assert {vcpu_page(0) // 4096, vcpu_page(1) // 4096} <= set(np.flatnonzero(last).tolist())
    vm.stop_dirty_log()
    with pytest.raises(RuntimeError):
        vm.sync_dirty_log()


def test_done_port_shuts_the_vm_down(make_vm: VmFactory) -> None:
    vm, recorder = make_vm(vcpus=2, params=[2])
    vm.cont()
    assert vm.wait_shutdown(30)
    assert vm.status == "shutdown"
    assert vm.vcpu_states() == ["done", "done"]
    assert sorted(recorder.output()) == sorted(b"0011")
    assert recorder.events[-1] == ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
    with pytest.raises(RuntimeError, match="shutdown"):
        vm.cont()
    vm.stop()  # harmless
    state = vm.save_state()
    assert [cpu["done"] for cpu in state["cpus"]] == [True, True]
    # The done OUT was completed: the vCPU stands after it.
    assert state["cpus"][0]["regs"]["rip"] == layout.IMAGE_LOAD_ADDRESS + 0x4F
    destination, _ = make_vm(vcpus=2, incoming=True)
    destination.load_state(state)
    assert destination.status == "shutdown"


def test_a_triple_fault_is_an_internal_error(make_vm: VmFactory) -> None:
    vm, recorder = make_vm(image=HLT)
    vm.cont()
    assert not vm.wait_shutdown(30)
    assert vm.status == "internal-error"
    # said in the guest author's terms, with where and the usual cause, not a Python repr
    assert vm.error.startswith("vCPU 0: the guest triple-faulted at RIP 0x10000 (CPL3): ")
    assert "flat binary linked at 0x10000" in vm.error and "Exit(" not in vm.error
    assert vm.vcpu_states() == ["failed"]
    assert recorder.event_names == ["RESUME", "STOP"]
    with pytest.raises(RuntimeError, match="internal-error"):
        vm.cont()


def test_close_ends_every_thread_and_is_idempotent() -> None:
    vm = MicroVM(ram_size=RAM, vcpus=2, image=COUNTER)
    ids = vm.vcpu_thread_ids()
    try:
        vm.cont()
        wait_until(lambda: read_u64(vm, vcpu_page(1)) > 0)
    finally:
        vm.close()
    assert vm.closed
    vm.close()
    assert [t.name for t in threading.enumerate() if t.name.startswith("vcpu")] == []
    # Python's join() returns as the thread finishes; the OS thread is gone a moment later.
    wait_until(lambda: not any(os.path.exists(f"/proc/self/task/{tid}") for tid in ids), 5)
    with pytest.raises(RuntimeError, match="closed"):
        vm.cont()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ram_size": 3 << 20},
        {"ram_size": 1 << 20},
        {"ram_size": 13 << 30},
        {"vcpus": 0},
        {"vcpus": 33},
        {"image": None},
        {"image": b""},
        {"image": b"\x90" * (layout.IMAGE_MAX_BYTES + 1)},
        {"params": [-1]},
        {"params": [0] * 513},
        {"cpl": 1},
        {"cpl": 2},
    ],
)
def test_bad_configurations_are_refused(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"ram_size": RAM, "image": COUNTER, **kwargs}
    with pytest.raises(ValueError):
        MicroVM(**arguments)


def test_vm_works_from_a_thread_that_is_not_main() -> None:
    results: list[object] = []

    def drive() -> None:
        try:
            with MicroVM(ram_size=RAM, image=COUNTER) as vm:
                vm.cont()
                wait_until(lambda: read_u64(vm, vcpu_page(0)) > 0)
                results.append(vm.stop())
        except BaseException as error:  # reported to the test below
            results.append(error)

    thread = threading.Thread(target=drive)
    thread.start()
    thread.join(60)
    assert len(results) == 1 and isinstance(results[0], float)


def test_memtouch_guest_runs_and_verifies(make_vm: VmFactory) -> None:
    guests = pytest.importorskip("postcopy.vm.guests")
    verify = pytest.importorskip("postcopy.vm.verify")
    info = guests.guest_info("memtouch")
    passes = 3
    vm, recorder = make_vm(vcpus=2, image=info.image, params=info.pack_params(passes=passes))
    vm.cont()
    assert vm.wait_shutdown(60)
    assert guests.pass_count("memtouch", recorder.output()) == passes * 2
    result = verify.verify_memtouch(vm.ram[0].view, vm.ram_size, 2)
    assert result.ok, result.detail


@pytest.fixture
def postcopy_destination(make_vm: VmFactory) -> Iterator[tuple[MicroVM, MicroVM, Any]]:
    """A stopped source and an incoming VM with its state loaded and its RAM registered
    MISSING on a userfaultfd: nothing of it is present yet. The test thread must not touch
    the destination's RAM until it has placed the pages (the GIL rule)."""
    userfaultfd = pytest.importorskip("postcopy.linux.userfaultfd")
    source, _ = make_vm()
    source.cont()
    wait_until(lambda: read_u64(source, vcpu_page(0)) > 0)
    source.stop()
    destination, _ = make_vm(incoming=True)
    uffd = userfaultfd.UserfaultFd.open()
    try:
        block = destination.ram[0]
        uffd.register(block.host_address, block.length, userfaultfd.RegisterMode.MISSING)
        destination.load_state(source.save_state())
        yield source, destination, uffd
    finally:
        uffd.close()  # wakes any vCPU still waiting, so the VM can close


def place(source: MicroVM, destination: MicroVM, uffd: Any, start: int, length: int) -> None:
    uffd.copy(destination.ram[0].host_address + start, source.ram[0].host_address + start, length)


def next_fault_offset(destination: MicroVM, uffd: Any) -> int:
    ready, _, _ = select.select([uffd.fileno()], [], [], 20)
    assert ready, "no page fault reported"
    fault = uffd.read_events()[0]
    assert fault.thread_id in (0, *destination.vcpu_thread_ids())
    return int(fault.address - destination.ram[0].host_address)


def test_stop_kicks_a_vcpu_waiting_for_a_missing_data_page(
    postcopy_destination: tuple[MicroVM, MicroVM, Any],
) -> None:
    source, destination, uffd = postcopy_destination
    place(source, destination, uffd, 0, layout.USABLE_BASE)  # all but the guest's data
    destination.cont()
    assert next_fault_offset(destination, uffd) == vcpu_page(0)
    destination.stop(timeout=20)
    assert destination.vcpu_states() == ["parked"]
    place(source, destination, uffd, layout.USABLE_BASE, RAM - layout.USABLE_BASE)
    saved = source.save_state()["cpus"][0]["regs"]["r8"]
    destination.cont()
    wait_until(lambda: read_u64(destination, vcpu_page(0)) > saved + COUNTS_PER_PRINT)
    destination.stop()


def test_stop_waits_for_a_missing_page_table_page(
    postcopy_destination: tuple[MicroVM, MicroVM, Any],
) -> None:
    source, destination, uffd = postcopy_destination
    destination.cont()
    assert next_fault_offset(destination, uffd) < layout.IMAGE_LOAD_ADDRESS  # page tables
    with pytest.raises(TimeoutError, match=r"vCPUs \[0\]"):
        destination.stop(timeout=0.2)
    assert destination.status == "running"
    destination.cont()  # withdraws the park request
    place(source, destination, uffd, 0, RAM)
    saved = source.save_state()["cpus"][0]["regs"]["r8"]
    wait_until(lambda: read_u64(destination, vcpu_page(0)) > saved + COUNTS_PER_PRINT)
    destination.stop()
    assert destination.vcpu_states() == ["parked"]


# -- memory backends -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memfd", "memfd-hugetlb", "file"])
def test_a_vm_runs_on_each_memory_backend_and_logs_dirty_pages_in_its_pages(
    make_vm: VmFactory, backend: str, tmp_path: Any
) -> None:
    from postcopy.ram import MemoryBackend
    from tests.hugepages import huge_pages, hugetlbfs_mount

    pages = 2 * (RAM >> 21)  # source and destination
    with hugetlbfs_mount(pages) if backend == "file" else huge_pages(pages) as pool_or_mount:
        text = f"file:{pool_or_mount}" if backend == "file" else backend
        vm, recorder = make_vm(vcpus=2, memory_backend=MemoryBackend.parse(text))
        block = vm.ram[0]
        huge = backend != "memfd"
        assert block.backend == backend and block.page_size == (2 << 20 if huge else 4096)
        assert vm.memory_backend == MemoryBackend.parse(text)
        vm.start_dirty_log()
        vm.cont()
        wait_until(lambda: len(recorder.output()) >= 4)
        vm.stop()
        dirty = vm.sync_dirty_log()["pc.ram"]
        assert dirty.size == block.pages
        # the counters live in the second MiB: one huge page of the block, or two pages
        written = {vcpu_page(0) // block.page_size, vcpu_page(1) // block.page_size}
        assert written <= set(np.flatnonzero(dirty).tolist())
        assert vm.save_state()["ram_blocks"] == [
            {"name": "pc.ram", "size": RAM, "page_size": block.page_size, "backend": backend}
        ]
        destination, _ = make_vm(vcpus=2, incoming=True, memory_backend=MemoryBackend.parse(text))
        copy_ram(vm, destination)
        destination.load_state(vm.save_state())
        stored = read_u64(vm, vcpu_page(0))
        destination.cont()
        wait_until(lambda: read_u64(destination, vcpu_page(0)) > stored)
        destination.close()
        vm.close()
