"""Postcopy recovery between two real `vm run` processes: QEMU's cases, and real cuts.

QEMU's own recovery tests (tests/qtest/migration/postcopy-tests.c): plain, with preempt,
with TLS and with a pre-shared key, a double failure in the handshake and one at the
reconnect; plus a pause started from the destination, links cut for real (a proxy's RST
inside a RAM frame and inside the bitmap reply, a frozen link found by the heartbeat,
`ss -K`), a foreign connection while paused, and five pauses in one migration. Every
case ends with x-verify and the guest still making passes on the destination.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from postcopy.bench.linkproxy import Cut, LinkProxy
from postcopy.transport import AuthConfig, connect, new_session
from postcopy.transport.errors import TransportError
from postcopy.wire import Direction, Encoder, FrameType, ResumeRequest, Shut
from tests.recoverypair import (
    Pair,
    after_first,
    diagnosis,
    finish,
    held_postcopy,
    start_pair,
)
from tests.vmprocess import QmpCommandError, VmProcess, free_port

pytestmark = pytest.mark.timeout(240)

SOURCE_RECOVERY = [
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "postcopy-active",
    "completed",
]
DESTINATION_RECOVERY = [
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover",
    "postcopy-active",
    "completed",
]
# short liveness limits, so that a test of a silent link does not wait out the defaults
QUICK = {"x-heartbeat-interval-ms": 100, "x-heartbeat-timeout-ms": 1500}


def recover_manually(pair: Pair, pause_side: str) -> None:
    """QEMU's sequence: pause one side, both pause, migrate-recover, migrate resume."""
    vm = pair.source if pause_side == "src" else pair.destination
    vm.cmd("migrate-pause")
    pair.both({"postcopy-paused"})
    new_uri = f"tcp:127.0.0.1:{free_port()}"
    pair.destination.cmd("migrate-recover", uri=new_uri)
    pair.source.cmd("migrate", uri=new_uri, resume=True)
    pair.both({"postcopy-active"})


def test_recovery_plain_with_qemu_preconditions(tmp_path: Path, vms: list[VmProcess]) -> None:
    pair = start_pair(tmp_path, vms)
    with pytest.raises(QmpCommandError, match="only supported during postcopy-active"):
        pair.source.cmd("migrate-pause")
    held_postcopy(pair)
    with pytest.raises(QmpCommandError, match="Postcopy migration in progress, cannot cancel"):
        pair.source.cmd("migrate_cancel")
    with pytest.raises(QmpCommandError, match="Cannot resume if there is no paused migration"):
        pair.source.cmd("migrate", uri=pair.uri, resume=True)
    with pytest.raises(QmpCommandError, match="can only be run when postcopy is paused"):
        pair.destination.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{free_port()}")
    pair.source.cmd("migrate-pause")
    pair.both({"postcopy-paused"})
    source = pair.source.cmd("query-migrate")
    assert source["error-desc"] == "Postcopy migration is paused by the user"
    assert source["x-postcopy"]["needed-pages"] > 0  # the RAM block is all still there
    assert pair.destination.cmd("query-migrate")["error-desc"]  # the broken link, named
    with pytest.raises(QmpCommandError, match="Postcopy migration in progress, cannot cancel"):
        pair.source.cmd("migrate_cancel")
    new_uri = f"tcp:127.0.0.1:{free_port()}"
    pair.destination.cmd("migrate-recover", uri=new_uri)
    pair.destination.cmd("migrate-recover", uri=new_uri)  # QEMU: may be run again
    pair.source.cmd("migrate", uri=new_uri, resume=True)
    pair.both({"postcopy-active"})
    info = finish(pair)
    assert info["x-recoveries"] == 1 and "error-desc" not in info
    assert after_first(pair.statuses("src"), "postcopy-active") == SOURCE_RECOVERY
    assert after_first(pair.statuses("dst"), "postcopy-active") == DESTINATION_RECOVERY


def test_recovery_with_preempt_and_a_key_paused_from_the_destination(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    pair = start_pair(
        tmp_path,
        vms,
        caps=("postcopy-ram", "postcopy-preempt"),
        src_args=("--key", str(key)),
        dest_args=("--key", str(key)),
    )
    held_postcopy(pair)
    recover_manually(pair, "dst")
    # the guest's requests are served on the new preempt channel while the push is held
    before = pair.destination.console().count(b"B")
    pair.destination.wait_passes(b"B", before + 1)
    info = finish(pair)
    assert info["x-recoveries"] == 1
    assert after_first(pair.statuses("dst"), "postcopy-active") == DESTINATION_RECOVERY


def test_recovery_over_tls(tmp_path: Path, vms: list[VmProcess]) -> None:
    from tests.test_transport_tls import make_ca, make_leaf

    ca = make_ca(tmp_path, "ca")
    make_leaf(tmp_path, "dst", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    pair = start_pair(
        tmp_path,
        vms,
        caps=("postcopy-ram", "postcopy-preempt"),
        src_args=("--tls-ca", str(ca[0])),
        dest_args=("--tls-cert", str(tmp_path / "dst.pem"), "--tls-key", str(tmp_path / "dst.key")),
    )
    held_postcopy(pair)
    recover_manually(pair, "src")
    assert finish(pair)["x-recoveries"] == 1


def test_double_failure_in_the_handshake(tmp_path: Path, vms: list[VmProcess]) -> None:
    """The new connection stalls once both sides are in postcopy-recover (QEMU's
    POSTCOPY_FAIL_RECOVERY); migrate-pause takes each side back to paused; a later
    recovery completes."""
    pair = start_pair(tmp_path, vms)
    with LinkProxy(pair.uri) as proxy:
        held_postcopy(pair, via=proxy.uri)
        pair.source.cmd("migrate-pause")
        pair.both({"postcopy-paused"})
        proxy.arm(
            Cut(frame=FrameType.RECV_BITMAP, direction="up", action="freeze", scope="connection")
        )
        pair.source.cmd("migrate", uri=proxy.uri, resume=True)
        proxy.wait_cut()
        pair.both({"postcopy-recover"})
        pair.source.cmd("migrate-pause")
        pair.wait("src", {"postcopy-paused"})
        assert pair.destination.cmd("query-migrate")["status"] == "postcopy-recover"
        pair.destination.cmd("migrate-pause")
        pair.wait("dst", {"postcopy-paused"})
        pair.source.cmd("migrate", uri=proxy.uri, resume=True)
        pair.both({"postcopy-active"})
        info = finish(pair)
    assert info["x-recoveries"] == 1 and info["x-recovery-attempts"] == 2
    assert after_first(pair.statuses("src"), "postcopy-paused")[:5] == [
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "postcopy-paused",
        "postcopy-recover-setup",
    ]


def test_double_failure_at_the_reconnect(tmp_path: Path, vms: list[VmProcess]) -> None:
    """A refused reconnect (QEMU's POSTCOPY_FAIL_CHANNEL_ESTABLISH) goes back to paused
    with an event; the destination stays paused; a later recovery completes."""
    pair = start_pair(tmp_path, vms)
    with LinkProxy(pair.uri) as proxy:
        held_postcopy(pair, via=proxy.uri)
        pair.source.cmd("migrate-pause")
        pair.both({"postcopy-paused"})
        proxy.refuse_new()
        pair.source.cmd("migrate", uri=proxy.uri, resume=True)
        deadline = time.monotonic() + 30
        while pair.statuses("src")[-2:] != ["postcopy-recover-setup", "postcopy-paused"]:
            assert time.monotonic() < deadline, pair.statuses("src")
            pair.source.cmd("query-migrate")
            time.sleep(0.05)
        assert "reconnecting" in pair.source.cmd("query-migrate")["error-desc"]
        assert pair.destination.cmd("query-migrate")["status"] == "postcopy-paused"
        proxy.refuse_new(False)
        pair.source.cmd("migrate", uri=proxy.uri, resume=True)
        pair.both({"postcopy-active"})
        assert finish(pair)["x-recoveries"] == 1


def test_foreign_and_unauthenticated_connections_are_refused_while_paused(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    pair = start_pair(tmp_path, vms, src_args=("--key", str(key)), dest_args=("--key", str(key)))
    held_postcopy(pair)
    pair.source.cmd("migrate-pause")
    pair.both({"postcopy-paused"})
    # a stranger with the wrong key: the transport refuses it
    with pytest.raises(TransportError, match="wrong key"):
        connect(pair.uri, auth=AuthConfig(os.urandom(32)), session=new_session())
    # the right key, but another migration's id
    with connect(pair.uri, auth=AuthConfig.from_file(key), session=new_session()) as stranger:
        encoder = Encoder(Direction.MAIN)
        stranger.send_all(
            [encoder.stream_header(), encoder.encode(ResumeRequest(new_session(), 1))]
        )
        from postcopy.migration.channel import StreamReader
        from postcopy.wire import StreamContext

        reader = StreamReader(stranger, Direction.RETURN, StreamContext(Direction.RETURN))
        reader.read_stream_header()
        answer = reader.read()
    assert isinstance(answer, Shut) and answer.error
    assert "belongs to another migration" in answer.reason
    info = pair.destination.cmd("query-migrate")
    assert info["status"] == "postcopy-paused" and info["x-refused-connections"] == 2
    pair.source.cmd("migrate", uri=pair.uri, resume=True)
    pair.both({"postcopy-active"})
    assert finish(pair)["x-recoveries"] == 1


def test_cuts_inside_a_ram_frame_and_the_bitmap_reply_recover_by_themselves(
    tmp_path: Path, vms: list[VmProcess]
) -> None:
    """A RST in the middle of a RAM_RUN's page data: both sides pause, the source
    reconnects by itself, and the pages that were on their way go again. Then a RST in
    the middle of the first reconnect's RECV_BITMAP: back to paused, and the next
    attempt completes."""
    pair = start_pair(tmp_path, vms)
    with LinkProxy(pair.uri) as proxy:
        held_postcopy(
            pair,
            via=proxy.uri,
            **{"x-postcopy-auto-recover": True, "max-postcopy-bandwidth": 16 << 20},
        )
        proxy.arm(Cut(frame=FrameType.RECV_BITMAP, direction="up", offset=4000))
        proxy.reset()  # the first cut: wherever the push is
        report = proxy.wait_cut()
        assert report.frame_type == FrameType.RECV_BITMAP and report.frame_offset == 4000
        # inside the page data of a run of the push (not a one-page answer to a request)
        proxy.arm(Cut(frame=FrameType.RAM_RUN, direction="down", offset=100_000, skip_short=True))
        report = proxy.wait_cut()
        assert report.frame_type == FrameType.RAM_RUN and report.frame_offset == 100_000
        info = finish(pair)
    assert info["x-recoveries"] == 2
    assert info["x-recovery-resent-pages"] > 0  # the cut run, and what followed it


def test_a_silent_link_is_found_by_the_heartbeat(tmp_path: Path, vms: list[VmProcess]) -> None:
    """A frozen link (nothing gets through, nothing fails): both sides pause once the
    heartbeat's timeout has passed, and recover by themselves when the link is back."""
    pair = start_pair(tmp_path, vms)
    pair.destination.cmd("migrate-set-parameters", **QUICK)
    with LinkProxy(pair.uri) as proxy:
        held_postcopy(pair, via=proxy.uri, **QUICK, **{"x-postcopy-auto-recover": True})
        proxy.freeze()
        pair.both({"postcopy-paused"}, timeout=30)
        assert "taken for dead" in pair.source.cmd("query-migrate")["error-desc"]
        proxy.thaw()
        pair.both({"postcopy-active"}, timeout=60)
        assert finish(pair)["x-recoveries"] == 1


def test_five_pauses_in_one_migration(tmp_path: Path, vms: list[VmProcess]) -> None:
    """Either side pauses, a reset link pauses both; each time the migration resumes,
    and a page a vCPU waited for through the outage comes just after the resume."""
    pair = start_pair(tmp_path, vms, caps=("postcopy-ram", "postcopy-preempt"))
    with LinkProxy(pair.uri) as proxy:
        held_postcopy(pair, via=proxy.uri, **{"x-postcopy-auto-recover": True})
        for cycle in range(5):
            recoveries = cycle + 1
            if cycle % 3 == 0:
                proxy.drop("up")  # the guest's requests are lost: a vCPU will be waiting
                time.sleep(0.3)
                proxy.reset()
            else:
                (pair.source if cycle % 3 == 1 else pair.destination).cmd("migrate-pause")
            deadline = time.monotonic() + 60
            while pair.source.cmd("query-migrate").get("x-recoveries") != recoveries:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            pair.wait("dst", {"postcopy-active"})
        destination = pair.destination.cmd("query-migrate")
        info = finish(pair)
    assert info["x-recoveries"] == 5 and destination["x-recoveries"] == 5
    assert pair.statuses("src").count("postcopy-paused") == 5


def test_a_vcpu_blocked_through_the_outage_gets_its_page_first(
    tmp_path: Path, vms: list[VmProcess], record_property: Any
) -> None:
    """A vCPU waits on a missing page when the link breaks (its request was lost on the
    way); the resume re-sends the request and the page comes as an answer, while the push
    is held at HOLD (a page a second): `pending-served` follows `resumed` on the
    destination, and the source answered at least those pages as requests after the
    pause. The issue bounds the time (100 ms after the resume); a test asserts no wall
    clock, so the figure, `x-pending-pages-ms` (resume -> the last pending page placed),
    is recorded as the test's property `x-pending-pages-ms` (junit XML; printed with -s)
    and measured by `make recovery-soak` (its `blocked` runs). Measured on a loaded
    2-core host: 2.7 and 2.9 ms (4928bbb); 3.2 ms in a run of this test; 2.0-3.9 ms,
    median 3.1, in the 7 `blocked` runs of a 50-run soak (seed 827740982)."""
    pair = start_pair(tmp_path, vms)
    destination = pair.destination
    with LinkProxy(pair.uri) as proxy:
        held_postcopy(pair, via=proxy.uri)
        proxy.drop("up")  # the guest's requests are lost from now on
        # counted after the drop: a request sent between an earlier count and the drop
        # was answered, and the vCPU may wait on nothing when the link breaks; one sent
        # just before the count and lost leaves the vCPU waiting without a new request
        sent = destination.cmd("query-migrate")["x-postcopy-requests-sent"]
        deadline = time.monotonic() + 30
        while not proxy.request_lost(destination.cmd("query-migrate"), sent):
            assert time.monotonic() < deadline, "the guest asked for no page"
            time.sleep(0.05)
        proxy.reset()
        pair.both({"postcopy-paused"})
    paused = pair.source.cmd("query-migrate")["x-postcopy"]
    passes = destination.console().count(b"B")
    new_uri = f"tcp:127.0.0.1:{free_port()}"
    destination.cmd("migrate-recover", uri=new_uri)
    pair.source.cmd("migrate", uri=new_uri, resume=True)
    pair.both({"postcopy-active"})
    deadline = time.monotonic() + 30
    while "x-pending-pages-ms" not in (info := destination.cmd("query-migrate")):
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    assert info["x-pending-pages"] >= 1, (info, diagnosis(pair))
    record_property("x-pending-pages-ms", info["x-pending-pages-ms"])
    print(f"x-pending-pages-ms {info['x-pending-pages-ms']} ({info['x-pending-pages']} pages)")
    events = [entry["event"] for entry in destination.cmd("x-migration-timeline")]
    resumed_at = len(events) - 1 - events[::-1].index("resumed")
    assert events.index("pending-served") > resumed_at, events[-30:]
    answered = pair.source.cmd("query-migrate")["x-postcopy"]
    assert answered["requested-pages"] - paused["requested-pages"] >= info["x-pending-pages"], (
        answered,
        paused,
        info,
    )
    destination.wait_passes(b"B", passes + 1)  # the vCPU went on
    assert finish(pair)["x-recoveries"] == 1


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ss") is None,
    reason="ss -K needs CAP_NET_ADMIN and iproute2 (CI runs as root)",
)
def test_a_kernel_reset_with_ss_kill(tmp_path: Path, vms: list[VmProcess]) -> None:
    """`ss -K` destroys the source's main socket in the kernel (RST to the peer)."""
    pair = start_pair(tmp_path, vms)
    held_postcopy(pair, None, **{"x-postcopy-auto-recover": True})
    port = pair.uri.rsplit(":", 1)[1]
    subprocess.run(
        ["ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", port],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 60
    while pair.source.cmd("query-migrate").get("x-recoveries") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert finish(pair)["x-recoveries"] == 1
