"""The supervisor's cron scheduler without workers: schedules and their minimum interval,
the missed-run rule at start, agentOS's overlap modes, persistence, and bad input."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ActorvisorError, ErrorCode
from supervisor.cron import (
    CRON_FILE,
    MAX_JOBS_PER_ACTOR,
    CronScheduler,
    Schedule,
    min_interval,
    parse_schedule,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
ACTOR = "a" * 24
EXEC = {"type": "exec", "command": "true"}


@dataclass
class FakeActor:
    id: str
    name: str = "vm"
    running: bool = False


@dataclass
class FakeManager:
    """What the scheduler uses of ActorManager: runs are futures the test resolves."""

    actors_dir: Path
    runs: list[tuple[list[Any], asyncio.Future[Any]]] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def get_by_id(self, actor_id: str) -> FakeActor:
        return FakeActor(actor_id)

    def submit(self, actor: FakeActor, name: str, args: list[Any], *, internal: bool = False) -> asyncio.Future[Any]:
        assert name == "runCronJob" and internal
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.runs.append((args, fut))
        return fut

    async def reply(self, name: str, fut: asyncio.Future[Any]) -> Any:
        return await fut

    def all(self) -> list[FakeActor]:
        return [FakeActor("b" * 24, running=True)]  # one other actor is up

    def _own(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)

    def finish_all(self) -> None:
        for _, fut in self.runs:
            if not fut.done():
                fut.set_result(None)


@pytest.fixture
async def cron(tmp_path: Path) -> Any:
    manager = FakeManager(tmp_path / "actors")
    (manager.actors_dir / ACTOR).mkdir(parents=True)
    scheduler = CronScheduler(manager, 1.0)
    scheduler.start()
    yield scheduler, manager
    manager.finish_all()
    for task in manager.tasks:
        task.cancel()
    await asyncio.gather(*manager.tasks, return_exceptions=True)
    await scheduler.stop()


def invalid(fn: Any, *args: Any, code: ErrorCode = ErrorCode.INVALID_ARGS) -> str:
    with pytest.raises(ActorvisorError) as info:
        fn(*args)
    assert info.value.code is code
    return info.value.message


def test_minimum_interval_of_schedules() -> None:
    assert min_interval(Schedule("* * * * * *")) == 1
    assert min_interval(Schedule("*/5 * * * * *")) == 5
    assert min_interval(Schedule("0,59 * * * * *")) == 1  # 59 → 0 of the next minute
    assert min_interval(Schedule("* * * * *")) == 60
    assert min_interval(Schedule("*/15 * * * *")) == 900
    assert min_interval(Schedule("0 9 * * *")) == 86400
    assert min_interval(Schedule("@hourly")) == 3600
    assert "at most one run every 10s" in invalid(parse, "*/5 * * * * *", 10.0)


def parse(text: object, minimum: float = 1.0) -> Schedule:
    return parse_schedule(text, minimum=minimum, now=time.time(), what="schedule")


def test_schedule_errors_are_precise() -> None:
    assert "has 3 fields" in invalid(parse, "* * *")
    assert "not a valid cron expression" in invalid(parse, "61 * * * *")
    assert "neither a cron expression" in invalid(parse, "tomorrow")
    assert "in the past" in invalid(parse, "2001-01-01T00:00:00Z")
    assert "must be a string" in invalid(parse, 5)
    assert parse("2999-01-01T00:00:00Z").once is not None
    assert parse("0 9 * * 1-5").once is None


# Fields made of what cron syntax is made of, so most strings get past the first checks.
cron_like = st.lists(st.text(alphabet="0123456789*/,-LW#?H@ JANMONSUNdaily", min_size=1, max_size=8),
                     min_size=1, max_size=7).map(" ".join)


@FUZZ
@given(st.text(max_size=40) | cron_like)
def test_any_schedule_text_is_accepted_or_refused_precisely(text: str) -> None:
    try:
        schedule = parse(text)
    except ActorvisorError as err:
        assert err.code is ErrorCode.INVALID_ARGS and "schedule" in err.message
    else:
        assert schedule.next_after(time.time()) is not None


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["id", "schedule", "overlap", "action", "type", "command",
                                         "args", "agentType", "prompt", "options", "x"]),
                        inner, max_size=5), max_leaves=12))
def test_schedule_cron_refuses_any_malformed_options_precisely(options: Any) -> None:
    scheduler = CronScheduler(FakeManager(Path("/nonexistent")), 1.0)
    try:
        scheduler.schedule(ACTOR, options)
    except ActorvisorError as err:
        assert err.code in (ErrorCode.INVALID_ARGS, ErrorCode.INVALID_PATH)
        assert err.message.startswith("scheduleCron")
    else:
        raise AssertionError(f"accepted {options!r}")


async def test_bad_actions_and_limits(tmp_path: Path) -> None:
    manager = FakeManager(tmp_path)
    (tmp_path / ACTOR).mkdir()
    scheduler = CronScheduler(manager, 1.0)
    ok = {"schedule": "* * * * *", "action": EXEC}
    assert "overlap must be" in invalid(scheduler.schedule, ACTOR, {**ok, "overlap": "never"})
    assert "type must be 'exec' or 'session'" in invalid(scheduler.schedule, ACTOR, {**ok, "action": {"type": "callback"}})
    assert "agentType must be one of" in invalid(
        scheduler.schedule, ACTOR, {**ok, "action": {"type": "session", "agentType": "pi", "prompt": "x"}})
    assert "options.cwd '/workspace/../../etc' escapes the VM root" in invalid(
        scheduler.schedule, ACTOR, {**ok, "action": {"type": "session", "agentType": "local", "prompt": "x",
                                                     "options": {"cwd": "../../etc"}}}, code=ErrorCode.INVALID_PATH)
    assert "args must be a list" in invalid(
        scheduler.schedule, ACTOR, {**ok, "action": {**EXEC, "args": ["x"] * 5000}})
    assert "at most" in invalid(scheduler.schedule, ACTOR, {**ok, "action": {"type": "exec", "command": "x" * 200_000}})
    assert "control characters" in invalid(scheduler.schedule, ACTOR, {**ok, "id": "a\nb"})
    for i in range(MAX_JOBS_PER_ACTOR):
        await scheduler.schedule(ACTOR, {**ok, "id": f"j{i}"})
    assert "already has 64 cron jobs" in invalid(scheduler.schedule, ACTOR, {**ok, "id": "one-more"})
    await scheduler.schedule(ACTOR, {**ok, "id": "j0"})  # the same id replaces
    saved = json.loads((tmp_path / ACTOR / CRON_FILE).read_text())["jobs"]
    assert len(saved) == MAX_JOBS_PER_ACTOR


def test_missed_runs_catch_up_once_at_start(tmp_path: Path) -> None:
    """Down for three hours with an hourly job: one run at start, then the schedule."""
    actor_dir = tmp_path / ACTOR
    actor_dir.mkdir()
    hours_ago = int((time.time() - 3 * 3600) * 1000)
    (actor_dir / CRON_FILE).write_text(json.dumps({"jobs": [
        {"id": "late", "schedule": "0 * * * *", "overlap": "allow", "action": EXEC,
         "createdAt": hours_ago, "lastRun": hours_ago, "runCount": 1},
        {"id": "fresh", "schedule": "0 0 1 1 *", "overlap": "skip", "action": EXEC,
         "createdAt": int(time.time() * 1000), "lastRun": None, "runCount": 0}]}))

    async def start() -> dict[str, Any]:
        scheduler = CronScheduler(FakeManager(tmp_path), 1.0)
        scheduler.start()
        assert scheduler._task is not None
        scheduler._task.cancel()
        return {j["id"]: j for j in scheduler.local_actions()["listCronJobs"](FakeActor(ACTOR), [])}

    jobs = asyncio.run(start())
    assert jobs["late"]["nextRun"] <= time.time() * 1000  # due now: the one catch-up run
    assert jobs["fresh"]["nextRun"] > time.time() * 1000 + 3600_000


@pytest.mark.parametrize("overlap, runs", [("allow", 3), ("skip", 1), ("queue", 2)])
async def test_overlap_as_agentos_defines_it(cron: Any, overlap: str, runs: int) -> None:
    """Three fires while the first run hangs: allow runs all three, skip drops the others,
    queue keeps one and runs it once the first ends."""
    scheduler, manager = cron
    await scheduler.schedule(ACTOR, {"id": "j", "schedule": "0 0 1 1 *", "overlap": overlap, "action": EXEC})
    job = scheduler._jobs[ACTOR]["j"]
    for _ in range(3):
        scheduler._fire(ACTOR, job, time.time())
    await asyncio.sleep(0.01)
    assert len(manager.runs) == (3 if overlap == "allow" else 1)
    manager.runs[0][1].set_result(None)
    await asyncio.sleep(0.01)
    assert len(manager.runs) == runs
    assert job.run_count == runs and job.last_run is not None
    args, _ = manager.runs[0]
    assert args[0]["id"] == "j" and args[0]["action"] == {"type": "exec", "command": "true", "args": []}
    await scheduler.stop()  # a run's save is not awaited by anyone: stopping waits for it
    saved = json.loads((manager.actors_dir / ACTOR / CRON_FILE).read_text())["jobs"]
    assert saved[0]["runCount"] == runs


async def test_a_run_wakes_no_worker_past_max_running_actors(tmp_path: Path) -> None:
    manager = FakeManager(tmp_path)
    (tmp_path / ACTOR).mkdir()
    scheduler = CronScheduler(manager, 1.0, max_running=1)
    await scheduler.schedule(ACTOR, {"id": "j", "schedule": "0 0 1 1 *", "action": EXEC})
    scheduler._fire(ACTOR, scheduler._jobs[ACTOR]["j"], time.time())
    await asyncio.gather(*manager.tasks)
    assert manager.runs == []  # refused (actor.overloaded, logged), not queued
    assert scheduler._jobs[ACTOR]["j"].running == 0
