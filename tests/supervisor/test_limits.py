"""The connection limiter's own bookkeeping: what it holds for a connection ends with it."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from supervisor.limits import ConnectionLimiter


async def _server(header_timeout: float) -> tuple[web.AppRunner, ConnectionLimiter, int]:
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    limiter = ConnectionLimiter(max_connections=1000, max_per_address=1000,
                                header_timeout=header_timeout)
    limiter.install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, limiter, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_a_head_that_came_during_a_loop_stall_is_served_not_timed_out() -> None:
    """The header timeout and a whole request head can become ready in the same pass of
    the event loop (the loop stalled past the deadline while the head came in). The head
    was there before the deadline was checked: the connection is served. A connection
    that sent nothing by then is closed, stall or not."""
    runner, limiter, port = await _server(header_timeout=0.3)
    results: dict[str, bytes] = {}
    stalled = threading.Event()

    def client(name: str, head: bytes | None) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            stalled.wait(10)
            time.sleep(0.2)  # well inside the stall, before the loop looks again
            if head is not None:
                sock.sendall(head)
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
                    if head is not None and data.endswith(b"ok"):
                        break
            except TimeoutError:
                data += b"<still open>"  # neither answered nor closed
            except OSError:
                pass  # reset: closed
            results[name] = data

    threads = [threading.Thread(target=client, args=("head", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
               threading.Thread(target=client, args=("silent", None))]
    try:
        for thread in threads:
            thread.start()
        for _ in range(200):
            if limiter.open == 2:
                break
            await asyncio.sleep(0.01)
        assert limiter.open == 2
        stalled.set()
        time.sleep(0.8)  # the loop stalls past both connections' header deadline
        for _ in range(500):
            if not any(thread.is_alive() for thread in threads):
                break
            await asyncio.sleep(0.01)
        assert results["head"].startswith(b"HTTP/1.1 200"), results["head"]
        assert results["silent"] == b"", results["silent"]  # closed by the server
        assert limiter.timed_out == 1
    finally:
        stalled.set()
        await runner.cleanup()
        for thread in threads:
            thread.join(10)


async def test_a_closed_connection_is_not_kept_alive_by_its_header_timeout() -> None:
    """The slowloris guard's timer is cancelled when its connection closes. Left pending, it
    kept each closed connection's handler and transport for the whole header timeout:
    thousands under churn, and every full garbage collection walked them all (a 30–55 ms
    stall of every connection in flight, seen as the Init p99 of bench/spawn.py)."""
    runner, limiter, port = await _server(header_timeout=600.0)
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
