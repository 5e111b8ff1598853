"""Splits a QMP input byte stream into JSON values, as QEMU's JSON streamer does.

QEMU does not need a newline between messages: a message ends where its outermost `{...}` (or
`[...]`, or a bare scalar) ends, and may span several lines. `JsonStreamer.feed(data)` returns the
values completed by `data`, each a `JsonValue` (the parsed value) or a `JsonParseError` (its
message is QEMU-like: "JSON parse error, ..."). Bounded: a message longer than `limit` bytes, or
nested deeper than `max_depth`, is reported as one `JsonTooLong`, and the input is then discarded up
to the next newline, so memory stays bounded and the connection stays usable.
"""

import json
import re
from dataclasses import dataclass
from typing import Final

MAX_MESSAGE: Final = 1 << 20  # 1 MiB
MAX_DEPTH: Final = 1024  # QEMU's MAX_NESTING

# Characters that matter outside strings, inside a structure.
_STRUCTURAL: Final = re.compile(rb'[{}\[\]"]')
# Characters that end or escape a string; a raw control character is invalid JSON.
_STRING_SPECIAL: Final = re.compile(rb'["\\\x00-\x1f]')
_NON_SPACE: Final = re.compile(rb"[^ \t\r\n]")
_SCALAR_END: Final = re.compile(rb'[ \t\r\n{}\[\]",:]')


@dataclass(frozen=True)
class JsonValue:
    value: object


@dataclass(frozen=True)
class JsonParseError:
    message: str


@dataclass(frozen=True)
class JsonTooLong:
    message: str


Parsed = JsonValue | JsonParseError | JsonTooLong


class _Invalid(ValueError):
    """A JSON text that Python's decoder accepts but QEMU's does not."""


def _no_constant(name: str) -> object:
    raise _Invalid(f"invalid keyword '{name}'")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _Invalid(f"duplicate key '{key}'")
        result[key] = value
    return result


def decode(text: bytes) -> Parsed:
    """One complete JSON text as a value, or the parse error QEMU would report."""
    try:
        return JsonValue(json.loads(text, parse_constant=_no_constant, object_pairs_hook=_object))
    except UnicodeDecodeError:
        return JsonParseError("JSON parse error, invalid UTF-8 sequence")
    except json.JSONDecodeError as exc:
        first = text[:1]
        if first and first not in b'{["-0123456789':
            word = text[:32].decode("utf-8", "replace")
            return JsonParseError(f"JSON parse error, invalid keyword '{word}'")
        msg = exc.msg.lower().removesuffix(" at")
        return JsonParseError(f"JSON parse error, {msg} at offset {exc.pos}")
    except _Invalid as exc:
        return JsonParseError(f"JSON parse error, {exc}")
    except RecursionError:
        return JsonParseError("JSON parse error, nesting too deep")


class JsonStreamer:
    """Incremental framing of concatenated JSON values (see module docstring)."""

    def __init__(self, limit: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.limit = limit
        self.max_depth = max_depth
        self.buf = bytearray()
        self.pos = 0  # scanned up to here
        self.start = -1  # start of the current message in buf, -1 between messages
        self.depth = 0
        self.in_string = False
        self.discarding = False  # after JsonTooLong: dropping input until a newline

    def reset(self) -> None:
        self.buf.clear()
        self.pos = 0
        self.start = -1
        self.depth = 0
        self.in_string = False
        self.discarding = False

    def pending(self) -> int:
        """Bytes held for an incomplete message."""
        return len(self.buf)

    def feed(self, data: bytes) -> list[Parsed]:
        out: list[Parsed] = []
        if self.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return out
            self.discarding = False
            data = data[newline + 1 :]
        self.buf += data
        buf = self.buf
        n = len(buf)
        i = self.pos
        while i < n:
            if self.in_string:
                m = _STRING_SPECIAL.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                c = buf[j]
                if c == 0x5C:  # backslash: skip the escaped character (wait for it if not here yet)
                    if j + 1 >= n:
                        i = j
                        break
                    i = j + 2
                    continue
                if c != 0x22:  # control character: this message is broken; report it and resync
                    out.append(decode(bytes(buf[self.start : j + 1])))
                    self._end_message()
                    i = j + 1
                    continue
                self.in_string = False
                i = j + 1
                if self.depth == 0:
                    out.append(decode(bytes(buf[self.start : i])))
                    self._end_message()
                continue
            if self.depth == 0:
                m = _NON_SPACE.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                c = buf[j]
                self.start = j
                if c in b"{[":
                    self.depth = 1
                    i = j + 1
                elif c == 0x22:
                    self.in_string = True
                    i = j + 1
                elif c in b"}]":
                    out.append(JsonParseError(f"JSON parse error, unexpected {chr(c)!r}"))
                    self._end_message()
                    i = j + 1
                else:  # a bare scalar (number, keyword, or garbage) up to the next delimiter
                    m = _SCALAR_END.search(buf, j)
                    if m is None:  # not ended yet: wait for more
                        i = j
                        break
                    end = m.start() if m.start() > j else j + 1
                    out.append(decode(bytes(buf[j:end])))
                    self._end_message()
                    i = end
                continue
            m = _STRUCTURAL.search(buf, i)
            if m is None:
                i = n
                break
            j = m.start()
            c = buf[j]
            i = j + 1
            if c == 0x22:
                self.in_string = True
            elif c in b"{[":
                self.depth += 1
                if self.depth > self.max_depth:
                    out.append(JsonTooLong(f"JSON parse error, nesting deeper than {self.max_depth}"))
                    rest = bytes(buf[j + 1 :])
                    self.reset()
                    newline = rest.find(b"\n")
                    self.discarding = newline < 0
                    if newline >= 0:
                        out.extend(self.feed(rest[newline + 1 :]))
                    return out
            else:
                self.depth -= 1
                if self.depth == 0:
                    out.append(decode(bytes(buf[self.start : i])))
                    self._end_message()
        self.pos = i
        # Forget what is done; keep only the current message.
        keep_from = self.start if self.start >= 0 else self.pos
        if keep_from > 0:
            del buf[:keep_from]
            self.pos -= keep_from
            if self.start >= 0:
                self.start = 0
        if len(buf) > self.limit:
            out.append(JsonTooLong(f"JSON parse error, message longer than {self.limit} bytes"))
            self.reset()
            self.discarding = True
        return out

    def _end_message(self) -> None:
        self.start = -1
        self.depth = 0
        self.in_string = False
