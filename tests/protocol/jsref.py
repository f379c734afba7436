"""The golden cases, and the bridge to the real npm client that produced their bytes.

`js/harness.ts` runs the unmodified `rivetkit@2.3.19` client code (its own TypeScript
sources, bundled by esbuild). Two kinds of case:

* INBOUND: a message as the npm client builds it (JS values, in the harness's tagged form)
  and the Python value we must decode it to. The client's bytes are frozen in
  `vectors.py`.
* OUTBOUND: a message we send. Our bytes are frozen in `vectors.py` together with what
  the npm client decoded them to (its view, tagged), checked by hand once and then by
  `test_golden.py` on every run where node and rivetkit are available.

Regenerate `vectors.py` after a deliberate format change with
`.venv/bin/python -m tests.protocol.jsref` (needs node, plus rivetkit and esbuild in
`$ACTORVISOR_RIVETKIT_NODE_MODULES`, `tests/node_modules` or `/tmp/rk/node_modules`).
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    encode_http_action_response,
    encode_http_error,
    encode_to_client,
)
from protocol.errors import ActorvisorError, ErrorCode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENCODINGS = (Encoding.JSON, Encoding.CBOR, Encoding.BARE)


# JS values in the harness's tagged form


def js_obj(**fields: Any) -> dict[str, Any]:
    return {"$obj": fields}


def js_bigint(value: int) -> dict[str, str]:
    return {"$bigint": str(value)}


def js_u8(value: bytes) -> dict[str, str]:
    return {"$u8": value.hex()}


JS_UNDEFINED = {"$undefined": 1}


def js_message(tag: str, **val: Any) -> dict[str, Any]:
    return js_obj(body=js_obj(tag=tag, val=js_obj(**val)))


# INBOUND: what the npm client sends


@dataclass(frozen=True)
class Inbound:
    name: str
    kind: str  # "to_server" | "http_action_request"
    js: Any  # the JS message (to_server) or args array (http_action_request)
    expected: Any  # the ToServer message or args list we decode it to, or one per encoding
    npm_bytes_match: tuple[Encoding, ...] = (Encoding.JSON,)
    """Where our encoder reproduces the npm bytes exactly. cbor-x writes every JS object
    as a map with a 2-byte length head (`b9 00 02`), where cbor2 writes `a2`."""

    def expected_for(self, encoding: Encoding) -> Any:
        return self.expected[encoding] if isinstance(self.expected, dict) else self.expected


CREATE_ARGS_JS = ["local", js_obj(cwd="/workspace", env=js_obj(A="1"))]
CREATE_ARGS = ["local", {"cwd": "/workspace", "env": {"A": "1"}}]

# Everything the compat rules touch that Python can express, in one args array.
TRICKY_ARGS_JS = [
    ["$x", 1],
    ["$$y", ["$z", 2]],
    ["$BigInt", "5"],
    js_bigint(12345678901234567890),
    js_bigint(-(2**70)),
    2**40,
    -(2**40),
    -1,
    1.5,
    None,
    "héllo ✓ \u2028",
    js_u8(b"\x00\x01\xfe\xff"),
    js_obj(nested=[[[]], js_obj()], flag=True),
]
TRICKY_ARGS = [
    ["$x", 1],
    ["$$y", ["$z", 2]],
    ["$BigInt", "5"],
    12345678901234567890,
    -(2**70),
    2**40,
    -(2**40),
    -1,
    1.5,
    None,
    "héllo ✓ \u2028",
    b"\x00\x01\xfe\xff",
    {"nested": [[[]], {}], "flag": True},
]

# JS values with no Python twin: they decode to the nearest value, so no encoder of ours
# can reproduce the npm bytes.
JS_ONLY_ARGS_JS = [{"$ab": "0a0b"}, JS_UNDEFINED, js_obj(a=JS_UNDEFINED, b=1)]
# undefined is null in json (and dropped as an object property), CBOR undefined in cbor,
# ["$Undefined", 0] in bare.
JS_ONLY_ARGS = {
    Encoding.JSON: [b"\x0a\x0b", None, {"b": 1}],
    Encoding.CBOR: [b"\x0a\x0b", None, {"a": None, "b": 1}],
    Encoding.BARE: [b"\x0a\x0b", None, {"a": None, "b": 1}],
}

# The bare frames of messages whose CBOR holds no JS object come out byte-identical.
NO_MAPS = (Encoding.JSON, Encoding.BARE)

INBOUND = [
    Inbound("create_session", "to_server",
            js_message("ActionRequest", id=js_bigint(0), name="createSession", args=CREATE_ARGS_JS),
            ActionRequest(0, "createSession", CREATE_ARGS)),
    Inbound("write_file_bytes", "to_server",
            js_message("ActionRequest", id=js_bigint(7), name="writeFile",
                       args=["/workspace/a.bin", js_u8(b"\x00\x01\x02\xff")]),
            ActionRequest(7, "writeFile", ["/workspace/a.bin", b"\x00\x01\x02\xff"]),
            NO_MAPS),
    Inbound("max_id_no_args", "to_server",
            js_message("ActionRequest", id=js_bigint(2**64 - 1), name="listSessions", args=[]),
            ActionRequest(2**64 - 1, "listSessions", []),
            NO_MAPS),
    Inbound("tricky_args", "to_server",
            js_message("ActionRequest", id=js_bigint(3), name="echo", args=TRICKY_ARGS_JS),
            ActionRequest(3, "echo", TRICKY_ARGS)),
    Inbound("subscribe", "to_server",
            js_message("SubscriptionRequest", eventName="sessionEvent", subscribe=True),
            SubscriptionRequest("sessionEvent", True),
            NO_MAPS),
    Inbound("unsubscribe", "to_server",
            js_message("SubscriptionRequest", eventName="vmShutdown", subscribe=False),
            SubscriptionRequest("vmShutdown", False),
            NO_MAPS),
    Inbound("http_create_session", "http_action_request", CREATE_ARGS_JS, CREATE_ARGS),
    Inbound("http_no_args", "http_action_request", [], [], NO_MAPS),
    Inbound("http_write_file_bytes", "http_action_request",
            ["/workspace/a.bin", js_u8(b"\xff\x00")], ["/workspace/a.bin", b"\xff\x00"],
            NO_MAPS),
    Inbound("http_tricky_args", "http_action_request", TRICKY_ARGS_JS, TRICKY_ARGS),
    Inbound("http_js_only_args", "http_action_request", JS_ONLY_ARGS_JS, JS_ONLY_ARGS, ()),
]


# OUTBOUND: what we send


@dataclass(frozen=True)
class Outbound:
    name: str
    kind: str  # "to_client" | "http_action_response" | "http_error"
    value: Any  # ToClient message, output value, or (ActorvisorError, ActorSpecifier | None)

    def encode(self, encoding: Encoding) -> bytes | str:
        if self.kind == "to_client":
            message: ToClient = self.value
            return encode_to_client(message, encoding)
        if self.kind == "http_action_response":
            return encode_http_action_response(self.value, encoding)
        error, actor = self.value
        return encode_http_error(error, encoding, actor)


TRICKY_OUTPUT = {
    "pair": ["$x", 1],
    "escaped": ["$$y", 2],
    "looks_compat": ["$BigInt", "5"],
    "bytes": b"\x00\x01\xff",
    "mid": 2**40,
    "neg_mid": -(2**40),
    "big": 2**64 + 1,
    "neg_big": -(2**63) - 5,
    "max_safe": 2**53 - 1,
    "float": 1.5,
    "text": "héllo ✓",
    "none": None,
    "list": [True, False, [], {}],
}

SESSION_EVENT = {
    "sessionId": "s1",
    "seq": 12,
    "event": {"jsonrpc": "2.0", "method": "session/update",
              "params": {"sessionId": "s1",
                         "update": {"sessionUpdate": "agent_message_chunk",
                                    "content": {"type": "text", "text": "hi"}}}},
}

OUTBOUND = [
    Outbound("init", "to_client", Init("actor-1", "conn-1")),
    Outbound("action_response", "to_client", ActionResponse(0, {"sessionId": "s1"})),
    Outbound("action_response_null", "to_client", ActionResponse(1, None)),
    Outbound("action_response_bytes", "to_client", ActionResponse(2, b"\x00\x01\xff")),
    Outbound("action_response_tricky", "to_client", ActionResponse(3, TRICKY_OUTPUT)),
    Outbound("action_response_max_id", "to_client", ActionResponse(2**64 - 1, 0)),
    Outbound("event_session", "to_client", Event("sessionEvent", [SESSION_EVENT])),
    Outbound("event_dollar_args", "to_client", Event("x", ["$x", 1])),
    Outbound("error_action", "to_client",
             ErrorMsg("actor", "unknown_action", "no action 'nope'", {"action": "nope"}, 4,
                      ActorSpecifier("actor-1", 2, "my-agent"))),
    Outbound("error_connection", "to_client",
             ErrorMsg("actor", "stopped", "actor stopped")),
    Outbound("http_output", "http_action_response", {"sessionId": "s1"}),
    Outbound("http_output_tricky", "http_action_response", TRICKY_OUTPUT),
    Outbound("http_output_null", "http_action_response", None),
    Outbound("http_error", "http_error",
             (ActorvisorError(ErrorCode.ACTOR_NOT_FOUND, "no actor 'x'"), None)),
    Outbound("http_error_full", "http_error",
             (ActorvisorError(ErrorCode.INVALID_ARGS, "bad path", {"path": ["$x", b"\x01"]}),
              ActorSpecifier("actor-1", 3))),
]


# Running the harness


def node_modules() -> Path | None:
    """A node_modules holding rivetkit's sources and esbuild, or None."""
    candidates = [os.environ.get("ACTORVISOR_RIVETKIT_NODE_MODULES"),
                  str(ROOT / "tests" / "node_modules"), "/tmp/rk/node_modules"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "rivetkit" / "src" / "serde.ts").is_file() and (
                Path(candidate) / ".bin" / "esbuild").exists():
            return Path(candidate)
    return None


def available() -> bool:
    return shutil.which("node") is not None and node_modules() is not None


class Harness:
    """The bundled harness; `run` sends jobs to one node process."""

    def __init__(self, workdir: Path) -> None:
        modules = node_modules()
        assert modules is not None
        self.bundle = workdir / "harness.cjs"
        subprocess.run(
            [str(modules / ".bin" / "esbuild"), str(HERE / "js" / "harness.ts"), "--bundle",
             "--platform=node", "--format=cjs", f"--alias:@={modules / 'rivetkit' / 'src'}",
             f"--outfile={self.bundle}", "--log-level=error"],
            check=True, cwd=modules.parent, timeout=60)

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        done = subprocess.run(["node", str(self.bundle)], input=json.dumps(jobs),
                              capture_output=True, text=True, check=True, timeout=60)
        results: list[dict[str, Any]] = json.loads(done.stdout)
        return results


def frame_json(frame: bytes | str) -> dict[str, str]:
    return {"text": frame} if isinstance(frame, str) else {"hex": frame.hex()}


def inbound_jobs() -> list[dict[str, Any]]:
    jobs = []
    for case in INBOUND:
        for encoding in ENCODINGS:
            if case.kind == "to_server":
                jobs.append({"op": "to_server", "encoding": encoding.value, "message": case.js})
            else:
                jobs.append({"op": "http_action_request", "encoding": encoding.value,
                             "args": case.js})
    return jobs


def outbound_jobs() -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for case in OUTBOUND:
        for encoding in ENCODINGS:
            frame = case.encode(encoding)
            if case.kind == "to_client":
                jobs.append({"op": "parse_to_client", "encoding": encoding.value,
                             **frame_json(frame)})
            elif case.kind == "http_action_response":
                assert isinstance(frame, bytes)
                jobs.append({"op": "parse_http_action_response", "encoding": encoding.value,
                             "hex": frame.hex()})
            else:
                assert isinstance(frame, bytes)
                jobs.append({"op": "parse_http_error", "encoding": encoding.value,
                             "hex": frame.hex(), "contentType": None})
    return jobs


def generate(harness: Harness) -> str:
    inbound = harness.run(inbound_jobs())
    outbound = harness.run(outbound_jobs())
    npm: dict[str, dict[str, Any]] = {}
    index = 0
    for case in INBOUND:
        npm[case.name] = {}
        for encoding in ENCODINGS:
            result = inbound[index]
            index += 1
            if "error" in result:
                raise RuntimeError(f"{case.name}/{encoding}: {result['error']}")
            npm[case.name][encoding.value] = result
    ours: dict[str, dict[str, Any]] = {}
    index = 0
    for out_case in OUTBOUND:
        ours[out_case.name] = {}
        for encoding in ENCODINGS:
            result = outbound[index]
            index += 1
            if "error" in result:
                raise RuntimeError(f"{out_case.name}/{encoding}: npm client failed: {result['error']}")
            ours[out_case.name][encoding.value] = {**frame_json(out_case.encode(encoding)),
                                               "js": result["value"]}
    return (
        '"""Golden vectors, generated by `python -m tests.protocol.jsref` from the real npm\n'
        'client (rivetkit@2.3.19, see js/harness.ts). Do not edit by hand.\n\n'
        "NPM_FRAMES: what the npm client sends for each INBOUND case, per encoding.\n"
        "OUR_FRAMES: what we send for each OUTBOUND case, and what the npm client decoded\n"
        'it to (`js`, in the harness\'s tagged form).\n"""\n\n'
        "from typing import Any\n\n"
        f"NPM_FRAMES: dict[str, dict[str, Any]] = {pprint.pformat(npm, width=96)}\n\n"
        f"OUR_FRAMES: dict[str, dict[str, Any]] = {pprint.pformat(ours, width=96)}\n"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        (HERE / "vectors.py").write_text(generate(Harness(Path(tmp))))
