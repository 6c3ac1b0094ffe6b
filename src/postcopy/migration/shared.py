"""Other processes that map the guest's RAM, served by the destination's postcopy.

A vhost-user backend maps guest RAM too (a memfd shared with the VM). In postcopy its
accesses to pages that have not arrived must wait like a vCPU's, and it must be woken
when they arrive: QEMU's postcopy_register_shared_ufd, postcopy_request_shared_page and
postcopy_notify_shared_wake (migration/postcopy-ram.c). The client opens its own
userfaultfd, registers its mapping MISSING (or MISSING|MINOR in minor-fault mode) and
hands the fd over (vm/memshare.py carries it over a Unix socket with SCM_RIGHTS).

`SharedClients` holds them. The destination's fault thread polls their userfaultfds next
to its own: a fault on a page already here is resolved at once (UFFDIO_WAKE, or CONTINUE
into the client's mapping in minor mode); any other becomes a page request, exactly like
a vCPU's. After every placed run `placed` wakes each client on that range: a UFFDIO_COPY
on our mapping fills the shared page cache but wakes only our own waiters.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from postcopy.linux.memory import EventFd
from postcopy.linux.userfaultfd import PageExistsError, UffdError, UserfaultFd
from postcopy.ram import RamBlock

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SharedClient:
    """One process mapping guest RAM with its own userfaultfd (vhost-user's backend).

    `bases[i]` is where the client mapped block i (None: it does not map it); `minor`:
    its mapping is registered MISSING|MINOR, so placed pages are CONTINUEd into it."""

    name: str
    uffd: UserfaultFd
    bases: list[int | None]
    page_sizes: list[int]
    lengths: list[int]
    minor: bool = False
    faults: int = 0
    wakes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fileno(self) -> int:
        return self.uffd.fileno()

    def locate(self, address: int) -> tuple[int, int] | None:
        """(block index, page) of an address in the client's mappings, or None."""
        for index, base in enumerate(self.bases):
            if base is not None and base <= address < base + self.lengths[index]:
                return index, (address - base) // self.page_sizes[index]
        return None

    def wake(self, block_index: int, first_page: int, count: int) -> None:
        """The pages are placed: let the client's waiters (if any) see them."""
        base = self.bases[block_index]
        if base is None:
            return
        size = self.page_sizes[block_index]
        start, length = base + first_page * size, count * size
        with self._lock:
            self.wakes += 1
        try:
            if self.minor:
                self._continue(start, length, size)
            else:
                self.uffd.wake(start, length)
        except UffdError as error:
            # a client that went away (its fd is still ours): nothing waits there any more
            log.debug("waking shared client %s: %s", self.name, error)

    def _continue(self, start: int, length: int, size: int) -> None:
        done = 0
        while done < length:
            try:
                done += self.uffd.continue_(start + done, length - done)
            except PageExistsError as error:
                # already mapped in the client: wake whoever waits on it, go on
                self.uffd.wake(start + done + error.done, size)
                done += error.done + size

    def close(self) -> None:
        self.uffd.close()


class SharedClients:
    """The processes sharing one VM's RAM; any thread may add, the fault thread reads."""

    def __init__(self, ram: list[RamBlock]) -> None:
        self._ram = ram
        self._clients: list[SharedClient] = []
        self._end_listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.changed = (
            EventFd()
        )  # written when a client joins or leaves (the fault thread polls it)

    def add(
        self, name: str, uffd: UserfaultFd, bases: list[int | None], *, minor: bool = False
    ) -> SharedClient:
        if len(bases) != len(self._ram):
            raise ValueError(f"{len(bases)} mapping bases for {len(self._ram)} RAM blocks")
        client = SharedClient(
            name,
            uffd,
            list(bases),
            [block.page_size for block in self._ram],
            [block.length for block in self._ram],
            minor,
        )
        with self._lock:
            self._clients.append(client)
        self._notify()
        return client

    def remove(self, client: SharedClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        self._notify()
        client.close()

    def _notify(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.changed.write(1)

    def clients(self) -> list[SharedClient]:
        with self._lock:
            return list(self._clients)

    def placed(self, block_index: int, first_page: int, count: int) -> None:
        """Called after every placed run (postcopy_notify_shared_wake)."""
        for client in self.clients():
            client.wake(block_index, first_page, count)

    def on_end(self, listener: Callable[[], None]) -> None:
        """Call `listener` when an incoming migration has ended (after `end`)."""
        self._end_listeners.append(listener)

    def end(self) -> None:
        """The incoming migration is over and every page is here: unregister the clients'
        ranges through their userfaultfds (UFFDIO_UNREGISTER acts on the fd's own process,
        and wakes what still waits there), then tell their listeners (QEMU's INBOUND_END)."""
        for client in self.clients():
            for index, base in enumerate(client.bases):
                if base is not None:
                    with contextlib.suppress(OSError):
                        client.uffd.unregister(base, client.lengths[index])
        for listener in self._end_listeners:
            listener()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(OSError):
                client.close()
        self.changed.close()
