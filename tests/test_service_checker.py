"""The load generator's checker: the store model, and lost, duplicate, wrong and unknown
answers fed to it on purpose; the longest gap; keys and values of the generator."""

from __future__ import annotations

import pytest

from postcopy.service.checker import Checker, StoreModel, longest_gap
from postcopy.service.load import KeyChooser, LoadOptions, latency_series, put_value
from postcopy.vm import kvstore as kv


def test_model_starts_from_the_preload_and_follows_writes() -> None:
    model = StoreModel(preloaded=10)
    assert model.apply(kv.GET, 3) == (kv.OK, kv.preload_value(3))
    assert model.apply(kv.GET, 11) == (kv.NOT_FOUND, b"")
    assert model.apply(kv.PUT, 3, b"new") == (kv.OK, kv.preload_value(3))
    assert model.apply(kv.GET, 3) == (kv.OK, b"new")
    assert model.apply(kv.DELETE, 3) == (kv.OK, b"new")
    assert model.apply(kv.DELETE, 3) == (kv.NOT_FOUND, b"")
    assert model.apply(kv.PUT, 11, b"x") == (kv.NOT_FOUND, b"")
    assert model.apply(kv.GET, 11) == (kv.OK, b"x")
    assert model.apply(kv.INFO, 0) == (kv.OK, None)


def _run(preloaded: int = 100) -> Checker:
    """Three requests of client 0: GET 5, PUT 5, GET 5, sent at 1.0, 1.1, 1.2."""
    checker = Checker(preloaded)
    checker.sent(0, 1, kv.GET, 5, b"", 1.0)
    checker.sent(0, 2, kv.PUT, 5, b"v2", 1.1)
    checker.sent(0, 3, kv.GET, 5, b"", 1.2)
    return checker


def test_correct_answers_are_ok() -> None:
    checker = _run()
    assert checker.answer(0, 1, kv.OK, kv.preload_value(5), 1.5) == "ok"
    assert checker.answer(0, 2, kv.OK, kv.preload_value(5), 1.6) == "ok"
    assert checker.answer(0, 3, kv.OK, b"v2", 1.7) == "ok"
    summary = checker.finish(2.0)
    assert summary.clean
    assert (summary.sent, summary.answered, summary.ok) == (3, 3, 3)
    assert summary.latency_max_us == pytest.approx(0.5e6)


def test_a_lost_answer_is_caught() -> None:
    checker = _run()
    checker.answer(0, 1, kv.OK, kv.preload_value(5), 1.5)
    checker.answer(0, 3, kv.OK, b"v2", 1.7)
    summary = checker.finish(3.0)
    assert not summary.clean
    assert summary.lost == 1
    assert summary.problems[0]["verdict"] == "lost" and summary.problems[0]["id"] == 2
    # the lost PUT waited from its send (1.1) to the end of the run (3.0)
    assert summary.longest_gap_ms == pytest.approx(1300.0)


def test_a_duplicate_answer_is_caught() -> None:
    checker = _run()
    checker.answer(0, 1, kv.OK, kv.preload_value(5), 1.5)
    assert checker.answer(0, 1, kv.OK, kv.preload_value(5), 1.55) == "duplicate"
    checker.answer(0, 2, kv.OK, kv.preload_value(5), 1.6)
    checker.answer(0, 3, kv.OK, b"v2", 1.7)
    summary = checker.finish(2.0)
    assert (summary.duplicate, summary.ok, summary.lost, summary.wrong) == (1, 3, 0, 0)
    assert not summary.clean


@pytest.mark.parametrize(
    ("status", "value"),
    [
        (kv.OK, b"v1"),  # a value never written
        (kv.NOT_FOUND, b""),  # the key is there
        (kv.OK, kv.preload_value(5)),  # the value before the PUT: a stale read
    ],
)
def test_a_wrong_answer_is_caught(status: int, value: bytes) -> None:
    checker = _run()
    checker.answer(0, 1, kv.OK, kv.preload_value(5), 1.5)
    checker.answer(0, 2, kv.OK, kv.preload_value(5), 1.6)
    assert checker.answer(0, 3, status, value, 1.7) == "wrong"
    summary = checker.finish(2.0)
    assert summary.wrong == 1 and not summary.clean
    assert summary.problems[0]["got"] == [kv.STATUSES[status], value.hex()]


def test_an_answer_to_nothing_sent_is_unknown() -> None:
    checker = _run()
    assert checker.answer(1, 1, kv.OK, b"", 1.5) == "unknown"
    assert checker.answer(0, 99, kv.OK, b"", 1.5) == "unknown"
    assert checker.finish(2.0).unknown == 2


def test_the_same_request_id_twice_is_refused() -> None:
    checker = _run()
    with pytest.raises(ValueError, match="twice"):
        checker.sent(0, 1, kv.GET, 5, b"", 1.3)


def test_longest_gap_counts_only_time_with_a_request_waiting() -> None:
    checker = Checker(0)
    # answers at 1.0 and 1.1; then nothing waits until a request at 5.0, answered at 5.2;
    # then a request at 5.3 answered at 6.3
    for index, (sent, answered) in enumerate([(0.9, 1.0), (1.05, 1.1), (5.0, 5.2), (5.3, 6.3)]):
        checker.sent(0, index, kv.GET, 1, b"", sent)
        checker.answer(0, index, kv.NOT_FOUND, b"", answered)
    gap, start = longest_gap(checker.order)
    assert gap == pytest.approx(1.0) and start == pytest.approx(5.3)


def test_keys_belong_to_one_client_each() -> None:
    options = LoadOptions(address="tcp:127.0.0.1:1", clients=4, keys=400, key_offset=1000)
    chooser = KeyChooser(options)
    seen: dict[int, set[int]] = {client: set() for client in range(4)}
    for _ in range(2000):
        for client in range(4):
            op, key = chooser.next(client)
            assert op in (kv.GET, kv.PUT, kv.DELETE)
            seen[client].add(key)
    for client, keys in seen.items():
        assert all(1001 <= key <= 1400 and (key - 1001) % 4 == client for key in keys)
    assert not set.intersection(*seen.values())


def test_zipf_keys_favour_the_first_ranks() -> None:
    chooser = KeyChooser(LoadOptions(address="unix:/x", clients=1, keys=10_000, zipf_s=1.2))
    keys = [chooser.next(0)[1] for _ in range(20_000)]
    assert keys.count(1) > keys.count(100) * 10


def test_put_values_are_unique_and_sized() -> None:
    values = {put_value(client, id, 16) for client in range(3) for id in range(1, 1000)}
    assert len(values) == 3 * 999
    assert len(put_value(1, 2, 48)) == 48 and len(put_value(1, 2, 1)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"clients": 0},
        {"rate": -1},
        {"keys": 3},
        {"read": 0.9, "delete": 0.2},
        {"value_size": 49},
        {"distribution": "pareto"},
        {"zipf_s": float("nan")},
        {"zipf_s": float("inf")},
        {"rate": float("nan")},
        {"read": float("nan")},
        {"duration": float("nan")},
        {"grace": float("nan")},
    ],
)
def test_load_options_are_checked(change: dict[str, object]) -> None:
    options = LoadOptions(address="unix:/x", **{"clients": 4, **change})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        options.check()


def test_latency_series_bins_by_send_time() -> None:
    checker = Checker(0)
    for index, (sent, answered) in enumerate([(0.001, 0.002), (0.005, 0.105), (0.015, None)]):
        checker.sent(0, index, kv.GET, 1, b"", sent)
        if answered is not None:
            checker.answer(0, index, kv.NOT_FOUND, b"", answered)
    checker.finish(1.0)
    series = latency_series(checker.order, 0.0, 0.01)
    assert series["sent"] == [2, 1]
    assert series["max_us"][0] == pytest.approx(100_000.0)
    assert series["lost"] == [0, 1]
