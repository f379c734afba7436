"""RivetKit client protocol v4: every message in json, cbor and bare, both directions.

Shapes and bytes follow the npm client `rivetkit@2.3.19` (`common/client-protocol-zod.ts`,
`common/bare/generated/client-protocol/v4.ts`, `serde.ts`, `client/actor-conn.ts`,
`client/actor-handle.ts`); the tests pin them with vectors produced by that client.

* json: `{"body":{"tag":..., "val":{...}}}` as a text frame. The client revives
  JSON-compat values in the whole message, so ids are `["$BigInt","n"]`.
* cbor: the same shape as CBOR maps in a binary frame. Ids are 8-byte CBOR integers,
  which cbor-x decodes as BigInt. The client revives JSON-compat values in what we send,
  but sends its own args as plain CBOR (a Uint8Array as tag 64, nothing escaped).
* bare: a 2-byte little-endian version (4), a u8 union tag, then the fields; args,
  outputs and metadata are CBOR byte strings written with JSON-compat escaping.

Decoders take untrusted bytes and raise `ProtocolError` and nothing else. Encoders take
service values and raise `ActorvisorError` for a value outside the model (see
`compat.py`): `actor.internal_error` for what we send as a server, `actor.invalid_args`
for args our client sends; an id or generation that is not a u64 is a bug in the caller
(`ValueError`). Nothing here does I/O or knows about connections.
"""

from __future__ import annotations

import io
import json
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import cbor2

from . import compat
from .bare import UINT_MAX, BareReader, BareWriter
from .compat import Form
from .errors import ActorvisorError, ErrorCode, ProtocolError

PROTOCOL_VERSION: Final = 4
MAX_MESSAGE_SIZE: Final = 1 << 20
"""Default bound for one inbound frame or HTTP body, in bytes."""

WS_PROTOCOL_STANDARD: Final = "rivet"
WS_PROTOCOL_ENCODING: Final = "rivet_encoding."
WS_PROTOCOL_CONN_PARAMS: Final = "rivet_conn_params."
WS_PROTOCOL_TOKEN: Final = "rivet_token."


class Encoding(StrEnum):
    JSON = "json"
    CBOR = "cbor"
    BARE = "bare"


@dataclass(frozen=True, slots=True)
class ActorSpecifier:
    """Which actor incarnation an error is about (v4 `ActorSpecifier`)."""

    actor_id: str
    generation: int
    key: str | None = None


# ToClient


@dataclass(frozen=True, slots=True)
class Init:
    actor_id: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    """An error for one action (`action_id` set) or for the whole connection."""

    group: str
    code: str
    message: str
    metadata: Any = None
    action_id: int | None = None
    actor: ActorSpecifier | None = None


@dataclass(frozen=True, slots=True)
class ActionResponse:
    id: int
    output: Any


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    args: list[Any]
    """The handler's arguments: the client calls `callback(...args)`."""


# ToServer


@dataclass(frozen=True, slots=True)
class ActionRequest:
    id: int
    name: str
    args: list[Any]


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """Subscribe to (or unsubscribe from) one event name.

    `after` and `epoch` are actorvisor's resume cursor, absent from RivetKit v4: the npm
    client never sends them. In json and cbor they are extra keys of `val` (which
    RivetKit's own schema would strip); in bare they are an optional trailing
    `optional<uint> after, optional<str> epoch`, written only when one is set.
    """

    event_name: str
    subscribe: bool
    after: int | None = None
    epoch: str | None = None


ToClient = Init | ErrorMsg | ActionResponse | Event
ToServer = ActionRequest | SubscriptionRequest

# Union members in v4 order: the index is the bare union tag.
_TO_CLIENT_TAGS: Final = ("Init", "Error", "ActionResponse", "Event")
_TO_SERVER_TAGS: Final = ("ActionRequest", "SubscriptionRequest")
_CBOR_MAX_DEPTH: Final = compat.MAX_DEPTH + 8  # room for the message envelope

# The tags cbor2 would otherwise decode into Python objects outside the value model
# (datetimes, sets, shared references that can build cycles, ...). Bignums (2, 3) are
# plain integers to us; everything else is refused with its tag number.
_CBOR_SEMANTIC_TAGS: Final = (0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258,
                              260, 261, 1004, 43000, 55799)
_CBOR_TAG_UINT8ARRAY: Final = 64


# Encoding negotiation


def parse_encoding(value: str | None) -> Encoding:
    """The `x-rivet-encoding` header (or `rivet_encoding.*` value); absent means json."""
    if not value:
        return Encoding.JSON
    try:
        return Encoding(value)
    except ValueError:
        raise ProtocolError(f"unsupported encoding {value!r:.40} (expected json, cbor or bare)",
                            ErrorCode.UNSUPPORTED_ENCODING) from None


def parse_ws_subprotocols(protocols: Sequence[str]) -> tuple[Encoding, Any]:
    """Read the encoding and connection params the client put in its subprotocols.

    The npm client offers `rivet`, `rivet_encoding.<enc>` and, when it has params,
    `rivet_conn_params.<encodeURIComponent(JSON.stringify(params))>`, plus others this
    does not need (`rivet_target.*`, `rivet_actor.*`, `rivet_token.*`, ...), which are
    ignored. Items may also be comma-separated lists (the raw header). The server must
    still answer by selecting `rivet`. Returns `(encoding, params or None)`.
    """
    encoding: str | None = None
    raw_params: str | None = None
    for item in protocols:
        for protocol in item.split(","):
            protocol = protocol.strip()
            if protocol.startswith(WS_PROTOCOL_ENCODING):
                value = protocol[len(WS_PROTOCOL_ENCODING):]
                if encoding is not None and encoding != value:
                    raise ProtocolError(f"conflicting subprotocols rivet_encoding.{encoding} "
                                        f"and rivet_encoding.{value:.40}",
                                        ErrorCode.UNSUPPORTED_ENCODING)
                encoding = value
            elif protocol.startswith(WS_PROTOCOL_CONN_PARAMS):
                raw_params = protocol[len(WS_PROTOCOL_CONN_PARAMS):]
    if encoding == "":
        raise ProtocolError("empty rivet_encoding subprotocol", ErrorCode.UNSUPPORTED_ENCODING)
    params = None
    if raw_params:
        try:
            text = urllib.parse.unquote(raw_params, errors="strict")
        except UnicodeDecodeError:
            raise ProtocolError("rivet_conn_params is not percent-encoded UTF-8") from None
        params = _json_value(text, "rivet_conn_params", compat_values=False)
    return parse_encoding(encoding), params


def content_type(encoding: Encoding) -> str:
    """HTTP content type for a body in `encoding` (RivetKit's `contentTypeForEncoding`)."""
    return "application/json" if encoding is Encoding.JSON else "application/octet-stream"


# Low-level codecs


class _U64:
    """An id: always written as a CBOR integer with an 8-byte head, so cbor-x gives BigInt."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value


def _cbor_default(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if isinstance(value, _U64):
        encoder.write(b"\x1b" + value.value.to_bytes(8, "big"))
        return
    raise TypeError(f"cannot CBOR-encode {type(value).__name__}")


def _cbor_dumps(tree: Any) -> bytes:
    return cbor2.dumps(tree, default=_cbor_default)


def _json_dumps(tree: Any) -> str:
    # Same text as JS's JSON.stringify: no spaces, non-ASCII left as is.
    return json.dumps(tree, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _u64(value: int, field: str) -> int:
    # Ids and counters come from our own code, not from users: a bad one is a bug.
    if not 0 <= value <= UINT_MAX:
        raise ValueError(f"{field} must be a u64, got {value}")
    return value


def _id_wire(value: int, encoding: Encoding, field: str) -> Any:
    _u64(value, field)
    return [compat.BIGINT, str(value)] if encoding is Encoding.JSON else _U64(value)


def _check_size(data: bytes | str, max_size: int, what: str) -> None:
    size = len(data)
    if isinstance(data, str) and size <= max_size < size * 4:
        size = len(data.encode("utf-8", "surrogatepass"))
    if size > max_size:
        raise ProtocolError(f"{what} is {size} bytes, more than the limit of {max_size}",
                            ErrorCode.MESSAGE_TOO_LARGE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r:.60}")
            seen.add(key)
    return out


def _json_tree(data: bytes | str, what: str) -> Any:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{what}: invalid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(data, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ProtocolError(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"{what}: invalid JSON: {exc}") from None


def _json_value(text: str, what: str, *, compat_values: bool) -> Any:
    return compat.from_wire(_json_tree(text, what), where=what, compat=compat_values)


def _refuse_semantic_tag(tag: int) -> Callable[[Any, bool], Any]:
    def refuse(_value: Any, _immutable: bool) -> Any:
        raise ValueError(f"unsupported CBOR tag {tag}")
    return refuse


_CBOR_SEMANTIC_DECODERS: Final = {tag: _refuse_semantic_tag(tag) for tag in _CBOR_SEMANTIC_TAGS}


def _cbor_tag_hook(tag: cbor2.CBORTag, _immutable: bool) -> Any:
    if tag.tag == _CBOR_TAG_UINT8ARRAY:
        if isinstance(tag.value, bytes):
            return tag.value
        raise ValueError("CBOR tag 64 (Uint8Array) must wrap a byte string")
    raise ValueError(f"unsupported CBOR tag {tag.tag}")


def _cbor_tree(data: bytes, what: str) -> Any:
    stream = io.BytesIO(data)
    try:
        tree = cbor2.CBORDecoder(stream, tag_hook=_cbor_tag_hook,
                                 semantic_decoders=_CBOR_SEMANTIC_DECODERS,
                                 max_depth=_CBOR_MAX_DEPTH, allow_duplicate_keys=False,
                                 strict_hashable_types=True).decode()
    except RecursionError:
        raise ProtocolError(f"{what}: CBOR nested too deeply") from None
    except Exception as exc:
        # cbor2 wraps hook errors; the innermost message is the one that names the problem.
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ProtocolError(f"{what}: invalid CBOR: {cause}") from None
    # One frame is one CBOR item; cbor2 would silently ignore what follows it.
    if stream.tell() != len(data):
        raise ProtocolError(f"{what}: {len(data) - stream.tell()} trailing bytes after the "
                            f"CBOR item (at byte {stream.tell()})")
    return tree


def _tree(data: bytes | str, encoding: Encoding, what: str) -> Any:
    """Parse a json or cbor message into its raw tree."""
    if encoding is Encoding.JSON:
        return _json_tree(data, what)
    return _cbor_tree(_binary(data, encoding, what), what)


def _binary(data: bytes | str, encoding: Encoding, what: str) -> bytes:
    if isinstance(data, str):
        raise ProtocolError(f"{what}: {encoding} messages must be binary, got text")
    return data


class _Fields:
    """Typed access to the fields of one decoded json/cbor object, with precise errors."""

    __slots__ = ("obj", "what")

    def __init__(self, obj: Any, what: str) -> None:
        if not isinstance(obj, dict):
            raise ProtocolError(f"{what} must be an object, got {_kind(obj)}")
        self.obj: dict[Any, Any] = obj
        self.what = what

    def error(self, key: str, problem: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: field {key!r} {problem}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def present(self, key: str) -> Any:
        if key not in self.obj:
            raise self.error(key, "is missing")
        return self.obj[key]

    def string(self, key: str) -> str:
        value = self.present(key)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_kind(value)}")
        return compat.checked_str(value, f"{self.what}.{key}")

    def boolean(self, key: str) -> bool:
        value = self.present(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be a boolean, got {_kind(value)}")
        return value

    def uint(self, key: str, *, compat_values: bool) -> int:
        value = compat.from_wire(self.present(key), where=f"{self.what}.{key}",
                                 compat=compat_values)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"must be an unsigned integer, got {_kind(value)}")
        if not 0 <= value <= UINT_MAX:
            raise self.error(key, f"must be between 0 and 2**64-1, got {value}")
        return value

    def value(self, key: str, *, compat_values: bool) -> Any:
        return compat.from_wire(self.present(key), where=f"{self.what}.{key}",
                                compat=compat_values)

    def array(self, key: str, *, compat_values: bool) -> list[Any]:
        value = self.value(key, compat_values=compat_values)
        if not isinstance(value, list):
            raise self.error(key, f"must be an array, got {_kind(value)}")
        return value

    def optional_str(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def optional_uint(self, key: str, *, compat_values: bool) -> int | None:
        return self.uint(key, compat_values=compat_values) if self.has(key) else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", bytes: "bytes",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _envelope(tree: Any, tags: tuple[str, ...], what: str) -> tuple[str, _Fields]:
    body = _Fields(_Fields(tree, what).present("body"), f"{what}.body")
    tag = body.string("tag")
    if tag not in tags:
        raise body.error("tag", f"is {tag!r:.60}, expected one of {', '.join(tags)}")
    return tag, _Fields(body.present("val"), f"{what}.body.val({tag})")


def _bare_reader(data: bytes, what: str) -> BareReader:
    reader = BareReader(data, what)
    reader.version(PROTOCOL_VERSION)
    return reader


def _bare_writer() -> BareWriter:
    writer = BareWriter()
    writer.version(PROTOCOL_VERSION)
    return writer


def _bare_tag(reader: BareReader, tags: tuple[str, ...]) -> str:
    start = reader.offset
    index = reader.u8("tag")
    if index >= len(tags):
        raise reader.error("tag", f"unknown union tag {index} (expected 0..{len(tags) - 1})",
                           start)
    return tags[index]


def _bare_value(reader: BareReader, field: str) -> Any:
    """A `data` field holding CBOR written with JSON-compat escaping."""
    start = reader.offset
    raw = reader.data(field)
    where = f"bare {reader.what}.{field} (at byte {start})"
    return compat.from_wire(_cbor_tree(raw, where), where=where, compat=True)


def _bare_list(reader: BareReader, field: str) -> list[Any]:
    value = _bare_value(reader, field)
    if not isinstance(value, list):
        raise ProtocolError(f"bare {reader.what}: field {field!r} must hold a CBOR array, "
                            f"got {_kind(value)}")
    return value


def _out(value: Any, encoding: Encoding, where: str) -> Any:
    """A service value going to the client, shaped for the json/cbor tree."""
    form = Form.JSON if encoding is Encoding.JSON else Form.CBOR
    return compat.escape(value, form=form, where=where, code=ErrorCode.INTERNAL)


def _out_cbor(value: Any, where: str) -> bytes:
    """A service value going to the client inside a bare `data` field."""
    return _cbor_dumps(compat.escape(value, form=Form.CBOR, where=where, code=ErrorCode.INTERNAL))


def _finish(tree: Any, encoding: Encoding) -> bytes | str:
    if encoding is Encoding.JSON:
        return _json_dumps(tree)
    return _cbor_dumps(tree)


def _to_bytes(frame: bytes | str) -> bytes:
    return frame.encode("utf-8") if isinstance(frame, str) else frame


# ToClient


def encode_to_client(msg: ToClient, encoding: Encoding) -> bytes | str:
    """Encode a message for the client; `str` means send it as a text frame (json)."""
    if encoding is Encoding.BARE:
        return _encode_to_client_bare(msg)
    val: dict[str, Any]
    match msg:
        case Init():
            tag, val = "Init", {"actorId": msg.actor_id, "connectionId": msg.connection_id}
        case ErrorMsg():
            tag, val = "Error", {"group": msg.group, "code": msg.code, "message": msg.message}
            if msg.metadata is not None:
                val["metadata"] = _out(msg.metadata, encoding, "metadata")
            # The client's schema requires actionId (nullable) but only an absent actor.
            val["actionId"] = (None if msg.action_id is None
                               else _id_wire(msg.action_id, encoding, "actionId"))
            if msg.actor is not None:
                val["actor"] = _actor_tree(msg.actor)
        case ActionResponse():
            tag, val = "ActionResponse", {"id": _id_wire(msg.id, encoding, "id"),
                                          "output": _out(msg.output, encoding, "output")}
        case Event():
            tag, val = "Event", {"name": msg.name, "args": _out(msg.args, encoding, "event args")}
    return _finish({"body": {"tag": tag, "val": val}}, encoding)


# Bytes that may start a CBOR item `compat.escape(form=CBOR)` would change, or that
# cbor2 never writes for a service value: an 8-byte integer head (beyond 2**32, written
# as a float for cbor-x), any tag (bignums), a float (NaN and infinities are refused).
# Found inside a string, such a byte only costs the slow path.
_SUSPECT_BYTES: Final = bytes([0x1B, 0x3B, *range(0xC0, 0xDC), 0xF9, 0xFA, 0xFB])
# A two-item array whose first item is a string starting with `$` (escaped by doubling it).
_DOLLAR_PAIR: Final = re.compile(rb"\x82(?:[\x61-\x77]|\x78.|\x79..|\x7a.{4}|\x7b.{8})\$", re.DOTALL)


def _may_need_escape(cbor: bytes) -> bool:
    # translate() and `in` run in C over the bytes; the regex only when a `$` is there.
    if len(cbor.translate(None, _SUSPECT_BYTES)) != len(cbor):
        return True
    return b"$" in cbor and _DOLLAR_PAIR.search(cbor) is not None


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | ai]) + value.to_bytes(size, "big")
    raise ValueError(f"CBOR length {value} out of range")


def _cbor_map_length(blob: bytes) -> tuple[int, int] | None:
    """(entries, head size) of the definite-length CBOR map `blob` starts with."""
    if not blob or blob[0] >> 5 != 5:
        return None
    ai = blob[0] & 0x1F
    if ai < 24:
        return ai, 1
    size = {24: 1, 25: 2, 26: 4, 27: 8}.get(ai)
    if size is None or len(blob) < 1 + size:
        return None
    return int.from_bytes(blob[1:1 + size], "big"), 1 + size


def event_frame_from_cbor(name: str, payload: bytes, epoch: str, encoding: Encoding,
                          seq: int | None = None) -> bytes | None:
    """`encode_to_client(Event(name, [{**loads(payload), "epoch": epoch}]), encoding)`,
    built around the payload's committed CBOR bytes without decoding or escaping it.

    The relay's hot path: a worker's event arrives as the CBOR map it committed, which ends
    with `"seq": seq, "epoch": epoch` (`eventlog.stored_payload`; older rows lack `epoch`,
    and get it added), and for cbor and bare clients a service value's CBOR is already its
    wire form unless it holds something `compat.escape` rewrites. Returns None when the
    bytes might (see `_may_need_escape`), for json, or when `payload` is not a
    definite-length map: the caller then encodes the decoded value the long way. Byte for
    byte the same frame. Given `seq`, the service-written tail is not scanned: the seq
    integer's bytes alone would send one event in eight the long way.
    """
    if encoding is Encoding.JSON:
        return None
    epoch_bytes = epoch.encode("utf-8")
    epoch_entry = b"\x65epoch" + _cbor_head(3, len(epoch_bytes)) + epoch_bytes
    has_epoch = False
    scanned = payload
    if seq is not None and 0 <= seq < 1 << 32:
        tail = b"\x63seq" + _cbor_head(0, seq)
        if payload.endswith(tail + epoch_entry):
            has_epoch, scanned = True, payload[:-len(tail + epoch_entry)]
        elif payload.endswith(tail):
            scanned = payload[:-len(tail)]
    if _may_need_escape(scanned) or _may_need_escape(epoch_bytes) or b"\x65epoch" in scanned:
        return None  # (a payload that may hold another `epoch`: the long way decides)
    head = _cbor_map_length(payload)
    if head is None:
        return None
    entries, head_size = head
    if has_epoch:
        args = b"".join((b"\x81", payload))
    else:
        args = b"".join((b"\x81", _cbor_head(5, entries + 1), payload[head_size:], epoch_entry))
    if encoding is Encoding.BARE:
        writer = _bare_writer()
        writer.u8(3)
        writer.string(name)
        writer.data(args)
        return writer.getvalue()
    name_bytes = name.encode("utf-8")
    # {"body": {"tag": "Event", "val": {"name": name, "args": [payload]}}}
    return b"".join((b"\xa1\x64body\xa2\x63tag\x65Event\x63val\xa2\x64name",
                     _cbor_head(3, len(name_bytes)), name_bytes, b"\x64args", args))


def _actor_tree(actor: ActorSpecifier) -> dict[str, Any]:
    tree: dict[str, Any] = {"actorId": actor.actor_id,
                            "generation": _u64(actor.generation, "generation")}
    if actor.key is not None:
        tree["key"] = actor.key
    return tree


def _write_actor(writer: BareWriter, actor: ActorSpecifier) -> None:
    writer.string(actor.actor_id)
    writer.uint(actor.generation)
    writer.optional(actor.key, writer.string)


def _encode_to_client_bare(msg: ToClient) -> bytes:
    writer = _bare_writer()
    match msg:
        case Init():
            writer.u8(0)
            writer.string(msg.actor_id)
            writer.string(msg.connection_id)
        case ErrorMsg():
            writer.u8(1)
            writer.string(msg.group)
            writer.string(msg.code)
            writer.string(msg.message)
            metadata = None if msg.metadata is None else _out_cbor(msg.metadata, "metadata")
            writer.optional(metadata, writer.data)
            writer.optional(msg.action_id, writer.uint)
            writer.optional(msg.actor, lambda actor: _write_actor(writer, actor))
        case ActionResponse():
            writer.u8(2)
            writer.uint(msg.id)
            writer.data(_out_cbor(msg.output, "output"))
        case Event():
            writer.u8(3)
            writer.string(msg.name)
            writer.data(_out_cbor(msg.args, "event args"))
    return writer.getvalue()


def decode_to_client(data: bytes | str, encoding: Encoding) -> ToClient:
    """Decode a server message (for the Python client). Raises `ProtocolError` only."""
    what = "ToClient"
    if encoding is Encoding.BARE:
        return _decode_to_client_bare(_binary(data, encoding, what))
    tag, val = _envelope(_tree(data, encoding, what), _TO_CLIENT_TAGS, what)
    match tag:
        case "Init":
            return Init(val.string("actorId"), val.string("connectionId"))
        case "Error":
            actor = None
            if val.has("actor"):
                actor = _read_actor_tree(_Fields(val.obj["actor"], f"{val.what}.actor"))
            val.present("actionId")
            return ErrorMsg(val.string("group"), val.string("code"), val.string("message"),
                            val.value("metadata", compat_values=True) if val.has("metadata")
                            else None,
                            val.optional_uint("actionId", compat_values=True), actor)
        case "ActionResponse":
            return ActionResponse(val.uint("id", compat_values=True),
                                  val.value("output", compat_values=True))
        case _:
            return Event(val.string("name"), val.array("args", compat_values=True))


def _read_actor_tree(fields: _Fields) -> ActorSpecifier:
    return ActorSpecifier(fields.string("actorId"), fields.uint("generation", compat_values=True),
                          fields.optional_str("key"))


def _read_actor_bare(reader: BareReader, field: str) -> ActorSpecifier:
    return ActorSpecifier(reader.string(f"{field}.actorId"), reader.uint(f"{field}.generation"),
                          reader.optional(f"{field}.key", reader.string))


def _decode_to_client_bare(data: bytes) -> ToClient:
    reader = _bare_reader(data, "ToClient")
    msg: ToClient
    match _bare_tag(reader, _TO_CLIENT_TAGS):
        case "Init":
            msg = Init(reader.string("actorId"), reader.string("connectionId"))
        case "Error":
            group, code, message = (reader.string("group"), reader.string("code"),
                                    reader.string("message"))
            metadata = (_bare_value(reader, "metadata") if reader.boolean("metadata")
                        else None)
            msg = ErrorMsg(group, code, message, metadata, reader.optional("actionId", reader.uint),
                           reader.optional("actor", lambda f: _read_actor_bare(reader, f)))
        case "ActionResponse":
            msg = ActionResponse(reader.uint("id"), _bare_value(reader, "output"))
        case _:
            msg = Event(reader.string("name"), _bare_list(reader, "args"))
    reader.end()
    return msg


# ToServer


def encode_to_server(msg: ToServer, encoding: Encoding) -> bytes | str:
    """Encode a client message exactly as the npm client shapes it; `str` is a text frame.

    Args that are not in the value model raise `ActorvisorError(actor.invalid_args)`.
    """
    if encoding is Encoding.BARE:
        return _encode_to_server_bare(msg)
    val: dict[str, Any]
    match msg:
        case ActionRequest():
            # npm sends its args through jsonStringifyCompat in json but as plain CBOR in cbor.
            form = Form.JSON if encoding is Encoding.JSON else Form.CBOR_PLAIN
            tag, val = "ActionRequest", {
                "id": _id_wire(msg.id, encoding, "id"), "name": msg.name,
                "args": compat.escape(msg.args, form=form, where="args",
                                      code=ErrorCode.INVALID_ARGS)}
        case SubscriptionRequest():
            tag, val = "SubscriptionRequest", {"eventName": msg.event_name,
                                               "subscribe": msg.subscribe}
            if msg.after is not None:
                val["after"] = _u64(msg.after, "after")
            if msg.epoch is not None:
                val["epoch"] = msg.epoch
    return _finish({"body": {"tag": tag, "val": val}}, encoding)


def _args_cbor_compat(args: list[Any]) -> bytes:
    return _cbor_dumps(compat.escape(args, form=Form.CBOR_COMPAT, where="args",
                                     code=ErrorCode.INVALID_ARGS))


def _encode_to_server_bare(msg: ToServer) -> bytes:
    writer = _bare_writer()
    match msg:
        case ActionRequest():
            writer.u8(0)
            writer.uint(msg.id)
            writer.string(msg.name)
            writer.data(_args_cbor_compat(msg.args))
        case SubscriptionRequest():
            writer.u8(1)
            writer.string(msg.event_name)
            writer.boolean(msg.subscribe)
            if msg.after is not None or msg.epoch is not None:
                writer.optional(msg.after, writer.uint)
                writer.optional(msg.epoch, writer.string)
    return writer.getvalue()


def decode_to_server(data: bytes | str, encoding: Encoding,
                     max_size: int = MAX_MESSAGE_SIZE) -> ToServer:
    """Decode one client frame. Raises `ProtocolError` and nothing else."""
    what = "ToServer"
    _check_size(data, max_size, what)
    if encoding is Encoding.BARE:
        return _decode_to_server_bare(_binary(data, encoding, what))
    tag, val = _envelope(_tree(data, encoding, what), _TO_SERVER_TAGS, what)
    # json args went through jsonStringifyCompat; cbor args are plain CBOR.
    compat_values = encoding is Encoding.JSON
    if tag == "ActionRequest":
        return ActionRequest(val.uint("id", compat_values=True), val.string("name"),
                             val.array("args", compat_values=compat_values))
    return SubscriptionRequest(val.string("eventName"), val.boolean("subscribe"),
                               val.optional_uint("after", compat_values=True),
                               val.optional_str("epoch"))


def _decode_to_server_bare(data: bytes) -> ToServer:
    reader = _bare_reader(data, "ToServer")
    msg: ToServer
    if _bare_tag(reader, _TO_SERVER_TAGS) == "ActionRequest":
        msg = ActionRequest(reader.uint("id"), reader.string("name"), _bare_list(reader, "args"))
    else:
        event_name, subscribe = reader.string("eventName"), reader.boolean("subscribe")
        after = epoch = None
        if reader.remaining:
            after = reader.optional("after", reader.uint)
            epoch = reader.optional("epoch", reader.string)
        msg = SubscriptionRequest(event_name, subscribe, after, epoch)
    reader.end()
    return msg


# HTTP actions


def encode_http_action_request(args: list[Any], encoding: Encoding) -> bytes:
    """The body of `POST .../action/{name}` as the npm client's handle sends it."""
    if encoding is Encoding.BARE:
        writer = _bare_writer()
        writer.data(_args_cbor_compat(args))
        return writer.getvalue()
    form = Form.JSON if encoding is Encoding.JSON else Form.CBOR_PLAIN
    tree = {"args": compat.escape(args, form=form, where="args", code=ErrorCode.INVALID_ARGS)}
    return _to_bytes(_finish(tree, encoding))


def decode_http_action_request(body: bytes, encoding: Encoding,
                               max_size: int = MAX_MESSAGE_SIZE) -> list[Any]:
    """The args of an HTTP action. Raises `ProtocolError` and nothing else."""
    what = "HttpActionRequest"
    _check_size(body, max_size, what)
    if encoding is Encoding.BARE:
        reader = _bare_reader(body, what)
        args = _bare_list(reader, "args")
        reader.end()
        return args
    fields = _Fields(_tree(body, encoding, what), what)
    return fields.array("args", compat_values=encoding is Encoding.JSON)


def encode_http_action_response(output: Any, encoding: Encoding) -> bytes:
    if encoding is Encoding.BARE:
        writer = _bare_writer()
        writer.data(_out_cbor(output, "output"))
        return writer.getvalue()
    return _to_bytes(_finish({"output": _out(output, encoding, "output")}, encoding))


def decode_http_action_response(body: bytes, encoding: Encoding) -> Any:
    """The output of an HTTP action (for the Python client). Raises `ProtocolError` only."""
    what = "HttpActionResponse"
    if encoding is Encoding.BARE:
        reader = _bare_reader(body, what)
        output = _bare_value(reader, "output")
        reader.end()
        return output
    return _Fields(_tree(body, encoding, what), what).value("output", compat_values=True)


def encode_http_error(err: ActorvisorError, encoding: Encoding,
                      actor: ActorSpecifier | None = None) -> bytes:
    """An HTTP error body (`HttpResponseError`); send it with `content_type(encoding)`."""
    if encoding is Encoding.BARE:
        writer = _bare_writer()
        writer.string(err.code.group)
        writer.string(err.code.code)
        writer.string(err.message)
        metadata = None if err.metadata is None else _out_cbor(err.metadata, "metadata")
        writer.optional(metadata, writer.data)
        writer.optional(actor, lambda a: _write_actor(writer, a))
        return writer.getvalue()
    tree: dict[str, Any] = {"group": err.code.group, "code": err.code.code,
                            "message": err.message}
    if err.metadata is not None:
        tree["metadata"] = _out(err.metadata, encoding, "metadata")
    if actor is not None:
        tree["actor"] = _actor_tree(actor)
    return _to_bytes(_finish(tree, encoding))


def decode_http_error(body: bytes, encoding: Encoding) -> ActorvisorError:
    """Rebuild an HTTP error; a `group.code` we do not know becomes `actor.internal_error`.

    Like the npm client, pick json when the response's content type says
    `application/json`, whatever encoding the request used.
    """
    what = "HttpResponseError"
    if encoding is Encoding.BARE:
        reader = _bare_reader(body, what)
        group, code, message = (reader.string("group"), reader.string("code"),
                                reader.string("message"))
        metadata = _bare_value(reader, "metadata") if reader.boolean("metadata") else None
        reader.optional("actor", lambda f: _read_actor_bare(reader, f))
        reader.end()
    else:
        fields = _Fields(_tree(body, encoding, what), what)
        group, code, message = fields.string("group"), fields.string("code"), fields.string("message")
        metadata = fields.value("metadata", compat_values=True) if fields.has("metadata") else None
        if fields.has("actor"):
            _read_actor_tree(_Fields(fields.obj["actor"], f"{what}.actor"))
    return ActorvisorError.from_dict({"group": group, "code": code, "message": message,
                                      "metadata": metadata})
