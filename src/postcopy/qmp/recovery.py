"""The VM's postcopy recovery commands, with QEMU's names, preconditions and error texts.

- `migrate-pause` (either side, in postcopy-active or postcopy-recover): pause now, as if
  the link had broken ("Postcopy migration is paused by the user" in error-desc).
- `migrate-recover {uri}` (destination, while paused): accept the source's reconnect on
  `uri` (QEMU: "Migrate recover can only be run when postcopy is paused."). Our
  destination also keeps accepting on the URI it listened on, so the source may
  reconnect there without it.
- `migrate {uri, resume: true}` (source, while paused): reconnect and resume (QEMU:
  "Cannot resume if there is no paused migration").

They never touch guest RAM and never wait for a migration thread: a vCPU, the receiver or
the fault thread may be blocked on a missing page while they run. QEMU runs them
out-of-band for that reason; here every QMP client has its own thread, and these handlers
only set state and shut sockets down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from postcopy.migration.incoming import IncomingError
from postcopy.migration.outgoing import MigrationError
from postcopy.migration.status import MigrationStatus
from postcopy.qmp.errors import QmpError
from postcopy.transport.errors import TransportError

if TYPE_CHECKING:
    from postcopy.qmp.monitor import VmMonitor

S = MigrationStatus
ALIVE = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER})


def register_recovery_commands(monitor: VmMonitor) -> None:
    monitor.server.register("migrate-pause", lambda args: migrate_pause(monitor, args))
    monitor.server.register(
        "migrate-recover", lambda args: migrate_recover(monitor, args), args={"uri": str}
    )


def migrate_pause(monitor: VmMonitor, args: dict[str, Any]) -> None:
    outgoing, incoming = monitor.outgoing, monitor.incoming
    try:
        if outgoing is not None and outgoing.status.value in ALIVE:
            outgoing.recovery.pause_by_user()
            return
        if (
            incoming is not None
            and incoming.recovery is not None
            and incoming.status.value in ALIVE
        ):
            incoming.recovery.pause_by_user()
            return
    except (MigrationError, IncomingError) as error:
        raise QmpError(str(error)) from error
    raise QmpError(
        "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
    )


def migrate_recover(monitor: VmMonitor, args: dict[str, Any]) -> dict[str, Any]:
    incoming = monitor.incoming
    if incoming is None or incoming.recovery is None or incoming.status.value != S.POSTCOPY_PAUSED:
        raise QmpError("Migrate recover can only be run when postcopy is paused.")
    try:
        incoming.recovery.listen_on(args["uri"])
    except (IncomingError, TransportError, OSError) as error:
        raise QmpError(str(error)) from error
    return {}


def migrate_resume(monitor: VmMonitor, uri: str) -> None:
    """`migrate {uri, resume: true}`."""
    outgoing = monitor.outgoing
    if outgoing is None or outgoing.status.value != S.POSTCOPY_PAUSED:
        raise QmpError("Cannot resume if there is no paused migration")
    try:
        outgoing.recovery.resume(uri)
    except MigrationError as error:
        raise QmpError(str(error)) from error
