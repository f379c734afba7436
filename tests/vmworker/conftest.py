from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from protocol.worker import WorkerToSupervisor, decode_all
from tests.support import vm_settings
from vmworker.actions import Actions
from vmworker.eventlog import EventLog, EventReader
from vmworker.outbox import Outbox
from vmworker.processes import ProcessLimits, ProcessTable
from vmworker.sessions import SessionLog, SessionManager
from vmworker.vm import Vm

from .harness import WorkerHarness


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A tmp dir with a short path: ipc:// socket paths must stay under ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="avw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def harness(short_tmp: Path) -> AsyncIterator[WorkerHarness]:
    h = WorkerHarness(short_tmp)
    try:
        yield h
    finally:
        await h.close()


@dataclass
class InProcessActor:
    """The worker's components wired as main.py wires them, minus the socket: frames the
    outbox sends are decoded into `sent`, in order."""

    actor_dir: Path
    log: EventLog
    outbox: Outbox
    vm: Vm
    sessions: SessionManager
    actions: Actions
    sent: list[WorkerToSupervisor]
    session_log: SessionLog

    async def call(self, name: str, *args: object) -> Any:
        return await self.actions.dispatch(name, list(args))


@pytest.fixture
async def actor(tmp_path: Path) -> AsyncIterator[InProcessActor]:
    actor_dir = tmp_path / "actors" / "a1"
    actor_dir.mkdir(parents=True)
    writer, reader_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    log = EventLog.open(actor_dir / "events.db")
    reader = EventReader(log.path)
    sent: list[WorkerToSupervisor] = []

    async def send(frame: bytes) -> None:
        # Round-trip through the real codec, exactly as the supervisor would see it.
        cbor2.loads(frame)
        sent.extend(decode_all(frame))

    outbox = Outbox(log, send, writer)
    vm = Vm(actor_dir, "a1", tmp_path, 0.0, vm_settings(tmp_path), lambda kind, payload: None)
    session_log = SessionLog(outbox, reader, reader_pool)
    sessions = SessionManager(outbox, vm, log.load_sessions(), session_log)
    processes = ProcessTable(outbox, actor_dir, ProcessLimits(output_log_bytes=1 << 20))
    actions = Actions(vm, sessions, outbox, reader, reader_pool, restarts=0, processes=processes)
    writer_task = asyncio.create_task(outbox.run())
    await vm.boot()
    assert vm.machine is not None
    processes.attach(vm.machine)
    try:
        yield InProcessActor(actor_dir, log, outbox, vm, sessions, actions, sent, session_log)
    finally:
        sessions.cancel_all()
        await vm.stop()
        await processes.close()
        await asyncio.wait_for(outbox.flush(), 10)
        writer_task.cancel()
        await asyncio.gather(writer_task, return_exceptions=True)
        reader_pool.submit(reader.close).result()
        writer.submit(log.close).result()
        writer.shutdown()
        reader_pool.shutdown()
