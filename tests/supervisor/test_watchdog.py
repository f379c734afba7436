"""The watchdog vouches for the event loop: no ping while the loop is blocked or the tick is dead.

An in-process supervisor (no worker is started) with a test-owned notify socket. The
checks count datagrams at points where the answer is fixed by construction — right after
the loop was blocked, and once the tick has been stale for longer than the threshold —
so they do not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from supervisor.app import Supervisor
from supervisor.config import Config
from supervisor.sdnotify import Notifier
from tests.notify import NotifySocket, pings


async def test_pings_stop_while_the_loop_is_blocked_and_when_the_tick_dies(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    config = Config(port=0, state_dir=tmp_path / "state", heartbeat_interval=0.2)
    sup = Supervisor(config, notifier=Notifier(str(notify.path), watchdog_usec=200_000))
    try:
        await sup.start()
        first = notify.drain()
        assert first[0]["READY"] == "1" and first[0]["STATUS"].startswith("actors: none")
        await notify.until(lambda got: pings(got) >= 3)

        notify.drain()
        time.sleep(1.0)  # block the loop: a pinger on a thread would still get through
        assert pings(notify.drain()) == 0
        mark = len(notify.received)
        await notify.until(lambda got: pings(got[mark:]) > 0)

        assert sup._ticker is not None
        sup._ticker.cancel()  # the tick stops, as if it had raised
        stale_after = 3 * config.heartbeat_interval + 0.1
        await asyncio.sleep(stale_after + 1.0)
        notify.drain()  # whatever was sent before the tick went stale
        await asyncio.sleep(1.0)
        assert pings(notify.drain()) == 0
    finally:
        await sup.stop()
        notify.close()


async def test_pings_stop_when_the_hub_stops_watching_worker_connections(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    config = Config(port=0, state_dir=tmp_path / "state", heartbeat_interval=0.2)
    sup = Supervisor(config, notifier=Notifier(str(notify.path), watchdog_usec=200_000))
    try:
        await sup.start()
        await notify.until(lambda got: pings(got) >= 2)
        assert sup.hub._monitor_task is not None
        sup.hub._monitor_task.cancel()  # link events stop: a hung worker would go unseen
        await asyncio.gather(sup.hub._monitor_task, return_exceptions=True)
        notify.drain()  # whatever was sent before
        await asyncio.sleep(1.0)
        assert pings(notify.drain()) == 0
    finally:
        await sup.stop()
        notify.close()


async def test_status_follows_the_actors_and_stopping_is_sent(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    config = Config(port=0, state_dir=tmp_path / "state", heartbeat_interval=0.1)
    sup = Supervisor(config, notifier=Notifier(str(notify.path)))
    try:
        await sup.start()
        sup.manager.get_or_create("vm", "listed-only")
        await notify.until(lambda got: any("1 stopped" in m.get("STATUS", "") for m in got))
    finally:
        await sup.stop()
        last = notify.drain()
        notify.close()
    assert last[0]["STOPPING"] == "1"
    assert last[0]["STATUS"].startswith("draining: 0 connections, 0 workers")
