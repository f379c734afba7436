"""The claude agent in process: real log, outbox, VM and the real, unpatched SDK, talking
HTTP + SSE to the fake Anthropic API (tests/fakes/anthropic_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from protocol.errors import ActorvisorError, ErrorCode
from protocol.worker import WorkerEvent
from tests.fakes.anthropic_api import (
    Cut,
    Drop,
    Fail,
    FakeAnthropic,
    Hold,
    Reply,
    StreamError,
    Text,
    Thinking,
    ToolUse,
    conversation_problem,
)
from vmworker.agents.claude import DEFAULT_MAX_RETRIES, DEFAULT_MAX_TOKENS, DEFAULT_MODEL
from vmworker.agents.history import INTERRUPTED, rebuild
from vmworker.agents.tools import MAX_OUTPUT_CHARS
from vmworker.sessions import SessionManager
from vmworker.vmfs import normalize

from .conftest import InProcessActor
from .harness import payload
from .test_sessions import ours


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture(autouse=True)
def no_host_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only what a test passes counts; a developer's own key must never reach the fake.
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


async def claude_session(actor: InProcessActor, fake: FakeAnthropic, *, key: str | None = None,
                         **options: Any) -> str:
    # Sessions ask before each tool call by default (fail closed); these tests answer
    # for themselves only where they say permissionPolicy="ask".
    options.setdefault("permissionPolicy", "allow_all")
    env = {"ANTHROPIC_API_KEY": key or fake.api_key, "ANTHROPIC_BASE_URL": fake.url,
           **options.pop("env", {})}
    result = await actor.call("createSession", "claude", {"env": env, **options})
    assert isinstance(result, dict)
    return str(result["sessionId"])


async def settle(actor: InProcessActor) -> None:
    await asyncio.wait_for(actor.outbox.flush(), 10)


def events(actor: InProcessActor, name: str, session_id: str) -> list[dict[str, Any]]:
    return [payload(m) for m in actor.sent if isinstance(m, WorkerEvent) and m.name == name
            and payload(m).get("sessionId") == session_id]


def updates(actor: InProcessActor, session_id: str) -> list[dict[str, Any]]:
    return [p["event"]["params"]["update"] for p in events(actor, "sessionEvent", session_id)]


def kinds(seen: list[dict[str, Any]]) -> list[str]:
    return [u["sessionUpdate"] + (f":{u['status']}" if "status" in u else "") for u in seen]


async def wait_until(actor: InProcessActor, check: Callable[[], Any], timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := check()):
            await asyncio.sleep(0.01)
            await settle(actor)
    return value


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": b} if isinstance(b, str) else b
                                        for b in blocks]}


def assistant(*blocks: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": b} if isinstance(b, str)
                                             else b for b in blocks]}


def tool_use(tool_id: str, name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": data}


def result(tool_id: str, text: str, error: bool = False) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": text, "is_error": error}


async def test_multi_step_tool_turn(actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake)
    write = {"path": "notes/hello.txt", "content": "hello from claude"}
    read = {"path": "/workspace/notes/hello.txt"}
    fake.script(
        Reply(Text("I'll write it."), ToolUse("toolu_w", "write_file", write)),
        Reply(ToolUse("toolu_r", "read_file", read)),
        Reply(Text("The file says: hello from claude")),
    )
    prompt = "Write hello to a file, read it back and tell me what it says."
    reply = await actor.call("sendPrompt", sid, prompt)
    await settle(actor)

    assert ours(reply) == {"text": "I'll write it.The file says: hello from claude",
                     "stopReason": "end_turn"}
    assert (actor.vm.root / "workspace/notes/hello.txt").read_text() == "hello from claude"
    seen = updates(actor, sid)
    assert kinds(seen) == [
        "user_message_chunk",
        *["agent_message_chunk"] * 3,
        "tool_call:pending", "tool_call_update:in_progress", "tool_call_update:completed",
        "tool_call:pending", "tool_call_update:in_progress", "tool_call_update:completed",
        *["agent_message_chunk"] * 3,
    ]
    call = seen[4]
    assert call == {"sessionUpdate": "tool_call", "toolCallId": "toolu_w",
                    "title": "write_file /workspace/notes/hello.txt", "kind": "edit",
                    "status": "pending", "rawInput": write,
                    "locations": [{"path": "/workspace/notes/hello.txt"}],
                    "_meta": {"actorvisor": {"toolName": "write_file"}}}
    assert seen[6] == {"sessionUpdate": "tool_call_update", "toolCallId": "toolu_w",
                       "status": "completed",
                       "content": [{"type": "content", "content": {
                           "type": "text", "text": "Wrote 17 bytes to /workspace/notes/hello.txt."}}],
                       "rawOutput": {"path": "/workspace/notes/hello.txt", "bytes": 17}}
    assert seen[7]["kind"] == "read" and seen[7]["rawInput"] == read
    assert seen[9]["content"][0]["content"]["text"] == "hello from claude"
    assert seen[9]["rawOutput"] == {"path": "/workspace/notes/hello.txt", "bytes": 17,
                                    "truncated": False}

    first, second, third = fake.requests
    assert all(r.outcome == "streamed" for r in fake.requests)
    assert first.headers["anthropic-version"] and first.headers.get("x-stainless-retry-count") == "0"
    body = first.body
    assert body["model"] == DEFAULT_MODEL and body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert body["stream"] is True and "thinking" not in body
    assert "/workspace" in body["system"]
    assert [t["name"] for t in body["tools"]] == ["bash", "read_file", "write_file", "edit_file",
                                                  "list_dir"]
    assert first.messages == [user(prompt)]
    wrote = result("toolu_w", "Wrote 17 bytes to /workspace/notes/hello.txt.")
    assert second.messages == [user(prompt),
                               assistant("I'll write it.", tool_use("toolu_w", "write_file", write)),
                               user(wrote)]
    assert third.messages == [*second.messages,
                              assistant(tool_use("toolu_r", "read_file", read)),
                              user(result("toolu_r", "hello from claude"))]

    # The next turn starts from the event log: exactly what the model saw, plus its answer.
    fake.script(Reply(Text("You're welcome.")))
    await actor.call("sendPrompt", sid, "thanks")
    assert fake.requests[3].messages == [*third.messages,
                                         assistant("The file says: hello from claude"),
                                         user("thanks")]
    assert await actor.call("closeSession", sid) is None


async def test_thinking_streams_as_thoughts_and_stays_in_the_tool_loop(
        actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake, thinking=True, model="claude-opus-5",
                               systemPrompt="Be brief.")
    fake.script(
        Reply(Thinking("The user wants hi.", signature="sig-1"), Text("Running it."),
              ToolUse("toolu_1", "bash", {"command": "echo hi"})),
        Reply(Text("It printed hi.")),
    )
    reply = await actor.call("sendPrompt", sid, "say hi with bash")
    await settle(actor)
    assert ours(reply) == {"text": "Running it.It printed hi.", "stopReason": "end_turn"}
    seen = updates(actor, sid)
    thoughts = [u["content"]["text"] for u in seen if u["sessionUpdate"] == "agent_thought_chunk"]
    assert "".join(thoughts) == "The user wants hi." and len(thoughts) == 2
    assert seen[-4]["rawOutput"] == {"exitCode": 0, "stdout": "hi\n", "stderr": ""}
    first, second = fake.requests
    assert first.body["thinking"] == {"type": "adaptive", "display": "summarized"}
    assert first.body["model"] == "claude-opus-5" and first.body["system"] == "Be brief."
    # Within the turn the thinking block goes back with its signature, as the API requires.
    assert second.messages[1] == assistant(
        {"type": "thinking", "thinking": "The user wants hi.", "signature": "sig-1"},
        "Running it.", tool_use("toolu_1", "bash", {"command": "echo hi"}))

    # The log keeps each block's signature: the next turn sends the same blocks back.
    assert seen[2]["_meta"] == {"actorvisor": {"signature": "sig-1"}}
    fake.script(Reply(Thinking("Short.", signature="sig-2"),
                      ToolUse("toolu_2", "bash", {"command": "sleep 60"})))
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "now sleep"))
    await wait_until(actor, lambda: updates(actor, sid)[-1].get("status") == "in_progress")
    # Cancel once the command runs: a sandbox killed in its first milliseconds can leave
    # its process behind (a vmworker/sandbox.py race, reported).
    await wait_until(actor, sleeping)
    await actor.call("cancelPrompt", sid)
    await turn
    fake.script(Reply(Text("ok")))
    await actor.call("sendPrompt", sid, "stop")
    assert fake.requests[3].messages == [
        *second.messages, assistant("It printed hi."), user("now sleep"),
        assistant({"type": "thinking", "thinking": "Short.", "signature": "sig-2"},
                  tool_use("toolu_2", "bash", {"command": "sleep 60"})),
        user(result("toolu_2", "Cancelled before it finished.", True), "stop"),
    ]

    budget = await claude_session(actor, fake, thinkingBudget=2048)
    fake.script(Reply(Text("ok")))
    await actor.call("sendPrompt", budget, "hm")
    assert fake.requests[4].body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert fake.requests[4].body["max_tokens"] == DEFAULT_MAX_TOKENS + 2048


async def test_cancel_mid_stream_aborts_the_request_and_keeps_the_session(
        actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake)
    fake.script(Reply(Text("Partial answer", pieces=2), Hold(), Text(" never sent")))
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "go"))
    await wait_until(actor, lambda: len(updates(actor, sid)) == 3)
    assert await actor.call("cancelPrompt", sid) == {"cancelled": True}
    assert ours(await asyncio.wait_for(turn, 10)) == {"text": "Partial answer", "stopReason": "cancelled"}
    await fake.wait_outcome(0, "aborted")
    assert (await actor.call("listSessions"))[0]["status"] == "idle"

    fake.script(Reply(Text("Fine.")))
    assert ours(await actor.call("sendPrompt", sid, "again")) == {"text": "Fine.", "stopReason": "end_turn"}
    assert fake.requests[1].messages == [user("go"), assistant("Partial answer"), user("again")]


def sleeping() -> list[int]:
    """Our `sleep` processes (sandboxed commands are descendants of this process)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == "sleep":
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


async def test_cancel_kills_the_running_tool_and_answers_its_call(
        actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake)
    fake.script(Reply(ToolUse("toolu_s", "bash", {"command": "sleep 60"})))
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "wait a minute"))
    await wait_until(actor, lambda: any(u.get("status") == "in_progress" for u in updates(actor, sid)))
    await wait_until(actor, sleeping)
    assert await actor.call("cancelPrompt", sid) == {"cancelled": True}
    assert (await asyncio.wait_for(turn, 10))["stopReason"] == "cancelled"
    await settle(actor)
    await wait_until(actor, lambda: not sleeping())
    last = updates(actor, sid)[-1]
    assert last["status"] == "failed" and last["toolCallId"] == "toolu_s"
    assert last["content"][0]["content"]["text"] == "Cancelled before it finished."

    fake.script(Reply(Text("ok")))
    await actor.call("sendPrompt", sid, "never mind")
    assert fake.requests[1].messages == [
        user("wait a minute"),
        assistant(tool_use("toolu_s", "bash", {"command": "sleep 60"})),
        user(result("toolu_s", "Cancelled before it finished.", True), "never mind"),
    ]


async def answer_next_permission(actor: InProcessActor, sid: str, seen: int, reply: str) -> dict[str, Any]:
    requests = await wait_until(actor, lambda: events(actor, "permissionRequest", sid)[seen:])
    request = requests[0]["request"]
    assert await actor.call("respondPermission", sid, request["permissionId"], reply) is None
    return dict(request)


async def test_ask_policy_approve_reject_and_always(actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake, permissionPolicy="ask")
    fake.script(
        Reply(Text("Writing, then cleaning up."),
              ToolUse("toolu_a", "write_file", {"path": "a.txt", "content": "A"}),
              ToolUse("toolu_b", "bash", {"command": "rm -rf /workspace"})),
        Reply(Text("I wrote a.txt; the clean-up was refused.")),
    )
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "write a.txt then wipe everything"))
    first = await answer_next_permission(actor, sid, 0, "once")
    assert first["toolCall"]["toolCallId"] == "toolu_a"
    assert first["toolCall"]["rawInput"] == {"path": "a.txt", "content": "A"}
    assert [o["optionId"] for o in first["options"]] == ["once", "always", "reject"]
    second = await answer_next_permission(actor, sid, 1, "reject")
    assert second["toolCall"]["title"] == "bash: rm -rf /workspace"
    assert (await asyncio.wait_for(turn, 10))["stopReason"] == "end_turn"
    await settle(actor)

    assert (actor.vm.root / "workspace/a.txt").read_text() == "A"
    assert [p["reply"] for p in events(actor, "permissionResolved", sid)] == ["once", "reject"]
    by_call = [(u["toolCallId"], u["status"]) for u in updates(actor, sid)
               if u["sessionUpdate"].startswith("tool_call")]
    assert by_call == [("toolu_a", "pending"), ("toolu_b", "pending"),
                       ("toolu_a", "in_progress"), ("toolu_a", "completed"),
                       ("toolu_b", "failed")]
    results = fake.requests[1].messages[-1]["content"]
    assert results[0] == result("toolu_a", "Wrote 1 bytes to /workspace/a.txt.")
    assert results[1]["is_error"] is True and "rejected" in results[1]["content"]

    # "always" covers later calls of the same tool in this session without asking again.
    fake.script(Reply(ToolUse("toolu_c", "write_file", {"path": "c.txt", "content": "C"})),
                Reply(ToolUse("toolu_d", "write_file", {"path": "d.txt", "content": "D"})),
                Reply(Text("Both written.")))
    turn = asyncio.create_task(actor.call("sendPrompt", sid, "write c and d"))
    await answer_next_permission(actor, sid, 2, "always")
    assert (await asyncio.wait_for(turn, 10))["text"] == "Both written."
    assert len(events(actor, "permissionRequest", sid)) == 3
    assert (actor.vm.root / "workspace/d.txt").read_text() == "D"


async def test_unanswered_permission_times_out_as_a_refusal(
        actor: InProcessActor, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTORVISOR_PERMISSION_TIMEOUT_S", "0.2")
    sid = await claude_session(actor, fake, permissionPolicy="ask")
    fake.script(Reply(ToolUse("toolu_1", "bash", {"command": "touch /workspace/x"})),
                Reply(Text("Nobody answered.")))
    assert (await actor.call("sendPrompt", sid, "touch x"))["stopReason"] == "end_turn"
    await settle(actor)
    assert [p["reply"] for p in events(actor, "permissionResolved", sid)] == ["cancelled"]
    answer = fake.requests[1].messages[-1]["content"][0]
    assert answer["is_error"] is True and "Nobody answered" in answer["content"]
    assert not (actor.vm.root / "workspace/x").exists()


async def test_401_is_a_clear_error_without_retry_and_the_session_stays_usable(
        actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake, key="sk-test-not-the-right-one")
    with pytest.raises(ActorvisorError) as info:
        await actor.call("sendPrompt", sid, "hello?")
    assert info.value.code is ErrorCode.AGENT_ERROR
    assert "rejected the credentials (401 authentication_error: invalid x-api-key)" in info.value.message
    assert "ANTHROPIC_API_KEY" in info.value.message
    assert len(fake.requests) == 1
    await settle(actor)
    notice = updates(actor, sid)[-1]
    assert notice["sessionUpdate"] == "agent_message_chunk"
    assert notice["content"]["text"] == f"[error] {info.value.message}"
    assert notice["_meta"]["actorvisor"]["error"]["status"] == 401
    assert (await actor.call("listSessions"))[0]["status"] == "idle"

    fake.api_key = "sk-test-not-the-right-one"  # the key becomes valid
    fake.script(Reply(Text("Hi!")))
    assert ours(await actor.call("sendPrompt", sid, "hello again")) == {"text": "Hi!", "stopReason": "end_turn"}
    # The error notice is not something the model said: it is left out of the history.
    assert fake.requests[1].messages == [user("hello?", "hello again")]


@pytest.mark.parametrize(("status", "error_type"), [(529, "overloaded_error"),
                                                    (429, "rate_limit_error")])
async def test_overload_is_retried_by_the_sdk_then_reported(
        actor: InProcessActor, fake: FakeAnthropic, status: int, error_type: str) -> None:
    sid = await claude_session(actor, fake)
    fake.script(*[Fail(status, error_type, "Overloaded")] * (DEFAULT_MAX_RETRIES + 1))
    with pytest.raises(ActorvisorError) as info:
        await actor.call("sendPrompt", sid, "busy?")
    assert info.value.code is ErrorCode.AGENT_ERROR
    assert f"unavailable ({status} {error_type}: Overloaded)" in info.value.message
    assert f"gave up after {DEFAULT_MAX_RETRIES} retries" in info.value.message
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == [
        str(i) for i in range(DEFAULT_MAX_RETRIES + 1)]

    # Transient failures (an error status, a dropped connection) are retried to success.
    fake.script(Fail(status, error_type), Drop(), Reply(Text("Back.")))
    assert ours(await actor.call("sendPrompt", sid, "now?")) == {"text": "Back.", "stopReason": "end_turn"}
    assert [r.outcome for r in fake.requests[-3:]] == [f"http {status}", "dropped", "streamed"]
    assert fake.requests[-1].messages == [user("busy?", "now?")]


async def test_error_mid_stream_and_max_tokens(actor: InProcessActor, fake: FakeAnthropic) -> None:
    sid = await claude_session(actor, fake)
    fake.script(StreamError("overloaded_error", "Overloaded", steps=(Text("Hel", pieces=1),)))
    with pytest.raises(ActorvisorError) as info:
        await actor.call("sendPrompt", sid, "hi")
    assert "stream failed mid-response: overloaded_error: Overloaded" in info.value.message
    fake.script(Reply(Text("Par", pieces=1), Cut(), Text("t two")))
    with pytest.raises(ActorvisorError) as info:
        await actor.call("sendPrompt", sid, "again")
    assert info.value.code is ErrorCode.AGENT_ERROR
    assert "connection to the Anthropic API broke mid-response: RemoteProtocolError" in info.value.message
    assert len(fake.requests) == 2  # a response that had begun is not retried

    # A tool call cut off by max_tokens is answered as not run, so the history stays valid.
    fake.script(Reply(Text("Let me"), ToolUse("toolu_x", "bash", {"command": "true"}),
                      stop_reason="max_tokens"),
                Reply(Text("ok")))
    assert (await actor.call("sendPrompt", sid, "more"))["stopReason"] == "max_tokens"
    await settle(actor)
    assert updates(actor, sid)[-1]["status"] == "failed"
    await actor.call("sendPrompt", sid, "go on")
    assert fake.requests[-1].messages == [
        user("hi"), assistant("Hel"), user("again"), assistant("Par"), user("more"),
        assistant("Let me", tool_use("toolu_x", "bash", {"command": "true"})),
        user(result("toolu_x", "Not run: the response ended with max_tokens before the tools ran.",
                    True), "go on"),
    ]


async def test_tool_results_the_model_can_act_on(actor: InProcessActor, fake: FakeAnthropic) -> None:
    await actor.vm.write_file(normalize("/workspace/twice.txt"), b"ab ab")
    await actor.vm.write_file(normalize("/workspace/once.txt"), b"x = 1\n")
    sid = await claude_session(actor, fake)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("edit_file", {"path": "once.txt", "old_string": "x = 1", "new_string": "x = 2"}),
        ("edit_file", {"path": "twice.txt", "old_string": "ab", "new_string": "cd"}),
        ("edit_file", {"path": "once.txt", "old_string": "nope", "new_string": "z"}),
        ("edit_file", {"path": "twice.txt", "old_string": "ab", "new_string": "cd", "replace_all": True}),
        ("read_file", {"path": "missing.txt"}),
        ("read_file", {"path": "/etc/passwd"}),
        ("bash", {"command": "head -c 100000 /dev/zero | tr '\\0' x"}),
        ("bash", {"command": "echo out; echo err >&2; exit 3"}),
        ("bash", {"command": "sleep 30", "timeout_seconds": 1}),
        ("list_dir", {}),
        ("write_file", {"path": "../../escape", "content": "x"}),
        ("fly", {}),
        ("bash", {"command": 5}),
    ]
    fake.script(Reply(*[ToolUse(f"toolu_{i}", name, data) for i, (name, data) in enumerate(calls)]),
                Reply(Text("done")))
    await actor.call("sendPrompt", sid, "exercise the tools")
    answers = {b["tool_use_id"]: b for b in fake.requests[1].messages[-1]["content"]}
    text = {int(k.split("_")[1]): v["content"] for k, v in answers.items()}
    error = {int(k.split("_")[1]): v["is_error"] for k, v in answers.items()}
    assert (text[0], error[0]) == ("Replaced 1 occurrence in /workspace/once.txt.", False)
    assert error[1] and "occurs 2 times" in text[1]
    assert error[2] and "was not found" in text[2]
    assert (text[3], error[3]) == ("Replaced 2 occurrences in /workspace/twice.txt.", False)
    assert (actor.vm.root / "workspace/once.txt").read_text() == "x = 2\n"
    assert (actor.vm.root / "workspace/twice.txt").read_text() == "cd cd"
    assert error[4] and "no such file" in text[4]
    assert error[5] and "/etc" in text[5]
    assert not error[6] and "characters truncated ..." in text[6]
    assert len(text[6]) < MAX_OUTPUT_CHARS + 100 and text[6].startswith("x" * 1000)
    assert (text[7], error[7]) == ("out\n[stderr]\nerr\n[exit code 3]", True)
    assert error[8] and text[8].startswith("Command timed out after 1 s")
    assert not error[9] and text[9].splitlines() == ["once.txt", "twice.txt"]
    assert error[10] and "escapes the VM root" in text[10]
    assert error[11] and "no tool named 'fly'" in text[11]
    assert error[12] and "`command` must be a string" in text[12]


async def test_credentials_stay_out_of_the_vm_the_log_and_the_sessions_table(
        actor: InProcessActor, fake: FakeAnthropic) -> None:
    with pytest.raises(ActorvisorError) as info:
        await actor.call("createSession", "claude", {})
    assert info.value.code is ErrorCode.AGENT_ERROR and "ANTHROPIC_API_KEY" in info.value.message

    key = "sk-test-only-in-session-env-4711"
    fake.api_key = key
    sid = await claude_session(actor, fake, key=key, env={"GREETING": "hi"})
    command = "echo key=${ANTHROPIC_API_KEY:-unset} greeting=$GREETING"
    fake.script(Reply(ToolUse("toolu_e", "bash", {"command": command})), Reply(Text("done")))
    await actor.call("sendPrompt", sid, "print your env")
    await settle(actor)
    assert fake.requests[0].headers.get("authorization") == f"Bearer {key}" or \
        fake.requests[0].headers.get("x-api-key") == key
    assert fake.requests[1].messages[-1]["content"][0]["content"] == "key=unset greeting=hi"
    rows = {r.session_id: r for r in actor.log.load_sessions()}
    assert rows[sid].options["env"] == {"ANTHROPIC_BASE_URL": fake.url, "GREETING": "hi"}
    assert key.encode() not in (actor.actor_dir / "events.db").read_bytes()

    # After a restart the key given in createSession is gone, and the error says so.
    reloaded = SessionManager(actor.outbox, actor.vm, actor.log.load_sessions(), actor.session_log)
    with pytest.raises(ActorvisorError) as info:
        await reloaded.prompt(sid, "still there?")
    assert info.value.code is ErrorCode.AGENT_ERROR and "restart" in info.value.message


def test_rebuild_always_yields_a_conversation_the_api_accepts() -> None:
    def chunk(kind: str, text: str, **extra: Any) -> dict[str, Any]:
        return {"sessionUpdate": kind, "content": {"type": "text", "text": text}, **extra}

    def call(tool_id: str, name: str | None) -> dict[str, Any]:
        update = {"sessionUpdate": "tool_call", "toolCallId": tool_id, "title": tool_id,
                  "kind": "execute", "status": "pending", "rawInput": {"command": tool_id}}
        if name is not None:
            update["_meta"] = {"actorvisor": {"toolName": name}}
        return update

    def done(tool_id: str, status: str, text: str) -> dict[str, Any]:
        return {"sessionUpdate": "tool_call_update", "toolCallId": tool_id, "status": status,
                "content": [{"type": "content", "content": {"type": "text", "text": text}}]}

    log = [
        chunk("user_message_chunk", "one"),
        chunk("agent_thought_chunk", "hm"),
        chunk("agent_thought_chunk", "m", _meta={"actorvisor": {"signature": "s1"}}),
        chunk("agent_thought_chunk", "", _meta={"actorvisor": {"redactedThinking": "r1"}}),
        chunk("agent_message_chunk", "A"), chunk("agent_message_chunk", "B"),
        call("t1", "bash"), call("t2", "bash"),
        {"sessionUpdate": "tool_call_update", "toolCallId": "t1", "status": "in_progress"},
        done("t1", "completed", "out1"), done("t2", "failed", "bad"),
        chunk("agent_message_chunk", "   "),
        call("t3", "bash"),                     # the worker died while this ran
        chunk("user_message_chunk", "two"),
        chunk("agent_thought_chunk", "cut off mid-thought"),   # never signed: left out
        chunk("agent_message_chunk", "[error] boom", _meta={"actorvisor": {"error": {}}}),
        chunk("user_message_chunk", "   "),
        call("local-call", None),               # not ours: nothing to pair it with
        chunk("agent_message_chunk", "C"),
    ]
    messages = rebuild(log)
    assert messages == [
        user("one"),
        assistant({"type": "thinking", "thinking": "hmm", "signature": "s1"},
                  {"type": "redacted_thinking", "data": "r1"},
                  "AB", tool_use("t1", "bash", {"command": "t1"}),
                  tool_use("t2", "bash", {"command": "t2"})),
        user(result("t1", "out1"), result("t2", "bad", True)),
        assistant(tool_use("t3", "bash", {"command": "t3"})),
        user(result("t3", INTERRUPTED, True), "two", "(empty prompt)"),
        assistant("C"),
    ]
    assert conversation_problem(messages + [user("next")]) is None
    assert conversation_problem([user("x"), assistant(tool_use("t", "bash", {}))]) is not None
