"""agentOS's documentation examples (sessions, history, permissions, filesystem, cron) run
unchanged but for the agent name, with the plain npm `rivetkit` client, against a real
supervisor; the approval examples' `claude` agent talks to the fake Anthropic API. One
node process runs them all (tests/e2e/npm/agentos_docs.mjs)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from tests.e2e.test_npm_client import NPM_DIR, node_command, node_env, parse_results
from tests.fakes.anthropic_api import FakeAnthropic, Reply, Text, ToolUse
from tests.support import MakeSupervisor


def tool_then_done(call_id: str) -> tuple[Reply, Reply]:
    return (Reply(ToolUse(call_id, "bash", {"command": "echo approved > /workspace/approved.txt"})),
            Reply(Text("Done.")))


async def run_examples(url: str, api_key: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *node_command("agentos_docs.mjs"), cwd=NPM_DIR, env={**node_env(url), "ANTHROPIC_API_KEY": api_key},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 150)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    results = parse_results(stdout.decode())
    assert results, f"no result line (exit {proc.returncode})\n{stdout.decode()[-2000:]}\n{stderr.decode()[-3000:]}"
    examples: dict[str, Any] = results[-1]["results"]
    return examples


async def test_agentos_documentation_examples(make_supervisor: MakeSupervisor) -> None:
    fake = await FakeAnthropic(f"sk-test-{secrets.token_hex(12)}").start()
    try:
        fake.script(*tool_then_done("toolu_always"), *tool_then_done("toolu_once"))
        sup = make_supervisor(env={"ANTHROPIC_BASE_URL": fake.url})
        results = await run_examples(sup.url, fake.api_key)
    finally:
        await fake.close()
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed, "\n".join(f"{n}: {e}\n{results[n].get('stack', '')}" for n, e in failed.items())

    quick = results["quickstart"]
    assert quick["file"] == "console.log('hello world')" and quick["stopReason"] == "end_turn"
    assert quick["hasResponse"] and quick["streamedMethods"] == ["session/update"]

    sessions = results["sessions"]
    assert sessions["created"]["sessionId"] == "string" and sessions["created"]["agentInfo"]["name"]
    assert sessions["sendPrompt"].startswith("You said: Create a TypeScript function")
    assert set(sessions["streamed"]) == {"session/update"}
    assert sessions["cancelled"] == "cancelled"
    assert sessions["destroyed"]["deletedEvents"] >= 0
    assert set(sessions["events"]) == {"createdAt,event,seq,sessionId"}
    assert set(sessions["sequenced"]) == {"notification,sequenceNumber"} and sessions["sameNotifications"]
    assert sessions["persisted"]["agentTypes"] == ["local"] and sessions["persisted"]["createdAt"]
    assert not sessions["persisted"]["destroyedListed"]
    assert sessions["reviewer"] == "Ran `cat /home/agentos/api.ts`: exit code 0.\n"  # the coder wrote it

    core = results["core"]
    assert core["exec"] == "hello\n" and core["readFile"] == "Hello, world!"
    assert [w["success"] for w in core["writeFiles"]] == [True, True]
    assert {"file /home/user/hello.txt", "directory /home/user/src", "file /home/user/src/index.ts",
            "file /home/user/src/utils.ts"} <= set(core["tree"])
    assert core["scheduled"] == "cleanup"
    jobs = {j["id"]: j for j in core["listCronJobs"]}
    assert jobs["cleanup"]["schedule"] == "0 * * * *" and jobs["cleanup"]["overlap"] == "allow"
    assert {j["action"]["type"] for j in jobs.values()} == {"exec", "session"}
    event = core["cronEvent"]["event"]
    assert event["id"] == event["jobId"] == "now" and event["schedule"] == "* * * * * *"
    assert event["result"]["stdout"] == "tick\n" and isinstance(core["cronEvent"]["seq"], int)

    cron = results["cron"]
    assert cron["ids"] == ["string", "string"] and cron["afterCancel"] == []
    assert sorted(j["overlap"] for j in cron["jobs"]) == ["allow", "skip"]
    assert all(isinstance(j["nextRun"], int) and j["lastRun"] is None for j in cron["jobs"])

    assert results["multiplayer"]["live"][0] == results["multiplayer"]["live"][1] > 0

    for name in ("autoApprove", "permissions"):
        approved = results[name]
        assert approved["text"] == "Done." and approved["written"] == "approved\n"
        assert approved["requests"] == [{"permissionId": "string", "description": "string", "params": "object"}]
