"""What the migration needs of a virtual machine, as a typing.Protocol.

The migration layer sits below the VM layer, so it never imports `postcopy.vm`; the
micro-VM implements this protocol and is handed in by the control layer (QMP).
"""

from __future__ import annotations

from typing import Any, Protocol

from postcopy.ram import Bitmap, RamList


class Machine(Protocol):
    @property
    def ram(self) -> RamList:
        """The RAM blocks, in a fixed order both sides agree on."""

    @property
    def vcpu_count(self) -> int: ...

    @property
    def running(self) -> bool: ...

    def stop(self) -> float:
        """Take every vCPU out of KVM_RUN and keep it out; returns the seconds it took."""

    def quiesce_devices(self, timeout: float) -> None:
        """Just before the stop for the switchover: devices give the guest no new work and
        wait (at most `timeout` s) until it has finished what it holds; cont() ends it."""

    def cont(self) -> None:
        """Start (or resume) every vCPU."""

    def start_dirty_log(self) -> None:
        """Begin tracking guest writes; everything counts as clean from here on."""

    def sync_dirty_log(self, rearm: bool = True) -> dict[str, Bitmap]:
        """Pages written by the guest since the last sync (or start), per block name.

        One bool entry per page of the block's page size. The dirty state is cleared
        (re-protected) as it is read, unless `rearm` is False: the last sync of a stopped
        VM, whose protection work (proportional to the dirty pages) would only add to
        the downtime.
        """

    def stop_dirty_log(self) -> None: ...

    def save_state(self) -> dict[str, Any]:
        """The vCPU and device state of a stopped VM as JSON-able plain data."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Load state from `save_state` of a VM with the same configuration."""

    def vcpu_thread_ids(self) -> list[int]:
        """Native thread ids of the vCPU threads (index = vCPU index), for blocktime."""
