"""`postcopy demo` end to end (on a 256 MiB guest to stay quick): it migrates, verifies,
writes its files, and leaves no process, socket or temporary file behind — after success,
after Ctrl-C, after SIGTERM in the middle of the migration, and after a VM fails to start."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postcopy.tools.runfile import load_run
from tests.hold import HOLD_RATE, set_parameters

pytestmark = pytest.mark.timeout(150)

DEMO = [sys.executable, "-m", "postcopy", "demo"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                if text.encode() in file.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def workdir_of(output: str) -> str:
    match = re.search(r"working directory: (\S+)", output)
    assert match, output
    return match.group(1)


def assert_all_gone(workdir: str, pids: list[int]) -> None:
    assert not os.path.exists(workdir), os.listdir(workdir)
    assert processes_mentioning(workdir) == []
    for pid in pids:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or f"{workdir}".encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )


def kill_leftovers(workdir: str | None) -> None:
    """If a test fails half-way, still end what the demo started (by PID)."""
    if workdir:
        for pid in processes_mentioning(workdir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_demo_migrates_verifies_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [*DEMO, "--ram", "256M", "--vcpus", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
    )
    workdir = None
    try:
        workdir = workdir_of(result.stdout)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr == ""
        pids = [int(pid) for pid in re.findall(r"PID (\d+)", result.stdout)]
        assert len(pids) == 2
        text = " ".join(result.stdout.split())
        for expected in (
            "migration summary",
            "postcopy requests",
            "blocktime",
            "the guest kept running on the destination",
            "verified:",
            "memtouch consistent",
        ):
            assert expected in text, expected
        assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)
        run = load_run(out / "run.jsonl")
        assert run.header["command"] == "demo"
        assert run.header["options"]["switch_after_rounds"] == 1
        assert run.header["options"]["preempt"] is True
        assert run.status == "completed"
        assert run.verify is not None and run.verify["ok"]
        assert run.verify["passes-at-stop"] > run.verify["passes-at-completion"]
        assert run.source["x-rounds"] == 1 and run.source["ram"]["postcopy-bytes"] > 0
        assert len(run.destination["postcopy-vcpu-blocktime"]) == 2
        assert_all_gone(workdir, pids)
    finally:
        kill_leftovers(workdir)


def start_demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    # Ctrl-C must reach the demo as in a terminal, even when the tests themselves run in
    # the background (a shell starts background jobs with SIGINT ignored, and Python then
    # keeps ignoring it)
    return subprocess.Popen(
        [*DEMO, "--out", str(tmp_path / "out"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_until(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stdout is not None
    seen = ""
    while marker not in seen:
        line = process.stdout.readline()
        assert line, f"the demo ended before printing {marker!r}: {seen}"
        seen += line
    return seen


def wait_for_status(run_file: Path, statuses: set[str], timeout: float = 60) -> str:
    """Watch the demo's run file (written as it goes) until a sample has one of `statuses`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_file.exists():
            for line in run_file.read_text().splitlines():
                record = json.loads(line)
                if record["event"] == "sample" and record["status"] in statuses:
                    return str(record["status"])
        time.sleep(0.02)
    raise TimeoutError(f"no sample with status in {statuses}")


@pytest.mark.parametrize(
    ("phase", "sig"),
    [
        ("starting", signal.SIGINT),  # Ctrl-C while the VMs start
        ("precopy", signal.SIGTERM),  # kill(1) in the middle of precopy
        ("postcopy", signal.SIGINT),  # Ctrl-C once the guest has moved
    ],
)
def test_demo_interrupted_removes_everything(
    tmp_path: Path, phase: str, sig: signal.Signals
) -> None:
    # precopy at 64 MiB/s leaves time to catch each phase of a 256 MiB guest
    process = start_demo(tmp_path, "--ram", "256M", "--max-bandwidth", "64M")
    workdir = None
    try:
        seen = read_until(process, "working directory")
        workdir = workdir_of(seen)
        seen += read_until(process, "started the source VM")
        pids = [int(pid) for pid in re.findall(r"PID (\d+)", seen)]
        assert len(pids) == 2
        if phase == "precopy":
            wait_for_status(tmp_path / "out" / "run.jsonl", {"active"})
        elif phase == "postcopy":
            # the first round at 64 MiB/s lasts seconds: time to hold the postcopy phase
            # that follows (the demo caps it at 64 MiB/s too, which a few dirty MiB outrun)
            wait_for_status(tmp_path / "out" / "run.jsonl", {"active"})
            set_parameters(
                os.path.join(workdir, "source.qmp"), **{"max-postcopy-bandwidth": HOLD_RATE}
            )
            wait_for_status(tmp_path / "out" / "run.jsonl", {"postcopy-active"})
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, out + err
        assert "interrupted" in err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert_all_gone(workdir, pids)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_leftovers(workdir)


def test_demo_with_a_vm_that_cannot_start_is_one_line_and_clean(tmp_path: Path) -> None:
    # more vCPUs than KVM allows per VM: the destination VM exits at once
    process = start_demo(tmp_path, "--ram", "64M", "--vcpus", "5000", "--keep-dir")
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    workdir = workdir_of(out)
    try:
        assert process.returncode == 1
        lines = err.strip().splitlines()
        assert re.match(
            r"postcopy demo: the (source|destination) VM exited with status \d: "
            r"postcopy vm run: --vcpus 5000: a VM has 1 to 32 vCPUs",
            lines[0],
        ), err
        assert lines[1] == f"working directory kept: {workdir}"
        assert "Traceback" not in err
        assert processes_mentioning(workdir) == []
        kept = sorted(os.listdir(workdir))
        assert "destination.stderr" in kept and not any(n.endswith(".qmp") for n in kept)
    finally:
        kill_leftovers(workdir)
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)


def test_bad_arguments_are_one_line() -> None:
    for args, text in (
        (["--ram", "lots"], "lots"),
        (["--max-bandwidth", "x"], '"x" is not a size'),
        (["--guest", "nosuch"], "unknown guest"),
        (["--guest", "kvstore", "--cut-link"], "postcopy demo --service"),
        (["--vcpus", "0"], "--vcpus"),
        (["--service", "--modes", "precopy,sideways"], "--modes: sideways"),
        (["--service", "--rate", "0"], "--rate 0"),
        (["--service", "--ram", "1536K"], "whole number of MiB"),
    ):
        result = subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and text in result.stderr
