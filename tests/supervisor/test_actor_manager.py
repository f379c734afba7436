"""The actor state machine on its own: `ActorManager` with a fake spawner and sender.

The spawner and the message sender are the manager's two doors to the outside (a
process, a socket); these fakes stand in for them, so every transition, the restart
intensity and idle sleep are driven step by step, with no process and no socket.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from protocol import worker as wire
from protocol.client import ActionRequest, Encoding, ErrorMsg, decode_to_client
from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import ShutdownReason, WorkerPhase
from supervisor.actors import TRANSITIONS, Actor, ActorManager, ActorState, IllegalTransition
from supervisor.config import Config
from supervisor.connections import Connection
from supervisor.liveness import MAX_SUSPECT_WINDOWS, Probe
from supervisor.spawner import WorkerProcess, WorkerSpec
from tests.support import eventually
from vmworker.eventlog import log_path, read_events


class FakeWorker:
    """A worker process that exits when told to (or when killed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[signal.Signals] = []
        self._status: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def exit(self, status: int) -> None:
        if not self._status.done():
            self._status.set_result(status)

    async def wait(self) -> int:
        return await asyncio.shield(self._status)

    def signal_group(self, sig: signal.Signals) -> None:
        self.signals.append(sig)
        if sig is signal.SIGKILL:
            self.exit(-signal.SIGKILL)


class FakeSpawner:
    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.specs: list[WorkerSpec] = []
        self.gate: asyncio.Event | None = None

    async def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        if self.gate is not None:
            await self.gate.wait()
        self.specs.append(spec)
        self.workers.append(FakeWorker(1000 + len(self.workers)))
        return self.workers[-1]

    async def close(self) -> None:
        return None


class FakeKernel:
    """What `supervisor.liveness.probe` would say of each fake worker: set by the test."""

    def __init__(self) -> None:
        self.ran_ns: dict[int, int] = {}
        self.stopped: set[int] = set()

    def run(self, worker: FakeWorker) -> None:
        self.ran_ns[worker.pid] = self.ran_ns.get(worker.pid, 0) + 1_000_000

    def probe(self, pid: int) -> Probe | None:
        return Probe(pid in self.stopped, self.ran_ns.get(pid, 0))


class Harness:
    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.spawner = FakeSpawner()
        self.kernel = FakeKernel()
        self.sent: list[tuple[str, wire.SupervisorToWorker]] = []
        self.config = Config(state_dir=tmp_path, **config)
        self.manager = ActorManager(self.config, self.spawner, "ipc://fake", self.send,
                                    probe=self.kernel.probe)

    def send(self, actor_id: str, msg: wire.SupervisorToWorker) -> bool:
        self.sent.append((actor_id, msg))
        return True

    def actions(self) -> list[str]:
        return [m.name for _, m in self.sent if isinstance(m, wire.Action)]

    async def spawned(self, count: int) -> FakeWorker:
        await eventually(lambda: len(self.spawner.workers) >= count, timeout=5)
        assert len(self.spawner.workers) == count
        return self.spawner.workers[-1]

    def hello(self, actor: Actor, worker: FakeWorker) -> None:
        # As a real worker's: it names where the log ends as this run begins.
        logged = read_events(log_path(actor.dir), 0, 1000).events
        last_seq = logged[-1].seq if logged else 0
        self.manager.on_worker_message(actor.id, wire.Hello(actor.id, worker.pid, "epoch-1", last_seq))

    def phase(self, actor: Actor, phase: WorkerPhase, **detail: Any) -> None:
        self.manager.on_worker_message(actor.id, wire.Phase(phase.value, detail))

    async def start(self, actor: Actor) -> FakeWorker:
        """Bring the actor's worker to ready through the same messages a real one sends."""
        self.manager.ensure_running(actor)
        worker = await self.spawned(len(self.spawner.workers) + 1)
        self.hello(actor, worker)
        self.phase(actor, WorkerPhase.READY, bootMs=1)
        assert actor.state is ActorState.READY
        return worker


@pytest.fixture
async def harness(tmp_path: Path) -> Any:
    h = Harness(tmp_path, restart_intensity=2, restart_period=60.0, sleep_after=0.0)
    yield h
    for worker in h.spawner.workers:
        worker.exit(0)
    await h.manager.stop_all(1.0)


def test_every_state_has_its_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(ActorState)
    assert all(new is not old for old, targets in TRANSITIONS.items() for new in targets)


async def test_an_illegal_transition_is_refused_and_says_which(harness: Harness) -> None:
    actor = harness.manager.get_or_create("vm", "illegal")
    with pytest.raises(IllegalTransition, match=r"stopped -> ready is not a legal transition"):
        actor.transition(ActorState.READY)
    assert actor.state is ActorState.STOPPED


async def test_an_action_starts_the_worker_and_reaches_it_after_hello(harness: Harness) -> None:
    actor = harness.manager.get_or_create("vm", "k")
    fut = harness.manager.submit(actor, "getRuntimeHealth", [])
    assert actor.state is ActorState.SPAWNING
    worker = await harness.spawned(1)
    assert harness.spawner.specs[0].actor_id == actor.id and actor.proc is worker
    assert harness.actions() == [] and len(actor.pending) == 1
    harness.hello(actor, worker)
    assert actor.state is ActorState.BOOTING and harness.actions() == ["getRuntimeHealth"]  # type: ignore[comparison-overlap]
    harness.phase(actor, WorkerPhase.READY, bootMs=3)
    assert actor.state is ActorState.READY
    (_, action), = harness.sent
    assert isinstance(action, wire.Action)
    harness.manager.on_worker_message(actor.id, wire.Reply(action.id, True, {"phase": "ready"}))
    assert await fut == {"phase": "ready"}
    assert harness.manager.count_by_state()["ready"] == 1


async def test_a_vm_that_fails_to_boot_is_an_actor_state_its_worker_still_answers_in(harness: Harness) -> None:
    actor = harness.manager.get_or_create("vm", "bad-disk")
    harness.manager.ensure_running(actor)
    worker = await harness.spawned(1)
    harness.hello(actor, worker)
    harness.phase(actor, WorkerPhase.FAILED, error="mount failed")
    assert actor.state is ActorState.BOOT_FAILED and actor.running
    harness.manager.submit(actor, "getRuntimeHealth", [])
    assert harness.actions() == ["getRuntimeHealth"]
    # It sleeps like any other; its next start boots again.
    harness.manager.stop(actor, ShutdownReason.SLEEP)
    assert actor.state is ActorState.STOPPING  # type: ignore[comparison-overlap]
    worker.exit(0)
    await eventually(lambda: actor.state is ActorState.STOPPED, timeout=5)


async def test_crashes_past_the_restart_intensity_mark_the_actor_failed_until_reset(harness: Harness) -> None:
    actor = harness.manager.get_or_create("vm", "crashy")
    for crash in range(1, 4):
        worker = await harness.start(actor)
        fut = harness.manager.submit(actor, "exec", ["true"])
        worker.exit(1)
        with pytest.raises(ActorvisorError) as info:
            await fut
        assert info.value.code is ErrorCode.WORKER_CRASHED
        await eventually(lambda: actor.quiet.is_set(), timeout=5)
        assert (actor.generation, len(actor.restarts)) == (crash, crash)
        # 2 crashes are within the intensity (restart_intensity=2); the 3rd is one too many.
        assert actor.state is (ActorState.CRASHED if crash <= 2 else ActorState.FAILED)
    # The supervisor wrote each dead worker's vmShutdown to the actor's log.
    shutdowns = read_events(log_path(actor.dir), 0, 10, ["vmShutdown"]).events
    assert [e.payload["reason"] for e in shutdowns] == ["crash"] * 3
    with pytest.raises(ActorvisorError) as info:
        harness.manager.submit(actor, "exec", ["true"])
    assert info.value.code is ErrorCode.FAILED
    assert len(harness.spawner.workers) == 3
    harness.manager.reset(actor)
    assert actor.state is ActorState.STOPPED and not actor.restarts
    harness.manager.submit(actor, "exec", ["true"])
    await harness.spawned(4)


async def test_crashes_spread_wider_than_the_period_never_fail_the_actor(tmp_path: Path) -> None:
    h = Harness(tmp_path, restart_intensity=1, restart_period=0.05)
    actor = h.manager.get_or_create("vm", "rare")
    try:
        for _ in range(3):
            worker = await h.start(actor)
            await asyncio.sleep(0.06)
            worker.exit(1)
            await eventually(lambda: actor.state is ActorState.CRASHED and actor.quiet.is_set(), timeout=5)
            assert len(actor.restarts) == 1
    finally:
        await h.manager.stop_all(1.0)


async def test_an_idle_actor_sleeps_and_a_busy_one_does_not(harness: Harness) -> None:
    actor = harness.manager.get_or_create("vm", "idle")
    worker = await harness.start(actor)
    actor.connections.add(object())
    harness.manager.tick()
    harness.manager.tick()
    assert actor.state is ActorState.READY and actor.idle_since is None
    actor.connections.clear()
    harness.manager.tick()   # idle from now
    assert actor.state is ActorState.READY and actor.idle_since is not None
    harness.manager.tick()   # idle for sleep_after (0 s): put to sleep
    assert actor.state is ActorState.STOPPING and actor.stop_reason is ShutdownReason.SLEEP
    assert isinstance(harness.sent[-1][1], wire.Sleep)
    worker.exit(0)
    await eventually(lambda: actor.state is ActorState.STOPPED, timeout=5)
    assert actor.proc is None and not actor.restarts


async def test_an_action_that_arrives_while_going_to_sleep_wakes_the_actor(harness: Harness) -> None:
    actor = harness.manager.get_or_create("vm", "wake")
    worker = await harness.start(actor)
    harness.manager.stop(actor, ShutdownReason.SLEEP)
    fut = harness.manager.submit(actor, "exec", ["true"])
    assert len(actor.pending) == 1
    worker.exit(0)
    second = await harness.spawned(2)
    assert actor.state is ActorState.SPAWNING and not fut.done()
    harness.hello(actor, second)
    assert harness.actions() == ["exec"]


async def test_stopped_while_its_worker_was_being_started(harness: Harness) -> None:
    harness.spawner.gate = asyncio.Event()
    actor = harness.manager.get_or_create("vm", "late")
    harness.manager.ensure_running(actor)
    await asyncio.sleep(0)
    harness.manager.stop(actor, ShutdownReason.SLEEP)
    assert actor.state is ActorState.STOPPED
    harness.spawner.gate.set()
    worker = await harness.spawned(1)
    # That process is no one's worker: told to drain, and never the actor's.
    await eventually(lambda: worker.signals == [signal.SIGTERM], timeout=5)
    assert actor.state is ActorState.STOPPED and actor.proc is None



async def test_a_worker_whose_hello_beats_its_spawner_is_adopted(harness: Harness) -> None:
    # Under load the worker's hello (and its ready) can arrive before the zygote reports
    # its pid: it is the actor's worker all the same, never told to stop.
    harness.spawner.gate = asyncio.Event()
    actor = harness.manager.get_or_create("vm", "early")
    harness.manager.ensure_running(actor)
    await asyncio.sleep(0)
    harness.manager.on_worker_message(actor.id, wire.Hello(actor.id, 1000, "epoch-1", 0))
    harness.phase(actor, WorkerPhase.READY, bootMs=1)
    assert actor.state is ActorState.READY
    harness.spawner.gate.set()
    worker = await harness.spawned(1)
    await eventually(lambda: actor.proc is worker, timeout=5)
    assert worker.signals == [] and actor.state is ActorState.READY


class FakeSocket:
    """The part of aiohttp's WebSocketResponse a connection writes to."""

    def __init__(self) -> None:
        self.frames: list[bytes | str] = []

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(data)

    async def send_str(self, data: str) -> None:
        self.frames.append(data)

    async def close(self, code: int = 1000, message: bytes = b"") -> bool:
        return True


async def test_http_and_websocket_actions_wait_for_a_reply_under_one_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path, action_timeout=0.2)
    actor = h.manager.get_or_create("vm", "mute")
    ws = FakeSocket()
    conn = Connection(ws, actor, h.manager, Encoding.JSON, 1 << 20,  # type: ignore[arg-type]
                      opened_at=0.0, implicit_grace=0.0, implicit_window=0.0)
    conn.writer = asyncio.create_task(conn.run_writer())
    try:
        await h.start(actor)
        # HTTP actions (ActorManager.call) and WebSocket ones: the worker never answers.
        with pytest.raises(ActorvisorError) as info:
            await h.manager.call(actor, "exec", ["true"])
        assert info.value.code is ErrorCode.ACTION_TIMEOUT
        conn.handle(ActionRequest(7, "exec", ["true"]))
        await eventually(lambda: ws.frames, timeout=5)
        (reply,) = [decode_to_client(f, Encoding.JSON) for f in ws.frames]
        assert isinstance(reply, ErrorMsg) and reply.action_id == 7
        assert f"{reply.group}.{reply.code}" == ErrorCode.ACTION_TIMEOUT.value
        assert reply.message == "exec got no reply within 0.2s"
    finally:
        await conn.aclose()
        await h.manager.stop_all(1.0)


WINDOW = 0.2  # hello_timeout and hang timeout of the liveness tests: time is slept past it


async def silent_start(tmp_path: Path, key: str) -> tuple[Harness, Actor, FakeWorker]:
    """A worker started with a `hello_timeout` of WINDOW that never says hello."""
    h = Harness(tmp_path, hello_timeout=WINDOW)
    actor = h.manager.get_or_create("vm", key)
    h.manager.ensure_running(actor)
    return h, actor, await h.spawned(1)


async def test_a_late_start_that_runs_is_waited_for_and_one_that_stopped_running_is_killed(
        tmp_path: Path) -> None:
    h, actor, worker = await silent_start(tmp_path, "late")
    try:
        for _ in range(2):  # a starved machine: no hello, but the process runs
            h.kernel.run(worker)
            await asyncio.sleep(1.5 * WINDOW)
            h.manager.tick()
            assert worker.signals == [], "a worker that ran was called hung"
        await asyncio.sleep(1.5 * WINDOW)  # a whole window in which it did not run at all
        h.manager.tick()
        assert worker.signals == [signal.SIGKILL] and actor.kill_reason is ShutdownReason.HANG
    finally:
        await h.manager.stop_all(1.0)


async def test_a_start_that_runs_but_never_says_hello_is_replaced_after_the_last_window(
        tmp_path: Path) -> None:
    h, _, worker = await silent_start(tmp_path, "spinning")
    try:
        started = asyncio.get_running_loop().time()
        while not worker.signals:
            h.kernel.run(worker)
            await asyncio.sleep(WINDOW / 2)
            h.manager.tick()
        suspect_for = asyncio.get_running_loop().time() - started
        assert suspect_for >= MAX_SUSPECT_WINDOWS * WINDOW, suspect_for
    finally:
        await h.manager.stop_all(1.0)


async def test_a_dropped_link_is_a_suspicion_settled_by_the_kernel(harness: Harness) -> None:
    h = Harness(harness.config.state_dir, hang_timeout=WINDOW)
    try:
        actor = h.manager.get_or_create("vm", "dropped")
        worker = await h.start(actor)
        h.manager.on_worker_link(worker.pid, up=False)
        h.kernel.run(worker)  # its libzmq retries the connection: it runs
        await asyncio.sleep(2 * WINDOW)
        h.manager.tick()
        assert worker.signals == []
        h.kernel.stopped.add(worker.pid)  # SIGSTOP: hung at once, no window to wait
        h.manager.tick()
        assert worker.signals == [signal.SIGKILL]
        # A stopped worker whose link came back is not a suspect any more.
        other = await h.start(h.manager.get_or_create("vm", "back"))
        h.kernel.stopped.add(other.pid)
        h.manager.on_worker_link(other.pid, up=False)
        h.manager.on_worker_link(other.pid, up=True)
        await asyncio.sleep(2 * WINDOW)
        h.manager.tick()
        assert other.signals == []
    finally:
        await h.manager.stop_all(1.0)
