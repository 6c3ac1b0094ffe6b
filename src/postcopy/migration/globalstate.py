"""The guest's run state across a migration: QEMU's global state section and its rule.

The source records the run state its guest had when the migration stopped it (QEMU's
`global_state_store()`), and it travels inside the device state. The destination then
decides as QEMU's `process_incoming_migration_bh` does (`migration_get_target_runstate`):
- no global state received (an older source): the guest counts as running;
- a live run state (running): the guest starts if autostart is on, i.e. the destination
  was not started with -S; otherwise it waits, paused, for `cont`;
- any other run state (paused, ...): the destination takes it over; a guest the user had
  stopped on the source stays stopped, whatever -S says, until `cont`.

QEMU applies this rule at the end of a precopy migration; at postcopy's RUN it obeys -S
alone (`loadvm_postcopy_handle_run_bh`), which starts a guest the user had paused on the
source. We apply the rule at both, so a paused guest never runs behind the user's back.
"""

from __future__ import annotations

from typing import Any

KEY = "global-state"
RUNNING = "running"
# QEMU's runstate_is_live(): the states in which the guest counts as running
LIVE_RUNSTATES = frozenset({RUNNING, "suspended"})
# run states a source may report: QEMU's RunState names that a stopped guest can have
KNOWN_RUNSTATES = frozenset(
    {
        RUNNING,
        "suspended",
        "paused",
        "prelaunch",
        "postmigrate",
        "debug",
        "io-error",
        "watchdog",
        "guest-panicked",
    }
)


class GlobalStateError(ValueError):
    """A global state section that cannot be understood."""


def attach(device_state: dict[str, Any], runstate: str) -> dict[str, Any]:
    """`device_state` with the source's run state in it (the global state section)."""
    return {**device_state, KEY: {"runstate": runstate}}


def target_runstate(device_state: dict[str, Any]) -> str:
    """The run state the source reported (QEMU: "running" when none was sent)."""
    section = device_state.get(KEY)
    if section is None:
        return RUNNING
    runstate = section.get("runstate") if isinstance(section, dict) else None
    if not isinstance(runstate, str) or runstate not in KNOWN_RUNSTATES:
        shown = runstate if isinstance(runstate, str) else type(runstate).__name__
        raise GlobalStateError(
            f"the source reported run state {shown[:40]!r}, which is not one of QEMU's "
            f"({', '.join(sorted(KNOWN_RUNSTATES))})"
        )
    return runstate


def starts_guest(runstate: str, autostart: bool) -> bool:
    """Whether the destination starts the guest once it has loaded it."""
    return runstate in LIVE_RUNSTATES and autostart
