"""Properties over generated input: decoders fail only with ProtocolError, whatever they
are fed; valid messages survive encode -> decode in every encoding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.bare import UINT_MAX
from protocol.client import (
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
    decode_http_action_request,
    decode_http_action_response,
    decode_http_error,
    decode_to_client,
    decode_to_server,
    encode_http_action_request,
    encode_http_action_response,
    encode_to_client,
    encode_to_server,
    event_frame_from_cbor,
    parse_encoding,
    parse_ws_subprotocols,
)
from protocol.errors import ProtocolError
from vmworker.eventlog import stored_payload

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])

# Values: the service model, biased towards what the compat rules care about.
dollar_text = st.sampled_from(["$", "$x", "$$x", "$$$", "$BigInt", "$Uint8Array",
                               "$ArrayBuffer", "$Undefined", "$Set"])
text = st.text(max_size=12) | dollar_text
ints = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(
    [2**32 - 1, 2**32, -(2**32), -(2**32) - 1, 2**53 - 1, 2**53, -(2**53), 2**64, 2**64 - 1])
scalars = (st.none() | st.booleans() | ints | text | st.binary(max_size=12)
           | st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.tuples(dollar_text, inner).map(list)
                   | st.dictionaries(text, inner, max_size=4)),
    max_leaves=20,
)
args = st.lists(values, max_size=4) | st.tuples(dollar_text, values).map(list)
uints = st.integers(min_value=0, max_value=UINT_MAX)
names = st.text(max_size=16)
encodings = st.sampled_from(list(Encoding))

actors = st.builds(ActorSpecifier, names, uints, st.none() | names)
to_client: st.SearchStrategy[ToClient] = st.one_of(
    st.builds(Init, names, names),
    st.builds(ErrorMsg, names, names, names, values, st.none() | uints, st.none() | actors),
    st.builds(ActionResponse, uints, values),
    st.builds(Event, names, args),
)
to_server: st.SearchStrategy[ToServer] = st.one_of(
    st.builds(ActionRequest, uints, names, args),
    st.builds(SubscriptionRequest, names, st.booleans(), st.none() | uints, st.none() | names),
)


def only_protocol_errors(decode: Callable[[], Any]) -> None:
    try:
        decode()
    except ProtocolError:
        pass


def every_decoder(data: bytes | str, encoding: Encoding) -> None:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    only_protocol_errors(lambda: decode_to_server(data, encoding))
    only_protocol_errors(lambda: decode_to_client(data, encoding))
    only_protocol_errors(lambda: decode_http_action_request(raw, encoding))
    only_protocol_errors(lambda: decode_http_action_response(raw, encoding))
    only_protocol_errors(lambda: decode_http_error(raw, encoding))


# (1) Anything at all


@FUZZ
@given(st.binary(max_size=64), encodings)
def test_random_bytes(data: bytes, encoding: Encoding) -> None:
    every_decoder(data, encoding)
    every_decoder(b"\x04\x00" + data, encoding)  # past the bare version check


@FUZZ
@given(st.text(max_size=64), encodings)
def test_random_text(data: str, encoding: Encoding) -> None:
    every_decoder(data, encoding)
    only_protocol_errors(lambda: parse_encoding(data))
    only_protocol_errors(lambda: parse_ws_subprotocols([data, "rivet_conn_params." + data]))


# Well-formed JSON and CBOR of the wrong shape reach deeper than random bytes do.
json_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | dollar_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["body", "tag", "val", "id", "name", "args", "output", "eventName",
                         "subscribe", "actionId", "actor", "group", "code", "message",
                         "metadata", "generation", "actorId", "connectionId", "after"])
        | st.text(max_size=4), inner, max_size=5),
    max_leaves=15,
)
tags = st.sampled_from(["Init", "Error", "ActionResponse", "Event", "ActionRequest",
                        "SubscriptionRequest", "Nope"])
envelopes = st.builds(lambda tag, val: {"body": {"tag": tag, "val": val}}, tags, json_trees)
cbor_items = st.recursive(
    json_trees | st.binary(max_size=8) | st.just(cbor2.undefined),
    lambda inner: st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 28, 29, 64, 258, 259,
                                                            1000, 55799]), inner)
    | st.lists(inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(envelopes | json_trees, cbor_items)
def test_wrongly_shaped_json_and_cbor(tree: Any, item: Any) -> None:
    import json

    every_decoder(json.dumps(tree), Encoding.JSON)
    every_decoder(cbor2.dumps(tree), Encoding.CBOR)
    for envelope in (item, {"body": {"tag": "ActionRequest",
                                     "val": {"id": 1, "name": "a", "args": item}}}):
        try:
            frame = cbor2.dumps(envelope)
        except (ValueError, TypeError, OverflowError):
            continue  # cbor2 cannot write every generated tag/value pairing
        every_decoder(frame, Encoding.CBOR)
        every_decoder(b"\x04\x00\x00\x01\x01a" + bytes([len(frame) & 0x7F]) + frame,
                      Encoding.BARE)


# (2) Valid messages round-trip


@ROUND_TRIP
@given(to_client, encodings)
def test_to_client_round_trip(message: ToClient, encoding: Encoding) -> None:
    assert decode_to_client(encode_to_client(message, encoding), encoding) == message


@ROUND_TRIP
@given(to_server, encodings)
def test_to_server_round_trip(message: ToServer, encoding: Encoding) -> None:
    frame = encode_to_server(message, encoding)
    assert decode_to_server(frame, encoding, max_size=1 << 30) == message


@ROUND_TRIP
@given(st.lists(values, max_size=4), values, encodings)
def test_http_round_trip(action_args: list[Any], output: Any, encoding: Encoding) -> None:
    body = encode_http_action_request(action_args, encoding)
    assert decode_http_action_request(body, encoding) == action_args
    body = encode_http_action_response(output, encoding)
    assert decode_http_action_response(body, encoding) == output


# (3) Valid frames, damaged


@st.composite
def damaged(draw: st.DrawFn, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        at = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif action == "insert":
            data.insert(at, draw(st.integers(min_value=0, max_value=255)))
        elif action == "delete" and data:
            del data[at]
        elif action == "truncate":
            del data[at:]
        elif action == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x1B, 0x9B, 0xBF, 0xD8]))
    return bytes(data)


@FUZZ
@given(st.data(), to_server | to_client, encodings)
def test_damaged_frames(data: st.DataObject, message: Any, encoding: Encoding) -> None:
    if isinstance(message, (ActionRequest, SubscriptionRequest)):
        frame = encode_to_server(message, encoding)
    else:
        frame = encode_to_client(message, encoding)
    raw = frame.encode() if isinstance(frame, str) else frame
    every_decoder(data.draw(damaged(raw)), encoding)


# The relay's hot path: a worker's committed payload bytes spliced into a client frame.
spliced_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**33), max_value=2**33) | text
    | st.binary(max_size=12),
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(dollar_text, inner).map(list)
                   | st.dictionaries(text, inner, max_size=4)),
    max_leaves=20,
)


@ROUND_TRIP
@given(names, st.dictionaries(text.filter(lambda k: k not in ("epoch", "seq")), spliced_values,
                              max_size=30),
       st.integers(min_value=0, max_value=2**40), st.text(min_size=1, max_size=20),
       st.sampled_from([Encoding.CBOR, Encoding.BARE, Encoding.JSON]), st.booleans())
def test_spliced_event_frame_is_the_encoded_one_or_none(name: str, payload: dict[str, Any], seq: int,
                                                         epoch: str, encoding: Encoding,
                                                         stored_epoch: bool) -> None:
    # As stored (`eventlog.stored_payload`: seq, then epoch, last), or as older rows were.
    blob = cbor2.dumps({**payload, "seq": seq, "epoch": epoch} if stored_epoch else {**payload, "seq": seq})
    frame = event_frame_from_cbor(name, blob, epoch, encoding, seq)
    if frame is not None:
        assert frame == encode_to_client(Event(name, [{**payload, "seq": seq, "epoch": epoch}]),
                                         encoding)
    else:
        # Only what may need escaping (or json) takes the long way.
        scanned = blob + epoch.encode()
        assert encoding is Encoding.JSON or any(b in scanned for b in b"\x1b\x3b$\xf9\xfa\xfb") or any(
            0xc0 <= b <= 0xdb for b in scanned)


def test_plain_payloads_are_spliced() -> None:
    payload = {"sessionId": "s1", "event": {"text": "chunk 7 of 9\n", "n": [1, -2, None, True]}}
    for seq in (1, 255, 256, 0xDB, 0x1B3B, 2**31):
        blob = cbor2.dumps({**payload, "seq": seq})
        for encoding in (Encoding.CBOR, Encoding.BARE):
            assert event_frame_from_cbor("sessionEvent", blob, "e", encoding, seq) == encode_to_client(
                Event("sessionEvent", [{**payload, "seq": seq, "epoch": "e"}]), encoding)
        stored = cbor2.dumps(stored_payload(payload, seq, "e"))
        for encoding in (Encoding.CBOR, Encoding.BARE):
            assert event_frame_from_cbor("sessionEvent", stored, "e", encoding, seq) == encode_to_client(
                Event("sessionEvent", [stored_payload(payload, seq, "e")]), encoding)
    blob = cbor2.dumps({**payload, "epoch": "old", "seq": 1})
    assert event_frame_from_cbor("sessionEvent", blob, "e", Encoding.CBOR, 1) is None
