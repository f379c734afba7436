"""Sessions and the local agent, in process: real log, real outbox, real VM; no socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from protocol.errors import ActorvisorError, ErrorCode
from protocol.worker import Reply, WorkerEvent
from vmworker.agents.base import Agent, StopReason, ToolKind, Turn, tool_call
from vmworker.agents.local import word_groups

from .conftest import InProcessActor
from .harness import payload


def updates(actor: InProcessActor, session_id: str) -> list[dict[str, Any]]:
    return [payload(m)["event"]["params"]["update"] for m in actor.sent
            if isinstance(m, WorkerEvent) and m.name == "sessionEvent"
            and payload(m)["sessionId"] == session_id]


async def new_session(actor: InProcessActor, **options: Any) -> str:
    result = await actor.call("createSession", "local", options or None)
    assert isinstance(result, dict)
    return str(result["sessionId"])


async def settle(actor: InProcessActor) -> None:
    await asyncio.wait_for(actor.outbox.flush(), 10)


def test_word_groups_rejoin_exactly() -> None:
    for text in ["", "a", "  lead and trail  ", "one two three four\nfive\n", "x\t\ty"]:
        assert "".join(word_groups(text)) == text
    assert word_groups("a b c d e") == ["a b c ", "d e"]


def ours(result: object) -> dict[str, Any]:
    """A sendPrompt result without agentOS's `response` (checked in its own test)."""
    assert isinstance(result, dict)
    return {k: v for k, v in result.items() if k != "response"}


async def test_local_agent_update_sequence(actor: InProcessActor) -> None:
    sid = await new_session(actor)
    prompt = "think: look first\nrun: echo hi\nwrite notes/n.txt: some text\nhello world"
    result = await actor.call("sendPrompt", sid, prompt)
    await settle(actor)
    assert isinstance(result, dict)
    # agentOS's `response`: the ACP session/prompt JSON-RPC response.
    assert result.pop("response")["result"] == {"stopReason": "end_turn"}
    assert result == {
        "text": "Ran `echo hi`: exit code 0.\nWrote 9 bytes to notes/n.txt.\nYou said: hello world\n",
        "stopReason": "end_turn",
    }
    seen = updates(actor, sid)
    kinds = [u["sessionUpdate"] for u in seen]
    assert seen[0] == {"sessionUpdate": "user_message_chunk",
                       "content": {"type": "text", "text": prompt}}
    assert kinds == [
        "user_message_chunk",
        "agent_thought_chunk",
        "tool_call", "tool_call_update", "tool_call_update",
        "agent_message_chunk", "agent_message_chunk",  # Ran `echo hi`: exit code 0.
        "tool_call", "tool_call_update", "tool_call_update",
        "agent_message_chunk", "agent_message_chunk",  # Wrote 9 bytes to notes/n.txt.
        "agent_message_chunk", "agent_message_chunk",  # You said: hello world
    ]
    run_call, run_progress, run_done = seen[2:5]
    assert run_call["status"] == "pending" and run_call["kind"] == "execute"
    assert run_call["rawInput"] == {"command": "echo hi"}
    assert run_progress == {"sessionUpdate": "tool_call_update",
                            "toolCallId": run_call["toolCallId"], "status": "in_progress"}
    assert run_done["status"] == "completed"
    assert run_done["rawOutput"] == {"exitCode": 0, "stdout": "hi\n", "stderr": ""}
    assert run_done["content"] == [{"type": "content", "content": {"type": "text", "text": "hi\n"}}]
    assert seen[7]["kind"] == "edit" and seen[7]["rawInput"]["path"] == "notes/n.txt"
    assert seen[9]["status"] == "completed"
    message = "".join(u["content"]["text"] for u in seen if u["sessionUpdate"] == "agent_message_chunk")
    assert message == result["text"]
    assert (actor.vm.root / "workspace/notes/n.txt").read_text() == "some text"


async def test_failed_command_is_a_failed_tool_call_not_an_error(actor: InProcessActor) -> None:
    sid = await new_session(actor)
    result = await actor.call("sendPrompt", sid, "run: exit 3")
    await settle(actor)
    assert ours(result) == {"text": "Ran `exit 3`: exit code 3.\n", "stopReason": "end_turn"}
    assert updates(actor, sid)[3]["status"] == "failed"


async def test_events_are_sent_in_seq_order_before_the_reply(actor: InProcessActor) -> None:
    sid = await new_session(actor)
    reply_task = asyncio.create_task(actor.call("sendPrompt", sid, "chunks: 300"))
    result = await reply_task
    actor.outbox.send(Reply(99, True, result))
    await settle(actor)
    seqs = [m.seq for m in actor.sent if isinstance(m, WorkerEvent)]
    assert seqs == sorted(seqs) == list(range(seqs[0], seqs[0] + len(seqs)))
    assert isinstance(actor.sent[-1], Reply)
    assert result["text"] == "".join(f"chunk {i} of 300\n" for i in range(1, 301))


async def test_one_turn_per_session_and_cancel(actor: InProcessActor) -> None:
    sid = await new_session(actor)
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "hello\nsleep: 30\nnever said"))
    await asyncio.sleep(0.2)
    with pytest.raises(ActorvisorError) as info:
        await actor.call("sendPrompt", sid, "again")
    assert info.value.code is ErrorCode.SESSION_BUSY
    assert await actor.call("listSessions") == [
        {"sessionId": sid, "agentType": "local", "createdAt": actor.sessions.get(sid).created_at,
         "status": "running"}]
    assert await actor.call("cancelPrompt", sid) == {"cancelled": True}
    assert ours(await asyncio.wait_for(turn, 5)) == {"text": "You said: hello\n", "stopReason": "cancelled"}
    assert await actor.call("cancelPrompt", sid) == {"cancelled": False}
    assert (await actor.call("sendPrompt", sid, "after"))["stopReason"] == "end_turn"


async def test_close_session(actor: InProcessActor) -> None:
    sid = await new_session(actor)
    assert await actor.call("closeSession", sid) is None
    for call in (("sendPrompt", sid, "x"), ("closeSession", sid), ("cancelPrompt", sid)):
        with pytest.raises(ActorvisorError) as info:
            await actor.call(*call)
        assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    assert (await actor.call("listSessions"))[0]["status"] == "closed"
    # Its history stays readable.
    assert await actor.call("getSessionEvents", sid) == []


async def test_get_session_events_pages_match_what_was_sent(actor: InProcessActor) -> None:
    sid = await new_session(actor)
    other = await new_session(actor)
    await actor.call("sendPrompt", sid, "chunks: 25")
    await actor.call("sendPrompt", other, "noise")
    await settle(actor)
    sent = [m for m in actor.sent if isinstance(m, WorkerEvent) and payload(m).get("sessionId") == sid]
    collected: list[dict[str, Any]] = []
    cursor = 0
    while True:
        page = await actor.call("getSessionEvents", sid, {"after": cursor, "limit": 10})
        assert isinstance(page, list) and len(page) <= 10
        if not page:
            break
        collected += page
        cursor = page[-1]["seq"]
    assert [e["seq"] for e in collected] == [m.seq for m in sent]
    assert [e["event"] for e in collected] == [payload(m)["event"] for m in sent]
    assert all(e["sessionId"] == sid and isinstance(e["createdAt"], int) for e in collected)

    replay = await actor.call("replayEvents", {"names": ["vmBooted", "sessionEvent"], "limit": 3})
    assert isinstance(replay, dict)
    assert replay["epoch"] == actor.log.epoch and replay["hasMore"] is True
    assert [e["name"] for e in replay["events"]] == ["sessionEvent"] * 3
    # Payloads carry their epoch as stored: a replayed event reads like a live one.
    assert all(e["args"][0]["epoch"] == actor.log.epoch for e in replay["events"])
    first = replay["events"][0]
    assert first["args"] == [next(m.payload for m in actor.sent
                                  if isinstance(m, WorkerEvent) and m.seq == first["seq"])]


class AskingAgent(Agent):
    """Stands in for an agent that asks before acting (the claude agent will)."""

    async def run_turn(self, prompt: str, turn: Turn) -> StopReason:
        reply = await turn.request_permission(tool_call("t1", "rm -rf", ToolKind.DELETE, {}))
        await turn.emit({"sessionUpdate": "agent_message_chunk",
                         "content": {"type": "text", "text": f"reply={reply.value}"}})
        return StopReason.END_TURN


async def test_permission_plumbing(actor: InProcessActor) -> None:
    sid = await new_session(actor, permissionPolicy="ask")
    actor.sessions.get(sid).agent = AskingAgent()
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "go"))
    await settle(actor)
    for _ in range(50):
        requests = [m for m in actor.sent if isinstance(m, WorkerEvent) and m.name == "permissionRequest"]
        if requests:
            break
        await asyncio.sleep(0.02)
        await settle(actor)
    request = payload(requests[0])
    assert request["sessionId"] == sid
    permission_id = request["request"]["permissionId"]
    assert [o["optionId"] for o in request["request"]["options"]] == ["once", "always", "reject"]
    with pytest.raises(ActorvisorError) as info:
        await actor.call("respondPermission", sid, "nope", "once")
    assert info.value.code is ErrorCode.PERMISSION_NOT_FOUND
    with pytest.raises(ActorvisorError) as info:
        await actor.call("respondPermission", sid, permission_id, "maybe")
    assert info.value.code is ErrorCode.INVALID_ARGS
    assert await actor.call("respondPermission", sid, permission_id, "always") is None
    assert ours(await asyncio.wait_for(turn, 5)) == {"text": "reply=always", "stopReason": "end_turn"}
    await settle(actor)
    names = [m.name for m in actor.sent if isinstance(m, WorkerEvent) and m.name.startswith("perm")]
    assert names == ["permissionRequest", "permissionResolved"]
    with pytest.raises(ActorvisorError) as info:
        await actor.call("respondPermission", sid, permission_id, "once")
    assert info.value.code is ErrorCode.PERMISSION_NOT_FOUND


async def test_sessions_survive_a_restart(actor: InProcessActor) -> None:
    from vmworker.sessions import SessionManager

    sid = await new_session(actor, env={"GREETING": "hi"}, cwd="/tmp")
    await actor.call("sendPrompt", sid, "run: echo $GREETING; pwd")
    await settle(actor)
    reloaded = SessionManager(actor.outbox, actor.vm, actor.log.load_sessions(),
                              actor.session_log)
    session = reloaded.get(sid)
    assert session.options.env == {"GREETING": "hi"} and session.options.cwd == "/tmp"
    assert session.status.value == "idle"
    result = await reloaded.prompt(sid, "run: echo $GREETING; pwd")
    assert result["text"] == "Ran `echo $GREETING; pwd`: exit code 0.\n"


async def test_cancelling_a_turn_resolves_its_pending_permission_as_cancelled(
        actor: InProcessActor) -> None:
    sid = await new_session(actor, permissionPolicy="ask")
    actor.sessions.get(sid).agent = AskingAgent()
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "go"))
    for _ in range(100):
        if actor.sessions.get(sid).permissions:
            break
        await asyncio.sleep(0.01)
    (permission_id,) = actor.sessions.get(sid).permissions
    assert await actor.call("cancelPrompt", sid) == {"cancelled": True}
    assert ours(await asyncio.wait_for(turn, 5)) == {"text": "", "stopReason": "cancelled"}
    await settle(actor)
    resolved = [payload(m) for m in actor.sent
                if isinstance(m, WorkerEvent) and m.name == "permissionResolved"]
    assert resolved == [{"sessionId": sid, "permissionId": permission_id, "reply": "cancelled",
                         "seq": resolved[0]["seq"], "epoch": actor.log.epoch}]
    with pytest.raises(ActorvisorError) as info:
        await actor.call("respondPermission", sid, permission_id, "once")
    assert info.value.code is ErrorCode.PERMISSION_NOT_FOUND
