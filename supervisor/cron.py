"""Cron jobs (agentOS's `scheduleCron`, `listCronJobs`, `cancelCronJob`), owned by the supervisor.

A job must fire while its actor sleeps, so the schedule cannot live in the worker: this
module keeps every actor's jobs in one heap of next fire times, served by one asyncio task
(not one task per job). A job that is due is handed to the actor's worker as the internal
action `runCronJob` through the normal action path (`ActorManager.submit`), which wakes a
sleeping actor exactly as a client's action would; the worker runs it and logs its
`cronEvent`s, so they are durable, sequenced and broadcast like every other event. While a
run is in flight the actor counts as busy; afterwards it goes back to sleep as usual.
This module never writes an actor's event log (only its worker does) and never makes a
client's action wait for a worker: scheduling, listing and cancelling are answered here.

Jobs are kept in the actor's dir (`cron.json`, replaced whole by rename, never half
written) and loaded from every actor dir when the service starts. The file is written on
a worker thread (supervisor/filewriter.py), never on the loop, in the order the changes
were made; scheduling and cancelling are answered once their file is synced. The rule for runs missed
while the service was down (docs/agentos-parity.md, "Cron"): a job whose schedule passed at
least once since its last run (or, never run, since it was scheduled) runs once at start,
then resumes its schedule; missed runs are never replayed one by one.

Schedules are what agentOS (croner) accepts: a cron expression of 5 fields, or 6 with
seconds first, or a nickname such as `@hourly`, parsed by croniter; or an ISO 8601
timestamp, a job that runs once. `overlap` is agentOS's: `allow` (default) starts a run
even while the previous one runs, `skip` drops a fire that finds a run in flight, `queue`
keeps at most one such fire and runs it when the current run ends.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import structlog
from croniter import CroniterError, croniter

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import ActionName
from vmworker.cron import check_keys, parse_action

from .filewriter import FileWriter

log = structlog.get_logger("supervisor.cron")

CRON_FILE: Final = "cron.json"
MAX_JOBS_PER_ACTOR: Final = 64
MAX_ID_CHARS: Final = 128
MAX_SCHEDULE_CHARS: Final = 256

T = TypeVar("T")


class Actor(Protocol):
    """What the scheduler needs of an actor (supervisor.actors.Actor; not imported: actors
    imports this module)."""

    id: str

    @property
    def running(self) -> bool: ...


class ActorManager(Protocol):
    """What the scheduler needs of supervisor.actors.ActorManager."""

    @property
    def actors_dir(self) -> Path: ...

    def all(self) -> Sequence[Actor]: ...

    def get_by_id(self, actor_id: str) -> Actor: ...

    def submit(self, actor: Any, name: str, args: list[Any], *,
               internal: bool = False) -> asyncio.Future[Any]: ...

    async def reply(self, name: str, fut: asyncio.Future[Any]) -> Any: ...

    def _own(self, task: asyncio.Task[Any]) -> None: ...


class Overlap(StrEnum):
    ALLOW = "allow"
    SKIP = "skip"
    QUEUE = "queue"


def _invalid(message: str) -> ActorvisorError:
    return ActorvisorError(ErrorCode.INVALID_ARGS, message)


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


# ---- schedules -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Schedule:
    """A parsed schedule: a cron expression, or one instant (`once`, epoch seconds)."""

    text: str
    once: float | None = None

    @property
    def seconds_first(self) -> bool:
        return self.once is None and len(self.text.split()) == 6

    def next_after(self, t: float) -> float | None:
        """The first fire time strictly after `t` (epoch seconds), None when there is none."""
        if self.once is not None:
            return self.once if self.once > t else None
        it = croniter(self.text, datetime.fromtimestamp(t, UTC),
                      second_at_beginning=self.seconds_first)
        return float(it.get_next(float))


def _min_gap(values: list[Any], span: int) -> float:
    """The least distance between two consecutive values of one cron field, wrapping
    around its span; `inf` when the field has a single value."""
    if values == ["*"]:
        return 1.0
    points = sorted({int(v) for v in values if isinstance(v, int)})
    if len(points) < 2:
        return math.inf
    gaps = [b - a for a, b in itertools.pairwise(points)]
    gaps.append(span - points[-1] + points[0])
    return float(min(gaps))


def min_interval(schedule: Schedule) -> float:
    """The shortest time between two fires of `schedule`, in seconds, never overstated.

    From the expanded fields, finest first: with several seconds it is their least gap;
    else with several minutes, 60 times theirs; else with several hours, 3600 times
    theirs; coarser schedules fire at most hourly-and-more apart. Wrap-around gaps
    (59 → 0) are counted as if the next minute or hour also fired: an understatement at
    worst, so a schedule is never let through as rarer than it is.
    """
    if schedule.once is not None:
        return math.inf
    expanded = croniter(schedule.text, second_at_beginning=schedule.seconds_first).expanded
    seconds = expanded[5] if len(expanded) > 5 else [0]
    for values, span, unit in ((seconds, 60, 1.0), (expanded[0], 60, 60.0), (expanded[1], 24, 3600.0)):
        gap = _min_gap(values, span)
        if gap != math.inf:
            return gap * unit
    return 86400.0


def parse_schedule(value: object, *, minimum: float, now: float, what: str) -> Schedule:
    """Validate a schedule; every error says what was wrong with it."""
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, got {_type(value)}")
    text = value.strip()
    if not text or len(text) > MAX_SCHEDULE_CHARS:
        raise _invalid(f"{what} must be 1 to {MAX_SCHEDULE_CHARS} characters")
    if " " not in text and not text.startswith("@"):
        # agentOS's rule: no spaces, an ISO 8601 instant; a job that runs once.
        try:
            instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise _invalid(f"{what} {text!r:.80} is neither a cron expression (5 fields, or 6 "
                           "with seconds first) nor an ISO 8601 timestamp") from None
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        once = instant.timestamp()
        if once <= now:
            raise _invalid(f"{what} {text!r:.80} is in the past")
        return Schedule(text, once)
    fields = text.split()
    if not text.startswith("@") and len(fields) not in (5, 6):
        raise _invalid(f"{what} {text!r:.80} has {len(fields)} fields; a cron expression has "
                       "5 (minute hour day month weekday) or 6 (seconds first)")
    schedule = Schedule(" ".join(fields))
    try:
        gap = min_interval(schedule)
        schedule.next_after(now)
    except (CroniterError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise _invalid(f"{what} {text!r:.80} is not a valid cron expression: {exc}") from None
    if gap < minimum:
        raise _invalid(f"{what} {text!r:.80} fires every {gap:g}s; this service allows at most "
                       f"one run every {minimum:g}s (cron_min_interval)")
    return schedule


# ---- job specs -------------------------------------------------------------------------

def parse_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise _invalid(f"{what} must be a string of 1 to {MAX_ID_CHARS} characters, got {_type(value)}")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        raise _invalid(f"{what} contains control characters")
    return value


@dataclass(eq=False)
class CronJob:
    id: str
    schedule: Schedule
    overlap: Overlap
    action: dict[str, Any]
    created_at: int
    last_run: int | None = None
    run_count: int = 0
    # Not persisted:
    next_run: float | None = None
    running: int = 0
    queued: bool = False
    token: int = 0  # heap entries carrying another token are stale

    def info(self) -> dict[str, Any]:
        """agentOS's `CronJobInfo` (epoch-millisecond numbers), plus `action`, `runCount`,
        `running` as its in-process manager has them."""
        return {"id": self.id, "schedule": self.schedule.text, "overlap": self.overlap.value,
                "lastRun": self.last_run,
                "nextRun": None if self.next_run is None else round(self.next_run * 1000),
                "action": self.action, "runCount": self.run_count, "running": self.running > 0}

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "schedule": self.schedule.text, "once": self.schedule.once,
                "overlap": self.overlap.value, "action": self.action,
                "createdAt": self.created_at, "lastRun": self.last_run, "runCount": self.run_count}

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> CronJob:
        return cls(str(raw["id"]), Schedule(str(raw["schedule"]), raw.get("once")),
                   Overlap(raw.get("overlap", "allow")), dict(raw["action"]),
                   int(raw["createdAt"]), raw.get("lastRun"), int(raw.get("runCount", 0)))


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- the scheduler ---------------------------------------------------------------------

@dataclass(order=True)
class _Due:
    when: float
    order: int
    actor_id: str = field(compare=False)
    job_id: str = field(compare=False)
    token: int = field(compare=False)


class CronScheduler:
    """Every actor's cron jobs: persisted per actor, fired from one heap by one task."""

    def __init__(self, manager: ActorManager, min_interval_s: float, max_running: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self._manager = manager
        self._max_running = max_running
        self._minimum = min_interval_s
        self._clock = clock
        self._jobs: dict[str, dict[str, CronJob]] = {}
        self._heap: list[_Due] = []
        self._order = itertools.count()
        self._tokens = itertools.count(1)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer = FileWriter("cron-save")

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Load every actor's jobs, catch up on missed runs, and start serving the heap."""
        now = self._clock()
        root = self._manager.actors_dir
        for path in sorted(root.glob(f"*/{CRON_FILE}")) if root.is_dir() else []:
            actor_id = path.parent.name
            try:
                records = json.loads(path.read_text())["jobs"]
                jobs = [CronJob.from_record(r) for r in records]
                for job in jobs:
                    since = (job.last_run if job.last_run is not None else job.created_at) / 1000
                    missed = job.schedule.next_after(since)
                    if missed is not None and missed <= now:
                        log.info("cron_catch_up", actor=actor_id, job=job.id, missed_at=missed)
                        missed = now
                    self._jobs.setdefault(actor_id, {})[job.id] = job
                    self._plan(actor_id, job, missed)
            except (OSError, ValueError, KeyError, TypeError, CroniterError) as exc:
                # One actor's damaged file must not keep every other actor's jobs from running.
                log.error("cron_file_unreadable", actor=actor_id, path=str(path), error=str(exc))
        loaded = sum(len(j) for j in self._jobs.values())
        if loaded:
            log.info("cron_loaded", jobs=loaded, actors=len(self._jobs))
        self._task = asyncio.create_task(self._serve(), name="cron")
        self._manager._own(self._task)

    async def forget(self, actor_id: str) -> None:
        """The actor is destroyed: its jobs go with its dir, once no save of theirs is
        queued (one landing after the dir is removed would leave a dir behind)."""
        for job in self._jobs.pop(actor_id, {}).values():
            job.token = 0
        await self._writer.drain()

    async def stop(self) -> None:
        """Stop firing and wait for every queued save of the cron files."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._writer.drain()

    # ---- actions -------------------------------------------------------------------

    def local_actions(self) -> dict[str, Callable[[Actor, list[Any]], Any]]:
        """The cron actions, answered by the supervisor (`ActorManager.local_actions`)."""
        return {ActionName.SCHEDULE_CRON: self._schedule_action,
                ActionName.LIST_CRON_JOBS: self._list_action,
                ActionName.CANCEL_CRON_JOB: self._cancel_action}

    def _schedule_action(self, actor: Actor, args: list[Any]) -> Awaitable[dict[str, str]]:
        if len(args) != 1:
            raise _invalid(f"scheduleCron takes 1 argument (options), got {len(args)}")
        return self.schedule(actor.id, args[0])

    def _list_action(self, actor: Actor, args: list[Any]) -> list[dict[str, Any]]:
        if args:
            raise _invalid(f"listCronJobs takes no arguments, got {len(args)}")
        return [job.info() for job in self._jobs.get(actor.id, {}).values()]

    def _cancel_action(self, actor: Actor, args: list[Any]) -> Awaitable[None]:
        if len(args) != 1:
            raise _invalid(f"cancelCronJob takes 1 argument (id), got {len(args)}")
        return self.cancel(actor.id, parse_id(args[0], "cancelCronJob: argument 1 (id)"))

    def schedule(self, actor_id: str, options: object) -> Awaitable[dict[str, str]]:
        """Check and schedule the job at once (it is listed and planned on return); the
        awaitable gives the reply once the actor's cron file is synced."""
        what = "scheduleCron: argument 1 (options)"
        if not isinstance(options, dict):
            raise _invalid(f"{what} must be an object, got {_type(options)}")
        check_keys(options, ("id", "schedule", "overlap", "action"), what)
        job_id = (parse_id(options["id"], f"{what}.id") if options.get("id") is not None
                  else str(uuid.uuid4()))
        now = self._clock()
        schedule = parse_schedule(options.get("schedule"), minimum=self._minimum, now=now,
                                  what=f"{what}.schedule")
        overlap_raw = options.get("overlap") or Overlap.ALLOW.value
        if overlap_raw not in {o.value for o in Overlap}:
            raise _invalid(f"{what}.overlap must be 'allow', 'skip' or 'queue', got {overlap_raw!r:.80}")
        action = parse_action(options.get("action"), f"{what}.action")
        jobs = self._jobs.setdefault(actor_id, {})
        if job_id not in jobs and len(jobs) >= MAX_JOBS_PER_ACTOR:
            raise _invalid(f"scheduleCron: this actor already has {len(jobs)} cron jobs, the most "
                           "it may have; cancel one first")
        old = jobs.get(job_id)
        if old is not None:  # the same id again replaces the job
            old.token = 0
        job = CronJob(job_id, schedule, Overlap(overlap_raw), action, _now_ms())
        jobs[job_id] = job
        self._plan(actor_id, job, schedule.next_after(now))
        saved = self._save(actor_id, durable=True)
        log.info("cron_scheduled", actor=actor_id, job=job_id, schedule=schedule.text,
                 overlap=job.overlap.value, action=action["type"])
        return _once_saved(saved, {"id": job_id})

    def cancel(self, actor_id: str, job_id: str) -> Awaitable[None]:
        """agentOS's `cancelCronJob`: an unknown id is no error. A run in flight finishes.
        The job is gone at once; the awaitable is done once the cron file is synced."""
        job = self._jobs.get(actor_id, {}).pop(job_id, None)
        if job is None:
            return _once_saved(None, None)
        job.token = 0
        job.queued = False
        saved = self._save(actor_id, durable=True)
        log.info("cron_cancelled", actor=actor_id, job=job_id)
        return _once_saved(saved, None)

    # ---- firing --------------------------------------------------------------------

    def _plan(self, actor_id: str, job: CronJob, when: float | None) -> None:
        job.next_run = when
        job.token = next(self._tokens)
        if when is not None:
            heapq.heappush(self._heap, _Due(when, next(self._order), actor_id, job.id, job.token))
            self._changed.set()

    def _live(self, due: _Due) -> CronJob | None:
        job = self._jobs.get(due.actor_id, {}).get(due.job_id)
        return job if job is not None and job.token == due.token else None

    async def _serve(self) -> None:
        while True:
            self._changed.clear()
            while self._heap and self._live(self._heap[0]) is None:
                heapq.heappop(self._heap)
            delay = None if not self._heap else self._heap[0].when - self._clock()
            if delay is None or delay > 0:
                try:  # asyncio.timeout: wait_for on 3.11 can drop a cancel (vmworker/vm.py)
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                except TimeoutError:
                    pass
                continue
            due = heapq.heappop(self._heap)
            job = self._live(due)
            if job is None:
                continue
            try:
                self._fire(due.actor_id, job, due.when)
            except Exception:
                # This task serves every actor's jobs: one job's surprise must not end it.
                log.exception("cron_fire_failed", actor=due.actor_id, job=job.id)

    def _fire(self, actor_id: str, job: CronJob, when: float) -> None:
        now = self._clock()
        if job.schedule.once is not None:
            self._jobs.get(actor_id, {}).pop(job.id, None)
            job.next_run = None
        else:
            # Never behind: after a stall the next fire is the next one from now.
            self._plan(actor_id, job, job.schedule.next_after(max(now, when)))
        if job.running:
            if job.overlap is Overlap.SKIP:
                log.info("cron_skipped_overlap", actor=actor_id, job=job.id)
                return
            if job.overlap is Overlap.QUEUE:
                job.queued = True
                return
        self._start_run(actor_id, job)

    def _start_run(self, actor_id: str, job: CronJob) -> None:
        job.running += 1
        job.last_run = _now_ms()
        job.run_count += 1
        self._save(actor_id)
        task = asyncio.create_task(self._run(actor_id, job), name=f"cron-{actor_id}-{job.id}")
        self._manager._own(task)

    async def _run(self, actor_id: str, job: CronJob) -> None:
        spec = {"id": job.id, "schedule": job.schedule.text, "action": job.action}
        try:
            actor = self._manager.get_by_id(actor_id)
            self._admit(actor)
            fut = self._manager.submit(actor, ActionName.RUN_CRON_JOB, [spec, job.last_run],
                                       internal=True)
            await self._manager.reply(ActionName.RUN_CRON_JOB, fut)
        except ActorvisorError as err:
            log.warning("cron_run_failed", actor=actor_id, job=job.id, code=err.code.value,
                        error=err.message)
        finally:
            job.running -= 1
            if job.queued and self._jobs.get(actor_id, {}).get(job.id) is job:
                job.queued = False
                self._start_run(actor_id, job)

    def _admit(self, actor: Actor) -> None:
        """A cron run wakes no worker past `max_running_actors`, as a client's call would not."""
        if not self._max_running or actor.running:
            return
        running = sum(1 for a in self._manager.all() if a.running)
        if running >= self._max_running:
            raise ActorvisorError(ErrorCode.OVERLOADED,
                                  f"{running} actors are running, the most this service runs at once")

    # ---- persistence ---------------------------------------------------------------

    def _save(self, actor_id: str, *, durable: bool = False) -> asyncio.Future[None]:
        """Queue the replacement of the actor's cron file with its jobs as they are now.

        The snapshot is taken here, on the loop; the writer thread writes the snapshots in
        the order they were taken, so the file ends as the jobs in memory are. `durable`
        (scheduling and cancelling) also syncs it to disk before the future is done, and
        the action is answered only then; a run's bookkeeping (`lastRun`, `runCount`) is
        not synced, so after a power loss a job may run one catch-up run more, never one less.
        """
        jobs = self._jobs.get(actor_id, {})
        text = json.dumps({"jobs": [j.record() for j in jobs.values()]}) if jobs else None
        path = self._manager.actors_dir / actor_id / CRON_FILE
        return self._writer.submit(lambda: _write_cron_file(path, text, durable=durable))


async def _once_saved(saved: Awaitable[None] | None, reply: T) -> T:
    if saved is not None:
        await saved
    return reply


def _write_cron_file(path: Path, text: str | None, *, durable: bool) -> None:
    """Replace `path` with `text` (remove it for None): a crash leaves the old one or the
    new one. Runs on the writer's thread."""
    partial = path.with_suffix(".tmp")
    try:
        if text is None:
            path.unlink(missing_ok=True)
        else:
            with partial.open("w") as fh:
                fh.write(text)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            partial.replace(path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        # The jobs stay scheduled in memory; only a restart would lose them.
        log.error("cron_save_failed", actor=path.parent.name, path=str(path), error=str(exc))
