"""Test helper: two `vm run` processes in a postcopy held open, to break and recover.

The postcopy phase is held by max-postcopy-bandwidth (QEMU's recovery tests use 4096
bytes/s: "slow enough on any machines"); requested pages are never throttled, so the
guest runs on the destination meanwhile. `finish` lifts the cap and checks the end:
both sides completed, the guest still making passes on the destination, x-verify.
Used by tests/test_migration_recovery.py and benchmarks/recovery_soak.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vmprocess import VmProcess, free_port

HOLD = 4096  # bytes/s of background push while a test works on the paused link


@dataclass
class Pair:
    source: VmProcess
    destination: VmProcess
    uri: str  # where the destination listens
    events: dict[str, list[str]] = field(default_factory=lambda: {"src": [], "dst": []})

    def statuses(self, side: str) -> list[str]:
        """The MIGRATION events `side` ("src", "dst") emitted so far, in order."""
        vm = self.source if side == "src" else self.destination
        for event in vm.qmp.get_events():
            if event["event"] == "MIGRATION":
                self.events[side].append(event["data"]["status"])
        vm.qmp.clear_events()
        return self.events[side]

    def wait(self, side: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
        vm = self.source if side == "src" else self.destination
        info = vm.wait_migration(statuses, timeout)
        self.statuses(side)
        return info

    def both(self, statuses: set[str], timeout: float = 60) -> None:
        self.wait("dst", statuses, timeout)
        self.wait("src", statuses, timeout)


def start_pair(
    tmp_path: Path,
    vms: list[VmProcess],
    *,
    caps: tuple[str, ...] = ("postcopy-ram",),
    guest: str = "memtouch",
    ram: str = "256M",
    vcpus: int = 1,
    src_args: tuple[str, ...] = (),
    dest_args: tuple[str, ...] = (),
    uri: str | None = None,
) -> Pair:
    uri = uri or f"tcp:127.0.0.1:{free_port()}"
    common = ("--guest", guest, "--ram", ram, "--vcpus", str(vcpus))
    cap_args = tuple(arg for cap in caps for arg in ("--migrate-capability", cap))
    destination = VmProcess(tmp_path, "dst", *common, "--incoming", uri, *cap_args, *dest_args)
    vms.append(destination)
    source = VmProcess(tmp_path, "src", *common, *cap_args, *src_args)
    vms.append(source)
    return Pair(source, destination, uri)


def held_postcopy(pair: Pair, via: str | None = None, **parameters: Any) -> None:
    """Migrate (to `via`, e.g. a link proxy, or the destination itself) and return once
    both sides are in postcopy-active with the push held at HOLD bytes/s."""
    settings = {"x-postcopy-after-rounds": 1, "max-postcopy-bandwidth": HOLD, **parameters}
    pair.source.cmd("migrate-set-parameters", **settings)
    pair.source.wait_passes(b"B", 1)
    pair.source.cmd("migrate", uri=via or pair.uri)
    pair.both({"postcopy-active"})


def finish(pair: Pair, timeout: float = 120) -> dict[str, Any]:
    """Lift the cap; both sides complete; the guest goes on; its memory is consistent."""
    pair.source.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    info = pair.wait("src", {"completed"}, timeout)
    pair.wait("dst", {"completed"}, 30)
    before = pair.destination.console().count(b"B")
    pair.destination.wait_passes(b"B", before + 2)
    pair.destination.cmd("stop")
    result = pair.destination.cmd("x-verify")
    assert result["ok"], (result["detail"], diagnosis(pair))
    return info


def diagnosis(pair: Pair) -> str:
    """Both sides' query-migrate, timelines and logs, for a failure message."""
    parts = []
    for name, vm in (("source", pair.source), ("destination", pair.destination)):
        parts.append(f"--- {name}: {vm.cmd('query-migrate')}")
        parts += [str(entry) for entry in vm.cmd("x-migration-timeline")[-40:]]
        parts.append(vm.stderr()[-3000:])
    return "\n".join(parts)


def after_first(statuses: list[str], status: str) -> list[str]:
    """The statuses from the first `status` on (the recovery part of an event list)."""
    return statuses[statuses.index(status) :]


def stop_and_verify(vm: VmProcess) -> dict[str, Any]:
    vm.cmd("stop")
    result = vm.cmd("x-verify")
    assert result["ok"], result["detail"]
    return dict(result)
