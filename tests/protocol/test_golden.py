"""Byte-for-byte agreement with the npm client (rivetkit@2.3.19).

The frozen half always runs: it checks our codecs against `vectors.py`, which was made
by the real client (see `jsref.py` for how). The live half runs the client again
through node when it is installed, so a change to our encoders is checked against what
the npm client actually decodes, not only against frozen bytes.
"""

from __future__ import annotations

import json
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from protocol.client import (
    ActionRequest,
    Encoding,
    SubscriptionRequest,
    decode_http_action_request,
    decode_http_action_response,
    decode_http_error,
    decode_to_client,
    decode_to_server,
    encode_http_action_request,
    encode_to_server,
    parse_ws_subprotocols,
)

from . import jsref
from .jsref import ENCODINGS, INBOUND, OUTBOUND, Inbound, Outbound
from .vectors import NPM_FRAMES, OUR_FRAMES


def frame_of(stored: dict[str, str]) -> bytes | str:
    return stored["text"] if "text" in stored else bytes.fromhex(stored["hex"])


def as_body(frame: bytes | str) -> bytes:
    return frame.encode("utf-8") if isinstance(frame, str) else frame


def cases(kind: type) -> list[Any]:
    source = INBOUND if kind is Inbound else OUTBOUND
    return [pytest.param(case, encoding, id=f"{case.name}-{encoding}")
            for case in source for encoding in ENCODINGS]


def encode_inbound(case: Inbound, encoding: Encoding) -> bytes | str:
    expected = case.expected_for(encoding)
    if case.kind == "to_server":
        return encode_to_server(expected, encoding)
    return encode_http_action_request(expected, encoding)


def decode_inbound(case: Inbound, frame: bytes | str, encoding: Encoding) -> Any:
    if case.kind == "to_server":
        return decode_to_server(frame, encoding)
    return decode_http_action_request(as_body(frame), encoding)


def cbor_model(data: bytes) -> Any:
    """A CBOR item with head widths forgotten but types and tags kept."""
    def walk(item: Any) -> Any:
        if isinstance(item, cbor2.CBORTag):
            return ("tag", item.tag, walk(item.value))
        if isinstance(item, list):
            return [walk(x) for x in item]
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        return (type(item).__name__, item)
    return walk(cbor2.loads(data))


# Frozen: the npm client's frames


@pytest.mark.parametrize(("case", "encoding"), cases(Inbound))
def test_decodes_what_the_npm_client_sends(case: Inbound, encoding: Encoding) -> None:
    frame = frame_of(NPM_FRAMES[case.name][encoding.value])
    assert decode_inbound(case, frame, encoding) == case.expected_for(encoding)


@pytest.mark.parametrize(("case", "encoding"), cases(Inbound))
def test_encodes_as_the_npm_client_does(case: Inbound, encoding: Encoding) -> None:
    npm = frame_of(NPM_FRAMES[case.name][encoding.value])
    ours = encode_inbound(case, encoding)
    if encoding in case.npm_bytes_match:
        assert as_body(ours) == as_body(npm)
    elif encoding is Encoding.CBOR and case.npm_bytes_match:
        # Same items, tags and number types; only cbor-x's 2-byte map heads differ. (A
        # case matching nowhere holds JS-only values, so its items differ too.)
        assert isinstance(ours, bytes) and isinstance(npm, bytes)
        assert cbor_model(ours) == cbor_model(npm)
    assert decode_inbound(case, ours, encoding) == case.expected_for(encoding)


def test_json_frames_are_text_and_binary_frames_are_bytes() -> None:
    # The npm client sends json as a text frame (a JS string) and cbor/bare as binary.
    for case in INBOUND:
        assert "text" in NPM_FRAMES[case.name]["json"]
        assert "hex" in NPM_FRAMES[case.name]["cbor"]
        assert "hex" in NPM_FRAMES[case.name]["bare"]
    message = ActionRequest(1, "x", [])
    assert isinstance(encode_to_server(message, Encoding.JSON), str)
    assert isinstance(encode_to_server(message, Encoding.CBOR), bytes)


def test_npm_ids_are_u64_heads_in_cbor_and_bigint_pairs_in_json() -> None:
    frames = NPM_FRAMES["create_session"]
    assert '"id":["$BigInt","0"]' in frames["json"]["text"]
    assert "6269641b0000000000000000" in frames["cbor"]["hex"]  # "id": 0x1b + u64
    assert frames["bare"]["hex"].startswith("0400" "00" "00")  # version 4, tag 0, uint 0


# Frozen: our frames, as the npm client decoded them


@pytest.mark.parametrize(("case", "encoding"), cases(Outbound))
def test_our_frames_are_pinned(case: Outbound, encoding: Encoding) -> None:
    stored = OUR_FRAMES[case.name][encoding.value]
    assert case.encode(encoding) == frame_of(stored)


@pytest.mark.parametrize(("case", "encoding"), cases(Outbound))
def test_our_frames_decode_back(case: Outbound, encoding: Encoding) -> None:
    frame = frame_of(OUR_FRAMES[case.name][encoding.value])
    if case.kind == "to_client":
        assert decode_to_client(frame, encoding) == case.value
    elif case.kind == "http_action_response":
        assert decode_http_action_response(as_body(frame), encoding) == case.value
    else:
        error, _actor = case.value
        decoded = decode_http_error(as_body(frame), encoding)
        assert (decoded.code, decoded.message, decoded.metadata) == (
            error.code, error.message, error.metadata)


def test_npm_client_sees_ids_as_bigint_and_bytes_as_uint8array() -> None:
    for encoding in ENCODINGS:
        body = OUR_FRAMES["action_response_bytes"][encoding.value]["js"]["$obj"]["body"]
        val = body["$obj"]["val"]["$obj"]
        assert val == {"id": {"$bigint": "2"}, "output": {"$u8": "0001ff"}}
        tricky = OUR_FRAMES["http_output_tricky"][encoding.value]["js"]["$obj"]
        assert tricky["pair"] == ["$x", 1] and tricky["escaped"] == ["$$y", 2]
        assert tricky["mid"] == 2**40  # a JS number, not a BigInt
        assert tricky["big"] == {"$bigint": str(2**64 + 1)}
        event = OUR_FRAMES["event_dollar_args"][encoding.value]["js"]["$obj"]["body"]
        assert event["$obj"]["val"]["$obj"]["args"] == ["$x", 1]


# Live: the npm client, run now

live = pytest.mark.skipif(not jsref.available(),
                          reason="node with rivetkit and esbuild is not installed")


@pytest.fixture(scope="module")
def harness() -> Iterator[jsref.Harness]:
    with tempfile.TemporaryDirectory() as tmp:
        yield jsref.Harness(Path(tmp))


@live
def test_npm_client_still_sends_the_frozen_frames(harness: jsref.Harness) -> None:
    results = harness.run(jsref.inbound_jobs())
    jobs = [(case.name, encoding.value) for case in INBOUND for encoding in ENCODINGS]
    for (name, encoding), result in zip(jobs, results, strict=True):
        assert result == NPM_FRAMES[name][encoding], (name, encoding)


@live
def test_npm_client_decodes_our_frames_as_frozen(harness: jsref.Harness) -> None:
    results = harness.run(jsref.outbound_jobs())
    jobs = [(case.name, encoding.value) for case in OUTBOUND for encoding in ENCODINGS]
    for (name, encoding), result in zip(jobs, results, strict=True):
        assert result == {"value": OUR_FRAMES[name][encoding]["js"]}, (name, encoding)


# RivetKit's own actor side runs decodeCborCompat on cbor frames too, so a literal
# `["$x", 1]` that the npm client sends unescaped in cbor fails there. actorvisor reads
# cbor args literally (PROTOCOL.md §2), which is what the sender meant.
REVIVED_BY_RIVETKIT = {("tricky_args", "cbor"), ("http_tricky_args", "cbor")}


@live
def test_rivetkit_reads_our_client_frames_as_it_reads_npm_frames(
        harness: jsref.Harness) -> None:
    jobs, names = [], []
    for case in INBOUND:
        for encoding in ENCODINGS:
            op = "parse_to_server" if case.kind == "to_server" else "parse_http_action_request"
            for frame in (encode_inbound(case, encoding),
                          frame_of(NPM_FRAMES[case.name][encoding.value])):
                jobs.append({"op": op, "encoding": encoding.value, **jsref.frame_json(frame)})
            names.append((case.name, encoding.value))
    results = harness.run(jobs)
    for index, name in enumerate(names):
        ours, npm = results[2 * index], results[2 * index + 1]
        if name in REVIVED_BY_RIVETKIT:
            assert "Unknown JSON encoding type: $x" in npm["error"]
        if name[0] != "http_js_only_args":
            assert ours == npm, name


@live
def test_rivetkit_ignores_our_cursor_in_json_and_cbor(harness: jsref.Harness) -> None:
    message = SubscriptionRequest("sessionEvent", True, after=41, epoch="e1")
    jobs = [{"op": "parse_to_server", "encoding": encoding.value,
             **jsref.frame_json(encode_to_server(message, encoding))}
            for encoding in (Encoding.JSON, Encoding.CBOR)]
    for result in harness.run(jobs):
        assert result == {"value": jsref.js_message("SubscriptionRequest",
                                                    eventName="sessionEvent", subscribe=True)}


@live
def test_subprotocols_parse_as_rivetkit_parses_them(harness: jsref.Harness) -> None:
    params = {"token": "a b/ü", "n": [1, True, None]}
    # What client/.../actor-websocket-client.ts buildWebSocketProtocols offers.
    quoted = urllib.parse.quote(json.dumps(params, separators=(",", ":"), ensure_ascii=False),
                                safe="-_.!~*'()")
    offered = ["rivet", "rivet_encoding.cbor", "rivet_target.actor", "rivet_actor.a1",
               f"rivet_conn_params.{quoted}"]
    [result] = harness.run([{"op": "ws_protocols", "header": ", ".join(offered)}])
    assert result == {"value": jsref.js_obj(encoding="cbor", connParams=jsref.js_obj(
        token="a b/ü", n=[1, True, None]), ackHookToken=jsref.JS_UNDEFINED)}
    assert parse_ws_subprotocols(offered) == (Encoding.CBOR, params)


@live
def test_npm_client_rejects_the_shapes_our_encoder_avoids(harness: jsref.Harness) -> None:
    init = '{"body":{"tag":"Init","val":{"actorId":"a","connectionId":"c"}}}'
    jobs = [
        # json may arrive as a binary frame; cbor may not arrive as text.
        {"op": "parse_to_client", "encoding": "json", "hex": init.encode().hex()},
        {"op": "parse_to_client", "encoding": "cbor", "text": init},
        # actionId must be present; null is how "no action" is said.
        {"op": "parse_to_client", "encoding": "json",
         "text": '{"body":{"tag":"Error","val":{"group":"g","code":"c","message":"m"}}}'},
        # an actor may be absent but not null.
        {"op": "parse_to_client", "encoding": "json",
         "text": '{"body":{"tag":"Error","val":{"group":"g","code":"c","message":"m",'
                 '"actionId":null,"actor":null}}}'},
        # ids must decode to BigInt: a plain number fails in json, a short CBOR head in cbor.
        {"op": "parse_to_client", "encoding": "json",
         "text": '{"body":{"tag":"ActionResponse","val":{"id":1,"output":1}}}'},
        {"op": "parse_to_client", "encoding": "cbor",
         "hex": cbor2.dumps({"body": {"tag": "ActionResponse",
                                      "val": {"id": 1, "output": 1}}}).hex()},
    ]
    accepted, *rejected = harness.run(jobs)
    assert "value" in accepted
    assert "buffer cannot be string" in rejected[0]["error"]
    for result, path in zip(rejected[1:], ["actionId", "actor", "id", "id"], strict=True):
        assert f'"{path}"' in result["error"], result
