"""A session's turn reaches subscribers complete, in order, identical to the log."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol.aio import Client, Connection
from protocol.client import Encoding
from tests.support import SupervisorProc

PROMPT = "hello there\nthink: planning\nwrite /workspace/a.txt: alpha\nrun: cat /workspace/a.txt"


async def collect_log(conn_or_client: Connection | None, session_id: str, *, via_http: tuple[Client,
                      str] | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        if via_http:
            client, key = via_http
            page = await client.action("vm", key, "getSessionEvents", session_id, {"after": after})
        else:
            assert conn_or_client is not None
            page = await conn_or_client.call("getSessionEvents", session_id, {"after": after})
        if not page:
            return events
        events.extend(page)
        after = page[-1]["seq"]


async def test_subscribe_then_act_on_one_connection(supervisor: SupervisorProc) -> None:
    for encoding in (Encoding.JSON, Encoding.CBOR, Encoding.BARE):
        async with Client(supervisor.url, encoding) as client:
            conn = await client.connect("vm", f"same-conn-{encoding.value}", reconnect=False)
            received: list[dict[str, Any]] = []
            conn.on("sessionEvent", received.append)
            session = await conn.call("createSession", "local", {})
            sid = session["sessionId"]
            result = await conn.call("sendPrompt", sid, PROMPT)
            assert result["stopReason"] == "end_turn"
            logged = await collect_log(conn, sid)
            # Replies never overtake the events their action produced.
            assert [e["seq"] for e in received] == [e["seq"] for e in logged]
            assert [e["event"] for e in received] == [e["event"] for e in logged]
            seqs = [e["seq"] for e in received]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            kinds = [e["event"]["params"]["update"]["sessionUpdate"] for e in received]
            assert kinds[0] == "user_message_chunk"
            assert kinds.count("agent_message_chunk") >= 2
            assert "agent_thought_chunk" in kinds and "tool_call" in kinds and "tool_call_update" in kinds
            for e in received:
                assert e["event"]["jsonrpc"] == "2.0"
                assert e["event"]["method"] == "session/update"
                assert e["event"]["params"]["sessionId"] == sid
            content = await conn.call("readFile", "/workspace/a.txt")
            assert content == b"alpha"
            await conn.close()


async def test_http_actions_with_websocket_subscription(supervisor: SupervisorProc) -> None:
    async with Client(supervisor.url, Encoding.JSON) as client:
        conn = await client.connect("vm", "http-actions", reconnect=False)
        received: list[dict[str, Any]] = []
        conn.on("sessionEvent", received.append)
        # Make sure the subscription is registered before acting over HTTP: an action on
        # the same connection is handled after it, strictly in order.
        await conn.call("listSessions")
        session = await client.action("vm", "http-actions", "createSession", "local", {})
        sid = session["sessionId"]
        result = await client.action("vm", "http-actions", "sendPrompt", sid, PROMPT)
        assert result["stopReason"] == "end_turn"
        logged = await collect_log(None, sid, via_http=(client, "http-actions"))
        # HTTP replies and WS events travel separately: wait for the stream to catch up.
        for _ in range(200):
            if len(received) >= len(logged):
                break
            await asyncio.sleep(0.01)
        assert [e["seq"] for e in received] == [e["seq"] for e in logged]
        assert [e["event"] for e in received] == [e["event"] for e in logged]
        await conn.close()


async def test_paced_chunks_carry_their_emission_time(supervisor: SupervisorProc) -> None:
    async with Client(supervisor.url) as client:
        sid = (await client.action("vm", "paced", "createSession", "local", {}))["sessionId"]
        result = await client.action("vm", "paced", "sendPrompt", sid, "chunks: 5 at 100/s")
        lines = result["text"].splitlines()
        assert [line.split(" at ")[0] for line in lines] == [f"chunk {i} of 5" for i in range(1, 6)]
        stamps = [float(line.split(" at ")[1]) for line in lines]
        assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
        bad = await client.action("vm", "paced", "sendPrompt", sid, "chunks: 5 at fast")
        assert bad["text"].startswith("chunks: expected")
