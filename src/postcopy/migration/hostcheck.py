"""Can this host be a postcopy destination, and if not, what to change (`postcopy check`).

Modelled on QEMU's postcopy_ram_supported_by_host/ufd_version_check, but explaining every
verdict instead of stopping at the first failure: userfaultfd reachable (and how), the API
handshake and its features, per RAM backend (ram, memfd, memfd-hugetlb, file) the features
and registration it needs (backendcheck.py: huge pages need the hugetlbfs feature and a
pool, a file on them a mount), the page sizes, and KVM with the capabilities the migration
uses.

`check_host()` is pure data and fast (a few milliseconds, no rich import): the destination
runs it at ADVISE and refuses with the failing items. The command prints it as a table
(or one JSON object with --json) and exits 0 when postcopy is possible, 1 otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from postcopy.linux import hugepages, memory
from postcopy.linux.userfaultfd import (
    DEV_USERFAULTFD,
    Feature,
    Ioctl,
    UffdError,
    UserfaultFd,
    missing_ioctls,
)

if TYPE_CHECKING:
    from postcopy.migration.backendcheck import RamUse

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00
KVM_CHECK_EXTENSION = 0xAE03
KVM_API_VERSION = 12

# (capability, number, required, what the migration uses it for)
KVM_CAPABILITIES = (
    ("USER_MEMORY", 3, True, "guest RAM is our own mmap'ed memory"),
    ("SYNC_MMU", 16, True, "KVM follows the host page tables, so UFFDIO_COPY reaches the guest"),
    ("IMMEDIATE_EXIT", 136, True, "vCPUs are stopped at switchover without signals racing"),
    (
        "MANUAL_DIRTY_LOG_PROTECT2",
        168,
        False,
        "precopy clears dirty bits only for pages it sends (else: plain GET_DIRTY_LOG)",
    ),
    ("DIRTY_LOG_RING", 192, False, "dirty pages as a ring instead of a bitmap (optional)"),
)

POSTCOPY_IOCTLS = Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE
API_IOCTLS = Ioctl.REGISTER | Ioctl.UNREGISTER


@dataclass(frozen=True)
class CheckItem:
    """One verdict: `ok`, what was found (`detail`), how to fix it, whether postcopy needs it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True
    why: str = ""


@dataclass
class HostReport:
    """Every check, in order, plus the raw facts they were made from."""

    items: list[CheckItem] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def postcopy_possible(self) -> bool:
        return all(item.ok for item in self.items if item.required)

    @property
    def failures(self) -> list[CheckItem]:
        """The required items that failed: why postcopy is not possible."""
        return [item for item in self.items if item.required and not item.ok]

    @property
    def warnings(self) -> list[CheckItem]:
        return [item for item in self.items if not item.required and not item.ok]

    def item(self, name: str) -> CheckItem:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(name)

    def summary(self) -> str:
        """One line: possible, or the failing checks with their fixes."""
        if self.postcopy_possible:
            return "postcopy migration is possible on this host"
        return "postcopy migration is NOT possible: " + "; ".join(
            f"{item.name}: {item.detail}" + (f" (fix: {item.fix})" if item.fix else "")
            for item in self.failures
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "postcopy_possible": self.postcopy_possible,
            "items": [asdict(item) for item in self.items],
            "facts": self.facts,
        }


def _names(flags: Feature | Ioctl) -> list[str]:
    return [member.name for member in type(flags) if member in flags and member.name]


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def _describe_size(size: int) -> str:
    if size >= 1 << 30 and size % (1 << 30) == 0:
        return f"{size >> 30} GiB"
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    return f"{size >> 10} KiB" if size % 1024 == 0 else f"{size} B"


# -- userfaultfd ---------------------------------------------------------------------------


def _userfaultfd_access(facts: dict[str, Any]) -> tuple[CheckItem, str | None]:
    """Try both ways of opening a userfaultfd; returns the item and the way that worked."""
    euid = os.geteuid()
    unprivileged = _read_int("/proc/sys/vm/unprivileged_userfaultfd")
    facts["euid"] = euid
    facts["unprivileged_userfaultfd"] = unprivileged
    outcomes: dict[str, str] = {}
    errnos: dict[str, int] = {}
    for via in ("syscall", DEV_USERFAULTFD):
        try:
            fd, _ = UserfaultFd.open_raw(via=via)
        except UffdError as error:
            outcomes[via] = error.strerror or "failed"
            errnos[via] = error.errno or 0
        else:
            os.close(fd)
            outcomes[via] = "ok"
    facts["userfaultfd_ways"] = outcomes
    working = next((via for via, outcome in outcomes.items() if outcome == "ok"), None)
    who = "root" if euid == 0 else f"uid {euid}"
    setting = f"vm.unprivileged_userfaultfd={unprivileged if unprivileged is not None else '?'}"
    detail = (
        f"syscall: {outcomes['syscall']}; {DEV_USERFAULTFD}: {outcomes[DEV_USERFAULTFD]}; "
        f"{setting}; running as {who}"
    )
    why = "the destination learns of guest accesses to pages that have not arrived yet"
    if working is not None:
        return CheckItem("userfaultfd", True, f"opened via {working} ({detail})", why=why), working
    if all(code in (errno.ENOSYS, errno.ENOENT) for code in errnos.values()):
        fix = "use a kernel built with CONFIG_USERFAULTFD=y"
    else:
        fix = (
            "run as root, or `sysctl vm.unprivileged_userfaultfd=1`, or give this user "
            f"read/write access to {DEV_USERFAULTFD} "
            f"(`setfacl -m u:$USER:rw {DEV_USERFAULTFD}`); UFFD_USER_MODE_ONLY is not "
            "enough, because faults taken by KVM on the guest's behalf are kernel-mode"
        )
    return CheckItem("userfaultfd", False, f"not available ({detail})", fix, why=why), None


def _userfaultfd_checks(report: HostReport, use: RamUse) -> None:
    facts = report.facts
    access, working = _userfaultfd_access(facts)
    report.items.append(access)
    if working is None:
        report.items.append(
            CheckItem(
                "userfaultfd API",
                False,
                "not checked: userfaultfd cannot be opened",
                "see the userfaultfd line",
            )
        )
        return
    try:
        with UserfaultFd.open(via=working) as probe:
            available, api_ioctls = probe.available_features, probe.ioctls
    except UffdError as error:
        report.items.append(
            CheckItem(
                "userfaultfd API",
                False,
                f"UFFDIO_API handshake failed: {error}",
                "use a kernel whose userfaultfd speaks API 0xAA (Linux >= 4.3)",
            )
        )
        return
    facts["userfaultfd_features"] = _names(available)
    facts["userfaultfd_features_mask"] = int(available)
    facts["userfaultfd_api_ioctls"] = _names(api_ioctls)
    lacking = missing_ioctls(api_ioctls, API_IOCTLS)
    report.items.append(
        CheckItem(
            "userfaultfd API",
            not lacking,
            f"features {int(available):#x}: {', '.join(_names(available)) or 'none'}"
            + (f"; missing ioctls {', '.join(_names(lacking))}" if lacking else ""),
            None if not lacking else "use a kernel with UFFDIO_REGISTER/UNREGISTER",
            why="the handshake says which kinds of memory and events the kernel can report",
        )
    )

    from postcopy.migration.backendcheck import backend_items  # it builds on CheckItem

    report.items.extend(backend_items(working, available, use, facts))


# -- pages and RAM ------------------------------------------------------------------------


def _page_checks(
    report: HostReport, ram_page_sizes: tuple[int, ...], target_page_size: int
) -> None:
    base = memory.page_size()
    thp = hugepages.transparent_hugepage_mode()
    report.facts.update(
        base_page_size=base,
        transparent_hugepage=thp,
        huge_page_sizes=hugepages.huge_page_sizes(),
        ram_page_sizes=list(ram_page_sizes),
        target_page_size=target_page_size,
    )
    report.items.append(
        CheckItem(
            "page sizes",
            True,
            f"base page {base} B; THP {thp or 'absent'}; huge page sizes "
            + (", ".join(_describe_size(size) for size in hugepages.huge_page_sizes()) or "none")
            + f"; RAM page sizes {', '.join(_describe_size(size) for size in ram_page_sizes)}",
            None,
            False,
            "THP is turned off on RAM before discards, so discards really free pages",
        )
    )
    report.items.append(
        CheckItem(
            "target page size",
            target_page_size <= base,
            f"guest page {target_page_size} B, host page {base} B",
            None if target_page_size <= base else "the guest's pages must not exceed the host's",
            why="each request fetches whole host pages, which must cover whole guest pages",
        )
    )


# -- KVM --------------------------------------------------------------------------------


def _kvm_checks(report: HostReport) -> None:
    facts = report.facts
    why = "the micro-VM runs its guest with KVM on both hosts"
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        code = error.errno or 0
        if code == errno.ENOENT:
            fix = (
                "load KVM (`modprobe kvm_intel` or `modprobe kvm_amd`) and enable "
                "virtualization (or nested virtualization) for this machine"
            )
        elif code in (errno.EACCES, errno.EPERM):
            fix = f"`chmod 666 {KVM_DEVICE}` or add the user to group kvm (`usermod -aG kvm $USER`)"
        else:
            fix = f"make {KVM_DEVICE} usable"
        facts["kvm_api_version"] = None
        report.items.append(
            CheckItem("KVM", False, f"cannot open {KVM_DEVICE}: {error.strerror}", fix, why=why)
        )
        return
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        facts["kvm_api_version"] = version
        if version != KVM_API_VERSION:
            report.items.append(
                CheckItem(
                    "KVM",
                    False,
                    f"KVM API version {version}, {KVM_API_VERSION} expected",
                    "use a Linux kernel with the stable KVM API",
                    why=why,
                )
            )
            return
        report.items.append(
            CheckItem("KVM", True, f"{KVM_DEVICE} opened, API version {version}", why=why)
        )
        capabilities: dict[str, int] = {}
        for name, number, required, purpose in KVM_CAPABILITIES:
            try:
                value = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, number)
            except OSError:
                value = 0
            capabilities[name] = value
            report.items.append(
                CheckItem(
                    f"KVM_CAP_{name}",
                    value > 0,
                    f"present ({value})" if value > 0 else "absent",
                    None
                    if value > 0
                    else (
                        "use a kernel whose KVM has it"
                        if required
                        else "optional: the migration falls back"
                    ),
                    required,
                    purpose,
                )
            )
        facts["kvm_capabilities"] = capabilities
    finally:
        os.close(fd)


# -- the report -------------------------------------------------------------------------


def check_host(
    *,
    ram_page_sizes: tuple[int, ...] = (4096,),
    shared_ram: bool = False,
    target_page_size: int = 4096,
    memory_types: tuple[str, ...] = (),
    minor: bool = False,
    ram_bytes: int | None = None,
    hugetlbfs_file: bool = False,
    kvm: bool = True,
) -> HostReport:
    """Check everything postcopy needs on this host, for RAM of the given page sizes and
    memory types (ram.backend: anonymous, shmem, hugetlb, other; shared_ram adds shmem, a
    huge page size hugetlb; none given: anonymous), in minor-fault mode if `minor`.

    Without `kvm`, KVM is not checked: the migration itself does not use it, and a
    destination that runs this at ADVISE has its VM already."""
    from postcopy.migration.backendcheck import RamUse

    base = memory.page_size()
    types = set(memory_types) or {"anonymous"}
    if shared_ram:
        types.add("shmem")
    huge = tuple(sorted({size for size in ram_page_sizes if size != base}))
    if huge:
        types.add("hugetlb")
    use = RamUse(frozenset(types), minor, ram_bytes, hugetlbfs_file, huge)
    started = time.perf_counter()
    report = HostReport()
    report.facts["memory_types"] = sorted(types)
    _userfaultfd_checks(report, use)
    _page_checks(report, tuple(ram_page_sizes), target_page_size)
    if kvm:
        _kvm_checks(report)
    report.facts["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return report
