"""Postcopy recovery's policies, alone: the status table, the backoff, the counters, and the
source's rebuild of what to send from the destination's received bitmaps."""

from __future__ import annotations

import numpy as np
import pytest

from postcopy.linux.memory import Mapping
from postcopy.migration.outgoing.pageservice import PageService
from postcopy.migration.outgoing.sender import RamSender
from postcopy.migration.parameters import Parameters
from postcopy.migration.recovery import Backoff, RecoveryStats
from postcopy.migration.status import (
    FINISHED,
    PAUSED_OR_RECOVERING,
    TRANSITIONS,
    IllegalTransition,
    MigrationStatus,
    StatusHolder,
)
from postcopy.ram import RamBlock, RamList


def test_a_paused_postcopy_never_fails() -> None:
    """QEMU: "never fail a postcopy migration; switch back to PAUSED instead"."""
    for status in PAUSED_OR_RECOVERING:
        assert not TRANSITIONS[status] & FINISHED
    holder = StatusHolder()
    for name in ("setup", "active", "postcopy-active", "postcopy-paused"):
        holder.move(MigrationStatus(name))
    with pytest.raises(IllegalTransition, match="postcopy-paused -> failed"):
        holder.move(MigrationStatus.FAILED)
    # the source's double failure at the reconnect, then in the handshake, then success
    for name in (
        "postcopy-recover-setup",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "postcopy-paused",
        "postcopy-recover",
        "postcopy-active",
        "completed",
    ):
        holder.move(MigrationStatus(name))


def test_backoff_doubles_up_to_its_cap_and_starts_again() -> None:
    backoff = Backoff(0.5, 30)
    assert [backoff.next() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    backoff.reset()
    assert backoff.next() == 0.5


def test_recovery_counters_add_the_paused_time_and_trace_both_ends() -> None:
    now = [100.0]
    traced: list[tuple[str, dict[str, object]]] = []
    stats = RecoveryStats(lambda: now[0], lambda name, **fields: traced.append((name, fields)))
    stats.paused("the link failed")
    now[0] += 2.0
    assert stats.as_qmp()["x-paused-ms"] == 2000  # a pause still running counts
    stats.paused("a second failure while paused")  # the pause goes on
    now[0] += 1.0
    stats.resumed(1)
    now[0] += 5.0
    info = stats.as_qmp()
    assert (info["x-pauses"], info["x-recoveries"], info["x-paused-ms"]) == (2, 1, 3000)
    assert info["x-last-pause-reason"] == "a second failure while paused"
    assert [name for name, _ in traced] == ["paused", "paused", "resumed"]
    assert traced[-1][1] == {"epoch": 1, "paused_ms": 3000}


def test_rebuild_sends_exactly_what_the_destination_lacks() -> None:
    mapping = Mapping.anonymous(64 * 4096)
    ram = RamList([RamBlock("pc.ram", mapping)])
    try:
        sender = RamSender(ram, Parameters(), lambda: 0.0)
        service = PageService(ram, sender)
        needed = np.zeros(64, dtype=np.bool_)
        needed[10:40] = True  # 30 pages to send at the switch
        service.set_needed([needed])
        service._claim(0, 10, 20)  # the push took 10..29 (on their way when the link broke)
        received = np.ones(64, dtype=np.bool_)
        received[20:40] = False  # 10..19 arrived; 20..29 were lost; 30..39 never left
        resent = service.rebuild([received])
        assert resent == 10  # 20..29: sent before, and sent again
        with service._needed_lock:
            assert np.array_equal(service._needed[0], ~received)
    finally:
        sender.close()
        mapping.close()
