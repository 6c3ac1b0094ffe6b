"""Watching a migration from outside: QEMU's final statuses and the loop that polls both
sides' `query-migrate` until both are final (`postcopy migrate`, `demo`, `bench`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postcopy.migration.status import FINISHED
from postcopy.tools.qmpclient import QmpClient, QmpClientError

# QEMU's statuses after which a migration does nothing more
FINAL_STATUSES = frozenset(status.value for status in FINISHED)
# how long the destination may take to report its end once the source has finished
DESTINATION_GRACE = 15.0


class WatchTimeout(Exception):
    """The migration did not end in time; the message names both sides' status."""


@dataclass
class Poll:
    """One round of queries: `t` seconds after `started`, on the host's monotonic clock
    `mono`; a side is None when it was not asked (no destination) or its QMP is gone."""

    t: float
    mono: float
    source: dict[str, Any] | None
    destination: dict[str, Any] | None

    @property
    def status(self) -> str:
        return str((self.source or {}).get("status", "none"))


def query_migrate(client: QmpClient | None) -> dict[str, Any] | None:
    """query-migrate, or None once the client's process or connection is gone."""
    if client is None:
        return None
    try:
        return dict(client.execute("query-migrate"))
    except QmpClientError:
        return None


def _final(info: dict[str, Any] | None) -> bool:
    return info is None or info.get("status") in FINAL_STATUSES


def watch_until_final(
    source: QmpClient,
    destination: QmpClient | None,
    *,
    started: float,
    interval: float,
    on_poll: Callable[[Poll], None] | None = None,
    timeout: float | None = None,
    destination_grace: float = DESTINATION_GRACE,
) -> Poll:
    """Poll both sides every `interval` seconds (a fixed schedule from `started`, the
    monotonic time `migrate` was sent) until both are final, calling `on_poll` each
    round; return the last round. A side whose QMP is gone counts as final. Once the
    source is final, a destination that never began (status none) is final too, and one
    that is still busy gets `destination_grace` seconds to finish."""
    next_poll = time.monotonic()
    source_final_at: float | None = None
    while True:
        now = time.monotonic()
        poll = Poll(round(now - started, 4), now, query_migrate(source), query_migrate(destination))
        if on_poll is not None:
            on_poll(poll)
        if _final(poll.source):
            source_final_at = source_final_at if source_final_at is not None else now
            dst = poll.destination
            if (
                destination is None
                or _final(dst)
                or (dst or {}).get("status", "none") == "none"
                or now - source_final_at > destination_grace
            ):
                return poll
        if timeout is not None and now - started > timeout:
            raise WatchTimeout(
                f"migration not finished after {timeout:.0f} s: source "
                f"{(poll.source or {}).get('status', 'gone')}, destination "
                f"{(poll.destination or {}).get('status', 'gone')}"
            )
        next_poll = max(next_poll + interval, time.monotonic() - interval)
        time.sleep(max(next_poll - time.monotonic(), 0.0))
