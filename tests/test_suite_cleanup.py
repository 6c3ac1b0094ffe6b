"""The suite's own cleanup: a pytest ended by SIGTERM still ends what its tests started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

INNER = """
import subprocess, time, pytest

@pytest.fixture
def child(tmp_path_factory):
    process = subprocess.Popen(["sleep", "600"])
    with open(PID_FILE, "w") as out:
        out.write(str(process.pid))
    yield process
    process.terminate()
    process.wait()

def test_waits(child):
    time.sleep(600)
"""


def test_a_suite_ended_by_sigterm_tears_its_fixtures_down(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_inner.py").write_text(f"PID_FILE = {str(pid_file)!r}\n{INNER}")
    repository = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p"]
    suite = subprocess.Popen(
        [*command, "tests.conftest", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=repository,  # where tests.conftest imports from
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    child = 0
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert suite.poll() is None, suite.communicate()[0]
            assert time.monotonic() < deadline, "the inner test never started its child"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        suite.send_signal(signal.SIGTERM)
        output, _ = suite.communicate(timeout=60)
        assert suite.returncode != 0, output
        # the fixture's teardown ended the child and reaped it: no such process now
        assert not Path(f"/proc/{child}").exists(), output
    finally:
        if suite.poll() is None:
            suite.kill()
            suite.wait()
        if child and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)
