"""The supervisor's own file writes (cron files, preview revocations) never block its loop.

An in-process supervisor (no worker is started) whose `os.fsync` is held on a
threading.Event, standing in for a stalled disk: while a save is held, the loop serves
other actions, the change is already in effect in memory, and the client's reply waits
until the fsync has returned. Saves made in a row land in the order made.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.actors import Actor
from supervisor.app import Supervisor
from supervisor.config import Config
from supervisor.cron import CRON_FILE
from supervisor.filewriter import FileWriter
from supervisor.preview import REVOKED_FILE, PreviewDenied, RevokedTokens, check_preview_token

EXEC = {"type": "exec", "command": "true"}
YEARLY = "0 0 1 1 *"   # never fires during a test


async def test_writes_run_one_at_a_time_in_the_order_submitted() -> None:
    """Earlier writes are made slower, so writes run side by side would finish out of
    order; a cancelled future (its client went away) still has its write run."""
    writer = FileWriter("test")
    ran: list[int] = []
    running = threading.Semaphore(1)

    def write(i: int) -> int:
        assert running.acquire(blocking=False), "two writes ran at once"
        time.sleep((20 - i) / 2000)
        ran.append(i)
        running.release()
        return i

    futures = [writer.submit(functools.partial(write, i)) for i in range(20)]
    futures[3].cancel()
    await writer.drain()
    assert ran == list(range(20))
    assert [await f for f in futures if not f.cancelled()] == [i for i in range(20) if i != 3]


class StalledDisk:
    """`os.fsync` held until released; records each fsync that returned, and each reply."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.events: list[str] = []
        self._real = os.fsync

    def fsync(self, fd: int) -> None:
        self.entered.set()
        # The bound only keeps a broken build (a save on the loop) from hanging the suite.
        self.released.wait(10)
        self._real(fd)
        self.events.append("synced")

    async def held(self) -> None:
        """Until a write is held in fsync; waits on a thread, so the loop must be free."""
        assert await asyncio.to_thread(self.entered.wait, 30)

    def release(self) -> None:
        self.released.set()

    def replied(self, fut: asyncio.Future[Any]) -> None:
        fut.add_done_callback(lambda _: self.events.append("replied"))


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[StalledDisk]:
    stalled = StalledDisk()
    monkeypatch.setattr(os, "fsync", stalled.fsync)
    yield stalled
    stalled.release()


@pytest.fixture
async def sup(tmp_path: Path) -> AsyncIterator[Supervisor]:
    config = Config(port=0, state_dir=tmp_path / "state", preview_secret_file=tmp_path / "secret")
    supervisor = Supervisor(config)
    await supervisor.start()
    yield supervisor
    await supervisor.stop()


def call(sup: Supervisor, actor: Actor) -> Callable[..., Any]:
    async def action(name: str, *args: Any) -> Any:
        return await sup.manager.call(actor, name, list(args))
    return action


async def test_cron_saves_wait_for_fsync_off_the_loop(sup: Supervisor, disk: StalledDisk) -> None:
    actor = sup.manager.get_or_create("vm", "cron-stalled-disk")
    fut = sup.manager.submit(actor, "scheduleCron", [{"id": "j", "schedule": YEARLY, "action": EXEC}])
    disk.replied(fut)
    await disk.held()
    assert not fut.done()
    # Meanwhile the loop answers other actions, and the job is already there.
    listed = await call(sup, actor)("listCronJobs")
    assert [job["id"] for job in listed] == ["j"] and not fut.done()
    disk.release()
    assert await sup.manager.reply("scheduleCron", fut) == {"id": "j"}
    assert disk.events == ["synced", "synced", "replied"]   # the file, then its dir
    saved = json.loads((actor.dir / CRON_FILE).read_text())["jobs"]
    assert [job["id"] for job in saved] == ["j"]

    disk.entered.clear()
    disk.released.clear()
    disk.events.clear()
    fut = sup.manager.submit(actor, "cancelCronJob", ["j"])
    disk.replied(fut)
    await disk.held()
    assert await call(sup, actor)("listCronJobs") == [] and not fut.done()
    disk.release()
    assert await sup.manager.reply("cancelCronJob", fut) is None
    assert disk.events == ["synced", "replied"]   # the file is removed; its dir is synced
    assert not (actor.dir / CRON_FILE).exists()


async def test_an_expired_preview_url_is_refused_at_once_and_answered_once_synced(
        sup: Supervisor, disk: StalledDisk) -> None:
    actor = sup.manager.get_or_create("vm", "preview-stalled-disk")
    token = (await call(sup, actor)("createSignedPreviewUrl", 8000))["token"]
    fut = sup.manager.submit(actor, "expireSignedPreviewUrl", [token])
    disk.replied(fut)
    await disk.held()
    assert not fut.done()
    with pytest.raises(PreviewDenied, match="expired by its owner"):
        check_preview_token(sup.previews.secret(), token, sup.previews.revoked)
    # The same token again is answered after the first write too, never before it.
    again = sup.manager.submit(actor, "expireSignedPreviewUrl", [token])
    await asyncio.sleep(0)
    assert not again.done()
    disk.release()
    assert await sup.manager.reply("expireSignedPreviewUrl", fut) == {"expired": True}
    assert await sup.manager.reply("expireSignedPreviewUrl", again) == {"expired": True}
    assert disk.events == ["synced", "replied"]
    reloaded = RevokedTokens(sup.config.state_dir / REVOKED_FILE)   # what a restart reads
    with pytest.raises(PreviewDenied, match="expired by its owner"):
        check_preview_token(sup.previews.secret(), token, reloaded)


async def test_saves_in_a_row_land_in_the_order_made(sup: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schedules and cancels sent without waiting, each fsync taking a random while: the
    file left is the jobs as they are in memory, and every revocation is on disk."""
    rng = random.Random(11)
    real_fsync = os.fsync

    def uneven_fsync(fd: int) -> None:
        time.sleep(rng.random() / 500)   # writes run in parallel would overtake each other
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", uneven_fsync)
    actor = sup.manager.get_or_create("vm", "saves-in-a-row")
    sent: list[tuple[str, asyncio.Future[Any]]] = []
    for i in range(60):
        job = f"j{rng.randrange(6)}"
        if rng.random() < 0.3:
            sent.append(("cancelCronJob", sup.manager.submit(actor, "cancelCronJob", [job])))
        else:
            options = {"id": job, "schedule": YEARLY, "action": {**EXEC, "args": [str(i)]}}
            sent.append(("scheduleCron", sup.manager.submit(actor, "scheduleCron", [options])))
    tokens = [(await call(sup, actor)("createSignedPreviewUrl", 8000))["token"] for _ in range(20)]
    sent += [("expireSignedPreviewUrl", sup.manager.submit(actor, "expireSignedPreviewUrl", [token]))
             for token in tokens]
    for name, fut in sent:
        await sup.manager.reply(name, fut)

    listed = await call(sup, actor)("listCronJobs")
    path = actor.dir / CRON_FILE
    saved = json.loads(path.read_text())["jobs"] if path.exists() else []
    assert [(j["id"], j["action"]) for j in saved] == [(j["id"], j["action"]) for j in listed]
    assert listed   # the seed leaves jobs, so the file's content is compared, not only its absence
    reloaded = RevokedTokens(sup.config.state_dir / REVOKED_FILE)
    for token in tokens:
        with pytest.raises(PreviewDenied, match="expired by its owner"):
            check_preview_token(sup.previews.secret(), token, reloaded)
