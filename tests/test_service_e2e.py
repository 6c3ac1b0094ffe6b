"""A kvstore guest migrates by postcopy (with preempt) between two VM processes while
clients keep sending requests through the service front: every request is answered
exactly once and correctly, the guest answers while its RAM is still arriving (the
postcopy push is held at 1 MiB/s until it has), and its table verifies afterwards."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from postcopy.service.checker import Checker
from postcopy.service.front import Front
from postcopy.service.load import LoadGenerator, LoadOptions
from tests.hold import HOLD_RATE
from tests.vmprocess import VmProcess, free_port

CAPABILITIES = ["--migrate-capability", "postcopy-ram", "--migrate-capability", "postcopy-preempt"]


def _answered(checker: Checker | None) -> int:
    return 0 if checker is None else checker.counts["ok"] + checker.counts["wrong"]


def _wait(condition: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.02)


@pytest.mark.timeout(240)
def test_kvstore_migrates_under_load_every_request_answered_once(
    vms: list[VmProcess], tmp_path: Path
) -> None:
    front = Front("tcp:127.0.0.1:0", f"unix:{tmp_path}/kv.sock")
    front_thread = threading.Thread(target=front.run, daemon=True)
    front_thread.start()
    load: LoadGenerator | None = None
    load_thread: threading.Thread | None = None
    try:
        port = free_port()
        common = ["--guest", "kvstore", "--ram", "128M", "--service", f"unix:{tmp_path}/kv.sock"]
        destination = VmProcess(
            tmp_path, "dst", *common, *CAPABILITIES, "--incoming", f"tcp:127.0.0.1:{port}"
        )
        vms.append(destination)
        source = VmProcess(tmp_path, "src", *common, *CAPABILITIES)
        vms.append(source)
        _wait(lambda: b"R" in source.console(), "kvstore ready on the source")

        options = LoadOptions(
            address=str(front.address), clients=4, rate=2000, duration=None, keys=20_000, grace=30
        )
        load = LoadGenerator(options)
        outcome: dict[str, Any] = {}
        load_thread = threading.Thread(target=lambda: outcome.update(summary=load.run()))
        load_thread.start()
        _wait(lambda: _answered(load.checker) >= 500, "answers before the migration")

        # postcopy from the start, its background push held at 1 MiB/s
        source.cmd(
            "migrate-set-parameters",
            **{"x-postcopy-after-rounds": 0, "max-postcopy-bandwidth": HOLD_RATE},
        )
        source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        destination.wait_migration({"postcopy-active"})
        at_switch = _answered(load.checker)
        _wait(lambda: _answered(load.checker) >= at_switch + 500, "answers during postcopy")
        # still postcopy: those answers came from a guest whose RAM was still arriving
        assert destination.cmd("query-migrate")["status"] == "postcopy-active"
        source.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
        destination.wait_migration({"completed"})
        source.wait_migration({"completed"})
        after = _answered(load.checker)
        _wait(lambda: _answered(load.checker) >= after + 500, "answers after the migration")
        load.stop()
        load_thread.join(60)
        summary = outcome["summary"]
        assert summary.clean, summary.as_json()
        assert summary.duplicate == summary.lost == summary.wrong == 0

        stats = front.stats()
        assert (stats["switches"], stats["duplicates"], stats["waiting"]) == (2, 0, 0)
        device = destination.cmd("x-request-device")
        assert device["generation"] == 1 and device["guest-errors"] == 0
        destination.cmd("stop")
        verdict = destination.cmd("x-verify")
        assert verdict["ok"], verdict["detail"]
    finally:
        if load is not None:
            load.stop()
        if load_thread is not None:
            load_thread.join(60)
        front.stop()
        front_thread.join(5)
        front.close()
