"""Benchmark: event fan-out through the full path, against a bare aiohttp broadcast.

Full path: the local agent in a worker emits N events → SQLite (group commit) → ZeroMQ →
supervisor relay (encode once) → every subscribed WebSocket. Baseline, in the same run:
a bare aiohttp server that only broadcasts the very same frames (captured from the full
path) to the same number of identical clients. The ratio says what sequencing,
persistence and supervision cost on top of the WebSocket writes themselves.

Then end-to-end latency at a fixed rate: events stamped with their emission time in the
worker, received by subscribers through the full path (p50/p99).

Clients run in separate processes (--client-procs) so that the server, not the client,
is what is measured; both cases use the same client code.

    .venv/bin/python bench/relay.py [--events 5000] [--subscribers 1,10,100] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.aio import Client  # noqa: E402
from protocol.client import (  # noqa: E402
    Encoding,
    Event,
    SubscriptionRequest,
    decode_to_client,
    encode_to_server,
)
from tests.support import SupervisorProc, free_port  # noqa: E402

SUBSCRIBE = cast(bytes, encode_to_server(SubscriptionRequest("sessionEvent", True), Encoding.CBOR))


# ---- client process: K connections, count frames, report when all have N -------------

async def client_main(url: str, conns: int, frames: int, ready_file: str) -> None:
    async with aiohttp.ClientSession() as session:
        sockets = []
        for _ in range(conns):
            ws = await session.ws_connect(url, protocols=("rivet", "rivet_encoding.cbor"), max_msg_size=0)
            await ws.receive()  # Init (or the baseline's hello)
            await ws.send_bytes(SUBSCRIBE)
            sockets.append(ws)
        Path(ready_file).write_text("ready")

        async def drain(ws: aiohttp.ClientWebSocketResponse) -> float:
            got = 0
            while got < frames:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"unexpected frame {msg.type}")
                got += 1
            return time.time()

        done = await asyncio.gather(*(drain(ws) for ws in sockets))
        print(json.dumps({"done": max(done)}), flush=True)
        for ws in sockets:
            await ws.close()


def start_clients(url: str, subscribers: int, frames: int, procs: int, tmp: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    per = [subscribers // procs + (1 if i < subscribers % procs else 0) for i in range(procs)]
    started = []
    for i, count in enumerate(c for c in per if c):
        ready = tmp / f"ready-{time.monotonic_ns()}-{i}"
        proc = subprocess.Popen([sys.executable, __file__, "--client", url, str(count), str(frames), str(ready)],
                                stdout=subprocess.PIPE, cwd=ROOT)
        started.append((proc, ready))
    deadline = time.monotonic() + 60
    while not all(r.exists() for _, r in started):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in started):
            raise RuntimeError("bench clients failed to connect")
        time.sleep(0.01)
    return started


def finish_clients(started: list[tuple[subprocess.Popen[bytes], Path]]) -> float:
    ends: list[float] = []
    for proc, _ in started:
        out, _ = proc.communicate(timeout=300)
        ends.append(json.loads(out.decode().strip().splitlines()[-1])["done"])
    return max(ends)


# ---- the two servers ------------------------------------------------------------------

async def full_path(sup: SupervisorProc, subscribers: int, events: int, procs: int, tmp: Path) -> float:
    key = f"relay-{subscribers}-{time.monotonic_ns()}"
    async with Client(sup.url) as client:
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        url = f"ws://127.0.0.1:{sup.port}/gateway/vm/connect?rvt-method=getOrCreate&rvt-key={key}"
        # chunks: N emits N agent chunks plus the prompt's own user_message_chunk.
        started = await asyncio.to_thread(start_clients, url, subscribers, events + 1, procs, tmp)
        await asyncio.sleep(0.3)  # let every subscription register
        t0 = time.time()
        await client.action("vm", key, "sendPrompt", sid, f"chunks: {events}")
        end = await asyncio.to_thread(finish_clients, started)
    return (events + 1) * subscribers / (end - t0)


async def capture_frames(sup: SupervisorProc, events: int) -> list[bytes]:
    key = f"capture-{time.monotonic_ns()}"
    frames: list[bytes] = []
    async with Client(sup.url) as client, aiohttp.ClientSession() as session:
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        ws = await session.ws_connect(f"ws://127.0.0.1:{sup.port}/gateway/vm/connect?rvt-method=getOrCreate&rvt-key={key}",
                                      protocols=("rivet", "rivet_encoding.cbor"), max_msg_size=0)
        await ws.receive()
        await ws.send_bytes(SUBSCRIBE)
        await asyncio.sleep(0.2)
        await client.action("vm", key, "sendPrompt", sid, f"chunks: {events}")
        while len(frames) < events + 1:
            msg = await ws.receive()
            assert isinstance(decode_to_client(msg.data, Encoding.CBOR), Event)
            frames.append(msg.data)
        await ws.close()
    return frames


async def bare_broadcast(frames: list[bytes], subscribers: int, procs: int, tmp: Path) -> float:
    sockets: list[web.WebSocketResponse] = []
    all_in = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("rivet",))
        await ws.prepare(request)
        await ws.send_bytes(b"hello")
        await ws.receive()  # the subscription frame
        sockets.append(ws)
        if len(sockets) == subscribers:
            all_in.set()
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        started = await asyncio.to_thread(start_clients, f"ws://127.0.0.1:{port}/ws", subscribers,
                                          len(frames), procs, tmp)
        await all_in.wait()
        t0 = time.time()
        for frame in frames:
            for ws in sockets:
                await ws.send_bytes(frame)
        end = await asyncio.to_thread(finish_clients, started)
    finally:
        await runner.cleanup()
    return len(frames) * subscribers / (end - t0)


async def latency(sup: SupervisorProc, subscribers: int, count: int, rate: float) -> list[float]:
    key = f"latency-{time.monotonic_ns()}"
    delays: list[float] = []
    async with Client(sup.url) as client:
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        conns = []
        for _ in range(subscribers):
            conn = await client.connect("vm", key, reconnect=False)

            def on_event(payload: dict[str, Any]) -> None:
                text = payload["event"]["params"]["update"].get("content", {}).get("text", "")
                if " at " in text and payload["event"]["params"]["update"]["sessionUpdate"] == "agent_message_chunk":
                    delays.append(time.time() - float(text.rsplit(" at ", 1)[1]))

            conn.on("sessionEvent", on_event)
            conns.append(conn)
        await client.action("vm", key, "listSessions")
        await client.action("vm", key, "sendPrompt", sid, f"chunks: {count} at {rate:g}/s")
        deadline = time.monotonic() + 30
        while len(delays) < count * subscribers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in conns:
            await conn.close()
    return sorted(delays)


async def main(args: argparse.Namespace) -> None:
    subs = [int(s) for s in args.subscribers.split(",")]
    with tempfile.TemporaryDirectory(prefix="actorvisor-bench-") as tmpdir:
        tmp = Path(tmpdir)
        sup = SupervisorProc(tmp / "state", free_port(), ["--log-level", "warning"], dict(os.environ))
        sup.start()
        try:
            frames = await capture_frames(sup, args.events)
            rows = []
            for n in subs:
                ours = await full_path(sup, n, args.events, args.client_procs, tmp)
                bare = await bare_broadcast(frames, n, args.client_procs, tmp)
                rows.append((n, ours, bare))
            lat = await latency(sup, args.latency_subscribers, args.latency_events, args.rate)
        finally:
            sup.stop()

    size = statistics.mean(len(f) for f in frames)
    print(f"Fan-out of {args.events + 1} session events (~{size:.0f} B CBOR frames), "
          f"{args.client_procs} client processes, events/s delivered in total")
    print(f"{'subscribers':>12}{'actorvisor':>14}{'bare aiohttp':>14}{'ratio':>8}")
    for n, ours, bare in rows:
        print(f"{n:>12}{ours:>14,.0f}{bare:>14,.0f}{ours / bare:>8.2f}")
    print(f"End-to-end latency (worker emit → subscriber), {args.latency_events} events at "
          f"{args.rate:g}/s to {args.latency_subscribers} subscribers: "
          f"p50 {lat[len(lat) // 2] * 1000:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms, "
          f"max {lat[-1] * 1000:.2f} ms ({len(lat)} samples)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, conns, frames, ready = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        asyncio.run(client_main(url, conns, frames, ready))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--subscribers", default="1,10,100")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--latency-events", type=int, default=2000)
    parser.add_argument("--latency-subscribers", type=int, default=10)
    asyncio.run(main(parser.parse_args()))
