"""The v4 codecs through their public API: round trips, wire details a server relies
on, the inbound asymmetry between encodings, and precise errors for bad frames."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest

from protocol.client import (
    MAX_MESSAGE_SIZE,
    ActionRequest,
    ActionResponse,
    ActorSpecifier,
    Encoding,
    ErrorMsg,
    Event,
    Init,
    SubscriptionRequest,
    ToClient,
    ToServer,
    content_type,
    decode_http_action_request,
    decode_http_action_response,
    decode_http_error,
    decode_to_client,
    decode_to_server,
    encode_http_action_request,
    encode_http_action_response,
    encode_http_error,
    encode_to_client,
    encode_to_server,
    parse_encoding,
    parse_ws_subprotocols,
)
from protocol.errors import ActorvisorError, ErrorCode, ProtocolError

ENCODINGS = list(Encoding)

VALUE = {"text": "héllo", "bytes": b"\x00\xff", "pair": ["$x", 1], "big": 2**64 + 3,
         "mid": 2**40, "float": -0.25, "none": None, "nested": [[{"ok": True}]]}

TO_CLIENT: list[ToClient] = [
    Init("actor-1", "conn-1"),
    ErrorMsg("actor", "unknown_action", "no such action", {"name": "x"}, 7,
             ActorSpecifier("actor-1", 3, "key-a")),
    ErrorMsg("actor", "stopped", "stopped", actor=ActorSpecifier("actor-1", 0)),
    ErrorMsg("protocol", "invalid_message", "bad frame"),
    ActionResponse(0, VALUE),
    ActionResponse(2**64 - 1, None),
    ActionResponse(5, b""),
    Event("sessionEvent", [{"seq": 1, "sessionId": "s"}]),
    Event("x", []),
    Event("y", ["$y", 2]),
]

TO_SERVER: list[ToServer] = [
    ActionRequest(0, "createSession", ["local", {"cwd": "/workspace"}]),
    ActionRequest(2**64 - 1, "writeFile", ["/w/a", b"\x01\x02"]),
    ActionRequest(9, "echo", [VALUE]),
    SubscriptionRequest("sessionEvent", True),
    SubscriptionRequest("sessionEvent", False),
    SubscriptionRequest("sessionEvent", True, after=0),
    SubscriptionRequest("sessionEvent", True, after=41, epoch="e-1"),
    SubscriptionRequest("sessionEvent", True, epoch="e-1"),
]


def body(frame: bytes | str) -> bytes:
    return frame.encode() if isinstance(frame, str) else frame


def protocol_error(call: Any, *args: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value


# Round trips


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("message", TO_CLIENT, ids=repr)
def test_to_client_round_trip(message: ToClient, encoding: Encoding) -> None:
    assert decode_to_client(encode_to_client(message, encoding), encoding) == message


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("message", TO_SERVER, ids=repr)
def test_to_server_round_trip(message: ToServer, encoding: Encoding) -> None:
    frame = encode_to_server(message, encoding)
    assert decode_to_server(frame, encoding) == message
    if encoding is Encoding.JSON:
        assert decode_to_server(body(frame), encoding) == message  # a binary json frame


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_http_round_trips(encoding: Encoding) -> None:
    args = ["a", VALUE, b"\x00"]
    assert decode_http_action_request(encode_http_action_request(args, encoding), encoding) == args
    assert decode_http_action_response(encode_http_action_response(VALUE, encoding),
                                       encoding) == VALUE
    error = ActorvisorError(ErrorCode.SESSION_NOT_FOUND, "no session s1", {"sessionId": "s1"})
    for actor in (None, ActorSpecifier("a", 1, "k")):
        decoded = decode_http_error(encode_http_error(error, encoding, actor), encoding)
        assert (decoded.code, decoded.message, decoded.metadata) == (
            error.code, error.message, error.metadata)


def test_http_error_with_an_unknown_code_becomes_internal() -> None:
    data = json.dumps({"group": "guard", "code": "actor_runner_failed", "message": "boom"})
    error = decode_http_error(data.encode(), Encoding.JSON)
    assert error.code is ErrorCode.INTERNAL
    assert error.message == "guard.actor_runner_failed: boom"


# Negotiation


def test_parse_encoding() -> None:
    assert parse_encoding(None) is Encoding.JSON
    assert parse_encoding("") is Encoding.JSON
    assert parse_encoding("cbor") is Encoding.CBOR
    assert parse_encoding("bare") is Encoding.BARE
    for bad in ("JSON", "msgpack", " json"):
        assert protocol_error(parse_encoding, bad).code is ErrorCode.UNSUPPORTED_ENCODING


def test_content_types() -> None:
    assert content_type(Encoding.JSON) == "application/json"
    assert content_type(Encoding.CBOR) == "application/octet-stream"
    assert content_type(Encoding.BARE) == "application/octet-stream"


def test_subprotocols() -> None:
    assert parse_ws_subprotocols([]) == (Encoding.JSON, None)
    assert parse_ws_subprotocols(["rivet"]) == (Encoding.JSON, None)
    assert parse_ws_subprotocols(["rivet", "rivet_encoding.bare", "rivet_actor.x",
                                  "rivet_token.t", "rivet_skip_ready_wait"]) == (
        Encoding.BARE, None)
    assert parse_ws_subprotocols(["rivet, rivet_encoding.cbor, rivet_conn_params.%7B%22a%22%3A"
                                  "%5B1%2C%22%C3%BC%22%5D%7D"]) == (Encoding.CBOR,
                                                                    {"a": [1, "ü"]})
    # Conn params are plain JSON (JSON.stringify): no compat revival.
    assert parse_ws_subprotocols(["rivet_conn_params.%5B%22%24x%22%2C1%5D"]) == (
        Encoding.JSON, ["$x", 1])


@pytest.mark.parametrize(("protocols", "problem", "code"), [
    (["rivet_encoding.xml"], "unsupported encoding 'xml'", ErrorCode.UNSUPPORTED_ENCODING),
    (["rivet_encoding."], "empty rivet_encoding", ErrorCode.UNSUPPORTED_ENCODING),
    (["rivet_encoding.json", "rivet_encoding.cbor"], "conflicting subprotocols",
     ErrorCode.UNSUPPORTED_ENCODING),
    (["rivet_conn_params.%7B"], "rivet_conn_params: invalid JSON", ErrorCode.INVALID_MESSAGE),
    (["rivet_conn_params.%FF"], "not percent-encoded UTF-8", ErrorCode.INVALID_MESSAGE),
    (["rivet_conn_params.NaN"], "rivet_conn_params: invalid JSON", ErrorCode.INVALID_MESSAGE),
])
def test_bad_subprotocols(protocols: list[str], problem: str, code: ErrorCode) -> None:
    error = protocol_error(parse_ws_subprotocols, protocols)
    assert problem in error.message and error.code is code


# Wire details


def test_frame_types() -> None:
    # json goes out as a text frame; cbor and bare must be binary (the npm client
    # asserts it for both).
    assert isinstance(encode_to_client(Init("a", "c"), Encoding.JSON), str)
    assert isinstance(encode_to_client(Init("a", "c"), Encoding.CBOR), bytes)
    assert isinstance(encode_to_client(Init("a", "c"), Encoding.BARE), bytes)
    for encoding in (Encoding.CBOR, Encoding.BARE):
        error = protocol_error(decode_to_server, "{}", encoding)
        assert f"{encoding} messages must be binary, got text" in error.message


def test_json_error_shape() -> None:
    frame = encode_to_client(ErrorMsg("g", "c", "m", actor=ActorSpecifier("a", 1)), Encoding.JSON)
    assert frame == ('{"body":{"tag":"Error","val":{"group":"g","code":"c","message":"m",'
                     '"actionId":null,"actor":{"actorId":"a","generation":1}}}}')
    frame = encode_to_client(ErrorMsg("g", "c", "m", None, 3), Encoding.JSON)
    assert frame == ('{"body":{"tag":"Error","val":{"group":"g","code":"c","message":"m",'
                     '"actionId":["$BigInt","3"]}}}')


def test_bare_error_layout() -> None:
    frame = encode_to_client(ErrorMsg("g", "c", "m", [1], 300, ActorSpecifier("a", 2, "k")),
                             Encoding.BARE)
    assert isinstance(frame, bytes)
    assert frame.hex() == ("0400" "01" "0167" "0163" "016d"   # version, tag Error, strings
                           "01" "02" "8101"                    # metadata: CBOR [1]
                           "01" "ac02"                         # actionId 300
                           "01" "0161" "02" "01" "016b")       # actor a, gen 2, key k


def test_cbor_ids_are_u64_heads_and_generation_is_plain() -> None:
    frame = encode_to_client(ErrorMsg("g", "c", "m", None, 1, ActorSpecifier("a", 2)),
                             Encoding.CBOR)
    assert isinstance(frame, bytes)
    assert bytes.fromhex("68616374696f6e4964" "1b0000000000000001") in frame
    assert bytes.fromhex("6a67656e65726174696f6e" "02") in frame


def test_subscription_cursor_extension_in_bare() -> None:
    plain = encode_to_server(SubscriptionRequest("e", True), Encoding.BARE)
    assert body(plain).hex() == "0400" "01" "0165" "01"  # exactly v4: nothing appended
    cursor = encode_to_server(SubscriptionRequest("e", True, 5, "x"), Encoding.BARE)
    assert body(cursor).hex() == "0400" "01" "0165" "01" "0105" "010178"
    assert decode_to_server(bytes.fromhex("0400" "01" "0165" "01" "00" "00"),
                            Encoding.BARE) == SubscriptionRequest("e", True)
    error = protocol_error(decode_to_server, bytes.fromhex("0400" "01" "0165" "01" "00"),
                           Encoding.BARE)
    assert "field 'epoch' at byte 7: needs 1 bytes, only 0 left" in error.message


# The inbound asymmetry (PROTOCOL.md §2)


def test_cbor_args_are_plain_cbor() -> None:
    # What cbor-x writes for args [Uint8Array[1], ["$x", 1], 2n**64n + 1n]: tag 64, no
    # escaping, a bignum.
    frame = cbor2.dumps({"body": {"tag": "ActionRequest", "val": {
        "id": 1, "name": "a",
        "args": [cbor2.CBORTag(64, b"\x01"), ["$x", 1], ["$BigInt", "7"], 2**64 + 1]}}})
    assert decode_to_server(frame, Encoding.CBOR) == ActionRequest(
        1, "a", [b"\x01", ["$x", 1], ["$BigInt", "7"], 2**64 + 1])


def test_bare_args_are_cbor_with_compat_escaping() -> None:
    args = cbor2.dumps([["$Uint8Array", "AQ=="], ["$$x", 1], ["$BigInt", "7"]])
    frame = bytes.fromhex("0400" "00" "01" "0161") + bytes([len(args)]) + args
    assert decode_to_server(frame, Encoding.BARE) == ActionRequest(1, "a", [b"\x01", ["$x", 1], 7])


def test_json_args_are_revived() -> None:
    frame = ('{"body":{"tag":"ActionRequest","val":{"id":["$BigInt","1"],"name":"a",'
             '"args":[["$Uint8Array","AQ=="],["$$x",1],["$BigInt","7"]]}}}')
    assert decode_to_server(frame, Encoding.JSON) == ActionRequest(1, "a", [b"\x01", ["$x", 1], 7])


def test_cbor_output_to_the_client_is_escaped() -> None:
    # The npm client runs decodeCborCompat on every cbor frame it receives.
    frame = encode_to_client(ActionResponse(1, ["$x", 1]), Encoding.CBOR)
    assert isinstance(frame, bytes) and b"\x82\x63$$x\x01" in frame


def test_ids_accept_a_plain_number_in_json() -> None:
    # Not what npm sends, but what a person with curl would; the value is what matters.
    frame = '{"body":{"tag":"ActionRequest","val":{"id":4,"name":"a","args":[]}}}'
    assert decode_to_server(frame, Encoding.JSON) == ActionRequest(4, "a", [])


# Bad frames


def json_request(**val: Any) -> str:
    return json.dumps({"body": {"tag": "ActionRequest", "val": val}}, ensure_ascii=False)


GOOD_VAL = {"id": ["$BigInt", "1"], "name": "a", "args": []}

BAD_JSON: list[tuple[str | bytes, str]] = [
    ("", "invalid JSON"),
    ("{", "invalid JSON"),
    (b"\xff{}", "invalid UTF-8 at byte 0"),
    ("[]", "ToServer must be an object, got array"),
    ("{}", "ToServer: field 'body' is missing"),
    ('{"body":1}', "ToServer.body must be an object, got integer"),
    ('{"body":{"val":{}}}', "ToServer.body: field 'tag' is missing"),
    ('{"body":{"tag":"Init","val":{}}}',
     "field 'tag' is 'Init', expected one of ActionRequest, SubscriptionRequest"),
    ('{"body":{"tag":"ActionRequest"}}', "ToServer.body: field 'val' is missing"),
    (json_request(name="a", args=[]), "ToServer.body.val(ActionRequest): field 'id' is missing"),
    (json_request(**{**GOOD_VAL, "id": ["$BigInt", "-1"]}),
     "field 'id' must be between 0 and 2**64-1, got -1"),
    (json_request(**{**GOOD_VAL, "id": ["$BigInt", str(2**64)]}),
     "field 'id' must be between 0 and 2**64-1"),
    (json_request(**{**GOOD_VAL, "id": 1.5}), "field 'id' must be an unsigned integer, got number"),
    (json_request(**{**GOOD_VAL, "id": "1"}), "field 'id' must be an unsigned integer, got string"),
    (json_request(**{**GOOD_VAL, "id": True}),
     "field 'id' must be an unsigned integer, got boolean"),
    (json_request(**{**GOOD_VAL, "name": 3}), "field 'name' must be a string, got integer"),
    (json_request(**{**GOOD_VAL, "args": {"a": 1}}), "field 'args' must be an array, got object"),
    (json_request(**{**GOOD_VAL, "args": [["$nope", 1]]}),
     "ToServer.body.val(ActionRequest).args[0]: unknown JSON-compat type '$nope'"),
    ('{"body":{"tag":"ActionRequest","val":{"id":1,"name":"a","args":[NaN]}}}',
     "NaN is not valid JSON"),
    ('{"body":{"tag":"ActionRequest","val":{"id":1,"name":"a","args":[1e999]}}}',
     "args[0]: inf is not a finite number"),
    ('{"body":{"tag":"ActionRequest","val":{"id":1,"id":2,"name":"a","args":[]}}}',
     "duplicate key 'id'"),
    ('{"body":{"tag":"SubscriptionRequest","val":{"eventName":"e","subscribe":"yes"}}}',
     "field 'subscribe' must be a boolean, got string"),
    ('{"body":{"tag":"SubscriptionRequest","val":{"eventName":"e","subscribe":true,'
     '"after":-1}}}', "field 'after' must be between 0 and 2**64-1"),
    ('{"body":{"tag":"SubscriptionRequest","val":{"eventName":"\\ud800","subscribe":true}}}',
     "eventName: string contains a lone UTF-16 surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"body":{"tag":"ActionRequest","val":{"id":1,"name":"a","args":' + "[" * 200 + "]" * 200
     + "}}}", "nested deeper than 128 levels"),
]


@pytest.mark.parametrize(("frame", "problem"), BAD_JSON)
def test_bad_json_frames(frame: str | bytes, problem: str) -> None:
    error = protocol_error(decode_to_server, frame, Encoding.JSON)
    assert problem in error.message
    assert error.code is ErrorCode.INVALID_MESSAGE


def cbor_request(args: Any) -> bytes:
    return cbor2.dumps({"body": {"tag": "ActionRequest", "val": {"id": 1, "name": "a",
                                                                 "args": args}}})


BAD_CBOR: list[tuple[bytes, str]] = [
    (b"", "invalid CBOR"),
    (b"\xa0\x00", "1 trailing bytes after the CBOR item (at byte 1)"),
    (b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", "invalid CBOR"),
    (b"\x9b\x00\x00\x00\x00\xff\xff\xff\xff", "invalid CBOR"),
    (cbor2.dumps([1]), "ToServer must be an object, got array"),
    (cbor_request([cbor2.CBORTag(1, 0)]), "unsupported CBOR tag 1"),
    (cbor_request([cbor2.CBORTag(258, [1])]), "unsupported CBOR tag 258"),
    (cbor_request([cbor2.CBORTag(259, {"a": 2})]), "unsupported CBOR tag 259"),
    (cbor_request([cbor2.CBORTag(64, "text")]), "tag 64 (Uint8Array) must wrap a byte string"),
    (bytes.fromhex("a164626f6479d81c80"), "unsupported CBOR tag 28"),
    (cbor_request([cbor2.CBORSimpleValue(99)]), "args[0]: unsupported value of type"),
    (cbor_request([float("nan")]), "args[0]: nan is not a finite number"),
    (cbor_request([{b"k": 1}]), "map key b'k' is not a string"),
    (cbor_request([{1: 1}]), "invalid CBOR"),  # strict_hashable_types
    (bytes.fromhex("a2616101616102"), "invalid CBOR"),  # duplicate key
    (bytes.fromhex("a1646e616d6562c328"), "invalid CBOR"),  # invalid UTF-8
    (cbor2.dumps({"body": {"tag": "ActionRequest", "val": {
        "id": 2**64, "name": "a", "args": []}}}), "field 'id' must be between 0 and 2**64-1"),
    (b"\x81" * 10_000 + b"\x00", "invalid CBOR"),
]


@pytest.mark.parametrize(("frame", "problem"), BAD_CBOR)
def test_bad_cbor_frames(frame: bytes, problem: str) -> None:
    error = protocol_error(decode_to_server, frame, Encoding.CBOR)
    assert problem in error.message
    assert error.code is ErrorCode.INVALID_MESSAGE


BAD_BARE: list[tuple[str, str]] = [
    ("", "field 'version' at byte 0: needs 2 bytes, only 0 left"),
    ("0300", "unsupported protocol version 3 (expected 4)"),
    ("0400", "field 'tag' at byte 2: needs 1 bytes"),
    ("040002", "unknown union tag 2 (expected 0..1)"),
    ("04000080", "field 'id' at byte 3: truncated uint"),
    ("04000001", "field 'name' at byte 4: truncated uint"),
    ("0400000101617f", "field 'args' at byte 6: length 127 but only 0 bytes left"),
    ("04000001016101a0", "field 'args' must hold a CBOR array, got object"),
    ("04000001016101ff", "bare ToServer.args (at byte 6): invalid CBOR"),
    ("040000010161028000", "bare ToServer.args (at byte 6): 1 trailing bytes"),
    ("040000010161018000", "1 trailing bytes after the message"),
    ("0400010165", "field 'subscribe' at byte 5: needs 1 bytes"),
    ("040001016502", "a bool must be 0 or 1, got 2"),
    ("04000101ff01", "field 'eventName' at byte 3: invalid UTF-8"),
]


@pytest.mark.parametrize(("frame", "problem"), BAD_BARE)
def test_bad_bare_frames(frame: str, problem: str) -> None:
    error = protocol_error(decode_to_server, bytes.fromhex(frame), Encoding.BARE)
    assert problem in error.message
    assert error.code is ErrorCode.INVALID_MESSAGE


def test_bad_to_client_frames_name_their_field() -> None:
    error = protocol_error(decode_to_client, '{"body":{"tag":"Error","val":{"group":"g",'
                           '"code":"c","message":"m"}}}', Encoding.JSON)
    assert "ToClient.body.val(Error): field 'actionId' is missing" in error.message
    error = protocol_error(decode_to_client, '{"body":{"tag":"Event","val":{"name":"e",'
                           '"args":{}}}}', Encoding.JSON)
    assert "field 'args' must be an array, got object" in error.message
    error = protocol_error(decode_to_client, bytes.fromhex("040004"), Encoding.BARE)
    assert "unknown union tag 4 (expected 0..3)" in error.message


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_size_is_checked_before_parsing(encoding: Encoding) -> None:
    junk = b"\xff" * 101
    for decode in (decode_to_server, decode_http_action_request):
        error = protocol_error(decode, junk, encoding, max_size=100)
        assert error.code is ErrorCode.MESSAGE_TOO_LARGE
        assert "101 bytes, more than the limit of 100" in error.message
    assert MAX_MESSAGE_SIZE == 1 << 20


def test_text_size_counts_utf8_bytes() -> None:
    frame = json_request(id=1, name="é" * 20, args=[])
    assert len(frame) < 100 < len(frame.encode())
    error = protocol_error(decode_to_server, frame, Encoding.JSON, max_size=100)
    assert error.code is ErrorCode.MESSAGE_TOO_LARGE


# Encoding values outside the model


def test_encoders_name_bad_values() -> None:
    with pytest.raises(ActorvisorError) as info:
        encode_to_client(ActionResponse(1, {"when": {1, 2}}), Encoding.CBOR)
    assert info.value.code is ErrorCode.INTERNAL
    assert info.value.message == "cannot encode output.when: unsupported type set"
    with pytest.raises(ActorvisorError) as info:
        encode_to_server(ActionRequest(1, "a", [float("inf")]), Encoding.JSON)
    assert info.value.code is ErrorCode.INVALID_ARGS
    assert info.value.message == "cannot encode args[0]: inf is not a finite number"
    with pytest.raises(ActorvisorError) as info:
        encode_http_action_request([object()], Encoding.BARE)
    assert info.value.code is ErrorCode.INVALID_ARGS


def test_ids_that_are_not_u64_are_caller_bugs() -> None:
    for encoding in ENCODINGS:
        with pytest.raises(ValueError):
            encode_to_client(ActionResponse(-1, None), encoding)
        with pytest.raises(ValueError):
            encode_to_server(ActionRequest(2**64, "a", []), encoding)
