"""The link between source and destination: loopback, or two network namespaces.

A shaped link is two namespaces made for this run, `pcbench-<pid>-src` and
`pcbench-<pid>-dst`, joined by a veth pair with addresses on a private /30 that exists
only inside them (10.77.0.1 and 10.77.0.2), each end's egress shaped by a tc token bucket
filter (tbf) to the link's rate. Every process of a side runs under `ip netns exec`, so
the migration and the limit probes cross the same shaped link. Deleting the namespaces
deletes the veth pair with them; both are registered on the run's `Cleanup` the moment
they exist. Namespaces of an earlier bench process that died without cleaning up (it
was SIGKILLed) are recognised by the dead PID in their name and removed.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from postcopy.bench.cleanup import Cleanup, pid_alive

# bytes per second; None means unshaped loopback
LINK_RATES: dict[str, float | None] = {"loopback": None, "1gbit": 1e9 / 8, "10gbit": 10e9 / 8}
NAMESPACE_PREFIX = "pcbench-"
_OURS = re.compile(rf"^{NAMESPACE_PREFIX}(\d+)-(src|dst)$")
SOURCE_ADDRESS = "10.77.0.1"
DESTINATION_ADDRESS = "10.77.0.2"
PREFIX_LENGTH = 30
# tbf needs a bucket of at least one scheduler tick at line rate; 4 ms worth is ample and
# keeps the queueing delay (latency, the queue limit) in the range of a real switch
BURST_SECONDS = 0.004
QUEUE_LATENCY = "20ms"


class LinkError(RuntimeError):
    """The link cannot be set up; the message says what to do."""


@dataclass(frozen=True)
class Side:
    """One end of the link: where its processes run and the address they use."""

    role: str
    address: str
    namespace: str | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run on this side (`ip netns exec` replaces itself with argv, so the
        PID the bench holds is the process's own)."""
        if self.namespace is None:
            return list(argv)
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass(frozen=True)
class Link:
    name: str
    rate: float | None
    source: Side
    destination: Side

    @property
    def namespaces(self) -> list[str]:
        return [n for n in (self.source.namespace, self.destination.namespace) if n]


def _ip(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LinkError(f"`{' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")


def list_namespaces() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return []
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def our_namespaces(pid: int | None = None) -> list[str]:
    """The namespaces made by bench process `pid` (any bench process if None)."""
    found = []
    for name in list_namespaces():
        match = _OURS.match(name)
        if match and (pid is None or int(match.group(1)) == pid):
            found.append(name)
    return found


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by bench processes that no longer exist."""
    removed = []
    for name in our_namespaces():
        match = _OURS.match(name)
        assert match is not None
        if not pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            removed.append(name)
    return removed


def open_link(name: str, cleanup: Cleanup) -> Link:
    """Set up link `name` (loopback, 1gbit, 10gbit); its teardown goes on `cleanup`."""
    if name not in LINK_RATES:
        raise LinkError(f"unknown link {name!r}; links: {', '.join(LINK_RATES)}")
    rate = LINK_RATES[name]
    if rate is None:
        return Link(name, None, Side("source", "127.0.0.1"), Side("destination", "127.0.0.1"))
    if os.geteuid() != 0:
        raise LinkError(
            f"link {name} needs network namespaces: run the bench as root "
            "(CAP_NET_ADMIN and CAP_SYS_ADMIN), or use --link loopback"
        )
    remove_stale_namespaces()
    pid = os.getpid()
    source_ns, destination_ns = f"{NAMESPACE_PREFIX}{pid}-src", f"{NAMESPACE_PREFIX}{pid}-dst"
    source_dev, destination_dev = f"pcb{pid}s", f"pcb{pid}d"
    for namespace in (source_ns, destination_ns):
        _ip("ip", "netns", "add", namespace)
        cleanup.push(f"namespace {namespace}", lambda ns=namespace: _ip("ip", "netns", "del", ns))  # type: ignore[misc]
    _ip("ip", "link", "add", source_dev, "type", "veth", "peer", "name", destination_dev)
    # until both ends have moved into the namespaces, the pair lives in ours
    cleanup.push(f"veth {source_dev}", lambda: _delete_if_present(source_dev))
    burst = max(int(rate * BURST_SECONDS), 64 * 1024)
    for namespace, device, address in (
        (source_ns, source_dev, SOURCE_ADDRESS),
        (destination_ns, destination_dev, DESTINATION_ADDRESS),
    ):
        _ip("ip", "link", "set", device, "netns", namespace)
        _ip("ip", "-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", device)
        _ip("ip", "-n", namespace, "link", "set", "lo", "up")
        _ip("ip", "-n", namespace, "link", "set", device, "up")
        _ip(
            "tc",
            "-n",
            namespace,
            "qdisc",
            "add",
            "dev",
            device,
            "root",
            "tbf",
            "rate",
            f"{int(rate * 8)}bit",
            "burst",
            str(burst),
            "latency",
            QUEUE_LATENCY,
        )
    return Link(
        name,
        rate,
        Side("source", SOURCE_ADDRESS, source_ns),
        Side("destination", DESTINATION_ADDRESS, destination_ns),
    )


def _delete_if_present(device: str) -> None:
    result = subprocess.run(["ip", "link", "show", device], capture_output=True, check=False)
    if result.returncode == 0:
        _ip("ip", "link", "del", device)
