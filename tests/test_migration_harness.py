"""The real migration code, both ends in this process, without KVM (tests/harness.py).

Each test migrates 16 MiB between two FakeMachines over a unix: socket, with real
userfaultfd on the destination, and checks every page: whole, in place, current. States
are held, not raced: a bandwidth of 1 byte/s holds precopy or the postcopy push where it
is, and a `Proxy` holds or cuts the connection.
"""

from __future__ import annotations

import time

import pytest

from tests.harness import Migration

PAGES = 4096  # 16 MiB
TOP = range(PAGES - 256, PAGES)  # the guest's working set: the last MiB, which the push
# (from page 0 on) reaches last


def test_precopy() -> None:
    # x-max-rounds 1: precopy completes at the end of its first round whether or not it
    # converged. This guest dirties its whole working set (1 MiB) between two syncs, and
    # each sync waits for it to do so: on a loaded host the bandwidth the source measures
    # (sync waits included, as QEMU's) falls below 1 MiB per downtime-limit, and precopy
    # rightly never converges (it stayed 'active' until the timeout, in CI)
    with Migration(pages=PAGES, working_set=TOP, parameters={"x-max-rounds": 1}) as pair:
        pair.start()
        pair.finish()
        pair.verify()
        assert pair.incoming.postcopy_start is None
        assert pair.outgoing.query()["ram"]["duplicate"] > 0  # the zero pages crossed as such


@pytest.mark.parametrize("rounds", [0, 1], ids=["from-the-start", "after-one-round"])
@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt"])
def test_postcopy_serves_the_guest_while_the_push_is_held(rounds: int, preempt: bool) -> None:
    """The push is held at 1 byte/s after its first run, away from the guest's working set
    (every page of which the guest dirtied after precopy sent it): the destination's guest
    gets those pages by request only, and runs on. Then the push is let go and finishes."""
    capabilities = ["postcopy-ram", "postcopy-preempt"] if preempt else ["postcopy-ram"]
    with Migration(
        pages=PAGES,
        working_set=TOP,
        capabilities=capabilities,
        parameters={
            "x-postcopy-after-rounds": rounds,
            "max-postcopy-bandwidth": 1,
            "x-postcopy-run-pages": 64,
            # the dirty log is synced at the round's end only, not once the rest of the
            # round fits in downtime-limit (as QEMU does): the working set, at the end of
            # RAM, is then all stale at the switch, however fast the round went
            "downtime-limit": 0,
        },
    ) as pair:
        received = list(pair.incoming.received)
        pair.start()
        pair.wait_destination("postcopy-active")
        pair.destination.wait_passes(pair.destination.passes() + 2)
        assert pair.incoming.status.value.value == "postcopy-active"  # the push is held
        assert pair.incoming.query()["x-postcopy-requests-sent"] > 0
        source = pair.outgoing.query()["x-postcopy"]
        assert source["requested-pages"] > 0
        if rounds:
            assert source["needed-pages"] >= len(TOP)  # the whole working set went stale
        pair.set_parameter("max-postcopy-bandwidth", 0)
        pair.finish()
        pair.verify()
        assert pair.outgoing.rounds == rounds
        # one set of `received` bitmaps, cleared in place at ADVISE: the prefaulter, the
        # placer, the fault thread and the swap all hold these arrays
        assert all(a is b for a, b in zip(received, pair.incoming.received, strict=True))


def test_two_vcpus_through_a_proxy() -> None:
    with Migration(
        pages=PAGES,
        vcpus=2,
        working_set=TOP,
        capabilities=["postcopy-ram", "postcopy-preempt", "postcopy-blocktime"],
        parameters={"x-postcopy-after-rounds": 1},
        proxy=True,
    ) as pair:
        pair.start()
        pair.finish()
        pair.verify()
        assert pair.proxy is not None and len(pair.proxy.links) == 2  # main and preempt
        assert len(pair.incoming.query()["postcopy-vcpu-blocktime"]) == 2


def test_a_cut_in_precopy_fails_both_ends_and_the_source_runs_on() -> None:
    with Migration(
        pages=PAGES, working_set=TOP, parameters={"max-bandwidth": 1}, proxy=True
    ) as pair:
        pair.start()
        pair.wait_source("active")
        assert pair.proxy is not None
        pair.proxy.cut()
        assert pair.wait_source("failed", "completed") == "failed"
        assert pair.wait_destination("failed", "completed") == "failed"
        assert pair.source.running  # precopy failed: the guest goes on where it was
        assert pair.outgoing.error and pair.incoming.error


def test_a_held_return_path_keeps_the_guest_running_on_the_source() -> None:
    """The proxy holds what the destination says: the source finishes its round but never
    stops the guest, since the stop waits for the destination's PONG (it has taken in what
    was sent). Released, the migration completes."""
    with Migration(
        pages=PAGES,
        working_set=TOP,
        # the round's end (or a sync in it that converged) always goes on to the stop:
        # without x-max-rounds, a round that did not converge on a loaded host was followed
        # by more rounds, not by the stop this test holds
        parameters={"max-bandwidth": 1, "x-max-rounds": 1},
        proxy=True,
    ) as pair:
        assert pair.proxy is not None
        pair.start()
        pair.wait_source("active")  # the setup's PING had its PONG
        pair.proxy.hold(to_destination=False, to_source=True)
        pair.set_parameter("max-bandwidth", 0)
        # a hang guard, not a measure: in process the fake vCPU's Python loop shares the
        # GIL with both sides, and this 16 MiB round took 3-16 s on a quiet host (CI: > 20 s)
        deadline = time.monotonic() + 120
        # the round ends, or precopy completes from the sync before its end (QEMU's way,
        # once the rest fits in downtime-limit): either way the stop waits for the PONG
        ends = {"round-end", "round-sync"}
        while not any(entry["event"] in ends for entry in list(pair.outgoing.timeline)):
            assert time.monotonic() < deadline, "the round never ended"
            time.sleep(0.001)
        assert pair.outgoing.status.value.value == "active"
        assert pair.source.running
        pair.proxy.release()
        pair.finish()
        pair.verify()


@pytest.mark.parametrize(
    ("backend", "minor"),
    [("memfd", False), ("memfd-hugetlb", False), ("memfd", True), ("memfd-hugetlb", True)],
)
def test_postcopy_on_shared_and_huge_page_memory(backend: str, minor: bool) -> None:
    """The same migration with RAM on a memfd or hugetlb memfd (copy or minor-fault
    placement): every 4 KiB page whole, in place, current; huge pages cross whole."""
    from postcopy.ram import MemoryBackend
    from tests.hugepages import huge_pages

    with (
        huge_pages(2 * PAGES // 512 if backend == "memfd-hugetlb" else 0),
        Migration(
            pages=PAGES,
            vcpus=2,
            working_set=TOP,
            capabilities=["postcopy-ram", "postcopy-preempt"],
            parameters={"x-postcopy-after-rounds": 1},
            backend=MemoryBackend.parse(backend),
            destination_parameters={"x-postcopy-minor-faults": minor},
        ) as pair,
    ):
        pair.start()
        pair.finish()
        pair.verify()
        info = pair.incoming.query()
        expected = "copy" if backend == "memfd" else "copy-huge"
        assert info["x-placement"] == {"pc.ram": "continue" if minor else expected}
        needed = pair.outgoing.query()["x-postcopy"]["needed-pages"]
        if backend == "memfd-hugetlb":
            assert needed <= PAGES // 512  # in huge pages


def test_a_migration_held_past_the_guard_says_where_each_thread_waits() -> None:
    """finish() is a hang guard, and its timeout must tell a hang from a slow host: held
    by the proxy (nothing passes either way), the migration cannot end, and the error
    names where the source's threads wait, besides each side's query and timeline."""
    with Migration(
        pages=PAGES,
        working_set=TOP,
        parameters={"max-bandwidth": 1, "x-max-rounds": 1},
        proxy=True,
    ) as pair:
        assert pair.proxy is not None
        pair.start()
        pair.wait_source("active")
        pair.proxy.hold()
        pair.set_parameter("max-bandwidth", 0)
        with pytest.raises(TimeoutError) as raised:
            pair.finish(timeout=1.0)
        text = str(raised.value)
        assert text.startswith("status active, not one of"), text
        lines = {line.split(":")[0].strip(): line for line in text.splitlines()}
        assert "control.py" in lines["migration"], text  # the migration thread's own frames
        assert "returnpath.py" in lines["return-path"], text
        assert "'x-rounds': 1" in lines["source"], text
        assert "timeline" in text and "harness.py" in lines["vcpu0"], text
