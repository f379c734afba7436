"""Bad input gets the precise error of PROTOCOL.md §5; nothing else is harmed."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.aio import Client
from protocol.client import (
    ActionRequest,
    ActionResponse,
    Encoding,
    ErrorMsg,
    Init,
    ToClient,
    decode_to_client,
    encode_to_server,
)
from protocol.errors import ActorvisorError, ErrorCode
from tests.support import SupervisorProc, free_port


def connect_url(base: str, key: str, name: str = "vm") -> str:
    return f"{base}/gateway/{name}/connect?rvt-namespace=default&rvt-method=getOrCreate&rvt-key={key}"


class RawConn:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, encoding: Encoding) -> None:
        self.ws, self.encoding, self.next_id = ws, encoding, 100

    async def send_raw(self, data: bytes | str) -> None:
        await (self.ws.send_str(data) if isinstance(data, str) else self.ws.send_bytes(data))

    async def recv(self) -> ToClient:
        msg = await self.ws.receive(timeout=15)
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
        return decode_to_client(msg.data, self.encoding)

    async def call(self, name: str, *args: Any) -> ToClient:
        self.next_id += 1
        await self.send_raw(encode_to_server(ActionRequest(self.next_id, name, list(args)), self.encoding))
        return await self.recv()


async def open_raw(session: aiohttp.ClientSession, base: str, key: str, encoding: Encoding) -> RawConn:
    ws = await session.ws_connect(connect_url(base, key),
                                  protocols=("rivet", f"rivet_encoding.{encoding.value}"))
    conn = RawConn(ws, encoding)
    assert isinstance(await conn.recv(), Init)
    return conn


MALFORMED: dict[Encoding, list[bytes | str]] = {
    Encoding.JSON: ["{", "[]", '{"body":{"tag":"Nope","val":{}}}', '{"body":{"tag":"ActionRequest","val":{"id":"x","name":1,"args":[]}}}', b"\xff\xfe"],
    Encoding.CBOR: [b"\xff", b"\xa1\x64body\xa2\x63tag\x64Nope\x63val\xa0", b"\x80", b""],
    Encoding.BARE: [b"", b"\x04\x00", b"\x04\x00\x07", b"\x04\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x09\x00\x00\x01\x01a\x00", "text frame"],
}


@pytest.mark.parametrize("encoding", list(Encoding))
async def test_malformed_frames_get_an_error_and_the_connection_lives(supervisor: SupervisorProc,
                                                                      encoding: Encoding) -> None:
    async with aiohttp.ClientSession() as session:
        conn = await open_raw(session, supervisor.url, f"bad-{encoding.value}", encoding)
        for frame in MALFORMED[encoding]:
            await conn.send_raw(frame)
            reply = await conn.recv()
            assert isinstance(reply, ErrorMsg), frame
            assert (reply.group, reply.code) == ("protocol", "invalid_message"), (frame, reply)
            assert reply.message
        # Oversized: over the 1 MiB bound, under the transport's hard cap.
        big = encode_to_server(ActionRequest(1, "writeFile", ["/workspace/big", "x" * (2 << 20)]), encoding)
        await conn.send_raw(big)
        reply = await conn.recv()
        assert isinstance(reply, ErrorMsg) and (reply.group, reply.code) == ("protocol", "message_too_large")
        # Unknown action, wrong argument types: precise errors carrying the action id.
        reply = await conn.call("launchMissiles")
        assert isinstance(reply, ErrorMsg) and reply.code == "unknown_action" and reply.action_id == conn.next_id
        reply = await conn.call("sendPrompt", 42, ["not", "text"])
        assert isinstance(reply, ErrorMsg) and reply.code == "invalid_args" and reply.action_id == conn.next_id
        reply = await conn.call("createSession", "no-such-agent")
        assert isinstance(reply, ErrorMsg) and reply.code == "invalid_args"
        # And the same connection still works.
        reply = await conn.call("exists", "/workspace")
        assert isinstance(reply, ActionResponse) and reply.output is True
        await conn.ws.close()


async def test_bad_upgrades_and_http_requests(supervisor: SupervisorProc) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.get(connect_url(supervisor.url, "k"),
                                 headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                          "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                          "Sec-WebSocket-Protocol": "rivet, rivet_encoding.xml"})
        assert resp.status == 400
        body = await resp.json()
        assert (body["group"], body["code"]) == ("protocol", "unsupported_encoding")

        # Errors after the encoding is agreed close the upgraded socket with `group.code`,
        # the form a RivetKit client turns into an ActorError.
        for url, reason in [(connect_url(supervisor.url, "k", name="chatRoom"), "actor.unknown_kind"),
                            (f"{supervisor.url}/gateway/0123456789abcdef01234567/connect", "actor.not_found"),
                            (connect_url(supervisor.url, "bad\x01key"), "actor.invalid_key")]:
            ws = await session.ws_connect(url, protocols=("rivet",))
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.extra == reason, (url, msg)
            await ws.close()
        resp = await session.post(f"{supervisor.url}/gateway/chatRoom/action/exec?rvt-method=getOrCreate&rvt-key=h",
                                  data=json.dumps({"args": ["true"]}), headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        assert resp.status == 404 and (await resp.json())["code"] == "unknown_kind"

        resp = await session.post(f"{supervisor.url}/gateway/vm/action/exec?rvt-method=getOrCreate&rvt-key=h",
                                  data=b"{not json", headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        assert resp.status == 400
        assert (await resp.json())["code"] == "invalid_message"
        resp = await session.post(f"{supervisor.url}/gateway/vm/action/exec?rvt-method=getOrCreate&rvt-key=h",
                                  data=json.dumps({"args": ["x" * 10]}), headers={"x-rivet-encoding": "yaml", "Content-Type": "application/json"})
        assert resp.status == 400 and (await resp.json())["code"] == "unsupported_encoding"
        resp = await session.post(f"{supervisor.url}/gateway/vm/action/exec?rvt-method=getOrCreate&rvt-key=h",
                                  data=b"x" * (3 << 20), headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        assert resp.status == 413 and (await resp.json())["code"] == "message_too_large"
        resp = await session.post(f"{supervisor.url}/gateway/vm/action/exec?rvt-method=get&rvt-key=never-made",
                                  data=json.dumps({"args": ["true"]}), headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        assert resp.status == 404 and (await resp.json())["code"] == "not_found"
        resp = await session.post(f"{supervisor.url}/gateway/0123456789abcdef01234567/action/exec",
                                  data=json.dumps({"args": ["true"]}), headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        assert resp.status == 404 and (await resp.json())["code"] == "not_found"
        resp = await session.post(f"{supervisor.url}/gateway/..%2F..%2Fetc/action/exec",
                                  data=json.dumps({"args": ["true"]}), headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        assert resp.status == 404


async def test_keys_and_paths_that_try_to_escape(supervisor: SupervisorProc) -> None:
    async with Client(supervisor.url) as client:
        for key in ["a\x00b", "line\nbreak", "k" * 600]:
            with pytest.raises(ActorvisorError) as info:
                await client.action("vm", key, "exists", "/workspace")
            assert info.value.code is ErrorCode.INVALID_KEY
        # Keys that look like paths are just names: they never reach the file system.
        for key in ["../../etc", "/etc/passwd", "..", "a/../../b"]:
            assert await client.action("vm", key, "exists", "/workspace") is True
        assert all(len(p.name) == 24 for p in (supervisor.state_dir / "actors").iterdir())

        key = "paths"
        await client.action("vm", key, "exec", "ln -s /etc /workspace/etc-link && ln -s ../.. /workspace/up", {})
        for path, code in [
            ("/workspace/../../../etc/passwd", {ErrorCode.INVALID_PATH, ErrorCode.FILE_NOT_FOUND}),
            ("/etc/shadow", {ErrorCode.INVALID_PATH}),
            ("/workspace/etc-link/passwd", {ErrorCode.INVALID_PATH}),
            ("/workspace/up/up/etc/passwd", {ErrorCode.INVALID_PATH}),
            (str(supervisor.state_dir / "actors"), {ErrorCode.INVALID_PATH, ErrorCode.FILE_NOT_FOUND}),
            ("/workspace/\x00x", {ErrorCode.INVALID_PATH}),
        ]:
            with pytest.raises(ActorvisorError) as info:
                await client.action("vm", key, "readFile", path)
            assert info.value.code in code, (path, info.value)
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", key, "writeFile", "/workspace/etc-link/evil", "x")
        assert info.value.code is ErrorCode.INVALID_PATH
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", key, "readFile", 7)
        assert info.value.code is ErrorCode.INVALID_ARGS


@pytest.fixture(scope="module")
def shared_supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProc]:
    sup = SupervisorProc(tmp_path_factory.mktemp("fuzz") / "state", free_port(), [], dict(os.environ))
    sup.start()
    try:
        yield sup
    finally:
        sup.close()


async def _random_frames_then_action(url: str, frames: list[bytes | str]) -> None:
    async with aiohttp.ClientSession() as session:
        for encoding in Encoding:
            conn = await open_raw(session, url, "fuzz", encoding)
            for frame in frames:
                await conn.send_raw(frame)
            reply = await conn.call("exists", "/workspace")
            # A random frame may decode as a real request; every reply is a protocol message.
            while not (isinstance(reply, ActionResponse) and reply.id == conn.next_id):
                assert isinstance(reply, (ErrorMsg, ActionResponse)), reply
                reply = await conn.recv()
            await conn.ws.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=200) | st.text(max_size=200), min_size=1, max_size=5))
def test_random_frames_never_harm_a_live_connection(shared_supervisor: SupervisorProc,
                                                    frames: list[bytes | str]) -> None:
    asyncio.run(_random_frames_then_action(shared_supervisor.url, frames))
