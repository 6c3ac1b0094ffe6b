"""Benchmark scenarios: what one run migrates and how, named so the name says it all.

A scenario name is
`<guest>-<ram>-<N>cpu-<mode>[-libvirt][-preempt][-cpl0][-<backend>][-prealloc][-minor][-cut]`,
for example `memtouch-1g-1cpu-postcopy1`: guest memtouch, 1 GiB of RAM, 1 vCPU, postcopy
after one precopy round. Modes: `precopy` (postcopy off), `postcopy0` (postcopy from the
start), `postcopyN` (postcopy after N precopy rounds); `-libvirt` makes that switch as a
management tool does instead of the source itself (the bench polls query-migrate every
10 ms and sends migrate-start-postcopy once `dirty-sync-count` reaches N + 1, as libvirt
does for N = 1); `-preempt` adds the
postcopy-preempt channel; `-cpl0` runs the guest at CPL0, emulated on this host like
QEMU's own test guest (a guest that touches memory ~200x slower). The RAM backend is
private anonymous memory unless `-memfd` (a shmem memfd), `-hugetlb` (a hugetlb memfd,
2 MiB pages) or `-hugetlbfs` (a file on a hugetlbfs mount the bench makes); the bench
takes the huge pages from the pool for the run and gives them back. `-prealloc` starts
both VMs with --mem-prealloc (QEMU's -mem-prealloc, libvirt's immediate allocation): RAM
populated before the migration, the time it took in the VMs' start-up, not in the run's
(benchmarks/qemu/run.py --prealloc does the same for QEMU). `-minor` puts the
destination in minor-fault mode (x-postcopy-minor-faults; memfd or hugetlb backends, a
file on hugetlbfs mapped with --share on for it).
`-cut` is postcopy recovery: the link goes through a proxy (bench/linkproxy.py) that
resets every connection `cut_after` bytes (16 MiB; a TOML `cut_after` changes it) into
the push that follows the switchover, and the source reconnects by itself
(x-postcopy-auto-recover); loopback only. A
kvstore scenario also runs the service under load through the migration
(postcopy.bench.service.DEFAULT_LOAD; a TOML `load` table changes it). Any name of that
form is a scenario; the grid
of the issue (three guests, 1 GiB and 4 GiB, 1 and 2 vCPUs, three modes) is the set `all`,
and `default` is a subset that runs in a few minutes. Files benchmarks/*.toml add named
sets and scenarios with their own guest parameters or migration parameters (see
benchmarks/README.md).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postcopy.bench.service import DEFAULT_LOAD, check_load
from postcopy.units import parse_size
from postcopy.vm.guests import GUESTS

GRID_GUESTS = ("memtouch", "randwrite", "scan")
GRID_RAM = ("1g", "4g")
GRID_VCPUS = (1, 2)
GRID_MODES = ("precopy", "postcopy1", "postcopy0")

# randwrite's working set: 10% of the pages above 1 MiB (the guest's own default, made explicit)
DEFAULT_GUEST_PARAMS: dict[str, dict[str, int]] = {"randwrite": {"working_set_ppm": 100_000}}
# precopy of a guest that dirties everything never converges; bound the rounds so a
# precopy-only run ends (with the forced stop's downtime, which is what it measures)
DEFAULT_PARAMETERS: dict[str, Any] = {"x-max-rounds": 5}
CUT_AFTER = 16 << 20  # -cut: bytes of the postcopy push before the link is reset

NAME = re.compile(
    r"^(?P<guest>[a-z]+)-(?P<ram>\d+[mg])-(?P<vcpus>\d+)cpu-"
    r"(?P<mode>precopy|postcopy\d+)(?P<libvirt>-libvirt)?(?P<preempt>-preempt)?(?P<cpl0>-cpl0)?"
    r"(?P<backend>-memfd|-hugetlb|-hugetlbfs)?(?P<prealloc>-prealloc)?(?P<minor>-minor)?"
    r"(?P<cut>-cut)?$"
)


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Scenario:
    name: str
    guest: str
    ram: int
    vcpus: int
    postcopy_after_rounds: int | None  # None: precopy only
    preempt: bool = False
    cpl: int = 3
    # the switch made by the bench as libvirt makes it (migrate-start-postcopy from a 10 ms
    # poll once dirty-sync-count >= postcopy_after_rounds + 1), not by the source itself
    switch_by_tool: bool = False
    guest_params: Mapping[str, int] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    load: Mapping[str, Any] = field(default_factory=dict)  # kvstore: the service's load
    backend: str = "ram"  # ram, memfd, memfd-hugetlb, hugetlbfs (a file on a mount)
    minor: bool = False  # the destination in minor-fault mode
    prealloc: bool = False  # both VMs with --mem-prealloc
    cut: bool = False  # the link is reset in postcopy, and the migration recovers
    cut_after: int = CUT_AFTER  # bytes of the push after the PACKAGE before the cut

    @property
    def hugetlb(self) -> bool:
        return self.backend in ("memfd-hugetlb", "hugetlbfs")

    @property
    def destination_parameters(self) -> dict[str, Any]:
        return {"x-postcopy-minor-faults": True} if self.minor else {}

    @property
    def mode(self) -> str:
        if self.postcopy_after_rounds is None:
            return "precopy"
        return f"postcopy{self.postcopy_after_rounds}"

    @property
    def capabilities(self) -> list[str]:
        if self.postcopy_after_rounds is None:
            return []
        caps = ["postcopy-ram", "postcopy-blocktime"]
        if self.preempt:
            caps.append("postcopy-preempt")
        return caps

    @property
    def migration_parameters(self) -> dict[str, Any]:
        merged = {**DEFAULT_PARAMETERS, **self.parameters}
        if self.cut:
            merged["x-postcopy-auto-recover"] = True
        if self.postcopy_after_rounds is not None:
            merged["x-postcopy-after-rounds"] = (
                -1 if self.switch_by_tool else self.postcopy_after_rounds
            )
        return merged

    @property
    def switch_at_sync_count(self) -> int | None:
        """With `-libvirt`: the dirty-sync-count at which the bench switches (QEMU counts
        the setup's sync, so the end of pass N reads N + 1)."""
        if not self.switch_by_tool or self.postcopy_after_rounds is None:
            return None
        return self.postcopy_after_rounds + 1

    @property
    def warmup(self) -> tuple[bytes, int]:
        """The console marker and count that say the guest has written its memory once:
        memtouch and randwrite a pass (2**20 writes) per vCPU, scan one checksum line."""
        marker = GUESTS[self.guest].pass_marker
        return marker, (1 if self.guest in ("scan", "kvstore") else self.vcpus)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "guest": self.guest,
            "ram": self.ram,
            "vcpus": self.vcpus,
            "mode": self.mode,
            "postcopy_after_rounds": self.postcopy_after_rounds,
            "preempt": self.preempt,
            "cpl": self.cpl,
            "switch": "libvirt" if self.switch_by_tool else "source",
            "capabilities": self.capabilities,
            "guest_params": dict(self.guest_params),
            "parameters": self.migration_parameters,
            "description": self.description,
            **({"load": dict(self.load)} if self.load else {}),
            "backend": self.backend,
            "minor": self.minor,
            "prealloc": self.prealloc,
            **({"cut_after": self.cut_after} if self.cut else {}),
        }


def parse_name(name: str) -> Scenario:
    match = NAME.match(name)
    if not match:
        raise ScenarioError(
            f"{name!r} is not a scenario name: expected "
            "<guest>-<ram>-<N>cpu-<precopy|postcopyN>[-libvirt][-preempt][-cpl0]"
            "[-memfd|-hugetlb|-hugetlbfs][-prealloc][-minor][-cut], "
            "e.g. memtouch-1g-1cpu-postcopy1"
        )
    guest = match.group("guest")
    if guest not in GUESTS:
        raise ScenarioError(f"{name!r}: no guest {guest!r} (guests: {', '.join(GUESTS)})")
    vcpus = int(match.group("vcpus"))
    if not 1 <= vcpus <= 64:
        raise ScenarioError(f"{name!r}: {vcpus} vCPUs")
    mode = match.group("mode")
    after = None if mode == "precopy" else int(mode.removeprefix("postcopy"))
    preempt = match.group("preempt") is not None
    if preempt and after is None:
        raise ScenarioError(f"{name!r}: -preempt needs a postcopy mode")
    suffix = (match.group("backend") or "-ram")[1:]
    backend = "memfd-hugetlb" if suffix == "hugetlb" else suffix
    minor = match.group("minor") is not None
    if minor and (backend == "ram" or after is None):
        raise ScenarioError(
            f"{name!r}: -minor needs a postcopy mode and a memfd or hugetlb backend"
        )
    cut = match.group("cut") is not None
    if cut and after is None:
        raise ScenarioError(f"{name!r}: -cut needs a postcopy mode (the link breaks in it)")
    ram = parse_size(match.group("ram"))
    if backend in ("memfd-hugetlb", "hugetlbfs") and ram % (2 << 20):
        raise ScenarioError(f"{name!r}: RAM on huge pages must be a multiple of 2 MiB")
    libvirt = match.group("libvirt") is not None
    if libvirt and not after:
        raise ScenarioError(f"{name!r}: -libvirt needs postcopyN with N >= 1 (a pass to wait for)")
    return Scenario(
        name=name,
        guest=guest,
        ram=ram,
        vcpus=vcpus,
        postcopy_after_rounds=after,
        preempt=preempt,
        cpl=0 if match.group("cpl0") else 3,
        switch_by_tool=libvirt,
        guest_params=dict(DEFAULT_GUEST_PARAMS.get(guest, {})),
        load=dict(DEFAULT_LOAD) if guest == "kvstore" else {},
        backend=backend,
        minor=minor,
        prealloc=match.group("prealloc") is not None,
        cut=cut,
    )


def grid() -> list[str]:
    return [
        f"{guest}-{ram}-{vcpus}cpu-{mode}"
        for guest in GRID_GUESTS
        for ram in GRID_RAM
        for vcpus in GRID_VCPUS
        for mode in GRID_MODES
    ]


BUILTIN_SETS: dict[str, list[str]] = {
    "default": [
        "memtouch-1g-1cpu-precopy",
        "memtouch-1g-1cpu-postcopy1",
        "memtouch-1g-1cpu-postcopy0",
        "memtouch-1g-2cpu-postcopy1",
        "randwrite-1g-1cpu-postcopy1",
        "scan-1g-1cpu-postcopy0",
    ],
    "smoke": ["memtouch-256m-1cpu-postcopy1"],
    "all": grid(),
}


@dataclass
class Catalogue:
    """Named sets and extra scenarios: the built-in ones plus benchmarks/*.toml."""

    sets: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in BUILTIN_SETS.items()}
    )
    extra: dict[str, Scenario] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)

    def scenario(self, name: str) -> Scenario:
        if name in self.extra:
            return self.extra[name]
        return parse_name(name)

    def known_names(self) -> list[str]:
        names = dict.fromkeys(grid())
        for members in self.sets.values():
            names.update(dict.fromkeys(members))
        names.update(dict.fromkeys(self.extra))
        return list(names)

    def resolve(self, selectors: Iterable[str]) -> list[Scenario]:
        """Scenarios for set names, scenario names and glob patterns, in order, once each."""
        chosen: dict[str, Scenario] = {}
        for selector in selectors:
            if selector in self.sets:
                names = self.sets[selector]
            elif any(ch in selector for ch in "*?["):
                names = fnmatch.filter(self.known_names(), selector)
                if not names:
                    raise ScenarioError(f"pattern {selector!r} matches no known scenario")
            else:
                names = [selector]
            for name in names:
                chosen.setdefault(name, self.scenario(name))
        return list(chosen.values())

    def load(self, path: Path) -> None:
        """Add the sets and scenarios of a TOML file (format in benchmarks/README.md)."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ScenarioError(f"{path}: {error}") from error
        for entry in data.get("scenario", []):
            scenario = _from_table(entry, path)
            self.extra[scenario.name] = scenario
        for name, members in data.get("sets", {}).items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise ScenarioError(f"{path}: set {name!r} must be a list of names")
            if name in ("all",):
                raise ScenarioError(f"{path}: set name {name!r} is reserved")
            self.sets[name] = list(members)
        self.sources.append(path)


def _from_table(entry: dict[str, Any], path: Path) -> Scenario:
    try:
        name = entry["name"]
        base = parse_name(entry.get("base", name))
    except (KeyError, ScenarioError) as error:
        raise ScenarioError(f"{path}: scenario {entry.get('name')!r}: {error}") from error
    guest_params = {**base.guest_params, **entry.get("guest_params", {})}
    parameters = {**base.parameters, **entry.get("parameters", {})}
    load = base.load
    if "load" in entry:
        if base.guest != "kvstore":
            raise ScenarioError(f"{path}: scenario {name!r}: a load table needs the kvstore guest")
        try:
            load = check_load(entry["load"], f"{path}: scenario {name!r}")
        except ValueError as error:
            raise ScenarioError(str(error)) from None
    return Scenario(
        name=name,
        guest=base.guest,
        ram=base.ram,
        vcpus=base.vcpus,
        postcopy_after_rounds=base.postcopy_after_rounds,
        preempt=base.preempt,
        cpl=base.cpl,
        switch_by_tool=base.switch_by_tool,
        guest_params=guest_params,
        parameters=parameters,
        description=str(entry.get("description", "")),
        load=load,
        backend=base.backend,
        minor=base.minor,
        prealloc=base.prealloc,
        cut=base.cut,
        cut_after=_cut_after(entry, base, path),
    )


def _cut_after(entry: dict[str, Any], base: Scenario, path: Path) -> int:
    if "cut_after" not in entry:
        return base.cut_after
    value = entry["cut_after"]
    if not base.cut or isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScenarioError(
            f"{path}: scenario {entry.get('name')!r}: cut_after must be a byte count >= 0 "
            "on a -cut scenario"
        )
    return value


def default_scenario_dirs() -> list[Path]:
    """benchmarks/ of the source tree this package runs from, and of the working directory."""
    candidates = [Path(__file__).resolve().parents[3] / "benchmarks", Path.cwd() / "benchmarks"]
    seen: list[Path] = []
    for directory in candidates:
        if directory.is_dir() and directory.resolve() not in seen:
            seen.append(directory.resolve())
    return seen


def load_catalogue(directories: Iterable[Path] | None = None) -> Catalogue:
    catalogue = Catalogue()
    for directory in directories if directories is not None else default_scenario_dirs():
        for path in sorted(directory.glob("*.toml")):
            catalogue.load(path)
    return catalogue
