"""RivetKit's JSON-compat value rules, and the one value model actorvisor speaks.

Inside the service, action args, outputs, event args and error metadata are plain Python
values: None, bool, int (any size), float (finite), str, bytes, list, and dict with str
keys. On the wire JavaScript needs more: RivetKit (`common/encoding.ts`) writes a BigInt
as `["$BigInt", "<decimal>"]`, a Uint8Array as `["$Uint8Array", <base64>]`, an ArrayBuffer
as `["$ArrayBuffer", <base64>]`, `undefined` as `["$Undefined", 0]`, and escapes any user
array of two items whose first is a string starting with `$` by doubling the `$`
(`["$x", 1]` travels as `["$$x", 1]`).

`escape` turns a service value into what goes on the wire; `from_wire` validates what a
peer sent and turns it back, reviving compat forms only where the peer wrote them. This
module owns those rules and the limits on incoming values (nesting depth, finite numbers,
valid strings); it never decides which encoding needs which rule: `client.py` does.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from enum import Enum
from typing import Any, Final, NoReturn

import cbor2

from .errors import ActorvisorError, ErrorCode, ProtocolError

MAX_DEPTH: Final = 128
"""Deepest nesting of lists/dicts accepted or produced inside one value."""

MAX_INT_BITS: Final = 4096
"""Largest integer magnitude accepted or produced, in bits. Far beyond any id or count;
it keeps decimal conversion (`$BigInt`) cheap and under Python's 4300-digit limit."""

JS_MAX_SAFE_INTEGER: Final = (1 << 53) - 1

BIGINT: Final = "$BigInt"
UINT8ARRAY: Final = "$Uint8Array"
ARRAYBUFFER: Final = "$ArrayBuffer"
UNDEFINED: Final = "$Undefined"

_CBOR_SHORT_INT_MIN: Final = -(1 << 32)
_CBOR_SHORT_INT_END: Final = 1 << 32
_DECIMAL = re.compile(r"-?[0-9]{1,1300}")


class _Invalid(Exception):
    """A bad value somewhere inside a tree; the path is collected while unwinding."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []

    def at(self, segment: str) -> _Invalid:
        self.path.append(segment)
        return self

    def where(self, root: str) -> str:
        return root + "".join(reversed(self.path))


def _key_segment(key: object) -> str:
    return f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r:.60}]"


def _is_dollar_pair(items: list[Any]) -> bool:
    return len(items) == 2 and isinstance(items[0], str) and items[0].startswith("$")


def _check_string(value: str) -> None:
    # JSON can smuggle a lone UTF-16 surrogate in as an escape; such a str can never be
    # re-encoded as UTF-8 (CBOR, the worker channel), so it is refused at the door.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid("string contains a lone UTF-16 surrogate") from None


class Form(Enum):
    """How a value is written, named for who writes it that way."""

    JSON = "json"
    """JSON text: bytes and BigInts become `$` pairs (`jsonStringifyCompat`)."""
    CBOR = "cbor"
    """Our CBOR (server to client, either encoding): bytes stay a CBOR byte string."""
    CBOR_COMPAT = "cbor_compat"
    """npm's `encodeCborCompat` (its bare args): `$` pairs for bytes and BigInts, in CBOR."""
    CBOR_PLAIN = "cbor_plain"
    """npm's cbor encoding of args: no escaping, bytes as CBOR tag 64 (a Uint8Array)."""


def checked_str(value: str, where: str) -> str:
    """A string field from a peer, refused if it cannot be re-encoded as UTF-8."""
    try:
        _check_string(value)
    except _Invalid as exc:
        raise ProtocolError(f"{where}: {exc.problem}") from None
    return value


def _check_int(value: int) -> None:
    if value.bit_length() > MAX_INT_BITS:
        raise _Invalid(f"integer of {value.bit_length()} bits is larger than {MAX_INT_BITS} bits")


def escape(value: Any, *, form: Form, where: str, code: ErrorCode) -> Any:
    """Prepare a service value for the wire in `form`.

    A value outside the model raises `ActorvisorError` with `code`, naming the path (e.g.
    `cannot encode output.files[3]: unsupported type set`).
    """
    try:
        return _Escaper(form).escape(value, 0)
    except _Invalid as exc:
        raise ActorvisorError(code, f"cannot encode {exc.where(where)}: {exc.problem}") from None


class _Escaper:
    __slots__ = ("bytes_as_pair", "bytes_as_tag", "bigint_as_pair", "cbor_ints", "escape_pairs")

    def __init__(self, form: Form) -> None:
        self.bytes_as_pair = form in (Form.JSON, Form.CBOR_COMPAT)
        self.bytes_as_tag = form is Form.CBOR_PLAIN
        self.bigint_as_pair = form in (Form.JSON, Form.CBOR_COMPAT)
        self.cbor_ints = form is not Form.JSON
        self.escape_pairs = form is not Form.CBOR_PLAIN

    def escape(self, value: Any, depth: int) -> Any:
        if value is None or value is True or value is False:
            return value
        if isinstance(value, int):
            return self._int(int(value))
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _Invalid(f"{value} is not a finite number")
            return float(value)
        if isinstance(value, str):
            _check_string(value)
            return str.__str__(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            if self.bytes_as_pair:
                return [UINT8ARRAY, base64.b64encode(raw).decode("ascii")]
            return cbor2.CBORTag(64, raw) if self.bytes_as_tag else raw
        if depth >= MAX_DEPTH:
            raise _Invalid(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, (list, tuple)):
            items = []
            for index, item in enumerate(value):
                try:
                    items.append(self.escape(item, depth + 1))
                except _Invalid as exc:
                    raise exc.at(f"[{index}]") from None
            if self.escape_pairs and _is_dollar_pair(items):
                return ["$" + items[0], items[1]]
            return items
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _Invalid(f"dict key {key!r:.60} is not a str")
                try:
                    _check_string(key)
                    out[str.__str__(key)] = self.escape(item, depth + 1)
                except _Invalid as exc:
                    raise exc.at(_key_segment(key)) from None
            return out
        raise _Invalid(f"unsupported type {type(value).__name__}")

    def _int(self, value: int) -> Any:
        _check_int(value)
        safe = -JS_MAX_SAFE_INTEGER <= value <= JS_MAX_SAFE_INTEGER
        if not safe:
            # Beyond 2**53 only a JS BigInt holds the value exactly.
            return [BIGINT, str(value)] if self.bigint_as_pair else value
        if self.cbor_ints and not _CBOR_SHORT_INT_MIN <= value < _CBOR_SHORT_INT_END:
            # cbor-x decodes any integer with an 8-byte head as a BigInt, and itself
            # writes such JS numbers as float64: do the same so a number stays a number.
            return float(value)
        return value


def from_wire(tree: Any, *, where: str, compat: bool) -> Any:
    """Validate a value decoded from JSON or CBOR and return it in the service model.

    With `compat`, `$`-pairs are revived (`["$$x", 1]` -> `["$x", 1]`, `["$BigInt", "5"]`
    -> 5, ...) and an unknown `$` type is an error; without it (plain CBOR from the npm
    client's cbor encoding) every list is taken literally. Either way integral floats
    within JS's safe range become int, because JS has one number type and cbor-x sends
    integers above 2**32 as float64. Raises `ProtocolError` naming the path.
    """
    try:
        return _from_wire(tree, compat, 0)
    except _Invalid as exc:
        raise ProtocolError(f"{exc.where(where)}: {exc.problem}") from None


def _from_wire(tree: Any, compat: bool, depth: int) -> Any:
    if tree is None or tree is True or tree is False:
        return tree
    if tree is cbor2.undefined:
        return None
    kind = type(tree)
    if kind is int:
        _check_int(tree)
        return tree
    if kind is float:
        if not math.isfinite(tree):
            raise _Invalid(f"{tree} is not a finite number")
        if tree.is_integer() and abs(tree) <= JS_MAX_SAFE_INTEGER:
            return int(tree)
        return tree
    if kind is str:
        _check_string(tree)
        return tree
    if kind is bytes:
        return tree
    if depth >= MAX_DEPTH:
        raise _Invalid(f"nested deeper than {MAX_DEPTH} levels")
    if kind is list:
        if compat and _is_dollar_pair(tree):
            return _revive_pair(tree, depth)
        items = []
        for index, item in enumerate(tree):
            try:
                items.append(_from_wire(item, compat, depth + 1))
            except _Invalid as exc:
                raise exc.at(f"[{index}]") from None
        return items
    if kind is dict:
        out = {}
        for key, item in tree.items():
            if type(key) is not str:
                raise _Invalid(f"map key {key!r:.60} is not a string")
            try:
                _check_string(key)
                out[key] = _from_wire(item, compat, depth + 1)
            except _Invalid as exc:
                raise exc.at(_key_segment(key)) from None
        return out
    raise _Invalid(f"unsupported value of type {kind.__name__}")


def _revive_pair(pair: list[Any], depth: int) -> Any:
    kind, payload = pair
    if kind.startswith("$$"):
        try:
            return [kind[1:], _from_wire(payload, True, depth + 1)]
        except _Invalid as exc:
            raise exc.at("[1]") from None
    if kind == BIGINT:
        if not isinstance(payload, str) or not _DECIMAL.fullmatch(payload):
            _bad_pair(kind, "a decimal integer string", payload)
        value = int(payload)
        _check_int(value)
        return value
    if kind in (UINT8ARRAY, ARRAYBUFFER):
        if not isinstance(payload, str):
            _bad_pair(kind, "a base64 string", payload)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            _bad_pair(kind, "valid padded base64", payload)
    if kind == UNDEFINED:
        return None
    raise _Invalid(f"unknown JSON-compat type {kind!r:.60} (a literal array starting with "
                   f"'$' must be escaped as '$$')")


def _bad_pair(kind: str, expected: str, payload: Any) -> NoReturn:
    raise _Invalid(f"{kind} needs {expected}, got {payload!r:.60}")
