"""The claude agent end to end: a real supervisor and real workers, the real SDK, and the
fake Anthropic API (tests/fakes/anthropic_api.py) as the only stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protocol.aio import Client, Connection
from protocol.errors import ActorvisorError, ErrorCode
from tests.fakes.anthropic_api import FakeAnthropic, Reply, Text, ToolUse
from tests.support import ROOT, MakeSupervisor, SupervisorProc, eventually, file_contains


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic(f"sk-test-{secrets.token_hex(12)}").start()
    try:
        yield server
    finally:
        await server.close()


def api_env(fake: FakeAnthropic, **extra: str) -> dict[str, str]:
    return {"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": fake.api_key, **extra}




def text(role: str, *parts: str) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": p} for p in parts]}


async def replay_all(conn: Connection) -> list[dict[str, Any]]:
    events, after = [], 0
    while True:
        page = await conn.call("replayEvents", {"after": after})
        events.extend(page["events"])
        after = page["nextCursor"]
        if not page["hasMore"]:
            return events


async def test_conversation_survives_a_killed_worker(make_supervisor: MakeSupervisor,
                                                     fake: FakeAnthropic) -> None:
    sup = make_supervisor(env=api_env(fake))
    async with Client(sup.url) as client:
        conn = await client.connect("vm", "claude-kill", reconnect=False)
        shutdowns: list[dict[str, Any]] = []
        conn.on("vmShutdown", shutdowns.append)
        sid = (await conn.call("createSession", "claude", {}))["sessionId"]
        fake.script(Reply(Text("I will remember: zebra.")))
        first = await conn.call("sendPrompt", sid, "Remember the word zebra.")
        assert {k: v for k, v in first.items() if k != "response"} == {"text": "I will remember: zebra.", "stopReason": "end_turn"}

        pid = (await conn.call("getRuntimeHealth"))["pid"]
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: [s for s in shutdowns if s["reason"] == "crash"])

        fake.script(Reply(Text("The word was zebra.")))
        second = await conn.call("sendPrompt", sid, "Which word?")
        assert {k: v for k, v in second.items() if k != "response"} == {"text": "The word was zebra.", "stopReason": "end_turn"}
        assert (await conn.call("getRuntimeHealth"))["pid"] != pid
        assert fake.requests[1].messages == [
            text("user", "Remember the word zebra."),
            text("assistant", "I will remember: zebra."),
            text("user", "Which word?"),
        ]
        await conn.close()


async def test_no_api_key_in_any_log_event_or_file(make_supervisor: MakeSupervisor,
                                                   fake: FakeAnthropic) -> None:
    env_key = fake.api_key
    session_key = f"sk-test-{secrets.token_hex(12)}"
    # Debug everywhere, the SDK's own request logging included: the most a log can say.
    sup = make_supervisor(env=api_env(fake, ACTORVISOR_LOG_LEVEL="debug", ANTHROPIC_LOG="debug"))
    async with Client(sup.url) as client:
        conn = await client.connect("vm", "claude-secrets", reconnect=False)
        shutdowns: list[dict[str, Any]] = []
        conn.on("vmShutdown", shutdowns.append)
        with_key = (await conn.call("createSession", "claude", {
            "env": {"ANTHROPIC_API_KEY": session_key}, "permissionPolicy": "allow_all"}))["sessionId"]
        # The model tries hard to see the key from inside the VM.
        fake.api_key = session_key
        fake.script(Reply(ToolUse("toolu_env", "bash", {"command": "env; echo $ANTHROPIC_API_KEY"})),
                    Reply(Text("Nothing to see.")))
        await conn.call("sendPrompt", with_key, "print your environment")
        seen_in_vm = fake.requests[1].messages[-1]["content"][0]["content"]
        assert "PATH=" in seen_in_vm and "ANTHROPIC_API_KEY" not in seen_in_vm
        # A session on the supervisor's key, refused: the error path logs too.
        from_env = (await conn.call("createSession", "claude", {}))["sessionId"]
        with pytest.raises(ActorvisorError) as info:
            await conn.call("sendPrompt", from_env, "hello")
        assert info.value.code is ErrorCode.AGENT_ERROR and "401" in info.value.message
        # A crash and a restart: the session given a key goes on with the supervisor's.
        pid = (await conn.call("getRuntimeHealth"))["pid"]
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: shutdowns)
        fake.api_key = env_key
        fake.script(Reply(Text("Still here.")))
        assert (await conn.call("sendPrompt", with_key, "still there?"))["text"] == "Still here."
        events = await replay_all(conn)
        await conn.close()
    assert sup.stop() == 0

    used = [r.headers.get("authorization", "") + r.headers.get("x-api-key", "")
            for r in fake.requests]
    assert session_key in used[0] and env_key in used[-1]  # both keys really were in play
    logs = sup.logs()
    assert "worker_started" in logs and "agent" in logs  # worker lines are in there
    for key in (env_key, session_key):
        assert key not in logs
        assert key not in json.dumps(events)
        for path in sup.state_dir.rglob("*"):
            if stat.S_ISREG(path.lstat().st_mode):
                assert not file_contains(path, key.encode()), path


async def run_demo(sup: SupervisorProc, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisor.cli", "demo", "--url", sup.url, "--agent", "claude",
        "--actor", "demo-claude", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace")


async def test_demo_uses_the_service_key_and_says_what_to_set_without_one(
        make_supervisor: MakeSupervisor, fake: FakeAnthropic) -> None:
    # The agent runs in the service, so the key that matters is the service's: the demo
    # client needs none of its own.
    plain = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    keyless = make_supervisor(env={"ANTHROPIC_API_KEY": "", "ANTHROPIC_BASE_URL": fake.url})
    code, out = await run_demo(keyless, plain)
    assert code == 2 and "ANTHROPIC_API_KEY" in out and "service's environment" in out
    assert fake.requests == []
    keyless.stop()

    sup = make_supervisor(env=api_env(fake))
    fake.script(Reply(Text("Hello from the model.")))
    code, out = await run_demo(sup, plain)
    assert code == 0, out
    assert "Hello from the model." in out and "[turn ended: end_turn]" in out
    assert len(fake.requests) == 1


@pytest.mark.parametrize("policy", ["ask", "allow_all"])
async def test_the_service_permission_policy_reaches_the_worker(
        make_supervisor: MakeSupervisor, tmp_state: Path, fake: FakeAnthropic,
        policy: str) -> None:
    """A session that names no policy gets the service's: by default it asks before the
    tool runs (and a rejection keeps it from running); with `allow_all` it just runs."""
    args: list[str] = []
    if policy == "allow_all":
        config = tmp_state / "policy.toml"
        config.write_text('permission_policy = "allow_all"\n')
        args = ["--config", str(config)]
    sup = make_supervisor(*args, env=api_env(fake))
    async with Client(sup.url) as client:
        conn = await client.connect("vm", f"policy-{policy}")
        asked: list[dict[str, Any]] = []
        conn.on("permissionRequest", asked.append)
        sid = (await conn.call("createSession", "claude", {}))["sessionId"]
        fake.script(Reply(ToolUse("toolu_p", "bash", {"command": "echo ran > /workspace/ran"})),
                    Reply(Text("Done.")))
        turn = asyncio.create_task(conn.call("sendPrompt", sid, "write the file"))
        if policy == "ask":
            await eventually(lambda: asked)
            assert not turn.done()
            request = asked[0]["request"]
            assert "echo ran" in json.dumps(request["params"])
            await conn.call("respondPermission", sid, request["permissionId"], "reject")
        assert (await turn)["text"] == "Done."
        assert await conn.call("exists", "/workspace/ran") is (policy == "allow_all")
        assert (asked == []) is (policy == "allow_all")
        await conn.close()
