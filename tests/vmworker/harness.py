"""A test-owned supervisor stand-in: a ROUTER on an ipc socket plus a real worker process.

It speaks the real worker protocol (`protocol.worker`) and records every frame in arrival
order, so tests can assert ordering exactly as the supervisor will see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

from protocol.errors import ActorvisorError
from protocol.worker import (
    Action,
    Hello,
    Reply,
    SupervisorToWorker,
    WorkerEvent,
    WorkerToSupervisor,
    decode_all,
    encode,
)
from tests.support import descendants, vm_settings

REPO = Path(__file__).resolve().parents[2]
# `python -c FORK_AND_WAIT argv...`: run argv as our child and wait for it.
FORK_AND_WAIT = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
os.waitpid(pid, 0)
"""


def payload(event: WorkerEvent) -> dict[str, Any]:
    """A received event's payload, typed: a receiver that decodes (`decode_all`, as every
    test does) always gets one; it is None only in the hub's undecoded `expand`."""
    assert event.payload is not None
    return event.payload


@dataclass
class WorkerHarness:
    tmp: Path
    actor_id: str = "actor1"
    boot_delay: float = 0.0
    supervisor_pid: int | None = None   # the process whose exit the worker leaves on
    generation: int = 0
    received: list[WorkerToSupervisor] = field(default_factory=list)
    uncommitted: list[int] = field(default_factory=list)  # events seen before their commit
    proc: asyncio.subprocess.Process | None = None

    def __post_init__(self) -> None:
        self.state_dir = self.tmp / "state"
        self.endpoint = f"ipc://{self.tmp}/workers.ipc"
        self._ctx = zmq.asyncio.Context()
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(self.endpoint)
        self._ids = itertools.count(1)
        self._arrived = asyncio.Condition()
        self._pump: asyncio.Task[None] | None = None
        self.identity: bytes | None = None
        self._db: sqlite3.Connection | None = None

    @property
    def actor_dir(self) -> Path:
        return self.state_dir / "actors" / self.actor_id

    async def start(self, *extra: str, parent: bool = False) -> None:
        """Start the worker (with `parent`, as the child of a process of its own between us
        and it, as the zygote is: `proc` is that parent, the hello names the worker)."""
        self.actor_dir.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody drains a pipe while the test runs, and a full one
        # would block the worker's logging.
        with open(self.log_path, "ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *((sys.executable, "-c", FORK_AND_WAIT) if parent else ()),
                sys.executable, "-m", "vmworker",
                "--actor-id", self.actor_id, "--actor-name", "vm", "--actor-key", "k",
                "--endpoint", self.endpoint, "--state-dir", str(self.state_dir),
                "--boot-delay", str(self.boot_delay), "--generation", str(self.generation),
                "--log-level", "debug",
                *(["--supervisor-pid", str(self.supervisor_pid)] if self.supervisor_pid else []),
                "--vm-settings", vm_settings(self.state_dir).to_arg(),
                *extra,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stderr=log_file,
                # Its own group, as the supervisor's spawner does: close() kills the group.
                start_new_session=True,
            )
        self.received.clear()
        self._pump = asyncio.create_task(self._pump_frames())
        # Its hello follows the lock (a killed predecessor's VM may still be going) and
        # Python's start-up: seconds on a loaded machine.
        await self.wait_for(lambda m: isinstance(m, Hello), timeout=30.0)

    async def _pump_frames(self) -> None:
        while True:
            identity, frame = await self.router.recv_multipart()
            self.identity = identity
            messages = decode_all(frame)
            for msg in messages:
                if isinstance(msg, WorkerEvent) and not self._committed(msg.seq):
                    self.uncommitted.append(msg.seq)
            async with self._arrived:
                self.received.extend(messages)
                self._arrived.notify_all()
            # zmq.asyncio's recv does not yield while frames are queued: without this a
            # flood would starve the test's own tasks.
            await asyncio.sleep(0)

    def _committed(self, seq: int) -> bool:
        """Is `seq` in the worker's SQLite log right now (read as the supervisor will)?"""
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.actor_dir / 'events.db'}?mode=ro", uri=True)
        row = self._db.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchone()
        return row is not None

    async def send(self, msg: SupervisorToWorker) -> None:
        assert self.identity is not None, "worker has not said hello yet"
        await self.router.send_multipart([self.identity, encode(msg)])

    async def send_raw(self, frame: bytes) -> None:
        assert self.identity is not None
        await self.router.send_multipart([self.identity, frame])

    async def wait_for(self, predicate: Callable[[WorkerToSupervisor], bool],
                       timeout: float = 10.0) -> WorkerToSupervisor:
        checked = 0
        async with asyncio.timeout(timeout):
            async with self._arrived:
                while True:
                    # Only look at what arrived since the last look: floods stay linear.
                    for msg in self.received[checked:]:
                        if predicate(msg):
                            return msg
                    checked = len(self.received)
                    await self._arrived.wait()

    async def wait_event(self, name: str, timeout: float = 10.0) -> WorkerEvent:
        msg = await self.wait_for(lambda m: isinstance(m, WorkerEvent) and m.name == name, timeout)
        assert isinstance(msg, WorkerEvent)
        return msg

    async def request(self, name: str, *args: Any, timeout: float = 20.0) -> Reply:
        action_id = next(self._ids)
        await self.send(Action(action_id, name, list(args)))
        reply = await self.wait_for(lambda m: isinstance(m, Reply) and m.id == action_id, timeout)
        assert isinstance(reply, Reply)
        return reply

    async def call(self, name: str, *args: Any, timeout: float = 20.0) -> Any:
        reply = await self.request(name, *args, timeout=timeout)
        if not reply.ok:
            assert reply.error is not None
            raise reply.error
        return reply.value

    async def call_error(self, name: str, *args: Any) -> ActorvisorError:
        reply = await self.request(name, *args)
        assert not reply.ok, f"{name} unexpectedly succeeded: {reply.value!r}"
        assert reply.error is not None
        return reply.error

    async def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    @property
    def log_path(self) -> Path:
        return self.tmp / "worker.log"

    def worker_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        if self.proc is not None:
            leftovers = descendants(self.proc.pid)
            if self.proc.returncode is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await self.proc.wait()
            for child in leftovers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        if self._db is not None:
            self._db.close()
            self._db = None
        self.router.close(linger=0)
        self._ctx.term()
