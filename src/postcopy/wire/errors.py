"""The one error of the wire layer: a stream or message that breaks the protocol.

Every check in `postcopy.wire` (decoding a peer's bytes, validating a message before it is
encoded, an event that is illegal in the incoming state) raises `ProtocolError`, so the I/O
layer needs one ``except`` clause, and the error says which field held which value.
"""

from __future__ import annotations

from typing import Any

_MAX_VALUE_CHARS = 120


def format_value(value: object) -> str:
    """Render a field's value for an error message: ints plainly, bytes as quoted text if
    they are printable ASCII, else hex (a peer's bytes, never a Python repr), the rest by
    repr; short."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if data and all(0x20 <= byte < 0x7F for byte in data):
            text = f'"{data.decode("ascii")}"'
        else:
            text = f"{data[:32].hex(' ')}{' ...' if len(data) > 32 else ''} (hex)"
        return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        # Payloads can be a megabyte; the message must stay one readable line.
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


class ProtocolError(Exception):
    """A violation of the migration protocol, naming the offending field and its value.

    ``field`` is ``"<Message>.<field>"`` (e.g. ``"RamRun.first_page"``) or a framing part
    (``"FrameHeader.length"``, ``"StreamHeader.magic"``, ``"event"``); ``value`` is the
    value found. The message reads ``"<field>=<value> <problem>"`` unless given whole.
    """

    field: str
    value: object

    def __init__(
        self,
        field: str,
        value: object,
        problem: str = "is invalid",
        *,
        message: str | None = None,
    ) -> None:
        self.field = field
        self.value = value
        if message is None:
            message = f"{field}={format_value(value)} {problem}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce calls cls(*args) with only the message: keep field and value
        # across pickling (errors travel between processes in the migration tests).
        return (_rebuild, (type(self), self.field, self.value, str(self)))


def _rebuild(cls: type[ProtocolError], field: str, value: object, message: str) -> ProtocolError:
    return cls(field, value, message=message)
