"""Unit tests of the `-libvirt` scenarios: the name, and the switch a management tool makes
(migrate-start-postcopy once dirty-sync-count reaches N + 1, once, only while active)."""

from __future__ import annotations

from typing import Any

import pytest

from postcopy.bench.libvirt import LibvirtSwitch
from postcopy.bench.scenarios import ScenarioError, parse_name


class FakeSource:
    def __init__(self, fail: bool = False) -> None:
        self.commands: list[str] = []
        self.fail = fail

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.commands.append(command)
        if self.fail:
            raise RuntimeError("Postcopy must be started after migration has been started")
        return {}


def info(status: str, count: int) -> dict[str, Any]:
    return {"status": status, "ram": {"dirty-sync-count": count}}


def test_libvirt_scenarios_leave_the_switch_to_the_bench() -> None:
    scenario = parse_name("memtouch-1g-1cpu-postcopy1-libvirt-preempt-cpl0")
    assert scenario.switch_by_tool and scenario.preempt and scenario.cpl == 0
    assert scenario.migration_parameters["x-postcopy-after-rounds"] == -1
    assert scenario.switch_at_sync_count == 2
    assert scenario.as_json()["switch"] == "libvirt"
    assert parse_name("memtouch-4g-1cpu-postcopy2-libvirt").switch_at_sync_count == 3
    plain = parse_name("memtouch-1g-1cpu-postcopy1")
    assert plain.switch_at_sync_count is None
    assert plain.migration_parameters["x-postcopy-after-rounds"] == 1
    for bad in ("memtouch-1g-1cpu-postcopy0-libvirt", "memtouch-1g-1cpu-precopy-libvirt"):
        with pytest.raises(ScenarioError, match="libvirt"):
            parse_name(bad)


def test_the_switch_comes_once_at_the_count_and_only_while_active() -> None:
    source = FakeSource()
    switch = LibvirtSwitch(source, at_sync_count=2)
    assert not switch.check(0.00, {"status": "setup"})
    assert not switch.check(0.01, info("active", 1))
    assert not switch.check(0.02, info("active", 1))
    assert switch.check(0.03, info("active", 2))
    assert not switch.check(0.04, info("active", 3))
    assert not switch.check(0.05, info("postcopy-active", 3))
    assert source.commands == ["migrate-start-postcopy"]
    record = switch.as_json()
    assert record["requested_at_s"] == 0.03
    assert (record["first_count_seen"], record["count_at_switch"]) == (1, 2)


def test_a_refused_switch_is_recorded_not_retried() -> None:
    source = FakeSource(fail=True)
    switch = LibvirtSwitch(source, at_sync_count=2)
    assert not switch.check(1.0, info("active", 2))
    assert not switch.check(1.01, info("active", 2))
    assert source.commands == ["migrate-start-postcopy"]
    assert "must be started" in (switch.as_json()["error"] or "")
    assert switch.requested_at is None
