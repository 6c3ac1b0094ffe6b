"""Can this host be a postcopy destination? (placeholder until the full report lands)"""

from __future__ import annotations

from dataclasses import dataclass, field

from postcopy.linux.memory import Mapping
from postcopy.linux.userfaultfd import Feature, Ioctl, RegisterMode, UserfaultFd


@dataclass
class HostReport:
    problems: list[str] = field(default_factory=list)

    @property
    def postcopy_possible(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return "; ".join(self.problems) or "ok"


def check_host(*, ram_page_sizes: tuple[int, ...] = (4096,), shared_ram: bool = False) -> HostReport:
    report = HostReport()
    try:
        with UserfaultFd.open(Feature.THREAD_ID) as uffd, Mapping.anonymous(1 << 21) as probe:
            allowed = uffd.register(probe.address, probe.length, RegisterMode.MISSING)
            needed = Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE
            if allowed & needed != needed:
                report.problems.append(f"userfaultfd lacks {needed & ~allowed!r}")
            uffd.unregister(probe.address, probe.length)
    except OSError as error:
        report.problems.append(f"userfaultfd unusable: {error}")
    return report
