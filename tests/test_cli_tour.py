"""The README, as a new user follows it: `make demo` in a fresh copy of this checkout, then
every command of the tour, of "A whole migration by hand" (the qmp-shell transcript and
the qemu.qmp program) and of "Build your own guest", in order, as written.

The copy holds the files git tracks (and new ones it does not ignore), as in a fresh clone
with this change; `make demo` builds its own .venv there (SYSTEM= skips apt: the packages
are here already, as `make test` put them). The commands then run in one bash, in private
mount and network namespaces with a /tmp of their own, so that the README's fixed paths
(/tmp/src.qmp, ...) and ports (4444, ...) meet nobody else's. Where the README leaves the
pace to a human, the harness waits as a human would: for a VM's ready line (its pidfile)
after starting it, and for a migration to end before looking at it in qmp-shell.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# the sections whose commands run on one host, in README order
RUN_SECTIONS = ("A five-minute tour", "A whole migration by hand", "Build your own guest")
NAMESPACES = ("unshare", "--mount", "--net", "--propagation", "private")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def qmp_shell_sessions(transcript: str) -> str:
    """A qmp-shell transcript as the commands typed in it: one piped qmp-shell per
    `$ qmp-shell PATH`, each after that VM's migration (if any) has ended."""
    script = []
    for session in re.split(r"^\$ ", transcript, flags=re.MULTILINE)[1:]:
        lines = session.splitlines()
        path = lines[0].split()[-1]
        commands = [line.removeprefix("(QEMU) ") for line in lines if line.startswith("(QEMU) ")]
        script.append(f"wait_migration_ended {path}")
        script.append(
            "printf '%s\\n' " + " ".join(shlex.quote(c) for c in commands) + f" | qmp-shell {path}"
        )
    return "\n".join(script)


def tour_script(readme: str, workdir: Path) -> str:
    """The README's commands, in order, as one bash script."""
    found = sections(readme)
    script = [
        "set -euo pipefail",
        # whatever happens, the VMs started here end with the script
        "trap 'jobs -p | xargs -r kill 2>/dev/null || true; wait' EXIT",
        "ip link set lo up",
        # a /tmp of our own, with the checkout's copy (itself under /tmp) moved into it
        f"mount --bind {workdir} /mnt && mount -t tmpfs tmpfs /tmp",
        f"mkdir -p {workdir} && mount --move /mnt {workdir} && cd {workdir}",
        'wait_ready() { for f in "$@"; do for _ in $(seq 600); do [ -s "$f" ] && break;'
        ' sleep 0.1; done; [ -s "$f" ] || { echo "no $f" >&2; exit 1; }; done; }',
        "wait_migration_ended() { for _ in $(seq 600); do "
        "printf 'query-migrate\\n' | qmp-shell \"$1\" | grep "
        '\'"status": "\\(active\\|setup\\|postcopy-active\\|device\\)"\' >/dev/null'
        " || return 0;"
        ' sleep 0.1; done; echo "$1: the migration did not end" >&2; exit 1; }',
    ]
    number = 0
    for name in RUN_SECTIONS:
        assert name in found, f"README has no section {name!r}"
        for language, body in BLOCK.findall(found[name]):
            script.append(f"echo '=== {name}: {language} block' >&2")
            if language == "sh":
                script.append(body)
                pidfiles = re.findall(r"--pidfile (\S+)", body)
                if pidfiles and body.rstrip().endswith("&"):
                    # a block that only starts VMs: the user waits for their ready lines
                    # (a block that goes on to `migrate` needs no help: it waits itself)
                    script.append("wait_ready " + " ".join(pidfiles))
            elif language == "text" and "$ qmp-shell" in body:
                script.append(qmp_shell_sessions(body))
            elif language == "python":
                number += 1
                program = workdir / f"readme-example-{number}.py"
                program.write_text(body)
                script.append(f"python {program}")
    script.append("wait")  # every VM the README started has ended
    return "\n".join(script) + "\n"


def fresh_copy(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = REPO / name
        if source.is_file():  # a file deleted in the worktree but still tracked is gone
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="the tour runs in private namespaces: root and unshare (util-linux)",
)
def test_the_readme_works_as_written_after_make_demo(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    fresh_copy(checkout)
    readme = (checkout / "README.md").read_text()
    # Quick start: `make demo` (and `make test`, which is this suite)
    quick = BLOCK.findall(sections(readme)["Quick start"])[0][1]
    assert quick.startswith("make demo ")
    demo = subprocess.run(
        ["make", "demo", "SYSTEM="], cwd=checkout, capture_output=True, text=True, timeout=600
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "verified: the destination's memory is what the guest wrote" in demo.stdout
    noise = [line for line in demo.stderr.splitlines() if "deprecat" in line.lower()]
    assert not noise, noise  # no deprecation banners on the way
    assert (checkout / ".venv" / "bin" / "qmp-shell").exists()

    script = tour_script(readme, checkout)
    (tmp_path / "tour.sh").write_text(script)
    environment = {
        **os.environ,
        "PATH": f"{checkout / '.venv' / 'bin'}:{os.environ['PATH']}",
        "TERM": "dumb",
    }
    environment.pop("VIRTUAL_ENV", None)
    tour = subprocess.Popen(
        [*NAMESPACES, "bash", str(tmp_path / "tour.sh")],
        cwd=checkout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,  # its VMs too: one process group to end if it hangs
    )
    try:
        out, err = tour.communicate(timeout=600)
    finally:
        if tour.poll() is None:
            os.killpg(tour.pid, signal.SIGKILL)
            tour.wait()
    assert tour.returncode == 0, f"{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    assert "Traceback" not in out + err, err
    # 1: the host can; 2: both VMs said they were ready, and the guest made passes
    assert re.search(r"^A*B{2,}$", out, re.M), "no memtouch passes on the source console"
    assert "postcopy migration is possible on this host" in out
    assert len(re.findall(r"^postcopy vm run: ready \(PID \d+\): QMP /tmp/\S+", out, re.M)) == 8
    # 3: completed, with the figures that add up; 4: the destination's memory verified
    assert "pages needed at the switch" in out and "run written to run.json" in out
    verdicts = re.findall(r'"ok": (true|false)', out)
    assert verdicts and set(verdicts) == {"true"}, verdicts
    # 5: the report and its plots
    assert "result: completed" in out and (checkout / "run.png").stat().st_size > 20_000
    # by hand: qmp-shell never met an error, and qemu.qmp saw the migration through
    assert '"error"' not in out
    assert "MIGRATION_PASS {'pass': 1}" in out and "{'ok': True, 'detail': 'memtouch" in out
    # a guest of one's own: the same digest on both sides
    digests = re.findall(r'no verifier[^"]*", "digest": "([0-9a-f]{64})"', out)
    assert len(digests) == 2 and digests[0] == digests[1], digests
