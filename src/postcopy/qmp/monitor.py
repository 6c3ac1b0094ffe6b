"""The VM process's QMP commands: QEMU's run-state and migration commands, with QEMU's names.

This is the glue of the top layer: it owns the micro-VM, the current migration (outgoing
or incoming) and the QMP server, and maps each command onto them. QMP events: STOP,
RESUME, SHUTDOWN from the VM; MIGRATION and MIGRATION_PASS from the migration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from postcopy.migration.incoming import IncomingMigration
from postcopy.migration.outgoing import MigrationError, OutgoingMigration
from postcopy.migration.parameters import Capabilities, ParameterError, Parameters
from postcopy.migration.shared import SharedClients
from postcopy.migration.status import FINISHED, POSTCOPY, MigrationStatus
from postcopy.qmp.errors import QmpError
from postcopy.qmp.recovery import migrate_resume, register_recovery_commands
from postcopy.qmp.server import QmpServer
from postcopy.transport import (
    AuthConfig,
    KeyFileError,
    TlsClientConfig,
    TlsServerConfig,
    UriError,
    parse_uri,
)
from postcopy.vm.guests import GUESTS
from postcopy.vm.machine import MicroVM, RunState
from postcopy.vm.verify import ram_digest, verify

log = logging.getLogger(__name__)


class VmMonitor:
    """Registers the VM's commands on `server` and runs migrations for it."""

    def __init__(
        self,
        vm: MicroVM,
        server: QmpServer,
        *,
        guest: str | None,
        guest_params: Sequence[int] = (),
        auth: AuthConfig | None = None,
        allow_insecure_network: bool = False,
        autostart: bool = True,
        tls_server: TlsServerConfig | None = None,
        tls_client: TlsClientConfig | None = None,
        trace_path: str | None = None,
        on_quit: Callable[[], None] | None = None,
        shared: SharedClients | None = None,
    ) -> None:
        self.vm = vm
        self.shared = shared  # processes sharing the VM's RAM (vm run --x-memory-socket)
        self.server = server
        self.guest = guest
        self.guest_params = list(guest_params)
        # named in the migration's Handshake: a destination expecting another guest refuses
        self.guest_identity = GUESTS[guest].identity(guest_params) if guest in GUESTS else ""
        self.auth = auth
        self.allow_insecure_network = allow_insecure_network
        self.tls_server = tls_server
        self.tls_client = tls_client
        self.autostart = autostart
        self.trace_path = trace_path
        self.parameters = Parameters()
        self.capabilities = Capabilities()
        self.capabilities.set("events", True)
        # the destination's page requests and its end travel on the return path: it is
        # always there, and the capability says so
        self.capabilities.set("return-path", True)
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self.incoming_done = threading.Event()
        self._on_quit = on_quit
        self._lock = threading.Lock()
        self._register()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.server.emit_event(name, data or None)

    def _register(self) -> None:
        register = self.server.register
        register("query-status", self.query_status)
        register("stop", self.stop)
        register("cont", self.cont)
        register("query-cpus-fast", self.query_cpus_fast)
        register(
            "migrate",
            self.migrate,
            args={"uri": str, "detach?": bool, "blk?": bool, "inc?": bool, "resume?": bool},
        )
        register(
            "migrate-incoming", self.migrate_incoming, args={"uri": str, "exit-on-error?": bool}
        )
        register("migrate_cancel", self.migrate_cancel)
        register_recovery_commands(self)
        register("migrate-start-postcopy", self.migrate_start_postcopy)
        register("query-migrate", self.query_migrate)
        register(
            "migrate-set-capabilities",
            self.migrate_set_capabilities,
            args={"capabilities": [{"capability": str, "state": bool}]},
        )
        register("query-migrate-capabilities", self.query_migrate_capabilities)
        register(
            "migrate-set-parameters",
            self.migrate_set_parameters,
            args={f"{name}?": type(value) for name, value in Parameters().query().items()},
        )
        register("query-migrate-parameters", self.query_migrate_parameters)
        register("x-verify", self.x_verify)
        register("x-console", self.x_console)
        register("x-migration-timeline", self.x_migration_timeline)
        register("x-request-latency-samples", self.x_request_latency_samples)
        register("x-request-hops", self.x_request_hops)
        register("x-request-device", self.x_request_device)
        self.server.on_quit(self._quit)

    # -- run state -------------------------------------------------------------------------------

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.vm.status.value, "running": self.vm.running, "singlestep": False}

    def stop(self, args: dict[str, Any]) -> None:
        if self._postcopy_incoming_active():
            raise QmpError("the VM cannot be stopped while postcopy is still bringing its RAM")
        if self.vm.running:
            self.vm.stop()

    def cont(self, args: dict[str, Any]) -> None:
        if self.outgoing is not None and self.outgoing.postcopy_start is not None:
            raise QmpError(
                "the VM has moved to the destination by postcopy; "
                "its state here is stale and cannot resume"
            )
        if (
            self.incoming is not None
            and not self.incoming.finished
            and self.incoming.postcopy_start is None
        ):
            raise QmpError("the VM is waiting for an incoming migration")
        if self.outgoing is not None and self.outgoing.status.value == MigrationStatus.COMPLETED:
            raise QmpError("the VM has migrated away; its state here is stale")
        if not self.vm.running:
            self.vm.cont()

    def query_cpus_fast(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "cpu-index": index,
                "thread-id": tid,
                "target": "x86_64",
                "qom-path": f"/machine/unattached/device[{index}]",
                "props": {"core-id": index},
            }
            for index, tid in enumerate(self.vm.vcpu_thread_ids())
        ]

    # -- migration ----------------------------------------------------------------------------

    def _migration_busy(self) -> bool:
        """A migration is moving data (an incoming one that still listens is not busy:
        QEMU lets capabilities be set on the destination until the source connects)."""
        if self.outgoing is not None and not self.outgoing.finished:
            return True
        return self.incoming is not None and self.incoming.status.value not in (
            FINISHED | {MigrationStatus.NONE}
        )

    def _postcopy_incoming_active(self) -> bool:
        return (
            self.incoming is not None
            and self.incoming.postcopy_start is not None
            and not self.incoming.finished
        )

    def migrate(self, args: dict[str, Any]) -> None:
        if args.get("resume"):
            migrate_resume(self, args["uri"])
            return
        if args.get("blk") or args.get("inc"):
            raise QmpError("block migration is not supported")
        try:
            parse_uri(args["uri"])  # QEMU refuses a bad URI at once, not once it fails
        except UriError as error:
            raise QmpError(f"Parameter 'uri' expects a valid migration URI: {error}") from None
        with self._lock:
            if self._migration_busy():
                raise QmpError("There's a migration process in progress")
            if self.incoming is not None and (
                self.incoming.status.value != MigrationStatus.COMPLETED
            ):
                # A VM that arrived by migration is a VM like any other once its incoming
                # migration has completed: it can move on (chains A -> B -> C).
                raise QmpError("Guest is waiting for an incoming migration")
            if self.vm.status in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
                raise QmpError(f"the VM is in state {self.vm.status} and cannot migrate")
            auth = self.auth
            if self.parameters.x_key_file:
                try:
                    auth = AuthConfig.from_file(self.parameters.x_key_file)
                except KeyFileError as error:  # missing, unreadable, readable by others
                    raise QmpError(str(error)) from None
            tls = self.tls_client
            if tls is not None and self.parameters.tls_hostname:
                tls = dataclasses.replace(tls, server_hostname=self.parameters.tls_hostname)
            migration = OutgoingMigration(
                self.vm,
                args["uri"],
                parameters=self.parameters,
                capabilities=self.capabilities,
                on_event=self.emit,
                auth=auth,
                tls=tls,
                guest=self.guest_identity,
                on_completed=self.vm.mark_postmigrate,
            )
            self.outgoing = migration
            migration.start()
        threading.Thread(target=self._watch_outgoing, args=(migration,), daemon=True).start()

    def migrate_incoming(self, args: dict[str, Any]) -> None:
        self.start_incoming(args["uri"], exit_on_error=args.get("exit-on-error", True))

    def start_incoming(self, uri: str, *, exit_on_error: bool = True) -> IncomingMigration:
        """Wait for a source on `uri`. Peers that fail the handshake are dropped and
        counted; a failure after it ends the process if `exit_on_error` (QEMU 9.1's
        migrate-incoming argument, true by default and for --incoming), else leaves it
        up with the migration failed and the reason in query-migrate."""
        with self._lock:
            if self.incoming is not None:
                raise QmpError("The incoming migration has already been started")
            if self.vm.status != RunState.INMIGRATE:
                raise QmpError(
                    "migrate-incoming is only allowed on a VM started with --incoming defer"
                )
            try:
                migration = IncomingMigration(
                    self.vm,
                    uri,
                    parameters=self.parameters,
                    capabilities=self.capabilities,
                    on_event=self.emit,
                    auth=self.auth,
                    tls=self.tls_server,
                    allow_insecure_network=self.allow_insecure_network,
                    autostart=self.autostart,
                    exit_on_error=exit_on_error,
                    shared=self.shared,
                    guest=self.guest_identity,
                    # an incoming VM's anonymous RAM: nothing wrote it since it was made
                    ram_zero=all(b.mapping.kind == "anonymous" for b in self.vm.ram),
                )
                migration.start()
            except Exception as error:
                raise QmpError(str(error)) from error
            self.incoming = migration
        threading.Thread(target=self._watch_incoming, args=(migration,), daemon=True).start()
        return migration

    def _watch_incoming(self, migration: IncomingMigration) -> None:
        migration.join()
        try:
            if self.trace_path:
                self._write_trace(migration.timeline, migration.query())
        finally:
            self.incoming_done.set()

    def _watch_outgoing(self, migration: OutgoingMigration) -> None:
        migration.join()
        if self.trace_path:
            self._write_trace(migration.timeline, migration.query())

    def _write_trace(self, timeline: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Append the run to the trace file, whole or not at all: a full disk or a file
        that cannot be written costs the trace (one line says so), never the migration,
        and leaves no half run for a reader to trip on."""
        assert self.trace_path is not None
        path = Path(self.trace_path)
        text = "".join(json.dumps(entry) + "\n" for entry in timeline)
        text += json.dumps({"event": "summary", **summary}) + "\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                data = memoryview(text.encode())
                try:
                    while data:
                        data = data[os.write(fd, data) :]
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        except OSError as error:
            reason = error.strerror or str(error)
            name = errno.errorcode.get(error.errno or 0)
            log.error(
                "the migration's trace was not written to %s: %s%s",
                path,
                reason,
                f" ({name})" if name else "",
            )

    def migrate_cancel(self, args: dict[str, Any]) -> None:
        if self.outgoing is not None:
            if self.outgoing.status.value in POSTCOPY:
                raise QmpError("Postcopy migration in progress, cannot cancel.")
            self.outgoing.cancel()

    def migrate_start_postcopy(self, args: dict[str, Any]) -> None:
        if self.outgoing is None:
            raise QmpError("Postcopy must be started after migration has been started")
        try:
            self.outgoing.start_postcopy()
        except MigrationError as error:
            raise QmpError(str(error)) from error

    @property
    def migration(self) -> IncomingMigration | OutgoingMigration | None:
        """The latest migration: an outgoing one can only start once the incoming one
        (if any) has completed, so it is the more recent of the two."""
        return self.outgoing or self.incoming

    def query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        migration = self.migration
        return migration.query() if migration is not None else {}

    def migrate_set_capabilities(self, args: dict[str, Any]) -> None:
        if self._migration_busy():
            raise QmpError("There's a migration process in progress")
        staged = Capabilities(dict(self.capabilities.enabled))
        try:
            for entry in args["capabilities"]:
                staged.set(entry["capability"], entry["state"])
        except ParameterError as error:
            raise QmpError(str(error)) from error
        if not staged["return-path"]:
            raise QmpError(
                "the return path is always on here (page requests and the destination's "
                "end travel on it); it cannot be turned off"
            )
        if staged["postcopy-preempt"] and not staged["postcopy-ram"]:
            raise QmpError("Postcopy preempt requires postcopy-ram")
        self.capabilities.enabled = staged.enabled

    def query_migrate_capabilities(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.capabilities.query()

    def migrate_set_parameters(self, args: dict[str, Any]) -> None:
        staged = Parameters(**vars(self.parameters))
        try:
            for name, value in args.items():
                staged.set(name, value)
        except ParameterError as error:
            raise QmpError(str(error)) from error
        for name, value in vars(staged).items():
            setattr(self.parameters, name, value)

    def query_migrate_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.parameters.query()

    # -- our own ------------------------------------------------------------------------------

    def x_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check the guest's memory; only on a stopped VM whose RAM is all present. A guest
        of one's own (--guest-image) has no verifier: the answer is the digest of its RAM,
        for comparing the source's with the destination's."""
        if self.vm.running:
            raise QmpError("x-verify needs a stopped VM: run 'stop' first")
        if self.incoming is not None and self.incoming.status.value != MigrationStatus.COMPLETED:
            raise QmpError(
                "x-verify needs the incoming migration to be completed "
                f"(status {self.incoming.status.value.value})"
            )
        block = self.vm.ram[0]
        if self.guest is None:
            return {
                "detail": "a guest of its own has no verifier: compare this digest of its "
                "RAM with the other side's",
                "digest": ram_digest(block.view),
            }
        result = verify(self.guest, block.view, block.length, self.vm.vcpu_count, self.guest_params)
        return {"ok": result.ok, "detail": result.detail, "digest": result.digest}

    def x_console(self, args: dict[str, Any]) -> dict[str, Any]:
        tail = self.vm.console_tail
        return {"bytes": self.vm.console_bytes, "tail": tail[-200:].decode("latin-1")}

    def x_migration_timeline(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        migration = self.migration
        return list(migration.timeline) if migration is not None else []

    # Added by the CLI helper for `postcopy report`'s latency histogram.
    LATENCY_SAMPLES_MAX = 50_000

    def x_request_latency_samples(self, args: dict[str, Any]) -> dict[str, Any]:
        """The destination's request latencies (fault read to page placed) in µs, one per
        requested page; evenly thinned to at most LATENCY_SAMPLES_MAX so the answer stays
        well inside a QMP client's read limit (qemu.qmp: 10 MB)."""
        if self.incoming is None:
            return {"us": [], "count": 0}
        samples = self.incoming.latency.samples()
        count = int(samples.size)
        if count > self.LATENCY_SAMPLES_MAX:
            samples = samples[:: -(-count // self.LATENCY_SAMPLES_MAX)]
        return {"us": [round(value * 1e6, 1) for value in samples.tolist()], "count": count}

    def x_request_hops(self, args: dict[str, Any]) -> dict[str, Any]:
        """Both roles' page-request hop logs (migration/hops.py): `outgoing` as a source,
        `incoming` as a destination; each {requests, placed, served} as columns, and the
        destination's vCPU waits (`waits`, migration/stats.py BlocktimeTracker)."""
        return {
            "outgoing": self.outgoing.hops.as_qmp() if self.outgoing is not None else None,
            "incoming": (
                {**self.incoming.hops.as_qmp(), "waits": self.incoming.blocktime.wait_log()}
                if self.incoming is not None
                else None
            ),
        }

    def x_request_device(self, args: dict[str, Any]) -> dict[str, Any]:
        """The request device's state and counters (postcopy.vm.requestdev)."""
        stats: list[dict[str, Any]] = [
            getattr(device, "stats", dict)() for device in self.vm.devices
        ]
        if not stats:
            raise QmpError("this VM has no request device (start it with --service)")
        return dict(stats[0])

    def _quit(self) -> None:
        if self._on_quit is not None:
            self._on_quit()

    def finished(self) -> bool:
        migration = self.migration
        return migration is None or migration.status.value in FINISHED
