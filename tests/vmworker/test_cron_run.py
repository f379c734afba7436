"""`runCronJob` in the worker: the job's life as durable cronEvents, agentOS's shapes plus ours."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import InProcessActor


async def test_a_run_logs_fire_then_complete_or_error(actor: InProcessActor,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    loud = {"id": "j", "schedule": "* * * * *",
            "action": {"type": "exec", "command": "head -c 10000 /dev/zero | tr '\\0' x; exit", "args": ["3"]}}
    done: Any = await actor.call("runCronJob", loud, 123)
    assert done["type"] == "cron:complete" and done["firedAt"] == 123 and done["id"] == done["jobId"] == "j"
    assert done["result"]["exitCode"] == 3  # a failing command is a completed run, as in agentOS
    assert done["result"]["stdout"].startswith("x" * 4096) and "(5904 more characters)" in done["result"]["stdout"]
    keyless = {"id": "k", "schedule": "0 9 * * *",
               "action": {"type": "session", "agentType": "claude", "prompt": "hi", "options": {}}}
    failed: Any = await actor.call("runCronJob", keyless, 124)
    assert failed["type"] == "cron:error" and failed["code"] == "actor.agent_error" and failed["error"]
    await actor.outbox.flush()
    page: Any = await actor.call("replayEvents", {"names": ["cronEvent"]})
    logged = [e["args"][0] for e in page["events"]]
    assert [(p["event"]["jobId"], p["event"]["type"]) for p in logged] == [
        ("j", "cron:fire"), ("j", "cron:complete"), ("k", "cron:fire"), ("k", "cron:error")]
    assert all(isinstance(p["seq"], int) and isinstance(p["event"]["time"], int) for p in logged)
    assert logged[1]["event"] == done
