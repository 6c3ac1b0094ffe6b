"""`postcopy service front` and `postcopy load`: the stable service address, and load on it.

    postcopy service front --listen tcp:127.0.0.1:7000 --backends unix:/tmp/kv.sock
    postcopy vm run --guest kvstore --ram 1G --qmp /tmp/src.sock --service unix:/tmp/kv.sock
    postcopy load --connect tcp:127.0.0.1:7000 --rate 5000 --duration 30 --out load.jsonl

The front runs until SIGTERM or Ctrl-C; its events (connections, switches) go to stdout
as JSON lines (and to --events FILE). The load generator prints a progress line a second
(--progress) and its summary; exit status 0 only if every request was answered exactly
once and correctly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, TextIO


def add_parser(subparsers: Any) -> None:
    service = subparsers.add_parser("service", help="the service front: a stable service address")
    service_sub = service.add_subparsers(dest="service_command", metavar="SERVICE_COMMAND")
    front = service_sub.add_parser(
        "front",
        help="listen for clients and for VMs' request devices; follow the VM as it migrates",
        description="Clients connect to --listen once; VM processes started with --service "
        "connect to --backends. Requests go to the VM that runs the guest now and wait in "
        "the front while none does.",
    )
    front.add_argument(
        "--listen", required=True, help="clients' address: tcp:HOST:PORT or unix:PATH"
    )
    front.add_argument("--backends", required=True, help="VMs' address: unix:PATH or tcp:HOST:PORT")
    front.add_argument("--events", type=Path, help="also append the events as JSON lines to FILE")
    front.set_defaults(func=run_front)
    service.set_defaults(func=lambda args: service.print_help() or 2)

    load = subparsers.add_parser(
        "load",
        help="N clients against a kvstore service, every answer checked",
        description="Send GET/PUT/DELETE to a kvstore service (through `postcopy service "
        "front`), check every answer against a model of the store, and report latency "
        "(p50/p99/max), the longest gap without an answer and lost, duplicate and wrong "
        "answers. Exit status 0 only if every request was answered once and correctly.",
    )
    load.add_argument("--connect", required=True, help="the service: tcp:HOST:PORT or unix:PATH")
    load.add_argument("--clients", type=int, default=8, help="connections (default 8)")
    load.add_argument(
        "--rate",
        type=float,
        default=5000.0,
        help="requests per second in all (default 5000; 0 = closed loop)",
    )
    load.add_argument(
        "--depth", type=int, default=1, help="closed loop: requests in flight per client"
    )
    load.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of sending (default 10; 0 = until Ctrl-C/SIGTERM)",
    )
    load.add_argument(
        "--keys", type=int, default=100_000, help="working set in keys (default 100000)"
    )
    load.add_argument("--key-offset", type=int, default=0, help="first key is OFFSET+1 (default 0)")
    load.add_argument(
        "--distribution",
        default="zipf",
        metavar="zipf[:S]|uniform",
        help="key popularity (default zipf with exponent 0.99)",
    )
    load.add_argument("--read", type=float, default=0.9, help="fraction of GETs (default 0.9)")
    load.add_argument(
        "--delete",
        type=float,
        default=0.01,
        help="fraction of DELETEs (default 0.01); the rest PUT",
    )
    load.add_argument(
        "--value-size", type=int, default=16, help="bytes per PUT value (default 16, at most 48)"
    )
    load.add_argument("--seed", type=int, default=1)
    load.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds to wait for answers after the last send (default 10)",
    )
    load.add_argument(
        "--preloaded", type=int, help="keys the guest preloaded (default: ask it with INFO)"
    )
    load.add_argument(
        "--out", type=Path, help="write a header, a line per request and the summary (JSON lines)"
    )
    load.add_argument("--progress", action="store_true", help="a progress line a second on stderr")
    load.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    load.set_defaults(func=run_load)


def _emitter(events: Path | None) -> tuple[Any, TextIO | None]:
    out = events.open("a") if events else None

    def emit(event: dict[str, Any]) -> None:
        line = json.dumps(event)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    return emit, out


def run_front(args: argparse.Namespace) -> int:
    from postcopy.service.front import Front
    from postcopy.transport.errors import UriError

    emit, out = _emitter(args.events)
    try:
        front = Front(args.listen, args.backends, on_event=emit)
    except (UriError, ValueError, OSError) as error:
        print(f"postcopy service front: {error}", file=sys.stderr)
        return 2
    previous = {
        sig: signal.signal(sig, lambda *_: front.stop()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        emit(
            {
                "event": "listening",
                "address": str(front.address),
                "backends": str(front.backend_address),
            }
        )
        front.run()
        emit({"event": "stats", **front.stats()})
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        front.close()
        if out is not None:
            out.close()
    return 0


def parse_distribution(text: str) -> tuple[str, float]:
    name, _, exponent = text.partition(":")
    if name == "uniform" and not exponent:
        return "uniform", 0.99
    if name == "zipf":
        try:
            return "zipf", float(exponent) if exponent else 0.99
        except ValueError:
            pass
    raise ValueError(f"--distribution {text!r}: expected uniform, zipf or zipf:EXPONENT")


def run_load(args: argparse.Namespace) -> int:
    from postcopy.service.load import LoadError, LoadGenerator, LoadOptions, write_jsonl

    try:
        distribution, exponent = parse_distribution(args.distribution)
        options = LoadOptions(
            address=args.connect,
            clients=args.clients,
            rate=args.rate,
            depth=args.depth,
            duration=args.duration or None,
            keys=args.keys,
            key_offset=args.key_offset,
            distribution=distribution,
            zipf_s=exponent,
            read=args.read,
            delete=args.delete,
            value_size=args.value_size,
            seed=args.seed,
            grace=args.grace,
            preloaded=args.preloaded,
        )
        progress = None
        if args.progress:

            def progress(line: dict[str, Any]) -> None:
                print(
                    f"t={line['t']:.0f}s sent {line['sent']} answered {line['answered']} "
                    f"({line['rate']}/s) waiting {line['waiting']} wrong {line['wrong']} "
                    f"duplicate {line['duplicate']}",
                    file=sys.stderr,
                    flush=True,
                )

        generator = LoadGenerator(options, progress=progress)
    except ValueError as error:
        print(f"postcopy load: {error}", file=sys.stderr)
        return 2
    previous = {
        sig: signal.signal(sig, lambda *_: generator.stop())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        summary = generator.run()
    except LoadError as error:
        print(f"postcopy load: {error}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.out is not None:
        write_jsonl(args.out, generator, summary)
    if args.json:
        print(json.dumps({"event": "summary", **summary.as_json()}))
    else:
        print(format_summary(summary.as_json()))
    return 0 if summary.clean else 1


def format_summary(s: dict[str, Any]) -> str:
    def number(value: Any, unit: str = "") -> str:
        return (
            "-"
            if value is None
            else f"{value:,.1f}{unit}"
            if isinstance(value, float)
            else f"{value:,}{unit}"
        )

    lines = [
        f"requests {s['sent']:,} answered {s['answered']:,} at {number(s['rate'], '/s')}",
        f"latency p50 {number(s['latency-p50-us'], ' us')}  "
        f"p99 {number(s['latency-p99-us'], ' us')}  max {number(s['latency-max-us'], ' us')}",
        f"longest gap without an answer {number(s['longest-gap-ms'], ' ms')}",
        f"lost {s['lost']}  duplicate {s['duplicate']}  wrong {s['wrong']}  unknown {s['unknown']}",
    ]
    for problem in s.get("problems", [])[:5]:
        lines.append(f"  {problem['verdict']}: {json.dumps(problem)}")
    return "\n".join(lines)
