"""Sampling profiles of both VM processes during a migration, summarised per thread.

With `postcopy bench --profile`, py-spy records each VM process (non-blocking, so the
target is not paused, `--threads` so every stack names its thread) from just before
`migrate` until both sides are final. The raw stacks are kept beside the results; the
record gets a summary: per thread its share of the samples and the functions where it
spent them, self and inclusive.

py-spy counts a sample as active when the thread is not asleep: running, or runnable
and waiting for a core. On two shared cores the second is common, so read the samples
beside the threads' real CPU seconds (the record's "cpu", from /proc/PID/task).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from postcopy.bench.cleanup import Cleanup

_LINE = re.compile(r"^thread \((?P<tid>\d+)\): (?P<stack>.*) (?P<count>\d+)$")
TOP = 8


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """'send_all (postcopy/transport/connection.py:412)' -> 'send_all (connection.py)'."""
    match = re.match(r"^(?P<func>.*?) \((?P<file>[^:]*)(?::\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match.group('func')} ({Path(match.group('file')).name})"


def summarise(path: Path, rate: int) -> dict[str, Any]:
    """Per thread: samples, seconds on CPU, top functions by self and inclusive samples."""
    samples: Counter[str] = Counter()
    self_counts: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        frames = match.group("stack").split(";")
        thread = f"{frames[0]} ({match.group('tid')})"
        frames = [_frame_name(f) for f in frames[1:]]
        count = int(match.group("count"))
        samples[thread] += count
        if frames:
            self_counts[thread][frames[-1]] += count
            for frame in set(frames):
                inclusive[thread][frame] += count
    total = sum(samples.values())
    threads = {}
    for thread, count in samples.most_common():
        threads[thread] = {
            "samples": count,
            "cpu_seconds": round(count / rate, 3),
            "share": round(count / total, 4) if total else 0.0,
            "top_self": [[name, n] for name, n in self_counts[thread].most_common(TOP)],
            "top_inclusive": [[name, n] for name, n in inclusive[thread].most_common(TOP + 4)],
        }
    return {"rate": rate, "samples": total, "threads": threads, "raw": str(path)}


class Profiler:
    """py-spy on each of `pids` ({side: pid}) between start() and stop()."""

    def __init__(
        self, cleanup: Cleanup, pids: dict[str, int], prefix: Path, rate: int = 200
    ) -> None:
        self.pids = pids
        self.prefix = prefix
        self.rate = rate
        self._cleanup = cleanup
        self._running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.errors: list[str] = []

    def start(self) -> None:
        py_spy = find_py_spy()
        if py_spy is None:
            self.errors.append("py-spy not found (pip install py-spy)")
            return
        for side, pid in self.pids.items():
            output = self.prefix.with_name(f"{self.prefix.name}-{side}.pyspy.txt")
            process = self._cleanup.spawn(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(self.rate),
                    "--format",
                    "raw",
                    "--threads",
                    "--nonblocking",
                    "--output",
                    str(output),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                name=f"py-spy {side}",
            )
            self._running[side] = (process, output)
        time.sleep(0.5)  # py-spy attaches before the migration starts

    def stop(self) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        for side, (process, output) in self._running.items():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                _, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            if output.exists():
                summaries[side] = summarise(output, self.rate)
            else:
                self.errors.append(f"py-spy {side}: {stderr.decode(errors='replace')[-500:]}")
        self._running.clear()
        if self.errors:
            summaries["errors"] = self.errors
        return summaries
