"""QMP argument schemas: a command's QAPI ``data`` written in Python, checked like QEMU.

Registering a command names its arguments (``args`` is the QAPI ``data`` of the command)::

    server.register("migrate", handle_migrate,
                    args={"uri": str, "detach?": bool, "resume?": bool})

Argument types: ``str``, ``int`` (QAPI int/uint: any integer in int64 or uint64 range, not
a bool), ``float`` (QAPI number: int or float, handed over as float), ``bool``, ``dict``
(any object), ``list`` (any array), ``object`` or ``typing.Any`` (anything), an
``enum.Enum`` subclass with string values (the handler gets the member; use StrEnum so it
still compares equal to the string), ``[T]`` (array of T) and ``{"name": T, ...}`` (a
struct, checked member by member). A name ending in ``?`` (or QAPI's leading ``*``) is
optional: when absent it is absent from the handler's dict too. Unknown arguments are
refused. Errors carry QEMU's messages ("Parameter 'x' is missing", "Invalid parameter
type for 'x', expected: string", ...).
"""

from __future__ import annotations

import enum
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

from postcopy.qmp.errors import QmpError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*\Z")
"""What a command or argument name may be."""
_INT_MIN = -(1 << 63)
_UINT_MAX = (1 << 64) - 1


class _Check:
    """Checks one value against one type of the schema and returns what the handler gets."""

    def check(self, value: object, path: str) -> object:
        raise NotImplementedError


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")


class _Scalar(_Check):
    def __init__(self, qapi_name: str, accepts: Callable[[object], bool]):
        self.qapi_name = qapi_name
        self.accepts = accepts

    def check(self, value: object, path: str) -> object:
        if not self.accepts(value):
            raise _type_error(path, self.qapi_name)
        return value


class _Number(_Check):
    def check(self, value: object, path: str) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, "number")
        try:
            return float(value)
        except OverflowError:
            raise _type_error(path, "number") from None


class _Anything(_Check):
    def check(self, value: object, path: str) -> object:
        return value


class _Enum(_Check):
    def __init__(self, enum_type: type[enum.Enum]):
        for member in enum_type:
            if not isinstance(member.value, str):
                raise ValueError(f"enum {enum_type.__name__} has a non-string value")
        self.enum_type = enum_type

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        try:
            return self.enum_type(value)
        except ValueError:
            raise QmpError(f"Parameter '{path}' does not accept value '{value}'") from None


class _Array(_Check):
    def __init__(self, item: _Check):
        self.item = item

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [self.item.check(element, f"{path}[{index}]") for index, element in enumerate(value)]


class Struct(_Check):
    def __init__(self, members: list[tuple[str, _Check, bool]]):
        self.members = members
        self.names = frozenset(name for name, _, _ in members)

    def check(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(path, "object")
        prefix = f"{path}." if path else ""
        result: dict[str, Any] = {}
        # QEMU's visitor walks the schema's members first and complains about leftovers
        # last; keep that order so the same input earns the same message.
        for name, member, optional in self.members:
            if name in value:
                result[name] = member.check(value[name], prefix + name)
            elif not optional:
                raise QmpError(f"Parameter '{prefix}{name}' is missing")
        for name in value:
            if name not in self.names:
                raise QmpError(f"Parameter '{prefix}{name}' is unexpected")
        return result


_STRING = _Scalar("string", lambda v: isinstance(v, str))
_INTEGER = _Scalar(
    "integer",
    lambda v: isinstance(v, int) and not isinstance(v, bool) and _INT_MIN <= v <= _UINT_MAX,
)
_BOOLEAN = _Scalar("boolean", lambda v: isinstance(v, bool))
_OBJECT = _Scalar("object", lambda v: isinstance(v, dict))
_ARRAY = _Scalar("array", lambda v: isinstance(v, list))


def _compile(spec: object, where: str) -> _Check:
    if spec is str:
        return _STRING
    if spec is int:
        return _INTEGER
    if spec is float:
        return _Number()
    if spec is bool:
        return _BOOLEAN
    if spec is dict:
        return _OBJECT
    if spec is list:
        return _ARRAY
    if spec is object or spec is typing.Any:
        return _Anything()
    if isinstance(spec, type) and issubclass(spec, enum.Enum):
        return _Enum(spec)
    if isinstance(spec, list):
        if len(spec) != 1:
            raise ValueError(f"{where}: an array type is written [item_type]")
        return _Array(_compile(spec[0], f"{where}[]"))
    if isinstance(spec, Mapping):
        return _compile_struct(spec, where)
    raise ValueError(f"{where}: unsupported argument type {spec!r}")


def _compile_struct(spec: Mapping[str, object], where: str) -> Struct:
    members: list[tuple[str, _Check, bool]] = []
    seen: set[str] = set()
    for raw_name, member_spec in spec.items():
        if not isinstance(raw_name, str):
            raise ValueError(f"{where}: member names are strings, not {raw_name!r}")
        optional = raw_name.endswith("?") or raw_name.startswith("*")
        name = raw_name.rstrip("?") if raw_name.endswith("?") else raw_name.lstrip("*")
        if not NAME.match(name) or name in seen:
            raise ValueError(f"{where}: bad or repeated member name {raw_name!r}")
        seen.add(name)
        members.append((name, _compile(member_spec, f"{where}.{name}"), optional))
    return Struct(members)


def compile_arguments(args: Mapping[str, object] | None, where: str = "arguments") -> Struct:
    """Turn an ``args=`` schema into its checker; raises ValueError for a bad schema."""
    return _compile_struct(args or {}, where)
