"""An in-process migration: the real OutgoingMigration and IncomingMigration, real
userfaultfd, a unix: socket, and machines whose vCPUs are plain threads (no KVM).

- `FakeMachine` implements `migration.machine.Machine` with one anonymous RAM block. Its
  vCPU threads read and rewrite guest pages with ctypes.memmove, which releases the GIL:
  a vCPU that touches a missing page sleeps in the kernel as a KVM vCPU does, and no
  Python code reads or writes guest RAM that can be missing (the GIL rule). Every page
  carries its own number, a generation that each touch increments, and a body derived
  from both, so a page that arrives torn, stale or at the wrong place is seen, by the
  vCPU that reads it and by `Migration.verify` at the end.
- `Proxy` forwards bytes between the source and the destination; a test can `hold` it
  (nothing more passes, in one direction or both, on every channel) and `release` it, or
  `cut` every connection: the way to pause a migration in a known state, or break it.
- `Migration` wires both ends (optionally through a `Proxy`), starts them, waits, checks
  every page, and cleans up everything it made, also when the test fails.

The other way to hold a state is the bandwidth: `max-bandwidth` and
`max-postcopy-bandwidth` take effect at once when changed (`Migration.set_parameter`), so
a limit of 1 byte/s holds precopy or the postcopy push, and 0 lets it go.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

import postcopy
from postcopy.closing import Closing
from postcopy.migration.incoming import IncomingMigration
from postcopy.migration.outgoing import OutgoingMigration
from postcopy.migration.parameters import Capabilities, Parameters
from postcopy.migration.status import MigrationStatus
from postcopy.ram import Bitmap, MemoryBackend, RamBlock, RamList, fold

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8
SWITCH_INTERVAL = 0.0002  # as `postcopy vm run` sets it: a woken thread gets the GIL soon

_memmove = ctypes.memmove  # a C call through ctypes: the GIL is released while it copies


def page_body(pages: npt.NDArray[np.uint64], generations: npt.NDArray[np.uint64]) -> Any:
    """The 64-bit word that fills the body of page `pages[i]` at generation `generations[i]`."""
    with np.errstate(over="ignore"):
        mixed = pages * np.uint64(0x9E3779B97F4A7C15) ^ generations * np.uint64(0xC2B2AE3D27D4EB4F)
    return mixed | np.uint64(1)


def page_content(page: int, generation: int) -> npt.NDArray[np.uint64]:
    """A whole page: its number, its generation, then the body word repeated."""
    words = np.empty(WORDS, dtype=np.uint64)
    words[0], words[1] = page, generation
    words[2:] = page_body(np.array([page], np.uint64), np.array([generation], np.uint64))[0]
    return words


def check_pages(words: npt.NDArray[np.uint64], first_page: int = 0) -> tuple[Any, Any]:
    """(generation of each page, numbers of the pages that are not whole and in place).

    `words` is RAM as (pages, WORDS) uint64. A page never written is all zeros
    (generation 0); any other must hold its own number, its generation and the body."""
    numbers = np.arange(first_page, first_page + words.shape[0], dtype=np.uint64)
    generations = words[:, 1].copy()
    written = generations != 0
    body = page_body(numbers, generations)
    good = np.where(
        written,
        (words[:, 0] == numbers) & (words[:, 2:] == body[:, None]).all(axis=1),
        ~words.any(axis=1),
    )
    return generations, numbers[~good]


class FakeVcpu:
    """A vCPU that touches the pages of its share of the working set (every n-th page of
    it, for n vCPUs: no two write one page) in order, round and round: read the page
    (faulting it in if missing), check it, write the next generation back."""

    def __init__(self, machine: FakeMachine, index: int) -> None:
        self.machine = machine
        self.index = index
        self.position = 0  # index into the working set of the next page to touch
        self.passes = 0  # complete passes over the working set
        self.busy = False  # on a page, not parked (the machine's condition guards it)
        self._scratch = np.zeros(WORDS, dtype=np.uint64)  # private: Python may read it
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{index}", daemon=True)
        self._thread.start()

    @property
    def thread_id(self) -> int:
        native = self._thread.native_id
        assert native is not None
        return native

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        machine = self.machine
        scratch = self._scratch.ctypes.data
        while machine.wait_until_running(self):
            pages = machine.working_set[self.index :: machine.vcpu_count]  # its own share
            page = int(pages[self.position])
            address = machine.block.host_address + page * PAGE_SIZE
            _memmove(scratch, address, PAGE_SIZE)  # a missing page faults here
            generations, bad = check_pages(self._scratch.reshape(1, WORDS), page)
            if bad.size:
                machine.errors.append(f"vCPU {self.index} read page {page} damaged")
            fresh = page_content(page, int(generations[0]) + 1)
            _memmove(address, fresh.ctypes.data, PAGE_SIZE)
            machine.touched(page)
            self.position += 1
            if self.position == len(pages):
                self.position = 0
                self.passes += 1
            if machine.pace:
                time.sleep(machine.pace)


class FakeMachine:
    """`migration.machine.Machine` without KVM: RAM is one block (anonymous, or made by
    `backend`: memfd, huge pages...), the vCPUs are `FakeVcpu` threads (created parked, as
    KVM's are, so their thread ids exist)."""

    def __init__(
        self,
        pages: int,
        *,
        vcpus: int = 1,
        working_set: Iterable[int] | None = None,
        pace: float = 0.0,
        name: str = "pc.ram",
        backend: MemoryBackend | None = None,
    ) -> None:
        self.block = RamBlock(name, (backend or MemoryBackend()).allocate(pages * PAGE_SIZE))
        self._ram = RamList([self.block])
        self.pages = pages
        self.working_set = np.array(
            list(working_set) if working_set is not None else range(pages), dtype=np.int64
        )
        self.pace = pace
        self.errors: list[str] = []  # what the vCPUs found wrong
        self.touches = np.zeros(pages, dtype=np.uint64)  # per page: touches by this VM's vCPUs
        self._dirty = np.zeros(pages, dtype=np.bool_)
        self._logging = False
        self._dirty_lock = threading.Lock()
        self._condition = threading.Condition()
        self._running = False
        self._busy = 0  # vCPUs between two pages (not parked)
        self._closed = False
        self._vcpus = [FakeVcpu(self, index) for index in range(vcpus)]
        self._synced_at = [0] * vcpus  # each vCPU's passes at the last dirty-log sync

    # -- the Machine protocol ---------------------------------------------------------------

    @property
    def ram(self) -> RamList:
        return self._ram

    @property
    def vcpu_count(self) -> int:
        return len(self._vcpus)

    @property
    def running(self) -> bool:
        return self._running

    def stop(self) -> float:
        """Park every vCPU after the page it is on (one waiting for a missing page parks
        once the page is there)."""
        started = time.perf_counter()
        with self._condition:
            self._running = False
            self._condition.wait_for(lambda: self._busy == 0)
        return time.perf_counter() - started

    def quiesce_devices(self, timeout: float) -> None:
        pass  # no devices

    def cont(self) -> None:
        with self._condition:
            self._running = True
            self._condition.notify_all()

    def start_dirty_log(self) -> None:
        with self._dirty_lock:
            self._dirty[:] = False
            self._logging = True
            self._synced_at = [vcpu.passes for vcpu in self._vcpus]

    def sync_dirty_log(self, rearm: bool = True) -> dict[str, Bitmap]:
        """What the vCPUs wrote since the last sync. This guest always dirties its whole
        working set in between: a sync of running vCPUs first waits until each has made a
        full pass since the last one, so that which pages are dirty does not depend on
        how the threads were scheduled."""
        deadline = time.monotonic() + 5.0
        while self._running and time.monotonic() < deadline:
            if all(
                v.passes >= mark + 2 for v, mark in zip(self._vcpus, self._synced_at, strict=True)
            ):
                break
            time.sleep(0.0005)
        with self._dirty_lock:
            dirty = self._dirty.copy()
            self._dirty[:] = False
            self._synced_at = [vcpu.passes for vcpu in self._vcpus]
        # as the micro-VM does: 4 KiB pages logged, the block's (huge) pages reported
        return {self.block.name: fold(dirty, self.block.page_size // PAGE_SIZE)}

    def stop_dirty_log(self) -> None:
        with self._dirty_lock:
            self._logging = False

    def save_state(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "vcpus": [{"position": v.position, "passes": v.passes} for v in self._vcpus],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state["pages"] != self.pages or len(state["vcpus"]) != len(self._vcpus):
            raise ValueError("machine state of a different configuration")
        for vcpu, saved in zip(self._vcpus, state["vcpus"], strict=True):
            vcpu.position, vcpu.passes = saved["position"], saved["passes"]

    def vcpu_thread_ids(self) -> list[int]:
        return [vcpu.thread_id for vcpu in self._vcpus]

    # -- for the harness --------------------------------------------------------------------

    def fill(self, every: int = 4) -> None:
        """Write generation 1 into every page but each `every`-th (those stay zero pages).
        Only before any migration: Python writes guest RAM here."""
        words = self.words()
        numbers = np.arange(self.pages, dtype=np.uint64)
        chosen = numbers[numbers % every != 0] if every else numbers
        ones = np.ones(chosen.size, dtype=np.uint64)
        words[chosen, 0] = chosen
        words[chosen, 1] = 1
        words[chosen, 2:] = page_body(chosen, ones)[:, None]

    def words(self) -> npt.NDArray[np.uint64]:
        """RAM as (pages, WORDS) uint64. Read it only while no page can be missing."""
        return np.frombuffer(self.block.view, dtype=np.uint64).reshape(self.pages, WORDS)

    def passes(self) -> int:
        """Complete passes over the working set, of the slowest vCPU."""
        return min(vcpu.passes for vcpu in self._vcpus)

    def wait_passes(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.passes() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the vCPUs made {self.passes()} passes, not {count}")
            time.sleep(0.001)

    def wait_until_running(self, vcpu: FakeVcpu) -> bool:
        """Called by a vCPU between pages: parks it while stopped; False once closed."""
        with self._condition:
            if vcpu.busy:
                vcpu.busy = False
                self._busy -= 1
                self._condition.notify_all()
            self._condition.wait_for(lambda: self._running or self._closed)
            if self._closed:
                return False
            vcpu.busy = True
            self._busy += 1
            return True

    def touched(self, page: int) -> None:
        """A vCPU wrote `page` (after the write: a sync in between sees it next time)."""
        self.touches[page] += 1
        if self._logging:
            with self._dirty_lock:
                self._dirty[page] = True

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._running = False
            self._condition.notify_all()
        joined = all(vcpu.join(5.0) for vcpu in self._vcpus)
        if joined:  # a vCPU still inside a page must not find it unmapped
            self.block.mapping.close()


class _Link:
    """One proxied connection: a pump thread per direction, each with its own gate."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket, held: dict[str, bool]):
        self.sockets = (downstream, upstream)
        self.held = dict(held)
        self.gates = {"to_destination": threading.Condition(), "to_source": threading.Condition()}
        self.bytes = {"to_destination": 0, "to_source": 0}
        self.closed = False
        self.threads = [
            threading.Thread(
                target=self._pump, args=(downstream, upstream, "to_destination"), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(upstream, downstream, "to_source"), daemon=True
            ),
        ]
        for thread in self.threads:
            thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        gate = self.gates[direction]
        try:
            while True:
                data = source.recv(1 << 16)
                with gate:
                    gate.wait_for(lambda: not self.held[direction] or self.closed)
                    if self.closed:
                        return
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                    self.bytes[direction] += len(data)
        except OSError:
            self.cut()

    def set_held(self, direction: str, held: bool) -> None:
        gate = self.gates[direction]
        with gate:  # waits for a send in progress: none passes once this returns
            self.held[direction] = held
            gate.notify_all()

    def cut(self) -> None:
        self.closed = True
        for sock in self.sockets:  # first: a pump blocked in sendall lets go of its gate
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for gate in self.gates.values():
            with gate:
                gate.notify_all()

    def close(self) -> None:
        self.cut()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(5.0)
        for sock in self.sockets:
            sock.close()


class Proxy:
    """Forwards every connection made to `path` to the unix socket `target`."""

    def __init__(self, target: str, path: str) -> None:
        self.target = target
        self.path = path
        self.links: list[_Link] = []  # in the order the source connected: main, preempt
        self._held = {"to_destination": False, "to_source": False}
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def hold(self, *, to_destination: bool = True, to_source: bool = True) -> None:
        """Stop forwarding: when this returns, no more byte passes in those directions on
        any channel (bytes already in the receiver's socket buffer are still read there)."""
        with self._lock:
            for direction, held in (("to_destination", to_destination), ("to_source", to_source)):
                if held:
                    self._held[direction] = True
                    for link in self.links:
                        link.set_held(direction, True)

    def release(self) -> None:
        with self._lock:
            for direction in self._held:
                self._held[direction] = False
                for link in self.links:
                    link.set_held(direction, False)

    def cut(self) -> None:
        """Reset every connection, as a broken network would (new ones are still accepted)."""
        with self._lock:
            for link in self.links:
                link.cut()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5.0)
        with self._lock:
            for link in self.links:
                link.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                downstream.close()
                upstream.close()
                continue
            with self._lock:
                self.links.append(_Link(downstream, upstream, self._held))


class Migration(Closing):
    """A source and a destination FakeMachine in this process, migrating over unix:.

    `capabilities` are enabled on both sides; `parameters` (QMP names) are set on the
    source. The source's vCPUs run from `start()`; the destination's from RUN (postcopy)
    or completion (precopy). Use as a context manager: `close()` undoes everything."""

    def __init__(
        self,
        *,
        pages: int = 4096,
        vcpus: int = 1,
        capabilities: Iterable[str] = (),
        parameters: dict[str, Any] | None = None,
        working_set: Iterable[int] | None = None,
        proxy: bool = False,
        pace: float = 0.0,
        backend: MemoryBackend | None = None,
        destination_parameters: dict[str, Any] | None = None,
    ) -> None:
        self._exit = contextlib.ExitStack()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._exit.callback(sys.setswitchinterval, self._switch_interval)
        self.directory = tempfile.mkdtemp(prefix="pcm-", dir="/tmp")  # short: unix paths
        self._exit.callback(shutil.rmtree, self.directory, True)
        try:
            work = list(working_set) if working_set is not None else None
            self.source = FakeMachine(
                pages, vcpus=vcpus, working_set=work, pace=pace, backend=backend
            )
            self._exit.callback(self.source.close)
            self.destination = FakeMachine(
                pages, vcpus=vcpus, working_set=work, pace=pace, backend=backend
            )
            self._exit.callback(self.destination.close)
            self.source.fill()
            self.parameters = Parameters()
            for name, value in (parameters or {}).items():
                self.parameters.set(name, value)
            destination_side = Parameters()
            for name, value in (destination_parameters or {}).items():
                destination_side.set(name, value)
            self.incoming = IncomingMigration(
                self.destination,
                f"unix:{self.directory}/destination.sock",
                parameters=destination_side,
                capabilities=_capabilities(capabilities),
            )
            self._exit.callback(self.incoming.close)
            self.incoming.start()
            uri = f"unix:{self.directory}/destination.sock"
            self.proxy: Proxy | None = None
            if proxy:
                self.proxy = Proxy(f"{self.directory}/destination.sock", f"{self.directory}/p")
                self._exit.callback(self.proxy.close)
                uri = self.proxy.uri
            self.outgoing = OutgoingMigration(
                self.source,
                uri,
                parameters=self.parameters,
                capabilities=_capabilities(capabilities),
            )
            self._exit.callback(self._stop_outgoing)
        except BaseException:
            self._exit.close()
            raise

    def start(self) -> None:
        """Start the source's vCPUs, then the migration."""
        self.source.cont()
        self.outgoing.start()

    def set_parameter(self, name: str, value: Any) -> None:
        """migrate-set-parameters on the source, during the migration (QMP names)."""
        self.parameters.set(name, value)

    def wait_source(self, *statuses: str, timeout: float = 20.0) -> str:
        return _wait(self.outgoing.status, statuses, timeout)

    def wait_destination(self, *statuses: str, timeout: float = 20.0) -> str:
        return _wait(self.incoming.status, statuses, timeout)

    def finish(self, timeout: float = 90.0) -> None:
        """Wait until both sides completed; then stop the destination's vCPUs. `timeout` is
        a guard against a hang, not a figure: each of the fake guest's syncs waits for two
        of its passes (up to 5 s), and with a few percent of a CPU (a loaded host) a
        migration takes 10-20 s, not a hang (the old 20 s wait failed so in full runs).
        A timeout says where each side and each thread stood (`whereabouts`)."""
        try:
            source = self.wait_source("completed", "failed", "cancelled", timeout=timeout)
            destination = self.wait_destination("completed", "failed", timeout=timeout)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.whereabouts()}") from None
        assert (source, destination) == ("completed", "completed"), (
            self.outgoing.query(),
            self.incoming.query(),
        )
        self.destination.stop()

    def whereabouts(self) -> str:
        """Where the migration stands, for the reader of a CI log: each side's query and
        last timeline entries, and where every other thread of this process is (the
        innermost frames of the project's code): a wait, a lock or a busy loop."""
        lines = [f"source: {self.outgoing.query()}", f"destination: {self.incoming.query()}"]
        for side, timeline in (
            ("source", self.outgoing.timeline),
            ("destination", self.incoming.timeline),
        ):
            lines.append(f"{side} timeline: {list(timeline)[-4:]}")
        lines.append("threads:")
        lines.extend(thread_stacks())
        return "\n".join(lines)

    def verify(self) -> None:
        """Every page arrived whole, in place and current: the destination holds what the
        source held when it stopped, plus exactly the destination vCPUs' own writes."""
        assert not self.source.running and not self.destination.running
        # both stopped, the migration complete: no page can be missing, Python may read RAM
        source_generations, source_bad = check_pages(self.source.words())
        destination_generations, destination_bad = check_pages(self.destination.words())
        assert source_bad.size == 0, f"source pages damaged: {source_bad[:10]}"
        assert destination_bad.size == 0, f"pages damaged in transit: {destination_bad[:10]}"
        expected = source_generations + self.destination.touches
        wrong = np.flatnonzero(destination_generations != expected)
        assert wrong.size == 0, (
            f"{wrong.size} pages stale or lost, e.g. page {wrong[0]}: generation "
            f"{destination_generations[wrong[0]]}, expected {expected[wrong[0]]}"
        )
        assert self.source.errors == [] and self.destination.errors == []

    def close(self) -> None:
        self._exit.close()

    def _stop_outgoing(self) -> None:
        if not self.outgoing.finished:
            self.outgoing.cancel()
        self.outgoing.join(10.0)


def _capabilities(names: Iterable[str]) -> Capabilities:
    capabilities = Capabilities()
    for name in names:
        capabilities.set(name, True)
    return capabilities


def _wait(holder: Any, statuses: Iterable[str], timeout: float) -> str:
    wanted = frozenset(MigrationStatus(status) for status in statuses)
    if not holder.wait_for(wanted, timeout):
        raise TimeoutError(f"status {holder.value.value}, not one of {sorted(statuses)}")
    return str(holder.value.value)


def thread_stacks(depth: int = 6) -> list[str]:
    """Every thread but the caller's, with its `depth` innermost frames of the project
    (src/postcopy, tests), innermost first: "name: file:line function <- ..."."""
    ours_only = (os.path.dirname(postcopy.__file__), os.path.dirname(os.path.abspath(__file__)))
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    caller = threading.get_ident()
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident == caller:
            continue
        ours = [
            f"{os.path.basename(entry.filename)}:{entry.lineno} {entry.name}"
            for entry in reversed(traceback.extract_stack(frame))
            if entry.filename.startswith(ours_only)
        ]
        lines.append(
            f"  {names.get(ident, ident)}: {' <- '.join(ours[:depth]) or '(no frame of ours)'}"
        )
    return sorted(lines)
