"""The checker of a kvstore service under load: a model of the store, and a verdict on
every answer. Pure (no sockets, no clock of its own): the load generator feeds it what it
sends and what it receives, with times; tests feed it lost, duplicate and wrong answers.

The model is exact when each key is written by one client only (the load generator gives
every client its own keys) and the service runs one client's requests in the order they
were sent: the expected answer of a request is fixed when it is sent, from the model,
which it then updates. Keys start as the guest preloads them (keys 1..preloaded hold
`preload_value(key)`, the others are absent), so a run must use keys no earlier run wrote.

Verdicts: "ok", "wrong" (status or value differ from the model), "duplicate" (a second
answer to a request), "unknown" (an answer to a request never sent); at the end, requests
without an answer are "lost".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from postcopy.vm import kvstore as kv

VERDICTS = ("ok", "wrong", "duplicate", "unknown", "lost")
_ABSENT = None


@dataclass(slots=True)
class Request:
    client: int
    id: int
    op: int
    key: int
    sent: float
    expected_status: int
    expected_value: bytes | None  # None: not checked (INFO)
    answered: float | None = None
    verdict: str | None = None
    got: tuple[int, bytes] | None = None


@dataclass
class Summary:
    sent: int = 0
    answered: int = 0
    ok: int = 0
    wrong: int = 0
    duplicate: int = 0
    unknown: int = 0
    lost: int = 0
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    latency_max_us: float | None = None
    longest_gap_ms: float | None = None
    longest_gap_at: float | None = None
    first_sent: float | None = None
    last_answered: float | None = None
    rate: float | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {key.replace("_", "-"): value for key, value in vars(self).items()}

    @property
    def clean(self) -> bool:
        """Every request answered exactly once and correctly."""
        return (
            self.sent > 0
            and self.ok == self.sent
            and not (self.wrong or self.duplicate or self.unknown or self.lost)
        )


class StoreModel:
    """What the store holds, as far as this run's requests changed it."""

    def __init__(self, preloaded: int) -> None:
        self.preloaded = preloaded
        self._values: dict[int, bytes | None] = {}

    def get(self, key: int) -> bytes | None:
        if key in self._values:
            return self._values[key]
        return kv.preload_value(key) if 1 <= key <= self.preloaded else _ABSENT

    def apply(self, op: int, key: int, value: bytes = b"") -> tuple[int, bytes | None]:
        """The answer (status, value) this request must get; the model moves on."""
        if op == kv.INFO:
            return kv.OK, None
        current = self.get(key)
        status, answer = (kv.NOT_FOUND, b"") if current is None else (kv.OK, current)
        if op == kv.PUT:
            self._values[key] = value
        elif op == kv.DELETE:
            self._values[key] = _ABSENT
        elif op != kv.GET:
            raise ValueError(f"operation {op} is not GET, PUT, DELETE or INFO")
        return status, answer


class Checker:
    """Requests sent and answers received, in order of time; a verdict on each answer."""

    def __init__(self, preloaded: int, *, problems_kept: int = 50) -> None:
        self.model = StoreModel(preloaded)
        self.requests: dict[tuple[int, int], Request] = {}
        self.order: list[Request] = []
        self.extra: list[dict[str, Any]] = []  # duplicates and unknown answers
        self.counts = dict.fromkeys(VERDICTS, 0)
        self._problems_kept = problems_kept

    def sent(self, client: int, id: int, op: int, key: int, value: bytes, t: float) -> Request:
        if (client, id) in self.requests:
            raise ValueError(f"client {client} sent request id {id} twice")
        status, expected = self.model.apply(op, key, value)
        request = Request(client, id, op, key, t, status, expected)
        self.requests[(client, id)] = request
        self.order.append(request)
        return request

    def answer(self, client: int, id: int, status: int, value: bytes, t: float) -> str:
        request = self.requests.get((client, id))
        if request is None:
            return self._extra("unknown", client, id, status, value, t)
        if request.verdict is not None:
            return self._extra("duplicate", client, id, status, value, t)
        request.answered = t
        request.got = (status, value)
        good = status == request.expected_status and (
            request.expected_value is None or value == request.expected_value
        )
        request.verdict = "ok" if good else "wrong"
        self.counts[request.verdict] += 1
        return request.verdict

    def _extra(
        self, verdict: str, client: int, id: int, status: int, value: bytes, t: float
    ) -> str:
        self.counts[verdict] += 1
        self.extra.append(
            {
                "verdict": verdict,
                "client": client,
                "id": id,
                "got": [kv.STATUSES.get(status, status), value.hex()],
                "answered": t,
            }
        )
        return verdict

    def outstanding(self) -> int:
        return len(self.order) - self.counts["ok"] - self.counts["wrong"]

    def finish(self, end: float | None = None) -> Summary:
        """Requests still without an answer are lost (they waited until `end`); the
        summary of the whole run."""
        lost = [r for r in self.order if r.verdict is None]
        for request in lost:
            request.verdict = "lost"
        self.counts["lost"] = len(lost)
        return summarise(self.order, self.extra, self._problems_kept, end)


def summarise(
    requests: Iterable[Request],
    extra: Iterable[dict[str, Any]] = (),
    problems_kept: int = 50,
    end: float | None = None,
) -> Summary:
    requests = list(requests)
    extra = list(extra)
    summary = Summary(sent=len(requests))
    for request in requests:
        if request.verdict == "ok":
            summary.ok += 1
        elif request.verdict == "wrong":
            summary.wrong += 1
        elif request.verdict == "lost":
            summary.lost += 1
    for item in extra:
        if item["verdict"] == "duplicate":
            summary.duplicate += 1
        else:
            summary.unknown += 1
    times = [(r.sent, r.answered) for r in requests if r.answered is not None]
    summary.answered = len(times)
    if requests:
        summary.first_sent = min(r.sent for r in requests)
    if times:
        pairs = np.array(times)
        latency = (pairs[:, 1] - pairs[:, 0]) * 1e6
        summary.latency_p50_us = round(float(np.percentile(latency, 50)), 1)
        summary.latency_p99_us = round(float(np.percentile(latency, 99)), 1)
        summary.latency_max_us = round(float(latency.max()), 1)
        last = float(pairs[:, 1].max())
        summary.last_answered = last
        span = last - float(pairs[:, 0].min())
        summary.rate = round(len(times) / span, 1) if span > 0 else None
    gap, at = longest_gap(requests, end)
    summary.longest_gap_ms = None if gap is None else round(gap * 1e3, 3)
    summary.longest_gap_at = at
    problems = [problem(r) for r in requests if r.verdict in ("wrong", "lost")]
    summary.problems = (problems + extra)[:problems_kept]
    return summary


def problem(request: Request) -> dict[str, Any]:
    """A wrong or lost request as JSON: what was asked, expected and got."""
    expected = None if request.expected_value is None else request.expected_value.hex()
    return {
        "verdict": request.verdict,
        "client": request.client,
        "id": request.id,
        "op": kv.OPS.get(request.op, request.op),
        "key": request.key,
        "sent": request.sent,
        "answered": request.answered,
        "expected": [kv.STATUSES.get(request.expected_status), expected],
        "got": None
        if request.got is None
        else [kv.STATUSES.get(request.got[0]), request.got[1].hex()],
    }


def longest_gap(
    requests: Iterable[Request], end: float | None = None
) -> tuple[float | None, float | None]:
    """The longest time during which a request was waiting and no answer came, and when
    it began. Between two answers a and b, the oldest request answered at b or later (or
    never) was sent at s: the gap is b - max(a, s). Lost requests wait until `end`."""
    requests = list(requests)
    if not requests:
        return None, None
    answered = np.array([np.inf if r.answered is None else r.answered for r in requests])
    sends = np.array([r.sent for r in requests])
    order = np.argsort(answered, kind="stable")
    answered, sends = answered[order], sends[order]
    # oldest send among the requests answered at or after each answer
    oldest = np.minimum.accumulate(sends[::-1])[::-1]
    count = int(np.count_nonzero(np.isfinite(answered)))
    times = answered[:count]
    previous = np.concatenate(([-np.inf], times[:-1]))
    starts = np.maximum(previous, oldest[:count])
    gaps = times - starts
    if count < len(requests) and end is not None:  # lost: waiting until the end
        tail = max(float(times[-1]) if count else -np.inf, float(oldest[count]))
        starts = np.append(starts, tail)
        gaps = np.append(gaps, end - tail)
    if gaps.size == 0:
        return None, None
    index = int(np.argmax(gaps))
    return max(float(gaps[index]), 0.0), float(starts[index])
