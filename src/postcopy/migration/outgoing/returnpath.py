"""The source's return path: the reader of the destination's messages.

Owns `ReturnPath` (QEMU's source_return_path_thread): the `return-path` thread reads the
destination's stream on the main connection: REQ_PAGES (checked, then handed to the page
service), PONG (recorded with its arrival time, waited on by the migration thread), SHUT
(the destination finished or gave up). It runs SCHED_FIFO: it is one of the three hops of
a page request. Before the switchover a broken return path ends the migration, and
says what our socket saw (failures.py): a reset connection is not the destination giving
up; from then on `on_broken` decides (recovery pauses). Each connection has its own
thread, tagged with the connection's generation (recovery.py); on a recovery connection
it also takes RECV_BITMAP and RESUME_ACK (handed to `on_recovery`), and a SHUT with an
error there is the destination refusing to resume. `last_heard` is when any message last
came (the heartbeat's evidence that the destination is alive).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from postcopy.migration import failures
from postcopy.migration.channel import StreamReader
from postcopy.migration.outgoing.errors import Cancelled, MigrationError
from postcopy.migration.outgoing.pageservice import PageRequest
from postcopy.migration.recovery import HEARTBEAT_PING, HEARTBEAT_PONG
from postcopy.migration.scheduling import prefer_this_thread
from postcopy.migration.stats import Clock, RamCounters
from postcopy.migration.status import MigrationStatus, StatusHolder
from postcopy.ram import RamList
from postcopy.wire import Message, Pong, RecvBitmap, ReqPages, ResumeAck, Shut

log = logging.getLogger(__name__)


class ReturnPath:
    """What the destination said: page requests, pongs, its final word."""

    def __init__(
        self,
        ram: RamList,
        status: StatusHolder,
        counters: RamCounters,
        on_request: Callable[[PageRequest], None],
        clock: Clock,
    ) -> None:
        self._ram = ram
        self._block_pages = [block.pages for block in ram]  # a request's bounds
        self._status = status
        self._counters = counters
        self._on_request = on_request
        self._clock = clock
        self._pong = threading.Condition()
        self._pongs: dict[int, float] = {}
        self.shut: Shut | None = None  # the destination's own last word
        self.broken: str | None = None  # why the return path ended without one
        self._shut_event = threading.Event()  # either of the two
        self.last_heard: float | None = None
        self.on_broken: Callable[[BaseException, int], bool] = lambda error, generation: False
        self.on_recovery: Callable[[Message, int], None] | None = None
        self.on_pong: Callable[[int], None] = lambda value: None  # the push's backlog
        self._ended: dict[int, threading.Event] = {}

    def start(self, reader: StreamReader, generation: int = 0) -> None:
        ended = self._ended.setdefault(generation, threading.Event())
        threading.Thread(
            target=self._run, args=(reader, generation, ended), name="return-path", daemon=True
        ).start()

    def wait_ended(self, generation: int, timeout: float) -> None:
        """Wait (at most `timeout` s) until the thread of `generation` has stopped reading."""
        ended = self._ended.get(generation)
        if ended is not None:
            ended.wait(timeout)

    def has_pong(self, value: int) -> bool:
        return value in self._pongs

    def pong_time(self, value: int) -> float:
        """When the PONG for `value` arrived (after `wait_pong(value)`)."""
        return self._pongs[value]

    def failure(self) -> str | None:
        """What ended the migration on the destination's side, in the user's terms: its
        SHUT's reason, or why the return path broke (failures.py); None while all is well."""
        if not self._shut_event.is_set():
            return None
        shut = self.shut
        if shut is not None:
            return failures.destination_gave_up(shut.reason) if shut.error else None
        return self.broken

    def wait_failure_for(self, timeout: float) -> str | None:
        """`failure()` once the return path has ended, waiting up to `timeout` for it."""
        self._shut_event.wait(timeout)
        return self.failure()

    def wait_pong(self, value: int, check_cancel: Callable[[], None]) -> None:
        with self._pong:
            while value not in self._pongs:
                check_cancel()
                if self._shut_event.is_set():
                    raise MigrationError(
                        self.failure() or "the destination ended the migration early"
                    )
                self._pong.wait(0.1)

    def wait_shut(self, cancelled: Callable[[], bool], check: Callable[[], None]) -> Shut:
        """Wait for the destination's SHUT; `check` raises if the wait must end (e.g. the
        connection was given up)."""
        while not self._shut_event.wait(0.1):
            if cancelled():
                raise Cancelled("migration cancelled")
            check()
        if self.shut is None:
            raise MigrationError(self.broken or "the return path ended")
        return self.shut

    def _run(self, reader: StreamReader, generation: int, ended: threading.Event) -> None:
        prefer_this_thread()
        try:
            reader.read_stream_header()
            while True:
                message = reader.read()
                self.last_heard = heard = self._clock()
                if isinstance(message, ReqPages):
                    self._counters.postcopy_requests += 1  # this thread is its only writer
                    if self._status.value != MigrationStatus.POSTCOPY_ACTIVE:
                        raise MigrationError("destination requested pages before postcopy")
                    if message.first_page + message.page_count > self._block_pages[message.block]:
                        name = self._ram[message.block].name
                        raise MigrationError(f"page request outside block {name!r}")
                    self._on_request(
                        PageRequest(message.block, message.first_page, message.page_count, heard)
                    )
                elif isinstance(message, Pong):
                    if message.value == HEARTBEAT_PONG or message.value & HEARTBEAT_PING:
                        continue  # a heartbeat: `last_heard` is all it is for
                    with self._pong:
                        self._pongs[message.value] = self._clock()
                        self._pong.notify_all()
                    self.on_pong(message.value)
                elif isinstance(message, RecvBitmap | ResumeAck) and self.on_recovery:
                    self.on_recovery(message, generation)
                elif isinstance(message, Shut) and message.error and generation > 0:
                    raise MigrationError(f"the destination refused to resume: {message.reason}")
                elif isinstance(message, Shut):
                    self.shut = message
                    self._shut_event.set()
                    if message.error:
                        log.error("destination gave up: %s", message.reason)
                    return
                else:
                    raise MigrationError(f"unexpected {type(message).__name__} on the return path")
        except Exception as error:
            if self.on_broken(error, generation):
                return  # paused: a recovery will start another thread
            if self.shut is None:
                self.broken = failures.return_path_broken(error)
                self._shut_event.set()
                with self._pong:
                    self._pong.notify_all()
        finally:
            ended.set()
