"""The few BARE primitives the RivetKit client protocol uses, as a bounds-checked cursor.

BARE (https://baremessages.org) as `@rivetkit/bare-ts` implements it: `uint` is ULEB128
(at most 10 bytes, canonical, below 2**64), `str` and `data` are a `uint` length then
the bytes, `bool` is one byte that must be 0 or 1, `optional<T>` is a `bool` then `T`.
Messages carry a 2-byte little-endian version prefix first (the `vbare` convention).

The reader never trusts a length: every read is checked against the bytes that are left
before anything is sliced or allocated, and every failure is a `ProtocolError` naming the
message, the field and the byte offset. This module knows nothing about message shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

from .errors import ProtocolError

T = TypeVar("T")

UINT_MAX: Final = (1 << 64) - 1
_UINT_MAX_BYTES: Final = 10  # ceil(64 / 7)


class BareReader:
    """Reads BARE values from one message; `what` names the message in errors."""

    __slots__ = ("_data", "_view", "offset", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._view = memoryview(data)
        self.offset = 0
        self.what = what

    def error(self, field: str, problem: str, offset: int | None = None) -> ProtocolError:
        at = self.offset if offset is None else offset
        return ProtocolError(f"bare {self.what}: field {field!r} at byte {at}: {problem}")

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset

    def _take(self, n: int, field: str) -> memoryview:
        if n > self.remaining:
            raise self.error(field, f"needs {n} bytes, only {self.remaining} left")
        chunk = self._view[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def version(self, expected: int) -> None:
        """The 2-byte little-endian version prefix."""
        raw = self._take(2, "version")
        version = raw[0] | (raw[1] << 8)
        if version != expected:
            raise self.error("version", f"unsupported protocol version {version} "
                             f"(expected {expected})", 0)

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def boolean(self, field: str) -> bool:
        start = self.offset
        value = self.u8(field)
        if value > 1:
            raise self.error(field, f"a bool must be 0 or 1, got {value}", start)
        return value == 1

    def uint(self, field: str) -> int:
        start = self.offset
        result = 0
        for index in range(_UINT_MAX_BYTES):
            if self.offset >= len(self._data):
                raise self.error(field, "truncated uint", start)
            byte = self._data[self.offset]
            self.offset += 1
            result |= (byte & 0x7F) << (7 * index)
            if byte < 0x80:
                # bare-ts rejects a trailing zero byte: each value has exactly one encoding.
                if byte == 0 and index > 0:
                    raise self.error(field, "non-canonical uint (trailing zero byte)", start)
                if result > UINT_MAX:
                    raise self.error(field, "uint larger than 2**64-1", start)
                return result
        raise self.error(field, f"uint longer than {_UINT_MAX_BYTES} bytes", start)

    def data(self, field: str) -> bytes:
        start = self.offset
        length = self.uint(field)
        if length > self.remaining:
            raise self.error(field, f"length {length} but only {self.remaining} bytes left", start)
        return bytes(self._take(length, field))

    def string(self, field: str) -> str:
        start = self.offset
        raw = self.data(field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(field, f"invalid UTF-8 ({exc.reason} at string byte {exc.start})",
                             start) from None

    def optional(self, field: str, read: Callable[[str], T]) -> T | None:
        return read(field) if self.boolean(field) else None

    def end(self) -> None:
        if self.remaining:
            raise self.error("<end>", f"{self.remaining} trailing bytes after the message")


class BareWriter:
    """Builds one BARE message."""

    __slots__ = ("_out",)

    def __init__(self) -> None:
        self._out = bytearray()

    def version(self, version: int) -> None:
        self._out += version.to_bytes(2, "little")

    def u8(self, value: int) -> None:
        self._out.append(value)

    def boolean(self, value: bool) -> None:
        self._out.append(1 if value else 0)

    def uint(self, value: int) -> None:
        if not 0 <= value <= UINT_MAX:
            raise ValueError(f"BARE uint out of range: {value}")
        while value >= 0x80:
            self._out.append((value & 0x7F) | 0x80)
            value >>= 7
        self._out.append(value)

    def data(self, value: bytes) -> None:
        self.uint(len(value))
        self._out += value

    def string(self, value: str) -> None:
        self.data(value.encode("utf-8"))

    def optional(self, value: T | None, write: Callable[[T], None]) -> None:
        self.boolean(value is not None)
        if value is not None:
            write(value)

    def getvalue(self) -> bytes:
        return bytes(self._out)
