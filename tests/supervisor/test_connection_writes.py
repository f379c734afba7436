"""A connection's outbound path: frames written straight to an idle socket or queued for
its writer reach the client byte for byte, in the order they were sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.client import Encoding
from supervisor.actors import Actor, ActorManager
from supervisor.connections import Connection
from tests.support import free_port

# Around every length boundary of a WebSocket frame head (7-bit, 16-bit, 64-bit lengths).
SIZES = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 65537]) | st.integers(0, 70_000)
FRAME = st.one_of(SIZES.map(lambda n: bytes(i % 251 for i in range(n))),
                  SIZES.map(lambda n: "é" * (n // 2)))
# Frames sent in one loop pass, then a pause that lets the writer and the socket catch up.
BURSTS = st.lists(st.lists(FRAME, min_size=1, max_size=6), min_size=1, max_size=6)


class _Actor:
    id = "actor-under-test"


@asynccontextmanager
async def connection_pair() -> AsyncIterator[tuple[Connection, aiohttp.ClientWebSocketResponse]]:
    """A Connection on a real aiohttp WebSocket, and the client end of it."""
    opened: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = Connection(ws, cast(Actor, _Actor()), cast(ActorManager, None), Encoding.CBOR, 8 << 20,
                          opened_at=0.0, implicit_grace=0.0, implicit_window=0.0,
                          transport=cast(asyncio.Transport, request.transport))
        conn.writer = asyncio.create_task(conn.run_writer())
        opened.set_result(conn)
        await done.wait()
        conn.writer.cancel()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/ws", max_msg_size=0) as client:
                conn = await asyncio.wait_for(opened, 5)
                try:
                    yield conn, client
                finally:
                    done.set()
    finally:
        await runner.cleanup()


async def received(client: aiohttp.ClientWebSocketResponse, count: int) -> list[bytes | str]:
    got: list[bytes | str] = []
    for _ in range(count):
        msg = await client.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), msg
        got.append(msg.data)
    return got


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bursts=BURSTS)
def test_frames_arrive_intact_and_in_order_whichever_path_they_take(bursts: list[list[bytes | str]]) -> None:
    async def scenario() -> None:
        async with connection_pair() as (conn, client):
            sent: list[bytes | str] = []
            for burst in bursts:
                for frame in burst:
                    conn.send_frame(frame)
                    sent.append(frame)
                await asyncio.sleep(0)
            assert await received(client, len(sent)) == sent

    run(scenario)


async def test_a_frame_for_an_idle_socket_is_written_before_send_frame_returns() -> None:
    """No task wake per connection per event: the writer, idle, is not woken."""
    async with connection_pair() as (conn, client):
        conn.send_frame(b"first")
        assert await received(client, 1) == [b"first"]
        await asyncio.sleep(0.01)  # the writer is back waiting
        writer_steps: list[Any] = []
        conn._wake.set = lambda: writer_steps.append("woken")  # type: ignore[method-assign]
        conn.send_frame(b"second")
        assert conn.queued_bytes == 0 and not writer_steps
        assert await received(client, 1) == [b"second"]


async def test_frames_of_one_loop_pass_after_the_first_go_through_the_writer_together() -> None:
    """A burst (one event loop pass) is written once by the writer, not once per frame:
    a system call per frame made a 5,000-subscriber flood several times slower."""
    async with connection_pair() as (conn, client):
        conn.send_frame(b"warm")
        assert await received(client, 1) == [b"warm"]
        await asyncio.sleep(0.01)
        for frame in (b"a", b"b", b"c"):
            conn.send_frame(frame)
        assert conn.queued_bytes == 2  # b"a" went straight out; b"b" and b"c" wait for the writer
        assert await received(client, 3) == [b"a", b"b", b"c"]
        assert conn.queued_bytes == 0
