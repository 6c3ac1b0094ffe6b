"""The catalogue of the migration timeline's trace points, as QEMU's trace-events files are.

Each side of a migration records a timeline (`MigrationBase._trace`): one entry per protocol
step, `{"event": NAME, "t": seconds since that side's start, "mono": the host's monotonic
clock, FIELDS...}`. QMP `x-migration-timeline` returns it, `vm run --trace FILE` writes it,
and the tools read it: `postcopy report` orders both sides' entries on one clock, the
plotter marks the steps, the bench measures the first round and the switchover from them.
A reader names a trace point only through the constants here, and
tests/test_trace_points.py checks that every `_trace(...)` the code makes is in this table
with its fields, that every entry here is made somewhere, and that each reader named here
uses it: renaming a step changes this table, and every reader follows or fails its test.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "source"
DESTINATION = "destination"
BOTH = "both"

# who reads trace points by name (every entry is also printed by `postcopy report`)
RUNFILE = "the run's phases and switchover (tools/runfile.py: report, plots, bench)"
PLOT = "the run's plot (tools/plot.py: report --png, the demo, bench --plot)"
BENCH = "the bench's figures (bench/analysis.py)"


@dataclass(frozen=True)
class TracePoint:
    name: str
    side: str  # SOURCE, DESTINATION or BOTH
    fields: tuple[str, ...]  # besides "event", "t" and "mono"
    doc: str
    readers: tuple[str, ...] = ()


STATUS = TracePoint(
    "status",
    BOTH,
    ("status",),
    "the migration status changed (QEMU's names: setup, active, postcopy-active, ...)",
    (RUNFILE,),
)
ROUND_START = TracePoint(
    "round-start",
    SOURCE,
    ("round", "transferred"),
    "a precopy round begins; bytes on the wire so far",
    (BENCH,),
)
ROUND_END = TracePoint(
    "round-end",
    SOURCE,
    ("round", "remaining", "bandwidth", "transferred"),
    "a precopy round ended: bytes still dirty, the measured bandwidth (bytes/s)",
    (PLOT, BENCH),
)
ROUND_SYNC = TracePoint(
    "round-sync",
    SOURCE,
    ("round", "pending", "transferred"),
    "the dirty log was synced before the round's end, as QEMU does once the rest fits in "
    "downtime-limit (dirty-sync-count and MIGRATION_PASS advance): bytes pending after it, "
    "bytes on the wire so far (the bulk round's end when postcopy cuts the round short)",
    (BENCH,),
)
DRAINED = TracePoint(
    "drained", SOURCE, (), "the destination has read all that was sent (PING answered)"
)
STOP = TracePoint(
    "stop",
    SOURCE,
    ("phase",),
    "the source stops the guest: the downtime begins (phase: precopy or postcopy)",
    (PLOT, BENCH),
)
FINAL_SYNC = TracePoint("final-sync", SOURCE, (), "the last dirty-log sync of the stopped guest")
STALE_HARVEST = TracePoint(
    "stale-harvest",
    SOURCE,
    ("pages",),
    "postcopy switchover, the guest still running: the dirty log read again (not a sync "
    "of its own: the final one counts for both) and the pages written since they were sent "
    "discarded, so that few are left for the downtime",
)
DISCARDS_SENT = TracePoint(
    "discards-sent",
    SOURCE,
    ("pages",),
    "the pages dirtied since they were sent are discarded: those the final sync found, in "
    "the downtime",
)
PACKAGE_SENT = TracePoint(
    "package-sent",
    SOURCE,
    ("discarded", "needed"),
    "LISTEN and the device state with RUN are sent: pages discarded, pages still needed",
    (PLOT,),
)
DESTINATION_RUNNING = TracePoint(
    "destination-running", SOURCE, (), "precopy: the destination confirmed that the guest runs"
)
PUSH_DONE = TracePoint(
    "push-done", SOURCE, (), "postcopy: every needed page has been sent", (PLOT,)
)
HANDSHAKE = TracePoint(
    "handshake",
    DESTINATION,
    ("capabilities",),
    "the source's handshake checked: the capabilities it migrates with",
)
ADVISE = TracePoint(
    "advise",
    DESTINATION,
    ("swap_ram", "ram_kept"),
    "postcopy advised: userfaultfd ready; whether RAM moves to a side mapping at LISTEN, "
    "and whether RAM (all zeros: a preallocation) was kept instead of emptied",
)
DISCARDS_DONE = TracePoint("discards-done", DESTINATION, (), "the source's discards are applied")
LISTEN = TracePoint(
    "listen",
    DESTINATION,
    ("placement",),
    "RAM registered on userfaultfd: faults become requests; how each block is placed",
    (PLOT,),
)
RUN = TracePoint(
    "run", DESTINATION, (), "the guest runs on the destination: the downtime ends", (PLOT, BENCH)
)
RUNSTATE = TracePoint(
    "runstate",
    DESTINATION,
    ("source", "autostart"),
    "the run state the guest had on the source (QEMU's global state), and whether the "
    "destination starts it (not with -S)",
)
MOVED = TracePoint(
    "moved", DESTINATION, ("pages",), "every still-valid precopy page is back in guest RAM"
)
COMPLETED = TracePoint(
    "completed", DESTINATION, (), "every page is in place; the migration completed", (PLOT,)
)
PAUSED = TracePoint(
    "paused",
    BOTH,
    ("reason",),
    "postcopy paused: a channel failed, the heartbeat heard nothing, or migrate-pause",
    (BENCH,),
)
RESUMED = TracePoint(
    "resumed",
    BOTH,
    ("epoch", "paused_ms"),
    "postcopy resumed on a new connection (its epoch); how long it had been paused",
    (BENCH,),
)
RECOVER_WAIT = TracePoint(
    "recover-wait",
    SOURCE,
    ("seconds",),
    "paused with x-postcopy-auto-recover: the next reconnect comes after this delay",
)
RECOVER_CONNECT = TracePoint(
    "recover-connect",
    SOURCE,
    ("epoch",),
    "reconnected: RESUME_REQUEST with this epoch and the RECV_BITMAP_REQUESTs are sent",
    (BENCH,),
)
BITMAPS = TracePoint(
    "bitmaps",
    SOURCE,
    ("missing", "resent"),
    "every block's received bitmap is in: pages still to send, of them sent before already",
)
RECOVER_LISTEN = TracePoint(
    "recover-listen", DESTINATION, ("uri",), "migrate-recover: reconnects are taken here"
)
RECOVER_ACCEPT = TracePoint(
    "recover-accept",
    DESTINATION,
    ("epoch",),
    "a reconnect of this migration (its id, a new epoch) is taken: postcopy-recover",
)
PENDING_SERVED = TracePoint(
    "pending-served",
    DESTINATION,
    ("pages", "ms"),
    "every page requested before a resume has arrived, this long after the resume",
)

TRACE_POINTS: tuple[TracePoint, ...] = (
    STATUS,
    ROUND_START,
    ROUND_END,
    ROUND_SYNC,
    DRAINED,
    STOP,
    FINAL_SYNC,
    STALE_HARVEST,
    DISCARDS_SENT,
    PACKAGE_SENT,
    DESTINATION_RUNNING,
    PUSH_DONE,
    HANDSHAKE,
    ADVISE,
    DISCARDS_DONE,
    LISTEN,
    RUN,
    RUNSTATE,
    MOVED,
    COMPLETED,
    PAUSED,
    RESUMED,
    RECOVER_WAIT,
    RECOVER_CONNECT,
    BITMAPS,
    RECOVER_LISTEN,
    RECOVER_ACCEPT,
    PENDING_SERVED,
)
CATALOGUE: dict[str, TracePoint] = {point.name: point for point in TRACE_POINTS}
# the keys every entry has, whatever its trace point
COMMON_FIELDS = ("event", "t", "mono")
