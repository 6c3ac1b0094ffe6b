"""Migration capabilities and parameters, with QEMU's names, types and checks.

QMP's migrate-set-capabilities / migrate-set-parameters and their query commands read and
write these. Names that QEMU does not have carry QEMU's "x-" prefix for experiments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

# Capabilities we implement; QEMU has more (xbzrle, multifd, ...) which we refuse by name.
SUPPORTED_CAPABILITIES = (
    "events",
    "postcopy-ram",
    "postcopy-preempt",
    "postcopy-blocktime",
    "return-path",
    "pause-before-switchover",
    "zero-blocks",
)

KNOWN_QEMU_CAPABILITIES = (
    *SUPPORTED_CAPABILITIES,
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "compress",
    "x-colo",
    "release-ram",
    "block",
    "multifd",
    "dirty-bitmaps",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)


class ParameterError(ValueError):
    """A capability or parameter name or value that is refused, with the reason."""


@dataclass
class Capabilities:
    enabled: dict[str, bool] = field(
        default_factory=lambda: {name: False for name in SUPPORTED_CAPABILITIES}
    )

    def set(self, name: str, state: bool) -> None:
        if name not in SUPPORTED_CAPABILITIES:
            if name in KNOWN_QEMU_CAPABILITIES:
                raise ParameterError(f"capability '{name}' is not supported by postcopy")
            raise ParameterError(f"Capability '{name}' not found")
        if not isinstance(state, bool):
            raise ParameterError(f"capability '{name}' state must be a boolean, not {state!r}")
        self.enabled[name] = state

    def __getitem__(self, name: str) -> bool:
        return self.enabled[name]

    def query(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.enabled.items()]

    def names(self) -> frozenset[str]:
        return frozenset(name for name, state in self.enabled.items() if state)


@dataclass
class Parameters:
    """Migration parameters (QEMU's names in query-migrate-parameters use dashes)."""

    # bytes per second; 0 means unlimited (QEMU's default is 128 MiB/s; we default to the link)
    max_bandwidth: int = 0
    # bytes per second during postcopy; 0 means unlimited (QEMU's meaning)
    max_postcopy_bandwidth: int = 0
    # milliseconds the guest may be stopped at a precopy switchover
    downtime_limit: int = 300
    # precopy rounds after which a migration that does not converge stops the guest and
    # finishes anyway (precopy only); 0 = iterate until it converges or is cancelled (QEMU)
    x_max_rounds: int = 0
    # switch to postcopy automatically after this many completed precopy rounds; -1 = manual.
    # 0 means postcopy from the start (no precopy round at all).
    x_postcopy_after_rounds: int = -1
    # switch to postcopy automatically when precopy rounds stop shrinking the dirty set
    x_postcopy_when_stalled: bool = False
    # pages per background run in postcopy; 0 = automatic: 512 when requested pages have
    # their own channel (postcopy-preempt), else 64 so that they do not wait behind a run
    x_postcopy_run_pages: int = 0
    # pages per run in precopy
    x_precopy_run_pages: int = 512
    # nice value of the threads that move RAM in bulk (source: the migration thread;
    # destination: the receiver and the prefaulter). Below the vCPUs' 0 they win a contended
    # CPU: on 2 shared cores the bulk round runs ~20% faster while the guest gets less CPU
    # for that time (and dirties less). 0 treats them as the vCPUs' equals. Needs
    # CAP_SYS_NICE to go below 0; without it, 0.
    x_migration_thread_nice: int = -5
    # destination, RAM on memfd or hugetlb (shared): register it MISSING|MINOR and place
    # postcopy pages by reading them into a second mapping of the RAM's file and mapping
    # them with UFFDIO_CONTINUE, instead of UFFDIO_COPY (beyond QEMU; see migration/backends)
    x_postcopy_minor_faults: bool = False
    # the transport's authentication key, given as a file path (never sent anywhere)
    x_key_file: str = ""
    # QEMU 9.0's zero-page-detection: "none" sends zero pages as data like any other, which
    # makes a sparse guest cost its full size on the wire (and under a bandwidth cap);
    # "legacy" and "multifd" (QEMU's default; we have no multifd) detect them on the sender
    zero_page_detection: str = "multifd"
    tls_creds: str = ""
    tls_hostname: str = ""
    announce_initial: int = 50
    # -- postcopy recovery (docs/ARCHITECTURE.md, "Recovery"); QEMU leaves all of this to
    # libvirt. The source reconnects by itself after a pause, to the same URI, first after
    # x-recover-backoff-ms and then doubling up to x-recover-backoff-max-ms, for ever: a
    # pause never gives up (neither side holds the whole guest).
    x_postcopy_auto_recover: bool = False
    x_recover_backoff_ms: int = 500
    x_recover_backoff_max_ms: int = 30000
    # the source PINGs every x-heartbeat-interval-ms (0 = no heartbeat); a side that hears
    # nothing from its peer for x-heartbeat-timeout-ms declares the link dead, and the
    # same figure is every socket's TCP_USER_TIMEOUT (unacknowledged data). The default
    # lets a blip of a few seconds pass: a transient outage should never become a pause.
    x_heartbeat_interval_ms: int = 1000
    x_heartbeat_timeout_ms: int = 15000
    # a recovery handshake that has not finished after this long goes back to paused
    x_recover_timeout_ms: int = 30000

    _LIMITS: ClassVar[dict[str, tuple[int, int]]] = {
        "max_bandwidth": (0, 2**62),
        "max_postcopy_bandwidth": (0, 2**62),
        "downtime_limit": (0, 2000000),
        "x_max_rounds": (0, 10000),
        "x_postcopy_after_rounds": (-1, 10000),
        "x_postcopy_run_pages": (0, 512),
        "x_precopy_run_pages": (1, 512),
        "x_migration_thread_nice": (-20, 19),
        "announce_initial": (1, 100000),
        "x_recover_backoff_ms": (10, 3600000),
        "x_recover_backoff_max_ms": (10, 3600000),
        "x_heartbeat_interval_ms": (0, 3600000),
        "x_heartbeat_timeout_ms": (100, 3600000),
        "x_recover_timeout_ms": (100, 3600000),
    }

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "zero_page_detection": ("none", "legacy", "multifd"),
    }

    def set(self, qmp_name: str, value: Any) -> None:
        name = qmp_name.replace("-", "_")
        known = {f.name: f for f in fields(self)}
        if name not in known or name.startswith("_"):
            raise ParameterError(f"Parameter '{qmp_name}' is unexpected")
        current = getattr(self, name)
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ParameterError(f"Invalid parameter type for '{qmp_name}', expected: boolean")
        elif isinstance(current, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParameterError(f"Invalid parameter type for '{qmp_name}', expected: integer")
            low, high = self._LIMITS.get(name, (0, 2**63 - 1))
            if not low <= value <= high:
                raise ParameterError(
                    f"Parameter '{qmp_name}' expects a value between {low} and {high}, not {value}"
                )
        elif isinstance(current, str) and not isinstance(value, str):
            raise ParameterError(f"Invalid parameter type for '{qmp_name}', expected: string")
        elif name in self._CHOICES and value not in self._CHOICES[name]:
            raise ParameterError(f"Parameter '{qmp_name}' does not accept value '{value}'")
        setattr(self, name, value)

    def query(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
