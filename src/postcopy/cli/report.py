"""`postcopy report` (being written)."""

from __future__ import annotations

from typing import Any


def add_parser(subparsers: Any) -> None:
    pass
