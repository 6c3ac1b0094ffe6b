"""Test helper: run the postcopy command as another user without reading the checkout.

CI clones into a directory only root can enter (users clone under /root, 0700), and the
.venv lies inside the checkout: a child that drops to user nobody can neither run the
venv's interpreter nor import the editable install from there. `ReadableInstall` copies
the package and its runtime dependencies (the closure of its requirements, from their
installed file lists) into a world-readable temporary directory, and picks an interpreter
of the same Python version that nobody can reach (this one's base interpreter when every
directory above it is world-searchable, else one on the usual system paths).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

import postcopy

AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
SYSTEM_BIN_DIRS = ("/usr/bin", "/usr/local/bin", "/bin")


def world_reachable(path: Path) -> bool:
    """Every directory above `path` is searchable by others and the file readable (and,
    for a program, executable) by them."""
    try:
        for parent in reversed(path.parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(path).st_mode
    except OSError:
        return False
    wanted = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) or os.access(path, os.X_OK) else 0)
    return mode & wanted == wanted


def runtime_distributions(name: str = "postcopy") -> list[Distribution]:
    """`name` and everything it requires at run time (no extras), each once."""
    found: dict[str, Distribution] = {}
    pending = [name]
    while pending:
        try:
            dist = distribution(pending.pop())
        except PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            match = re.match(r"[A-Za-z0-9_.\-]+", requirement)
            if match:
                pending.append(match.group(0))
    return list(found.values())


def reachable_interpreter() -> str | None:
    """A Python of this version that user nobody can run, or None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = getattr(sys, "_base_executable", sys.executable)
    candidates = [Path(os.path.realpath(base))]
    candidates += [Path(directory) / version for directory in SYSTEM_BIN_DIRS]
    for candidate in candidates:
        if candidate.name.startswith(version) and world_reachable(candidate):
            return str(candidate)
    return None


class ReadableInstall:
    """The package and its dependencies in a world-readable directory; `close()` removes it."""

    def __init__(self) -> None:
        parent = tempfile.gettempdir()
        if not world_reachable(Path(parent)):
            parent = "/tmp"
        self.root = Path(tempfile.mkdtemp(prefix="postcopy-readable-", dir=parent))
        try:
            self._copy()
            for directory, _, files in os.walk(self.root):
                os.chmod(directory, 0o755)
                for name in files:
                    os.chmod(os.path.join(directory, name), 0o644)
        except BaseException:
            self.close()
            raise
        self.python = reachable_interpreter()

    def _copy(self) -> None:
        package = Path(postcopy.__file__).parent
        shutil.copytree(
            package, self.root / "postcopy", ignore=shutil.ignore_patterns("__pycache__")
        )
        for dist in runtime_distributions():
            if dist.metadata["Name"].lower() == "postcopy":
                continue  # an editable install: its files are the package copied above
            for file in dist.files or []:
                if file.parts[0] == ".." or "__pycache__" in file.parts:
                    continue  # scripts in bin/, compiled caches
                source = Path(str(dist.locate_file(file)))
                if not source.is_file():
                    continue
                target = self.root / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)

    def command(self) -> list[str]:
        """The postcopy command line as user nobody (needs a reachable interpreter)."""
        assert self.python is not None
        return [*AS_NOBODY, self.python, "-m", "postcopy"]

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(self.root),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
            "LANG": "C.UTF-8",
        }

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
