"""Sizes and rates as people write them: the one parser every option and scenario name uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.units import format_bytes, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("256M", 256 << 20), ("1G", 1 << 30), ("4GiB", 4 << 30), ("1.5k", 1536)],
)
def test_sizes_as_people_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_rate_takes_per_second() -> None:
    assert parse_rate("100MB/s") == 100 << 20


@pytest.mark.parametrize("text", ["", "1Q", "-1M", "1e3", "M"])
def test_what_is_not_a_size_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["9" * 400, "9" * 5000 + "T", "99999999999T"])
def test_a_size_too_large_is_refused_with_a_clear_error(text: str) -> None:
    # float() of hundreds of digits is inf, and int(inf) raised OverflowError, not ValueError
    with pytest.raises(ValueError, match="too large a size"):
        parse_size(text)


@given(st.text(max_size=60))
def test_any_text_is_a_size_or_a_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert 0 <= size < 1 << 63
    assert format_bytes(size)
