"""The Python client resumes by cursor: cuts and a supervisor kill -9 lose and repeat nothing."""

from __future__ import annotations

import asyncio
import random
import signal
from typing import Any

import aiohttp

from protocol.aio import Client
from protocol.client import Encoding
from tests.e2e.proxy import CuttableProxy
from tests.support import MakeSupervisor, SupervisorProc, eventually

STREAM = 5000


async def logged_seqs(client: Client, key: str, session_id: str) -> list[int]:
    seqs: list[int] = []
    after = 0
    while True:
        page = await client.action("vm", key, "getSessionEvents", session_id, {"after": after, "limit": 10000})
        if not page:
            return seqs
        seqs.extend(e["seq"] for e in page)
        after = page[-1]["seq"]




async def test_random_cuts_during_a_long_stream(supervisor: SupervisorProc) -> None:
    rng = random.Random(20261127)
    proxy = CuttableProxy(supervisor.port)
    await proxy.start()
    try:
        async with Client(supervisor.url) as direct, Client(proxy.url, Encoding.CBOR) as via_proxy:
            conn = await via_proxy.connect("vm", "cut-stream")
            received: list[int] = []
            conn.on("sessionEvent", lambda p: received.append(p["seq"]))
            sid = (await direct.action("vm", "cut-stream", "createSession", "local", {}))["sessionId"]
            # Paced (2 s): a worker emits 5,000 unpaced chunks in a fraction of a second,
            # before a few cuts at 5-150 ms apart could land.
            turn = asyncio.create_task(direct.action("vm", "cut-stream", "sendPrompt", sid,
                                                     f"chunks: {STREAM} at 2500/s"))
            while not turn.done():
                await asyncio.sleep(rng.uniform(0.005, 0.15))
                proxy.cut()
            await turn
            expected = await logged_seqs(direct, "cut-stream", sid)
            await eventually(lambda: received and received[-1] >= expected[-1], 30)
            print(f"\n{proxy.cuts} cuts, {conn.reconnects} reconnects, {len(received)} events, "
                  f"{conn.repeats} repeats dropped")
            assert len(expected) >= STREAM
            assert conn.reconnects >= 3
            assert received == expected
            assert conn.repeats == 0  # explicit cursors: the server never resends
            await conn.close()
    finally:
        await proxy.close()


async def test_supervisor_kill_9_mid_stream_then_resume(
        make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor()
    async with Client(sup.url) as client:
        conn = await client.connect("vm", "kill-9")
        received: list[int] = []
        conn.on("sessionEvent", lambda p: received.append(p["seq"]))
        sid = (await client.action("vm", "kill-9", "createSession", "local", {}))["sessionId"]
        turn = asyncio.create_task(client.action("vm", "kill-9", "sendPrompt", sid, f"chunks: {STREAM}"))
        await eventually(lambda: len(received) > 500, 30)
        sup.stop(signal.SIGKILL)
        try:
            await turn
        except Exception:
            pass  # the turn dies with its worker; its committed events must survive
        sup.start()
        try:
            expected = await logged_seqs(client, "kill-9", sid)
        except aiohttp.ServerDisconnectedError:
            # The client's pool may still hold a keep-alive connection to the killed
            # process; the request on it fails before anything is sent back. Once more:
            expected = await logged_seqs(client, "kill-9", sid)
        await eventually(lambda: received and received[-1] >= expected[-1], 30)
        print(f"\nreceived {len(received)} of {len(expected)} logged events after kill -9, "
              f"{conn.reconnects} reconnects")
        assert 500 < len(expected)
        assert received == expected
        assert conn.reconnects >= 1
        # And the stream goes on live after the restart.
        await client.action("vm", "kill-9", "sendPrompt", sid, "chunks: 10")
        expected = await logged_seqs(client, "kill-9", sid)
        await eventually(lambda: received[-1] >= expected[-1], 30)
        assert received == expected
        await conn.close()


async def test_a_recreated_log_is_reported_not_skipped(
        make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor()
    async with Client(sup.url) as client:
        conn = await client.connect("vm", "epochs")
        received: list[dict[str, Any]] = []
        conn.on("sessionEvent", received.append)
        sid = (await client.action("vm", "epochs", "createSession", "local", {}))["sessionId"]
        await client.action("vm", "epochs", "sendPrompt", sid, "chunks: 20")
        await eventually(lambda: len(received) >= 21, 10)
        old_epoch = received[-1]["epoch"]
        await conn.close()
        sup.stop()
        # An operator wipes the actor's event log: a new log, a new epoch, seq from 1.
        for path in (sup.state_dir / "actors").glob("*/events.db*"):
            path.unlink()
        sup.start()
    async with Client(sup.url) as client:
        sid = (await client.action("vm", "epochs", "createSession", "local", {}))["sessionId"]
        await client.action("vm", "epochs", "sendPrompt", sid, "hello again")
        conn2 = await client.connect("vm", "epochs", reconnect=False)
        conn2.cursors["sessionEvent"], conn2.epoch = received[-1]["seq"], old_epoch
        fresh: list[dict[str, Any]] = []
        conn2.on("sessionEvent", fresh.append)
        await eventually(lambda: conn2.errors and fresh, 10)
        assert conn2.errors[0].code.value == "actor.epoch_changed"
        new_log = await client.action("vm", "epochs", "replayEvents", {"names": ["sessionEvent"]})
        await eventually(lambda: len(fresh) >= len(new_log["events"]), 10)
        assert [e["seq"] for e in fresh] == [e["seq"] for e in new_log["events"]]
        assert new_log["epoch"] != old_epoch and fresh[0]["epoch"] == new_log["epoch"]
        await conn2.close()
