"""Cron (agentOS's scheduleCron) on a real supervisor: jobs fire while the actor sleeps,
their cronEvents arrive live and stay in the log, cancel stops them, they survive a
restart, and a `session` job runs a prompt."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from protocol.aio import Client
from protocol.errors import ActorvisorError, ErrorCode
from tests.support import MakeSupervisor, eventually

# Idle actors sleep within a few tenths of a second, so a job every second finds its
# actor asleep and the supervisor has to wake it.
FAST_SLEEP = "heartbeat_interval = 0.1\nsleep_after = 0.2\n"


def fast_config(tmp_state: Path) -> str:
    path = tmp_state / "fast.toml"
    path.write_text(FAST_SLEEP)
    return str(path)


async def logged(client: Client, key: str) -> list[tuple[str, dict[str, Any]]]:
    page = await client.action("vm", key, "replayEvents", {"limit": 10000})
    return [(e["name"], e["args"][0]) for e in page["events"]]


def fires_with_sleep_between(events: list[tuple[str, dict[str, Any]]], job: str) -> int:
    """How many of the job's fires came after the actor had slept since the previous fire."""
    count, slept = 0, False
    for name, payload in events:
        if name == "vmShutdown" and payload["reason"] == "sleep":
            slept = True
        elif name == "cronEvent" and payload["event"]["jobId"] == job and payload["event"]["type"] == "cron:fire":
            count += slept
            slept = False
    return count


async def test_cron_job_wakes_the_sleeping_actor_each_second_until_cancelled(
        make_supervisor: MakeSupervisor, tmp_state: Path) -> None:
    sup = make_supervisor("--config", fast_config(tmp_state))
    key = "cron-every-second"
    async with Client(sup.url) as client:
        conn = await client.connect("vm", key)
        live: list[dict[str, Any]] = []
        conn.on("cronEvent", live.append)
        job = await client.action("vm", key, "scheduleCron", {
            "id": "stamp", "schedule": "* * * * * *",
            "action": {"type": "exec", "command": "date >> /workspace/cron.log"}})
        assert job == {"id": "stamp"}
        [info] = await client.action("vm", key, "listCronJobs")
        assert info["id"] == "stamp" and info["schedule"] == "* * * * * *" and info["overlap"] == "allow"
        assert info["action"] == {"type": "exec", "command": "date >> /workspace/cron.log", "args": []}
        assert isinstance(info["nextRun"], int)
        # Live, with agentOS's shape plus ours, and a seq like every logged event.
        await eventually(lambda: any(e["event"]["type"] == "cron:complete" for e in live), 15)
        done = next(e for e in live if e["event"]["type"] == "cron:complete")
        assert done["event"]["jobId"] == "stamp" and done["event"]["id"] == "stamp"
        assert done["event"]["result"]["exitCode"] == 0 and isinstance(done["event"]["durationMs"], int)
        assert isinstance(done["seq"], int) and isinstance(done["event"]["firedAt"], int)
        await conn.close()

        # No connection now: the actor sleeps between runs and the supervisor wakes it.
        async def slept_through_three() -> bool:
            return fires_with_sleep_between(await logged(client, key), "stamp") >= 3
        await eventually(slept_through_three, 30, interval=0.5)
        assert "actor_idle_sleep" in sup.logs()

        await client.action("vm", key, "cancelCronJob", "stamp")
        cancelled_at = time.time() * 1000
        assert await client.action("vm", key, "listCronJobs") == []
        await client.action("vm", key, "cancelCronJob", "stamp")  # agentOS: no error
        # Cancelled: the scheduler fires it no more. A run it handed over before may still
        # start and end; its firedAt (the scheduler's clock, this host's) is before the cancel.
        await asyncio.sleep(2.5)
        fires = [p["event"] for n, p in await logged(client, key)
                 if n == "cronEvent" and p["event"]["type"] == "cron:fire"]
        assert len(fires) >= 3 and all(f["firedAt"] < cancelled_at for f in fires)
        lines = (await client.action("vm", key, "readFile", "/workspace/cron.log")).decode().splitlines()
        assert len(lines) >= 3


async def test_cron_job_survives_a_restart_and_a_session_job_prompts(
        make_supervisor: MakeSupervisor, tmp_state: Path) -> None:
    sup = make_supervisor("--cron-min-interval", "2")
    key = "cron-restart"
    async with Client(sup.url) as client:
        # Bad input over the wire: precise errors, and runCronJob is not the client's.
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", key, "scheduleCron", {
                "schedule": "* * * * * *", "action": {"type": "exec", "command": "true"}})
        assert info.value.code is ErrorCode.INVALID_ARGS
        assert "fires every 1s; this service allows at most one run every 2s" in info.value.message
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", key, "scheduleCron", {"schedule": "61 * * * *", "action": {}})
        assert "'61 * * * *' is not a valid cron expression" in info.value.message
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", key, "runCronJob", {"id": "x", "action": {"type": "exec", "line": "true"}}, 0)
        assert info.value.code is ErrorCode.UNKNOWN_ACTION
        await client.action("vm", key, "scheduleCron", {
            "id": "ask", "schedule": "*/2 * * * * *", "overlap": "skip",
            "action": {"type": "session", "agentType": "local",
                       "prompt": "run: echo from-cron >> /workspace/session.log",
                       "options": {"cwd": "/workspace"}}})
    sup.stop()
    sup.start()
    async with Client(sup.url) as client:
        [info] = await client.action("vm", key, "listCronJobs")
        assert info["id"] == "ask" and info["overlap"] == "skip"
        restarted_at = max((p["seq"] for _, p in await logged(client, key)), default=0)

        async def completed() -> list[dict[str, Any]]:
            return [p["event"] for n, p in await logged(client, key) if n == "cronEvent"
                    and p["event"]["type"] == "cron:complete" and p["seq"] > restarted_at]
        [first, *_] = await eventually(completed, 30, interval=0.5)
        assert first["jobId"] == "ask" and first["result"]["stopReason"] == "end_turn"
        assert "Ran `echo from-cron >> /workspace/session.log`: exit code 0." in first["result"]["text"]
        content = await client.action("vm", key, "readFile", "/workspace/session.log")
        assert b"from-cron" in content
        await client.action("vm", key, "cancelCronJob", "ask")
