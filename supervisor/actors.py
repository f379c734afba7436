"""Actors: the registry and the one state machine that decides when workers run.

Every state change goes through `Actor.transition`, which refuses any change that is not
in `TRANSITIONS`, and every worker exit through `ActorManager._watch`, which reaps the
child. Actions are handed to a worker the moment it has said `hello`; before that they
wait in a bounded queue, so nothing here ever awaits a worker on behalf of a connection
being opened.

    stopped ──spawn──▶ spawning ──hello──▶ booting ──phase ready──▶ ready
       ▲                   │                  │  └──phase failed──▶ boot_failed
       │                   │                  │                       │
       │                   └──────exit────────┴──────────exit─────────┴──▶ crashed
       └─────────────── stopping ◀── sleep / shutdown                       │
                                                                restart budget spent
                                                                            ▼
                                                                          failed

A `boot_failed` actor's worker is alive and answers (its VM actions with
`actor.failed`); it sleeps when idle like any other, and its next start boots again.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import structlog

from protocol import worker as wire
from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import ACTOR_KINDS, ActionName, ShutdownReason, WorkerPhase
from vmworker import vmroot
from vmworker.eventlog import append_for_dead_worker, log_path

from . import liveness, metrics
from .config import Config
from .cron import CronScheduler
from .relay import ActorRelay
from .spawner import Spawner, WorkerProcess, WorkerSpec

log = structlog.get_logger("supervisor.actors")

MAX_KEY_BYTES = 512


class ActorState(StrEnum):
    STOPPED = "stopped"
    SPAWNING = "spawning"
    BOOTING = "booting"
    READY = "ready"
    BOOT_FAILED = "boot_failed"
    STOPPING = "stopping"
    CRASHED = "crashed"
    FAILED = "failed"


_S = ActorState
# Every state change the manager may make, and no other (the table is the spec: a
# change missing here is a bug, and `Actor.transition` says which one).
TRANSITIONS: Final[Mapping[ActorState, frozenset[ActorState]]] = {
    _S.STOPPED: frozenset({_S.SPAWNING}),
    # STOPPED: stopped before its worker process existed.
    _S.SPAWNING: frozenset({_S.BOOTING, _S.STOPPING, _S.STOPPED, _S.CRASHED, _S.FAILED}),
    _S.BOOTING: frozenset({_S.READY, _S.BOOT_FAILED, _S.STOPPING, _S.CRASHED, _S.FAILED}),
    _S.READY: frozenset({_S.STOPPING, _S.CRASHED, _S.FAILED}),
    _S.BOOT_FAILED: frozenset({_S.STOPPING, _S.CRASHED, _S.FAILED}),
    _S.STOPPING: frozenset({_S.STOPPED}),
    _S.CRASHED: frozenset({_S.SPAWNING, _S.STOPPED}),
    # STOPPED: reset by an operator.
    _S.FAILED: frozenset({_S.STOPPED}),
}
RUNNING: Final = frozenset({_S.SPAWNING, _S.BOOTING, _S.READY, _S.BOOT_FAILED, _S.STOPPING})
"""States in which a worker process exists or is being started."""


class IllegalTransition(RuntimeError):
    """A state change that is not in TRANSITIONS: a bug in the manager, never the client's."""


def actor_id_for(name: str, key: str) -> str:
    """Actor ids are derived from name + key, so they survive a supervisor restart."""
    return hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()[:24]


def validate_key(key: str) -> None:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ActorvisorError(ErrorCode.INVALID_KEY, f"actor key is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in key):
        raise ActorvisorError(ErrorCode.INVALID_KEY, "actor key contains control characters")


def validate_name(name: str) -> None:
    if name not in ACTOR_KINDS:
        kinds = ", ".join(sorted(ACTOR_KINDS))
        # Not `not_found`: the RivetKit client retries that one for seconds, in case the
        # actor is being created; a kind that does not exist never will.
        raise ActorvisorError(ErrorCode.UNKNOWN_KIND,
                              f"no actor kind named {name[:64]!r}; this service hosts: {kinds}")


@dataclass(eq=False)
class Actor:
    id: str
    name: str
    key: str
    dir: Path
    relay: ActorRelay
    created_at: float = field(default_factory=time.time)
    state: ActorState = ActorState.STOPPED
    phase: str | None = None
    proc: WorkerProcess | None = None
    hello: bool = False
    run_from: int | None = None  # the log's last seq in the running worker's hello
    generation: int = 0
    restarts: deque[float] = field(default_factory=deque)
    pending: deque[wire.Action] = field(default_factory=deque)
    inflight: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    connections: set[Any] = field(default_factory=set)
    started_at: float | None = None
    # When the hub reported the worker's connection dropped (no answer to libzmq's pings
    # for the hang timeout) and no new one since: a suspicion that `tick` settles.
    link_lost_at: float | None = None
    # While a suspect (no hello yet, or its link lost): since when, and from what run time
    # of its threads, a whole window without running would make it hung (`_hung`).
    progress: tuple[float, int] | None = None
    stop_reason: ShutdownReason | None = None
    kill_reason: ShutdownReason | None = None
    exit_task: asyncio.Task[None] | None = None
    idle_since: float | None = None
    # Set while nothing about a past worker is still being recorded: a new worker of
    # this actor may open the event log only then.
    quiet: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.quiet.set()

    def transition(self, new: ActorState, **why: Any) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            allowed = ", ".join(sorted(TRANSITIONS[self.state]))
            log.error("actor_state_illegal", actor=self.id, old=self.state.value, new=new.value,
                      allowed=allowed, **why)
            raise IllegalTransition(f"actor {self.id}: {self.state.value} -> {new.value} is not "
                                    f"a legal transition (from {self.state.value}: {allowed})")
        log.info("actor_state", actor=self.id, key=self.key, old=self.state.value,
                 new=new.value, **why)
        self.state = new

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def describe(self) -> dict[str, Any]:
        return {
            "actorId": self.id,
            "name": self.name,
            "key": self.key,
            "state": self.state.value,
            "phase": self.phase,
            "pid": self.proc.pid if self.proc else None,
            "generation": self.generation,
            "restarts": len(self.restarts),
            "connections": len(self.connections),
            "subscribers": self.relay.subscriber_count(),
            "pendingActions": len(self.pending),
            "inflightActions": len(self.inflight),
            "eventsSeq": self.relay.last_seq,
            "eventsRelayed": self.relay.events_relayed,
            "uptimeMs": int((time.monotonic() - self.started_at) * 1000) if self.started_at and self.running else 0,
            # Age of the last liveness evidence: 0 while libzmq's heartbeat holds the
            # worker's connection, the time since it dropped otherwise.
            "lastHeartbeatAgeMs": (None if not self.hello else 0 if self.link_lost_at is None
                                   else int((time.monotonic() - self.link_lost_at) * 1000)),
        }


class ActorManager:
    def __init__(self, config: Config, spawner: Spawner, endpoint: str,
                 send: Callable[[str, wire.SupervisorToWorker], bool],
                 input_pending: Callable[[], bool] = lambda: False,
                 probe: Callable[[int], liveness.Probe | None] = liveness.probe) -> None:
        self._config = config
        self._input_pending = input_pending
        self._probe = probe
        self._spawner = spawner
        self._endpoint = endpoint
        self._send = send
        self._actors: dict[str, Actor] = {}
        self._by_pid: dict[int, Actor] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = True
        self.actions_total = 0
        # Every VM's limits and identity range, completed for this host (VmSettings.to_arg).
        self.vm_settings = ""
        # Actions the supervisor answers itself, without the worker (preview URLs). One
        # returns its reply, or an awaitable of it when it must write to disk first (off
        # the loop); its effect in memory is immediate either way.
        self.local_actions: dict[str, Callable[[Actor, list[Any]], Any]] = {}
        # Cron jobs of every actor, answered here too; started by the supervisor (`cron.start()`).
        self.cron = CronScheduler(self, config.cron_min_interval, config.max_running_actors)
        self.local_actions.update(self.cron.local_actions())

    # ---- registry ------------------------------------------------------------------

    @property
    def actors_dir(self) -> Path:
        return self._config.state_dir / "actors"

    def all(self) -> list[Actor]:
        return list(self._actors.values())

    def count_by_state(self) -> dict[str, int]:
        """How many known actors are in each state: every state, zeros included, in the
        order they are declared. The one count behind the metrics, the systemd status
        line and `/admin/workers`."""
        counts = {state.value: 0 for state in ActorState}
        for actor in self._actors.values():
            counts[actor.state.value] += 1
        return counts

    def get_or_create(self, name: str, key: str, *, create: bool = True) -> Actor:
        validate_name(name)
        validate_key(key)
        actor_id = actor_id_for(name, key)
        actor = self._actors.get(actor_id)
        if actor is not None:
            return actor
        actor_dir = self.actors_dir / actor_id
        meta = actor_dir / "meta.json"
        if not meta.exists():
            if not create:
                raise ActorvisorError(ErrorCode.ACTOR_NOT_FOUND,
                                      f"no {name} actor with key {key[:64]!r}")
            actor_dir.mkdir(parents=True, exist_ok=True)
            # Written whole or not at all: a crash here must not leave an actor unreadable.
            partial = meta.with_suffix(".tmp")
            partial.write_text(json.dumps({"name": name, "key": key, "createdAt": time.time()}))
            partial.replace(meta)
        return self._register(actor_id, name, key, actor_dir)

    def exists(self, name: str, key: str) -> bool:
        validate_name(name)
        validate_key(key)
        actor_id = actor_id_for(name, key)
        return actor_id in self._actors or (self.actors_dir / actor_id / "meta.json").exists()

    def get_by_id(self, actor_id: str) -> Actor:
        actor = self._actors.get(actor_id)
        if actor is not None:
            return actor
        if not (len(actor_id) == 24 and all(c in "0123456789abcdef" for c in actor_id)):
            raise ActorvisorError(ErrorCode.ACTOR_NOT_FOUND, f"no actor with id {actor_id[:64]!r}")
        actor_dir = self.actors_dir / actor_id
        try:
            meta = json.loads((actor_dir / "meta.json").read_text())
        except (OSError, ValueError):
            raise ActorvisorError(ErrorCode.ACTOR_NOT_FOUND, f"no actor with id {actor_id!r}") from None
        return self._register(actor_id, meta["name"], meta["key"], actor_dir)

    def _register(self, actor_id: str, name: str, key: str, actor_dir: Path) -> Actor:
        relay = ActorRelay(actor_id, log_path(actor_dir), self._config.ring_size)
        actor = Actor(actor_id, name, key, actor_dir, relay)
        self._actors[actor_id] = actor
        return actor

    # ---- actions -------------------------------------------------------------------

    def submit(self, actor: Actor, name: str, args: list[Any], *,
               internal: bool = False) -> asyncio.Future[Any]:
        """Hand an action to the actor's worker now, or queue it until its `hello`.

        Synchronous on purpose: the caller's message order is the order actions reach
        the worker. Returns a future for the reply. `runCronJob` is the cron scheduler's
        own (`internal`), never a client's.
        """
        try:
            ActionName(name)
            if name == ActionName.RUN_CRON_JOB and not internal:
                raise ValueError(name)
        except ValueError:
            raise ActorvisorError(ErrorCode.UNKNOWN_ACTION,
                                  f"the {actor.name} actor has no action {name[:64]!r}") from None
        if (local := self.local_actions.get(name)) is not None:
            answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            try:
                result = local(actor, list(args))
            except ActorvisorError as err:
                answered.set_exception(err)
            else:
                if inspect.isawaitable(result):
                    answered = asyncio.ensure_future(result)
                else:
                    answered.set_result(result)
            self.actions_total += 1
            return answered
        if actor.state is ActorState.FAILED:
            raise ActorvisorError(ErrorCode.FAILED,
                                  f"actor {actor.id} crashed more than {self._config.restart_intensity} "
                                  f"times within {self._config.restart_period:.0f}s and is marked failed; "
                                  f"reset it (POST /admin/actors/{actor.id}/reset) or restart the service")
        if not self.accepting:
            raise ActorvisorError(ErrorCode.STOPPED, "the service is shutting down; retry shortly")
        action = wire.Action(next(self._ids), name, list(args))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if actor.hello and actor.state in (ActorState.BOOTING, ActorState.READY, ActorState.BOOT_FAILED):
            if not self._send(actor.id, action):
                raise ActorvisorError(ErrorCode.OVERLOADED, "the actor's worker is not accepting messages")
        else:
            if len(actor.pending) >= self._config.max_pending_actions:
                raise ActorvisorError(ErrorCode.OVERLOADED,
                                      f"{len(actor.pending)} actions already wait for this actor to start")
            actor.pending.append(action)
            self.ensure_running(actor)
        actor.inflight[action.id] = fut
        fut.add_done_callback(metrics.action_observer(name))
        self.actions_total += 1
        return fut

    async def call(self, actor: Actor, name: str, args: list[Any]) -> Any:
        return await self.reply(name, self.submit(actor, name, args))

    async def reply(self, name: str, fut: asyncio.Future[Any]) -> Any:
        """An action's reply, or `actor.action_timeout` after `action_timeout` seconds:
        the one wait policy of every transport (HTTP and WebSocket alike). The action's
        own future is left to the worker's late reply or its exit."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self._config.action_timeout)
        except TimeoutError:
            raise ActorvisorError(ErrorCode.ACTION_TIMEOUT,
                                  f"{name} got no reply within {self._config.action_timeout:g}s") from None

    # ---- lifecycle -----------------------------------------------------------------

    def ensure_running(self, actor: Actor) -> None:
        """Start the actor's worker if it is not running. Never waits for it."""
        if actor.running or actor.state is ActorState.FAILED or not self.accepting:
            return
        actor.transition(ActorState.SPAWNING)
        actor.hello = False
        actor.run_from = None
        actor.stop_reason = None
        self._own(asyncio.create_task(self._spawn(actor), name=f"spawn-{actor.id}"))

    async def _spawn(self, actor: Actor) -> None:
        await actor.quiet.wait()
        if actor.restarts:
            # Jittered backoff, growing with the crashes in the current window.
            await asyncio.sleep(min(2.0, 0.025 * 2 ** len(actor.restarts)) * random.uniform(0.5, 1.0))
        if actor.state is not ActorState.SPAWNING:
            return
        limits = {}
        if self._config.worker_memory_mb:
            limits["memory_mb"] = self._config.worker_memory_mb
        if self._config.worker_open_files:
            limits["open_files"] = self._config.worker_open_files
        spec = WorkerSpec(
            actor_id=actor.id, actor_name=actor.name, actor_key=actor.key,
            endpoint=self._endpoint, state_dir=self._config.state_dir.resolve(),
            boot_delay=self._config.boot_delay, generation=actor.generation,
            supervisor_pid=os.getpid(), log_level=self._config.log_level,
            limits=limits, vm_settings=self.vm_settings,
            permission_policy=self._config.permission_policy,
        )
        try:
            proc = await self._spawner.spawn(spec)
        except OSError as exc:
            log.error("worker_spawn_failed", actor=actor.id, error=str(exc))
            self._fail_inflight(actor, ActorvisorError(ErrorCode.INTERNAL, f"could not start the worker: {exc}"))
            if actor.state is ActorState.SPAWNING:
                actor.transition(ActorState.CRASHED, error=str(exc))
            return
        # Its hello may have come first (the zygote's answer and the worker's hello race):
        # then the actor is booting or further on, and this process is that worker.
        adoptable = (ActorState.SPAWNING, ActorState.BOOTING, ActorState.READY, ActorState.BOOT_FAILED)
        if actor.state not in adoptable or actor.proc is not None:
            # Stopped while its process was being started: that process is no one's
            # worker. It drains as if told to sleep (it may have opened the log), and
            # is reaped here.
            log.info("worker_spawned_after_stop", actor=actor.id, pid=proc.pid, state=actor.state.value)
            proc.signal_group(signal.SIGTERM)
            self._own(asyncio.create_task(proc.wait(), name=f"reap-{actor.id}"))
            return
        actor.proc = proc
        self._by_pid[proc.pid] = actor
        actor.kill_reason = None
        actor.started_at = time.monotonic()
        actor.link_lost_at = None
        actor.progress = (actor.started_at, 0)  # a new process has run for 0 ns
        log.info("worker_spawned", actor=actor.id, pid=proc.pid, generation=actor.generation)
        actor.exit_task = asyncio.create_task(self._watch(actor, proc), name=f"watch-{actor.id}")
        self._own(actor.exit_task)

    async def _watch(self, actor: Actor, proc: WorkerProcess) -> None:
        status = await proc.wait()
        if self._by_pid.get(proc.pid) is actor:
            del self._by_pid[proc.pid]
        if actor.proc is not proc:
            return
        # The worker led its own process group: take anything it left behind with it.
        proc.signal_group(signal.SIGKILL)
        actor.proc = None
        actor.hello = False
        run_from, actor.run_from = actor.run_from, None
        actor.phase = None
        if actor.state is ActorState.STOPPING:
            # Actions that arrived while it was going to sleep never reached it: they
            # wake it again. Those it had been given were answered or cancelled by it.
            waiting = list(actor.pending) if actor.stop_reason is ShutdownReason.SLEEP else []
            self._fail_inflight(actor, ActorvisorError(ErrorCode.STOPPED, "the actor was stopped"),
                                keep={a.id for a in waiting})
            actor.transition(ActorState.STOPPED, status=status, reason=actor.stop_reason)
            # A sleeping actor keeps no recent events in memory: cursors read its log.
            actor.relay.ring.clear()
            if waiting and self.accepting:
                actor.pending.extend(waiting)
                self.ensure_running(actor)
            return
        reason = actor.kill_reason or ShutdownReason.CRASH
        log.warning("worker_exited", actor=actor.id, pid=proc.pid, status=status, reason=reason.value)
        self._fail_inflight(actor, ActorvisorError(
            ErrorCode.WORKER_CRASHED,
            f"the actor's worker process {'hung and was killed' if reason is ShutdownReason.HANG else 'exited unexpectedly'}"
            f" (status {status}); the next action starts it again"))
        now = time.monotonic()
        actor.restarts.append(now)
        metrics.RESTARTS.labels(reason.value).inc()
        while actor.restarts and now - actor.restarts[0] > self._config.restart_period:
            actor.restarts.popleft()
        actor.generation += 1
        if len(actor.restarts) > self._config.restart_intensity:
            actor.transition(ActorState.FAILED, status=status, restarts=len(actor.restarts))
        else:
            actor.transition(ActorState.CRASHED, status=status, reason=reason.value)
        if status in wire.NOTHING_TO_RECORD:
            return  # it logged its vmShutdown itself, or never opened the log
        actor.quiet.clear()
        try:
            await self._record_shutdown(actor, reason, run_from)
        finally:
            actor.quiet.set()

    async def _record_shutdown(self, actor: Actor, reason: ShutdownReason, run_from: int | None) -> None:
        """Write `vmShutdown` for a worker that could not, then relay it.

        The worker is reaped, and no new one starts until this returns, so the event log
        still has exactly one writer.
        """
        try:
            record = await asyncio.to_thread(append_for_dead_worker, log_path(actor.dir),
                                             reason.value, run_from)
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            log.error("shutdown_record_failed", actor=actor.id, error=str(exc))
            return
        if record is None:
            return  # the run had logged its own
        if actor.relay.last_seq is None or record.seq > actor.relay.last_seq:
            actor.relay.publish(record.seq, record.payload["epoch"], record.name, record.payload)

    def _fail_inflight(self, actor: Actor, error: ActorvisorError, keep: Collection[int] = ()) -> None:
        actor.pending.clear()
        for action_id, fut in list(actor.inflight.items()):
            if action_id in keep:
                continue
            if not fut.done():
                fut.set_exception(error)
            del actor.inflight[action_id]

    # ---- worker messages -----------------------------------------------------------

    def on_worker_message(self, actor_id: str, msg: wire.WorkerToSupervisor) -> None:
        actor = self._actors.get(actor_id)
        # A worker may speak before its spawner has reported its pid (the zygote's answer
        # and the worker's hello race): while spawning, and from its hello on, its
        # messages are the new worker's (a reply dropped here is an action waiting forever).
        # A durable event is relayed whoever sent it: it is committed, and the relay
        # drops what it already relayed.
        expected = actor is not None and (actor.proc is not None or actor.hello
                                          or actor.state is ActorState.SPAWNING
                                          or isinstance(msg, wire.WorkerEvent))
        if actor is None or not expected:
            log.warning("worker_message_from_unknown", actor=actor_id, type=type(msg).__name__)
            return
        match msg:
            case wire.Hello():
                self._on_hello(actor, msg)
            case wire.Phase():
                actor.phase = msg.phase
                if msg.phase == WorkerPhase.FAILED:
                    log.error("vm_boot_failed", actor=actor.id, **msg.detail)
                    if actor.state is ActorState.BOOTING:
                        actor.transition(ActorState.BOOT_FAILED, **msg.detail)
                if msg.phase == WorkerPhase.READY and actor.state is ActorState.BOOTING:
                    actor.transition(ActorState.READY, **msg.detail)
            case wire.WorkerEvent():
                actor.relay.publish(msg.seq, msg.epoch, msg.name, msg.payload, msg.raw)
            case wire.Reply():
                fut = actor.inflight.pop(msg.id, None)
                if fut is None or fut.done():
                    return
                if msg.ok:
                    fut.set_result(msg.value)
                else:
                    assert msg.error is not None
                    fut.set_exception(msg.error)

    def on_worker_link(self, pid: int, up: bool) -> None:
        """The hub saw a worker's connection accepted or dropped (supervisor/hub.py).

        A drop is only a suspicion: after a stall of ours, libzmq may drop a connection
        whose pong it had not read yet, and the worker (alive) reconnects at once. `tick`
        settles it; a new connection from the same process clears it.
        """
        actor = self._by_pid.get(pid)
        if actor is None or actor.proc is None or actor.proc.pid != pid:
            return
        if up:
            if actor.link_lost_at is not None:
                log.info("worker_link_restored", actor=actor.id, pid=pid,
                         after_s=round(time.monotonic() - actor.link_lost_at, 1))
            actor.link_lost_at = None
        elif actor.state is not ActorState.STOPPING:
            actor.link_lost_at = time.monotonic()
            seen = self._probe(pid)
            actor.progress = (actor.link_lost_at, seen.ran_ns if seen is not None else 0)
            log.warning("worker_link_lost", actor=actor.id, pid=pid)

    def _on_hello(self, actor: Actor, hello: wire.Hello) -> None:
        if actor.proc is not None and hello.pid != actor.proc.pid:
            log.warning("worker_hello_pid_mismatch", actor=actor.id, pid=hello.pid)
        actor.hello = True
        actor.run_from = hello.last_seq
        actor.relay.on_worker_hello(hello.epoch, hello.last_seq)
        if actor.state is ActorState.SPAWNING:
            actor.transition(ActorState.BOOTING, pid=hello.pid)
        while actor.pending:
            action = actor.pending.popleft()
            if not self._send(actor.id, action):
                fut = actor.inflight.pop(action.id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ActorvisorError(ErrorCode.OVERLOADED,
                                                      "the actor's worker is not accepting messages"))

    def tick(self) -> None:
        """Once per heartbeat interval: catch hangs, sleep idle actors. Sends nothing."""
        now = time.monotonic()
        # Unread worker frames or link events: our loop is behind, and what we believe
        # about a worker's connection may already be stale.
        judge_silence = not self._input_pending()
        for actor in self._actors.values():
            proc = actor.proc
            if proc is None or actor.state is ActorState.STOPPING:
                actor.idle_since = None
                continue
            since = actor.link_lost_at if actor.hello else actor.started_at
            if judge_silence and since is not None and self._hung(actor, proc.pid, since, now):
                log.error("worker_hung" if actor.hello else "worker_silent_at_start",
                          actor=actor.id, pid=proc.pid, suspect_s=round(now - since, 1))
                actor.kill_reason = ShutdownReason.HANG
                proc.signal_group(signal.SIGKILL)
                continue
            if actor.connections or actor.inflight or actor.pending or actor.relay.has_catch_up():
                actor.idle_since = None
            elif actor.idle_since is None:
                actor.idle_since = now
            elif now - actor.idle_since >= self._config.sleep_after:
                log.info("actor_idle_sleep", actor=actor.id, idle_s=round(now - actor.idle_since))
                actor.idle_since = None
                self.stop(actor, ShutdownReason.SLEEP)

    def _hung(self, actor: Actor, pid: int, since: float, now: float) -> bool:
        """Is a suspect hung — a worker silent since its start, or whose connection dropped
        at `since`? Yes if the kernel says it is stopped (SIGSTOP, a debugger), or if a
        whole window (`hello_timeout`, or the hang timeout after a drop) passed in which
        none of its threads ran. One that ran is late, not hung (a machine starved by a
        boot storm makes healthy workers later than any timeout): it gets another window,
        up to MAX_SUSPECT_WINDOWS from `since`, after which a process that runs but still
        cannot say hello or reconnect is replaced (docs/delivery.md, "Liveness")."""
        window = self._config.hang_timeout if actor.hello else self._config.hello_timeout
        mark_at, mark_ran = actor.progress or (since, 0)
        overdue = now - mark_at > window
        if not overdue and not actor.hello:
            return False  # a start is not probed before its window is out
        seen = self._probe(pid)
        if seen is None:
            return False  # gone: its exit is being reaped
        if seen.stopped:
            return True
        if not overdue:
            return False
        if seen.ran_ns > mark_ran and now - since < liveness.MAX_SUSPECT_WINDOWS * window:
            log.warning("worker_late", actor=actor.id, pid=pid, suspect_s=round(now - since, 1),
                        ran_ms=round((seen.ran_ns - mark_ran) / 1e6, 1))
            actor.progress = (now, seen.ran_ns)
            return False
        return True

    def reset(self, actor: Actor) -> None:
        """Clear a failed actor's crash history; its next action starts it again."""
        actor.restarts.clear()
        if actor.state is ActorState.FAILED:
            actor.transition(ActorState.STOPPED, reason="reset")

    # ---- stopping ------------------------------------------------------------------

    def stop(self, actor: Actor, reason: ShutdownReason) -> None:
        if actor.proc is None:
            if actor.state is not ActorState.FAILED:
                actor.transition(ActorState.STOPPED, reason=reason)
            return
        actor.stop_reason = reason
        actor.transition(ActorState.STOPPING, reason=reason)
        msg = wire.Shutdown() if reason is ShutdownReason.DESTROY else wire.Sleep()
        if not (actor.hello and self._send(actor.id, msg)):
            actor.proc.signal_group(signal.SIGTERM)

    async def destroy(self, actor: Actor) -> None:
        """Stop the worker for good, close its connections, delete its state."""
        self.stop(actor, ShutdownReason.DESTROY)
        if actor.exit_task is not None:
            await asyncio.wait([actor.exit_task], timeout=10.0)
        if actor.proc is not None:
            actor.proc.signal_group(signal.SIGKILL)
            if actor.exit_task is not None:
                await asyncio.wait([actor.exit_task], timeout=5.0)
        for conn in list(actor.connections):
            conn.close_soon(1000, "actor.not_found")
        self._actors.pop(actor.id, None)
        await self.cron.forget(actor.id)
        await asyncio.to_thread(shutil.rmtree, actor.dir, True)
        await asyncio.to_thread(vmroot.release_identity, self._config.state_dir, actor.id)
        log.info("actor_destroyed", actor=actor.id, key=actor.key)

    async def stop_all(self, timeout: float) -> None:
        """Drain: sleep every worker in parallel, then kill the process groups of stragglers."""
        self.accepting = False
        waits = []
        for actor in self._actors.values():
            if actor.proc is not None and actor.exit_task is not None:
                self.stop(actor, ShutdownReason.SLEEP)
                waits.append(actor.exit_task)
        if waits:
            done, pending = await asyncio.wait(waits, timeout=timeout)
            for actor in self._actors.values():
                if actor.proc is not None:
                    log.warning("worker_killed_at_stop", actor=actor.id, pid=actor.proc.pid)
                    actor.proc.signal_group(signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cron.stop()

    def _own(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
