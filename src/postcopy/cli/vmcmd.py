"""`postcopy vm run`: one micro-VM process with its QMP server, source or destination.

    postcopy vm run --guest memtouch --ram 1G --vcpus 2 --qmp /tmp/src.sock
    postcopy vm run --guest memtouch --ram 1G --vcpus 2 --qmp /tmp/dst.sock \\
        --incoming tcp:127.0.0.1:4444
    postcopy vm run --guest memtouch --ram 1G --memory-backend memfd-hugetlb --qmp /tmp/h.sock

When its QMP socket accepts (and a destination listens for the migration), it prints one
line on stdout, `postcopy vm run: ready (PID N): QMP PATH, ...`, and writes its PID to
--pidfile if given. The process lives until QMP `quit`, SIGTERM or Ctrl-C. A destination
whose incoming migration fails exits with status 1 and the reason on stderr, freeing its
RAM (QEMU's exit-on-error; `migrate-incoming` can say false). Peers that fail the
handshake before that (a port scan, garbage, a wrong key) are dropped with one line each,
and the destination keeps waiting for its source. A side told to quit in postcopy (the
guest runs on the destination, part of its RAM is only on the source) says that the guest
is lost and exits with status 1 (QEMU exits 0). A guest that stops for good (a triple
fault, say) leaves the VM in `internal-error`, with the reason on stderr, for QMP to
inspect.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postcopy.units import parse_size

SWITCH_INTERVAL = 0.0002  # seconds
# told to quit, the process ends within this even if a thread of its teardown is stuck (QEMU
# quits promptly in every state; a supervisor's grace, vmchild.STOP_TIMEOUT, is 10 s)
TEARDOWN_SECONDS = 6.0
VERBOSE_LOG = "%(asctime)s %(name)s: %(message)s"


def add_parser(subparsers: Any) -> None:
    vm = subparsers.add_parser("vm", help="run a micro-VM (source or migration destination)")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    run = vm_sub.add_parser("run", help="start a micro-VM with a QMP server")
    guest = run.add_mutually_exclusive_group(required=True)
    guest.add_argument("--guest", help="built-in guest: memtouch, randwrite, scan")
    guest.add_argument("--guest-image", type=Path, help="a flat binary in the guest ABI")
    run.add_argument(
        "--guest-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a built-in guest's parameter (see `postcopy vm guests`)",
    )
    run.add_argument("--ram", default="256M", help="RAM size, e.g. 256M, 1G (default 256M)")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument(
        "--memory-backend",
        default="ram",
        metavar="BACKEND",
        help="what RAM is made of, as QEMU's memory backends: ram (anonymous memory, the "
        "default), memfd, memfd-hugetlb (2 MiB pages from the huge page pool), or file:PATH "
        "(a file, or a new file in the directory PATH, e.g. a hugetlbfs mount)",
    )
    run.add_argument(
        "--x-memory-socket",
        type=Path,
        metavar="PATH",
        help="experimental: share the VM's memfd RAM with other processes on this Unix socket "
        "(they map it and hand over a userfaultfd, as a vhost-user backend does; see "
        "postcopy.vm.memshare)",
    )
    run.add_argument(
        "--share",
        nargs="?",
        const="on",
        choices=("on", "off"),
        help="QEMU's share=on|off: map RAM shared (default: on for memfd backends, else off)",
    )
    run.add_argument(
        "--mem-prealloc",
        action="store_true",
        help="QEMU's -mem-prealloc (prealloc=on): populate all guest RAM at start-up, so "
        "that neither the guest nor an incoming migration waits for the host to back it "
        "(on a destination with postcopy-ram only anonymous RAM stays populated: other "
        "backends are emptied at the postcopy advise, as in QEMU)",
    )
    run.add_argument(
        "--guest-cpl",
        type=int,
        choices=(0, 3),
        default=3,
        help="privilege level the guest runs at (default 3, native here; 0 is "
        "emulated on this host's PVM, like QEMU's own test guest: slow)",
    )
    run.add_argument("--qmp", required=True, help="path of the QMP Unix socket to create")
    run.add_argument(
        "--incoming",
        metavar="URI",
        help="wait for a migration on tcp:HOST:PORT or unix:PATH, or 'defer' "
        "to wait for QMP migrate-incoming",
    )
    run.add_argument("--key", type=Path, help="authentication key file (both sides)")
    run.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="TLS certificate of this VM as a migration destination",
    )
    run.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    run.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="CA that signs the peer's certificate: as a source, migrate over "
        "TLS to destinations it signed; as a destination with "
        "--tls-verify-client, accept only sources it signed",
    )
    run.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="as a destination, require a client certificate (with --tls-ca)",
    )
    run.add_argument(
        "--allow-insecure-network",
        action="store_true",
        help="listen on a network address without a key",
    )
    run.add_argument(
        "--migrate-capability",
        action="append",
        default=[],
        metavar="NAME",
        help="enable a migration capability at start (as migrate-set-capabilities)",
    )
    run.add_argument(
        "-S",
        "--paused",
        action="store_true",
        help="do not start the guest (a destination stays paused after migration)",
    )
    run.add_argument(
        "--service",
        metavar="URI",
        help="give the VM a request device connected to the service front at URI "
        "(unix:PATH or tcp:HOST:PORT; see `postcopy service front`); a kvstore guest "
        "always has the device",
    )
    run.add_argument("--console", type=Path, help="append the guest's console output to FILE")
    run.add_argument("--trace", help="append the migration timeline as JSON lines to FILE")
    run.add_argument(
        "--pidfile",
        type=Path,
        metavar="FILE",
        help="write this process's PID to FILE once ready (removed when it exits)",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=run_vm)
    guests = vm_sub.add_parser("guests", help="list the built-in guests and their parameters")
    guests.set_defaults(func=list_guests)
    vm.set_defaults(func=lambda args: vm.print_help() or 2)


def list_guests(args: argparse.Namespace) -> int:
    from postcopy.vm.guests import GUESTS

    for info in GUESTS.values():
        print(f"{info.name}: {info.description}")
        print("  " + info.params_help().replace("\n", "\n  "))
        print(f"  console: {info.pass_help}")
    return 0


def _guest_params(args: argparse.Namespace) -> tuple[bytes, list[int], str | None]:
    from postcopy.vm.guests import GUESTS
    from postcopy.vm.layout import check_image

    if args.guest_image is not None:
        if args.guest_param:
            raise ValueError("--guest-param applies to built-in guests only")
        try:
            image = args.guest_image.read_bytes()
        except OSError as error:
            raise ValueError(f"--guest-image {args.guest_image}: {error.strerror}") from None
        try:
            check_image(image, [])
        except ValueError as error:
            raise ValueError(f"--guest-image {args.guest_image}: {error}") from None
        return image, [], None
    if args.guest not in GUESTS:
        raise ValueError(f'unknown guest "{args.guest}"; built-in guests: {", ".join(GUESTS)}')
    info = GUESTS[args.guest]
    values: dict[str, int] = {}
    for item in args.guest_param:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--guest-param {item}: expected NAME=VALUE")
        try:
            values[name] = int(value, 0)
        except ValueError:
            raise ValueError(
                f"--guest-param {item}: the value must be a number (e.g. 100000 or 0x1000)"
            ) from None
    try:
        return info.image, info.pack_params(values), info.name
    except KeyError as error:
        raise ValueError(f"--guest-param {error.args[0]}") from None


def _tls_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from postcopy.transport import TlsClientConfig, TlsServerConfig

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    server = None
    if args.tls_cert is not None:
        server = TlsServerConfig(
            args.tls_cert, args.tls_key, cafile=args.tls_ca, verify_client=args.tls_verify_client
        )
    elif args.tls_verify_client:
        raise ValueError("--tls-verify-client needs --tls-cert, --tls-key and --tls-ca")
    client = None
    if args.tls_ca is not None:
        client = TlsClientConfig(args.tls_ca, certfile=args.tls_cert, keyfile=args.tls_key)
    return server, client


def _check_capabilities(names: list[str]) -> None:
    from postcopy.migration.parameters import Capabilities, ParameterError

    staged = Capabilities()
    for name in names:
        try:
            staged.set(name, True)
        except ParameterError as error:
            raise ValueError(f"--migrate-capability {name}: {error}") from None


def ready_line(args: argparse.Namespace, pid: int) -> str:
    """The one line `vm run` prints when it is ready: what a script or a user waits for."""
    if args.incoming == "defer":
        state = "waiting for migrate-incoming"
    elif args.incoming:
        state = f"waiting for a migration on {args.incoming}"
    elif args.paused:
        state = "guest paused (-S: `cont` starts it)"
    else:
        state = "guest running"
    return f"postcopy vm run: ready (PID {pid}): QMP {args.qmp}, {state}"


def _write_pidfile(path: Path, pid: int) -> None:
    temporary = path.with_name(f".{path.name}.{pid}")
    temporary.write_text(f"{pid}\n")
    temporary.replace(path)


def _remove_pidfile(path: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(pid):
            path.unlink()


def run_vm(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s"
        if args.verbose
        else "postcopy vm run: %(message)s",
    )
    from postcopy.qmp.monitor import VmMonitor
    from postcopy.qmp.server import QmpServer
    from postcopy.ram import MemoryBackend
    from postcopy.transport import AuthConfig
    from postcopy.vm.layout import MAX_VCPUS, check_config
    from postcopy.vm.machine import MicroVM
    from postcopy.vm.requestdev import RequestDevice

    try:
        image, params, guest_name = _guest_params(args)
        devices = [RequestDevice(args.service)] if args.service or guest_name == "kvstore" else []
        if not 1 <= args.vcpus <= MAX_VCPUS:
            raise ValueError(f"--vcpus {args.vcpus}: a VM has 1 to {MAX_VCPUS} vCPUs")
        try:
            ram_size = parse_size(args.ram)
            check_config(ram_size, args.vcpus)
        except ValueError as error:
            raise ValueError(f"--ram {args.ram}: {error}") from None
        backend = MemoryBackend.parse(
            args.memory_backend,
            None if args.share is None else args.share == "on",
            prealloc=args.mem_prealloc,
        )
        if args.x_memory_socket is not None and (backend.kind == "ram" or not backend.shared):
            raise ValueError(
                "--x-memory-socket shares RAM with a file behind it: use --memory-backend "
                "memfd, memfd-hugetlb or file:PATH with --share on"
            )
        _check_capabilities(args.migrate_capability)
        auth = AuthConfig.from_file(args.key) if args.key else None
        tls_server, tls_client = _tls_configs(args)
    except (ValueError, OSError) as error:
        print(f"postcopy vm run: {error}", file=sys.stderr)
        return 2
    console_file = args.console.open("ab") if args.console else None

    def console(data: bytes) -> None:
        if console_file is not None:
            console_file.write(data)
            console_file.flush()

    # A Python thread keeps the GIL for up to the switch interval (5 ms by default) when
    # others wait for it: the fault thread must not wait that long behind the receiver.
    sys.setswitchinterval(SWITCH_INTERVAL)
    quit_event = threading.Event()
    server = QmpServer(args.qmp)
    try:
        vm = MicroVM(
            ram_size=ram_size,
            vcpus=args.vcpus,
            image=image,
            params=params,
            incoming=args.incoming is not None,
            cpl=args.guest_cpl,
            memory_backend=backend,
            console=console,
            on_event=lambda name, data: server.emit_event(name, data or None),
            devices=devices,
        )
    except Exception as error:
        print(f"postcopy vm run: cannot create the VM: {error}", file=sys.stderr)
        return 1
    exit_code = 0
    pid = os.getpid()
    monitor: Any = None
    memory_share: Any = None
    shared: Any = None
    try:
        if args.x_memory_socket is not None:
            from postcopy.migration.shared import SharedClients
            from postcopy.vm.memshare import MemoryShareServer

            shared = SharedClients(list(vm.ram))
            memory_share = MemoryShareServer(
                str(args.x_memory_socket),
                vm.ram,
                shared,
                lambda: "minor" if monitor.parameters.x_postcopy_minor_faults else "missing",
            )
        monitor = VmMonitor(
            vm,
            server,
            guest=guest_name,
            guest_params=params,
            auth=auth,
            allow_insecure_network=args.allow_insecure_network,
            autostart=not args.paused,
            trace_path=args.trace,
            tls_server=tls_server,
            tls_client=tls_client,
            on_quit=quit_event.set,
            shared=shared,
        )
        for name in args.migrate_capability:
            monitor.capabilities.set(name, True)
        signal.signal(signal.SIGTERM, lambda *_: quit_event.set())
        signal.signal(signal.SIGINT, lambda *_: quit_event.set())
        # listen for the migration before QMP accepts: whoever sees the socket (or the
        # ready line) may send `migrate` to this destination at once
        if args.incoming and args.incoming != "defer":
            try:
                monitor.start_incoming(args.incoming)
            except Exception as error:
                print(f"postcopy vm run: {error}", file=sys.stderr)
                return 1
        try:
            server.start()
        except (OSError, RuntimeError) as error:
            where = f" {error.filename}" if isinstance(error, OSError) and error.filename else ""
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            print(f"postcopy vm run: the QMP socket{where}: {reason}", file=sys.stderr)
            return 1
        if not args.incoming and not args.paused:
            vm.cont()
        if args.pidfile is not None:
            _write_pidfile(args.pidfile, pid)
        print(ready_line(args, pid), flush=True)
        while not quit_event.wait(0.1):
            vm.flush_console()  # a byte the guest printed before it went quiet
            incoming = monitor.incoming
            if (
                incoming is not None
                and incoming.finished
                and incoming.error
                and incoming.exit_on_error
            ):
                exit_code = 1  # the migration logged why (incoming migration failed: ...)
                break
        migration = monitor.migration
        notice = migration.termination_notice() if migration is not None else None
        if notice is not None:
            # told to quit (SIGTERM, Ctrl-C, QMP quit) in postcopy: as a source, the guest
            # runs on the destination and part of its RAM is only here; as a destination,
            # the guest ran here and part of its RAM is not here yet. QEMU exits too
            # (status 0), and the guest dies with us; we say so and exit 1
            print(f"postcopy vm run: {notice}", file=sys.stderr)
            exit_code = 1
    finally:
        watchdog = _teardown_watchdog(lambda: exit_code, args.pidfile, pid)
        # a deliberate end: what the teardown says (a listener closed, ...) is no news
        logging.getLogger("postcopy.migration").setLevel(logging.CRITICAL)
        server.close()
        if monitor is not None and monitor.incoming is not None:
            monitor.incoming.close()
        if memory_share is not None:
            memory_share.close()
            shared.close()
        vm.close()
        if console_file is not None:
            console_file.close()
        if args.pidfile is not None:
            _remove_pidfile(args.pidfile, pid)
        watchdog.cancel()
    return exit_code


def _teardown_watchdog(
    exit_code: Callable[[], int], pidfile: Path | None, pid: int
) -> threading.Timer:
    """A timer that ends the process if its teardown outlasts TEARDOWN_SECONDS: it says
    so, dumps every thread's stack (the stuck one is a bug to fix) and exits with the exit
    status already decided; the kernel closes the fds, the uffd and the guest's RAM."""

    def stuck() -> None:
        print(
            f"postcopy vm run: the teardown took more than {TEARDOWN_SECONDS:g} s: "
            "exiting without it; the threads were:",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        if pidfile is not None:
            _remove_pidfile(pidfile, pid)
        os._exit(exit_code() or 1)

    timer = threading.Timer(TEARDOWN_SECONDS, stuck)
    timer.daemon = True
    timer.start()
    return timer
