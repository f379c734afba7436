"""The connection limiter's own bookkeeping: what it holds for a connection ends with it."""

from __future__ import annotations

import asyncio
import gc

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from supervisor.limits import ConnectionLimiter


async def test_a_closed_connection_is_not_kept_alive_by_its_header_timeout() -> None:
    """The slowloris guard's timer is cancelled when its connection closes. Left pending, it
    kept each closed connection's handler and transport for the whole header timeout:
    thousands under churn, and every full garbage collection walked them all (a 30–55 ms
    stall of every connection in flight, seen as the Init p99 of bench/spawn.py)."""
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    limiter = ConnectionLimiter(max_connections=1000, max_per_address=1000, header_timeout=600.0)
    limiter.install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        before = sum(isinstance(o, RequestHandler) for o in gc.get_objects())
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    assert await resp.text() == "ok"
        for _ in range(50):  # the server side of the last ones closes a moment later
            if limiter.open == 0:
                break
            await asyncio.sleep(0.02)
        assert limiter.open == 0
        await asyncio.sleep(0)
        gc.collect()
        alive = sum(isinstance(o, RequestHandler) for o in gc.get_objects()) - before
        assert alive < 5, f"{alive} closed connections' handlers are still alive"
    finally:
        await runner.cleanup()
