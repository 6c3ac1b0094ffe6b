"""QMP input framing, sans I/O: QEMU's JSON streamer, and the strict decoding of one text.

Input framing is QEMU's, not lines: a message ends where its outermost ``}`` closes
(qemu.qmp sends no newline after a command). A message over ``max_message_size`` bytes
(1 MiB) or nested deeper than ``max_nesting`` is skipped to its end without being
buffered, so a client cannot make the server hold more than that. A control character or
a 0xFF byte resets the parser, as in QEMU ("the client should provoke a lexical error").
Each problem becomes a `FrameError` whose text the server sends back; the stream stays
usable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_SIZE = 1 << 20
MAX_INTEGER_DIGITS = 4000  # below Python's own limit of 4300 for int()
# Python's json decoder recurses per level; QMP messages nest a handful of levels, so a
# limit far below the interpreter's recursion limit costs nothing and keeps decode safe.
MAX_NESTING = 256

# Bytes that cannot appear in JSON text (raw control characters, bytes never valid in
# UTF-8). QEMU's lexer treats them as a lexical error that resets the parser, and the spec
# tells clients to send one to get out of a half-sent message; we honour the same bytes.
_RESET_CLASS = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xc0\xc1\xf5-\xff"
_RESET_BYTES = frozenset(
    [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xC0, 0xC1, *range(0xF5, 0x100)]
)
_STRING_SPECIAL = re.compile(rb'["\\' + _RESET_CLASS + rb"]")
_VALUE_SPECIAL = re.compile(rb'[{}\[\]"' + _RESET_CLASS + rb"]")
_JUNK_END = re.compile(rb'[ \t\r\n{\["' + _RESET_CLASS + rb"]")
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


@dataclass(frozen=True)
class FrameError:
    """Input that could not become a message; ``desc`` is the client-facing error text."""

    desc: str


class JsonStreamSplitter:
    """Cuts a byte stream into JSON texts the way QEMU's JSON streamer does.

    A text is an object or array (ended by its matching outer bracket, whatever lines it
    spans), a top-level string, or a run of other top-level bytes up to the next blank or
    bracket (a number, a keyword or garbage: the decoder sorts them out). Only the bytes
    of the current text are kept, at most ``max_message_size`` of them.
    """

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE, max_nesting: int = MAX_NESTING):
        if max_message_size < 2 or max_nesting < 1:
            raise ValueError("max_message_size must be >= 2 and max_nesting >= 1")
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._junk = False
        self._discarding: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished text (0 between texts or while discarding)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | FrameError]:
        """Consume ``data``; return the texts (and errors) it completes, in order."""
        out: list[bytes | FrameError] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._in_string:
                pos = self._scan_string(data, view, pos, out)
            elif self._depth:
                pos = self._scan_value(data, view, pos, out)
            elif self._junk:
                match = _JUNK_END.search(data, pos)
                stop = match.start() if match else end
                self._keep(view, pos, stop)
                if match:
                    self._finish(out)
                pos = stop
            else:
                pos = self._scan_top(data, view, pos, out)
        return out

    def _scan_top(
        self, data: bytes, view: memoryview, pos: int, out: list[bytes | FrameError]
    ) -> int:
        match = _NOT_BLANK.search(data, pos)
        if match is None:
            return len(data)
        pos = match.start()
        byte = data[pos]
        if byte in _OPEN:
            self._depth = 1
        elif byte == _QUOTE:
            self._in_string = True
        elif byte in _RESET_BYTES:
            self._reset(byte, out)
            return pos + 1
        elif byte in _CLOSE:
            # a closing bracket with nothing open is a text of its own, answered at once
            # (QEMU's streamer parses when its bracket count drops below zero): a client
            # waiting for the answer would otherwise wait for a blank that never comes
            self._keep(view, pos, pos + 1)
            self._finish(out)
            return pos + 1
        else:
            self._junk = True
            return pos
        self._keep(view, pos, pos + 1)
        return pos + 1

    def _scan_string(
        self, data: bytes, view: memoryview, pos: int, out: list[bytes | FrameError]
    ) -> int:
        if self._escaped:
            self._escaped = False
            if data[pos] in _RESET_BYTES:
                self._reset(data[pos], out)
            else:
                self._keep(view, pos, pos + 1)
            return pos + 1
        pos, byte = self._to_special(_STRING_SPECIAL, data, view, pos, out)
        if byte == _BACKSLASH:
            self._escaped = True
        elif byte is not None:
            self._in_string = False
            if not self._depth:
                self._finish(out)
        return pos

    def _scan_value(
        self, data: bytes, view: memoryview, pos: int, out: list[bytes | FrameError]
    ) -> int:
        pos, byte = self._to_special(_VALUE_SPECIAL, data, view, pos, out)
        if byte is None:
            return pos
        if byte in _OPEN:
            self._depth += 1
            if self._depth > self.max_nesting:
                self._discard("JSON nesting depth limit exceeded")
        elif byte in _CLOSE:
            # Mismatched brackets ("{]") still close a level: the decoder reports the
            # syntax error, and the stream stays in step with what the client meant.
            self._depth -= 1
            if not self._depth:
                self._finish(out)
        else:
            self._in_string = True
        return pos

    def _to_special(
        self,
        special: re.Pattern[bytes],
        data: bytes,
        view: memoryview,
        pos: int,
        out: list[bytes | FrameError],
    ) -> tuple[int, int | None]:
        """Keep the bytes up to and including the next one `special` matches.

        Returns where to go on and that byte, or None for the byte when there was none (all
        of data kept) or it was a reset byte (the text dropped, an error in out).
        """
        match = special.search(data, pos)
        if match is None:
            self._keep(view, pos, len(data))
            return len(data), None
        stop = match.start()
        byte = data[stop]
        if byte in _RESET_BYTES:
            self._reset(byte, out)
            return stop + 1, None
        self._keep(view, pos, stop + 1)
        return stop + 1, byte

    def _keep(self, view: memoryview, start: int, stop: int) -> None:
        if self._discarding is not None or start == stop:
            return
        if len(self._buf) + (stop - start) > self.max_message_size:
            self._discard(f"JSON message exceeds {self.max_message_size} bytes")
        else:
            self._buf += view[start:stop]

    def _discard(self, reason: str) -> None:
        if self._discarding is None:
            self._discarding = reason
            self._buf = bytearray()

    def _finish(self, out: list[bytes | FrameError]) -> None:
        if self._discarding is not None:
            out.append(FrameError(self._discarding))
        else:
            out.append(bytes(self._buf))
        self._clear()

    def _reset(self, byte: int, out: list[bytes | FrameError]) -> None:
        out.append(FrameError(f"JSON parse error, invalid byte 0x{byte:02x}"))
        self._clear()

    def _clear(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = self._escaped = self._junk = False
        self._discarding = None


class ParseError(Exception):
    """A framed text that is not strict JSON; the message is the client-facing error text."""


def _reject_constant(name: str) -> object:
    raise ParseError(f"JSON parse error, invalid keyword '{name}'")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ParseError(f"JSON parse error, duplicate key '{key}'")
        result[key] = value
    return result


def _integer(digits: str) -> int:
    # Python refuses to convert more digits than this with a ValueError of its own
    # (sys.get_int_max_str_digits), which escaped as a dropped connection
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ParseError(
            f"JSON parse error, a number of {len(digits.lstrip('-'))} digits "
            f"(at most {MAX_INTEGER_DIGITS})"
        )
    return int(digits)


def _number(text: str) -> float:
    # 1e999 is inf to Python: nothing QMP takes, and no JSON can carry it back (an id is
    # echoed in the answer: the answer could not be written and the connection dropped)
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"JSON parse error, the number {text[:40]} is out of range")
    return value


def decode_text(text: bytes) -> object:
    """Decode one framed JSON text strictly (UTF-8, no NaN, no duplicate keys, integers of
    at most MAX_INTEGER_DIGITS digits, finite numbers)."""
    try:
        return json.loads(
            text.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_int=_integer,
            parse_float=_number,
            object_pairs_hook=_object_without_duplicates,
        )
    except UnicodeDecodeError:
        raise ParseError("JSON parse error, invalid UTF-8 sequence") from None
    except json.JSONDecodeError as exc:
        raise ParseError(f"JSON parse error, {exc.msg}") from None
    except RecursionError:
        raise ParseError("JSON nesting depth limit exceeded") from None
