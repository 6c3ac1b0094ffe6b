"""Test helper: hold a migration in the state a test observes, instead of racing it.

A test that waits for a transient status (postcopy-active, active) and then looks at it
fails on a loaded or a fast host when the migration has already moved on. These helpers
cap the bandwidth of the phase being observed (the source reads its parameters live, so
a cap set over QMP holds the phase from the next run on) and lift the cap once the test
has seen what it wanted; requested pages are never throttled, so a guest keeps running.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

# 1 MiB/s: a 256 MiB guest's background push would take minutes, so the phase outlasts
# any reasonable observation; each run of 512 pages then sleeps 2 s, so an uncap takes
# effect within 2 s.
HOLD_RATE = 1 << 20

# Precopy held for good: max-bandwidth alone holds only the bytes on the wire, and a guest
# that has not written its RAM yet (on a loaded host, right after it started) has only zero
# pages, which cross as markers of a few bytes: a 64 MiB pass "held" at 1 MiB/s completed in
# 80 ms. With every page sent as data and 1 byte/s, one run goes, then the next waits days.
PRECOPY_HELD: dict[str, int | str] = {"max-bandwidth": 1, "zero-page-detection": "none"}


def set_parameters(qmp_path: str, **parameters: object) -> None:
    """migrate-set-parameters through a QMP connection of our own (the VM's QMP server
    takes several clients at once, so a CLI that drives the VM keeps its own)."""
    client = QEMUMonitorProtocol(qmp_path)
    try:
        client.connect(negotiate=True)
        response = client.cmd_raw("migrate-set-parameters", parameters)
        assert "error" not in response, response
    finally:
        with contextlib.suppress(Exception):
            client.close()


def samples_show(run_file: Path, status: str) -> bool:
    """Whether a run file (`postcopy migrate --timeline`, the demo's run.jsonl: written and
    flushed sample by sample) has a progress sample with `status` yet."""
    if not run_file.exists():
        return False
    for line in run_file.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line still being written
            record = json.loads(line)
            if record.get("event") == "sample" and record.get("status") == status:
                return True
    return False


def migrate_holding_postcopy(
    source_qmp: str, command: Sequence[str], run_file: Path, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run a `postcopy migrate ... --timeline RUN_FILE` command with the source's postcopy
    push capped until one of its progress samples shows postcopy-active, then uncapped.
    The CLI samples every 0.1 s: a postcopy phase shorter than that would otherwise be
    missed. Returns the completed process with all of its output."""
    set_parameters(source_qmp, **{"max-postcopy-bandwidth": HOLD_RATE})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(list(command), stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + timeout
            while process.poll() is None and not samples_show(run_file, "postcopy-active"):
                assert time.monotonic() < deadline, "no postcopy-active sample"
                time.sleep(0.05)
            set_parameters(source_qmp, **{"max-postcopy-bandwidth": 0})
            process.wait(timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            list(command), process.returncode, out.read(), err.read()
        )
