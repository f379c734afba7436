"""While the supervisor drains, a new WebSocket gets the close reason RivetKit retries on.

The RivetKit client reconnects at once when our graceful shutdown closes its connection
with `ws.going_away`; that reconnect lands on the draining supervisor. It must get no
`Init` there (it would settle on a process about to exit) but the same retryable close,
so the client backs off and tries again.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp

from tests.support import MakeSupervisor

GATEWAY = "/gateway/vm/{path}?rvt-namespace=default&rvt-method=getOrCreate&rvt-key=drain"


async def test_an_upgrade_during_the_drain_is_closed_with_going_away(
        make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--stop-timeout", "30")
    assert sup.proc is not None
    async with aiohttp.ClientSession() as session:
        resp = await session.post(sup.url + GATEWAY.format(path="action/getRuntimeHealth"),
                                  json={"args": []}, headers={"x-rivet-encoding": "json", "Content-Type": "application/json"})
        worker_pid = (await resp.json())["output"]["pid"]
        # A stopped worker cannot go to sleep, so the drain waits for it: the window in
        # which the supervisor still listens but no longer accepts work.
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            sup.proc.send_signal(signal.SIGTERM)
            for _ in range(500):
                async with session.get(sup.url + "/admin/workers") as admin:
                    if not (await admin.json())["supervisor"]["accepting"]:
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the supervisor did not start draining")
            async with session.ws_connect(sup.url + GATEWAY.format(path="connect"),
                                          protocols=("rivet", "rivet_encoding.json")) as ws:
                msg = await ws.receive(timeout=10)
                assert msg.type is aiohttp.WSMsgType.CLOSE, msg
                assert (msg.data, msg.extra) == (1001, "ws.going_away")
                assert ws.protocol == "rivet"
        finally:
            os.kill(worker_pid, signal.SIGCONT)
    assert sup.proc.wait(30) == 0
