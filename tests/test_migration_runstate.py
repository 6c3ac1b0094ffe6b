"""The guest's run state across a migration (QEMU's global state): the destination's rule,
and a source that resumes after a failed migration only a guest the migration stopped.

The rule is a pure function (tested as a table); the failure test migrates between two
real micro-VMs in this process, the source wrapped so that saving its device state fails
after the switchover has stopped it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postcopy.migration import globalstate
from postcopy.migration.incoming import IncomingMigration
from postcopy.migration.outgoing import OutgoingMigration
from postcopy.migration.parameters import Capabilities, Parameters
from postcopy.migration.status import MigrationStatus
from postcopy.vm.guests import GUESTS
from postcopy.vm.machine import MicroVM

pytestmark = pytest.mark.timeout(120)

RAM = 16 << 20


@pytest.mark.parametrize(
    ("sent", "autostart", "starts"),
    [
        (None, True, True),  # no global state (an older source): counts as running
        (None, False, False),  # ... and -S keeps it paused
        ("running", True, True),
        ("running", False, False),  # -S
        ("suspended", True, True),  # live, as QEMU's runstate_is_live()
        ("paused", True, False),  # stopped on the source: stays stopped, -S or not
        ("paused", False, False),
        ("prelaunch", True, False),
        ("postmigrate", True, False),
    ],
)
def test_the_destination_starts_only_a_guest_that_ran(
    sent: str | None, autostart: bool, starts: bool
) -> None:
    state: dict[str, Any] = {"cpus": []}
    if sent is not None:
        state = globalstate.attach(state, sent)
        assert state["cpus"] == []
    runstate = globalstate.target_runstate(state)
    assert runstate == (sent or "running")
    assert globalstate.starts_guest(runstate, autostart) is starts


@pytest.mark.parametrize(
    "section", [{"runstate": "flying"}, {"runstate": 3}, {}, "running", {"runstate": "x" * 500}]
)
def test_a_global_state_that_makes_no_sense_is_refused_by_name(section: object) -> None:
    with pytest.raises(globalstate.GlobalStateError, match="the source reported run state") as e:
        globalstate.target_runstate({globalstate.KEY: section})
    assert len(str(e.value)) < 300


class StateCannotBeSaved:
    """A real micro-VM whose device state cannot be saved: the migration fails after the
    switchover has stopped the guest, the one point where the source must decide whether
    to resume it."""

    def __init__(self, vm: MicroVM) -> None:
        self._vm = vm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)

    def save_state(self) -> dict[str, Any]:
        raise RuntimeError("device state could not be saved")


@pytest.fixture
def pair() -> Iterator[tuple[MicroVM, MicroVM]]:
    info = GUESTS["memtouch"]
    source = MicroVM(ram_size=RAM, image=info.image, params=info.pack_params())
    try:
        destination = MicroVM(ram_size=RAM, incoming=True)
        try:
            yield source, destination
        finally:
            destination.close()
    finally:
        source.close()


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_a_failed_migration_resumes_only_a_guest_it_stopped(
    tmp_path: Path, pair: tuple[MicroVM, MicroVM], paused: bool
) -> None:
    source, destination = pair
    source.cont()
    if paused:
        source.stop()
    uri = f"unix:{tmp_path}/migration.sock"
    incoming = IncomingMigration(
        destination, uri, parameters=Parameters(), capabilities=Capabilities()
    )
    incoming.start()
    try:
        outgoing = OutgoingMigration(
            StateCannotBeSaved(source),
            uri,
            parameters=Parameters(),
            capabilities=Capabilities(),
        )
        outgoing.start()
        outgoing.join(60)
        assert outgoing.status.value == MigrationStatus.FAILED
        assert outgoing.error == "device state could not be saved"
        assert source.running is not paused
        assert source.status == ("paused" if paused else "running")
    finally:
        incoming.close()
