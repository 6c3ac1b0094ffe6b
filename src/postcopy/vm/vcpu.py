"""The vCPU thread: one Python thread per vCPU looping in KVM_RUN, parked on request.

How a vCPU is taken out of KVM_RUN promptly (the kick), without a signal handler and so
without needing the main thread: the kick signal (SIGUSR1) is blocked in every vCPU
thread from birth, and KVM_SET_SIGNAL_MASK unblocks it only inside KVM_RUN. A kick sent
with pthread_kill therefore makes KVM_RUN return EINTR and is never delivered: it stays
pending until the thread consumes it with sigtimedwait. A kick that arrives while the
thread is outside KVM_RUN stays pending too and ends the next KVM_RUN at once, so no kick
is ever lost (QEMU's SIG_IPI scheme). immediate_exit=1 is set as well, because KVM_RUN
with immediate_exit completes a pending I/O instruction and returns without entering the
guest: a parked vCPU's registers are then always those after a whole instruction.

The owner (the MicroVM) shares one Condition with all its vCPU threads; every field that
says what a thread should do or is doing changes under it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping

from postcopy.linux.kvm import KvmError, KvmVcpu
from postcopy.linux.kvm_abi import (
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    IoDirection,
    IoExit,
    MmioExit,
    ShutdownExit,
)
from postcopy.vm.layout import (
    CONSOLE_LINE_STATUS_PORT,
    CONSOLE_LINE_STATUS_READY,
    CONSOLE_PORT,
    DONE_PORT,
    IMAGE_LOAD_ADDRESS,
)

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
CONSOLE_FLUSH_BYTES = 4096
CONSOLE_FLUSH_SECONDS = 0.05


class VcpuState(enum.Enum):
    STARTING = "starting"
    PARKED = "parked"
    RUNNING = "running"
    DONE = "done"  # the guest said so (OUT to DONE_PORT); the thread has ended
    FAILED = "failed"  # triple fault, internal error, or a KVM_RUN error; thread ended
    EXITED = "exited"  # asked to quit (close)


class Outcome(enum.Enum):
    PARK = "park"
    DONE = "done"
    FAILED = "failed"


# Called under the shared condition when a thread reaches DONE or FAILED; returns the
# events to emit once the lock is released: (index, state, detail) -> [(event, data)].
StateHook = Callable[[int, VcpuState, str], list[tuple[str, dict[str, object]]]]
EventSink = Callable[[str, dict[str, object]], None]
ConsoleSink = Callable[[int, bytes], None]
# A device's port handler: gets the exit (on the vCPU's own thread, which may read the
# vCPU's registers), returns the bytes an IN reads (ignored for an OUT).
PortHandler = Callable[[KvmVcpu, IoExit], bytes]


class VcpuThread:
    """Runs one KvmVcpu on its own thread. Methods named request_* need the condition held."""

    def __init__(
        self,
        vcpu: KvmVcpu,
        condition: threading.Condition,
        *,
        console: ConsoleSink,
        on_final_state: StateHook,
        emit: EventSink,
        ports: Mapping[int, PortHandler] | None = None,
    ) -> None:
        self.vcpu = vcpu
        self._ports = dict(ports or {})
        self.index = vcpu.index
        self._condition = condition
        self._console = console
        self._on_final_state = on_final_state
        self._emit = emit
        self.state = VcpuState.STARTING
        self.detail = ""
        self.native_id = 0
        self._ident = 0
        self._go = False
        self._quit = False
        self._pending_console = bytearray()
        self._console_since = 0.0  # when the oldest pending byte came
        # the vCPU thread appends and passes on; flush_stale_console() passes on too
        self._console_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    # -- control (owner side) ----------------------------------------------------------

    def start(self) -> None:
        """Start the thread (parked) and wait until it is ready to run."""
        # The thread inherits this mask: the kick is blocked before its first instruction.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, [KICK_SIGNAL])
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        with self._condition:
            self._condition.wait_for(lambda: self.state is not VcpuState.STARTING)

    @property
    def is_current_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def request_run(self) -> None:
        # A thread still RUNNING was asked to park and has not managed yet (a vCPU waiting
        # for a missing page-table page cannot be kicked): it keeps running instead.
        if self.state in (VcpuState.PARKED, VcpuState.RUNNING):
            self._go = True
            self._condition.notify_all()

    def request_park(self) -> None:
        self._go = False
        self.vcpu.immediate_exit = True
        if self.state is VcpuState.RUNNING:
            self._kick()

    def request_quit(self) -> None:
        self._quit = True
        self.request_park()
        self._condition.notify_all()

    def mark_done(self) -> None:
        """Make a parked vCPU done without running it (state loaded from a done vCPU)."""
        if self.state is not VcpuState.PARKED:
            raise RuntimeError(f"vCPU {self.index} is {self.state.value}, not parked")
        self.state = VcpuState.DONE
        self._quit = True
        self._condition.notify_all()

    def _kick(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the thread has just ended
            signal.pthread_kill(self._ident, KICK_SIGNAL)

    @property
    def active(self) -> bool:
        return self.state is VcpuState.RUNNING

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread --------------------------------------------------------------------

    def _main(self) -> None:
        self.native_id = threading.get_native_id()
        self._ident = threading.get_ident()
        events: list[tuple[str, dict[str, object]]] = []
        try:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            self.vcpu.set_signal_mask(s for s in blocked if s != KICK_SIGNAL)
            with self._condition:
                self.state = VcpuState.PARKED
                self._condition.notify_all()
            while True:
                with self._condition:
                    self._condition.wait_for(lambda: self._go or self._quit)
                    if self._quit:
                        return
                    self.vcpu.immediate_exit = False
                    self.state = VcpuState.RUNNING
                outcome, detail = self._run()
                if outcome is not Outcome.FAILED:
                    self._complete_pending_io()
                self._flush_console()
                with self._condition:
                    if outcome is Outcome.PARK:
                        self.state = VcpuState.PARKED
                    else:
                        self.state = VcpuState.DONE if outcome is Outcome.DONE else VcpuState.FAILED
                        self.detail = detail
                        events = self._on_final_state(self.index, self.state, detail)
                    self._condition.notify_all()
                if outcome is not Outcome.PARK:
                    return
        except BaseException as error:  # a dying vCPU must still report
            log.exception("vCPU %d thread failed", self.index)
            with self._condition:
                self.state = VcpuState.FAILED
                self.detail = f"{type(error).__name__}: {error}"
                events = self._on_final_state(self.index, self.state, self.detail)
                self._condition.notify_all()
        finally:
            with self._condition:
                if self.state in (VcpuState.STARTING, VcpuState.PARKED, VcpuState.RUNNING):
                    self.state = VcpuState.EXITED
                self._condition.notify_all()
            for event, data in events:
                self._emit(event, data)

    def _run(self) -> tuple[Outcome, str]:
        vcpu = self.vcpu
        while True:
            try:
                exit = vcpu.run()
            except KvmError as error:
                return Outcome.FAILED, str(error)
            if type(exit) is IoExit:
                if exit.direction is IoDirection.OUT:
                    if exit.port == CONSOLE_PORT:
                        self._console_out(exit.data[:: exit.size])
                    elif exit.port == DONE_PORT:
                        return Outcome.DONE, ""
                    elif (handler := self._ports.get(exit.port)) is not None:
                        handler(vcpu, exit)
                elif (handler := self._ports.get(exit.port)) is not None:
                    vcpu.write_io_data(exit, handler(vcpu, exit))
                else:
                    vcpu.write_io_data(exit, self._in_data(exit.port, exit.size * exit.count))
            elif type(exit) is IntrExit:
                self._eat_kicks()
                if self._go:
                    self._resume_after_kick()
            else:
                self._flush_console()
                return Outcome.FAILED, f"vCPU {self.index}: {describe_exit(exit, vcpu)}"
            if not self._go:
                return Outcome.PARK, ""

    def _resume_after_kick(self) -> None:
        # A park request was withdrawn (cont() after a stop() that timed out): take back
        # its immediate_exit, under the lock so that a new park request cannot be lost.
        with self._condition:
            if self._go:
                self.vcpu.immediate_exit = False

    @staticmethod
    def _in_data(port: int, length: int) -> bytes:
        if port == CONSOLE_LINE_STATUS_PORT:
            return bytes([CONSOLE_LINE_STATUS_READY]) * length
        return b"\xff" * length

    def _complete_pending_io(self) -> None:
        # KVM_RUN with immediate_exit finishes an I/O instruction KVM still holds and
        # returns EINTR at once: saved registers are then those after the instruction.
        self.vcpu.immediate_exit = True
        exit = self.vcpu.run()
        if type(exit) is not IntrExit:
            log.warning("vCPU %d: completing I/O gave %s", self.index, exit)
        self._eat_kicks()

    def _eat_kicks(self) -> None:
        while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
            pass

    def _console_out(self, data: bytes) -> None:
        """Bytes are passed on in batches (a line, or what came within CONSOLE_FLUSH_SECONDS):
        a byte per OUT would cost the console consumer a call each."""
        with self._console_lock:
            if not self._pending_console:
                self._console_since = time.monotonic()
            self._pending_console += data
            if (
                b"\n" in data
                or len(self._pending_console) >= CONSOLE_FLUSH_BYTES
                or time.monotonic() - self._console_since >= CONSOLE_FLUSH_SECONDS
            ):
                self._pass_on_console()

    def _flush_console(self) -> None:
        with self._console_lock:
            self._pass_on_console()

    def flush_stale_console(self, max_age: float = CONSOLE_FLUSH_SECONDS) -> None:
        """From any thread: pass on bytes that waited `max_age` for more. A guest that
        prints once and then computes (memtouch's 'A', a 'B' per pass) would otherwise be
        shown only at its next byte, seconds later or never."""
        with self._console_lock:
            if self._pending_console and time.monotonic() - self._console_since >= max_age:
                self._pass_on_console()

    def _pass_on_console(self) -> None:
        if self._pending_console:
            data = bytes(self._pending_console)
            self._pending_console.clear()
            try:
                self._console(self.index, data)
            except Exception:  # a console consumer must not kill the vCPU
                log.exception("console callback failed")


def describe_exit(exit: Exit, vcpu: KvmVcpu) -> str:
    """Why a vCPU stopped for good, in the guest author's terms, with where it was."""
    try:
        rip = vcpu.get_regs().rip
        cpl = vcpu.get_sregs().cs.selector & 3
        where = f"at RIP {rip:#x} (CPL{cpl})"
    except KvmError:
        where = "(its registers could not be read)"
    if isinstance(exit, ShutdownExit):
        return (
            f"the guest triple-faulted {where}: any exception does (there is no IDT); "
            f"check that the image is a flat binary linked at {IMAGE_LOAD_ADDRESS:#x} "
            "that keeps to the guest ABI (README, `The guest ABI`)"
        )
    if isinstance(exit, HltExit):
        return (
            f"the guest executed HLT {where}; a guest that is done writes to port "
            f"{DONE_PORT:#x} in a loop (the guest ABI)"
        )
    if isinstance(exit, MmioExit):
        access = "wrote" if exit.is_write else "read"
        return (
            f"the guest {access} guest physical {exit.phys_addr:#x} {where}, outside its RAM "
            "(there are no devices besides the console port)"
        )
    if isinstance(exit, InternalErrorExit):
        return f"KVM reported an internal error (suberror {exit.suberror}) {where}"
    if isinstance(exit, FailEntryExit):
        return (
            "KVM could not enter the guest (hardware entry failure reason "
            f"{exit.hardware_entry_failure_reason:#x}) {where}"
        )
    reason = getattr(exit.reason, "name", exit.reason)
    return f"the guest stopped with KVM exit {reason} {where}, which this VM does not handle"
