"""Benchmark: one actor's events through the full path, against bare baselines.

Throughput. Full path: the local agent in a worker emits N events → SQLite (group commit,
`synchronous=FULL`) → ZeroMQ → supervisor relay (encode once) → every subscribed
WebSocket. Baseline, in the same run: a bare aiohttp server that only broadcasts the very
same frames (captured from the full path) to the same number of identical clients. Also
the CPU time the supervisor and the worker spend per event (what load does not change).

Latency, as a ratio. End-to-end p50/p99 at a fixed rate to K subscribers: events stamped
with their emission time in the worker, received by subscribers in a client process.
Baseline, in the same run, with the same processes and hops but no sequencing and no
persistence: a producer process stamps the same frames at the same rate and sends them
over ZeroMQ (ipc) to a bare aiohttp broadcaster process, which writes each to the K
subscribers of an identical client process. A third case is that baseline with the one
thing persistence adds: the producer commits each event to an event log of its own
(`vmworker.eventlog`, `synchronous=FULL`) before it sends it. The three run in turn,
--latency-rounds times, and each figure is over all rounds pooled (a single round's p99
moves by 2x with the machine's noise); the per-round ratios are printed too. Every round
streams on one long-lived actor (a new session each round) after a round that is not
counted, and the baseline's log is kept as warm: a fresh log's WAL grows through its
first cycle, which doubles a commit's p50 on this disk. `--no-warm` takes a new actor and
a new log each round. Subscribers count only their round's session: a subscription
without a cursor starts up to a second back (docs/delivery.md, the implicit cursor), so on
a long-lived actor it first gets the end of the last round.

Clients run in separate processes (--client-procs) so that the server, not the client,
is what is measured; every case uses the same client code.

    .venv/bin/python bench/relay.py [--events 20000] [--subscribers 1,10,100] [--rate 1000]
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
from typing import cast

import aiohttp
import cbor2
import psutil
import zmq
import zmq.asyncio
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.conn_setup import pct  # noqa: E402
from protocol.aio import Client  # noqa: E402
from protocol.client import (  # noqa: E402
    Encoding,
    Event,
    SubscriptionRequest,
    decode_to_client,
    encode_to_client,
    encode_to_server,
)
from tests.support import SupervisorProc, free_port  # noqa: E402
from vmworker.eventlog import EncodedEvent, EventLog, EventReader, now_ms  # noqa: E402

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

def worker_pids(sup: SupervisorProc) -> set[int]:
    """The supervisor's worker processes (children of its zygote, bwrap not included)."""
    assert sup.proc is not None
    pids: set[int] = set()
    for zygote in psutil.Process(sup.proc.pid).children():
        try:
            if "supervisor.zygote" in " ".join(zygote.cmdline()):
                pids.update(p.pid for p in zygote.children() if p.name().startswith("python"))
        except psutil.Error:
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def full_path(sup: SupervisorProc, subscribers: int, events: int, procs: int,
                    tmp: Path) -> tuple[float, float, float]:
    """Events/s delivered in total, and CPU µs per event of the supervisor and the worker."""
    assert sup.proc is not None
    key = f"relay-{subscribers}-{time.monotonic_ns()}"
    before = worker_pids(sup)
    async with Client(sup.url) as client:
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        (worker,) = worker_pids(sup) - before
        url = f"ws://127.0.0.1:{sup.port}/gateway/vm/connect?rvt-method=getOrCreate&rvt-key={key}"
        # chunks: N emits N agent chunks plus the prompt's own user_message_chunk.
        started = await asyncio.to_thread(start_clients, url, subscribers, events + 1, procs, tmp)
        await asyncio.sleep(0.3)  # let every subscription register
        cpu0 = cpu_seconds(sup.proc.pid), cpu_seconds(worker)
        t0 = time.time()
        await client.action("vm", key, "sendPrompt", sid, f"chunks: {events}")
        end = await asyncio.to_thread(finish_clients, started)
        sup_cpu, worker_cpu = cpu_seconds(sup.proc.pid) - cpu0[0], cpu_seconds(worker) - cpu0[1]
    return ((events + 1) * subscribers / (end - t0), sup_cpu / (events + 1) * 1e6,
            worker_cpu / (events + 1) * 1e6)


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


async def bare_server(port: int, subscribers: int
                      ) -> tuple[web.AppRunner, list[web.WebSocketResponse], asyncio.Event]:
    """The baselines' broadcaster: a bare aiohttp WebSocket server on `port` that greets,
    takes one subscription frame per socket, and sets the event once all are in."""
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
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, sockets, all_in


async def bare_broadcast(frames: list[bytes], subscribers: int, procs: int, tmp: Path) -> float:
    port = free_port()
    runner, sockets, all_in = await bare_server(port, subscribers)
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


# ---- latency: subscriber, producer and broadcaster processes ---------------------------

BARE_SESSION = "0" * 32


def stamped_text(i: int, count: int) -> str:
    """The local agent's paced chunk text (vmworker/agents/local.py): the emission time last."""
    return f"chunk {i} of {count} at {time.time():.6f}\n"


async def latency_client_main(url: str, conns: int, frames: int, ready_file: str, session_id: str) -> None:
    """K subscriptions; prints the delay of every stamped chunk of `session_id` received, in
    ms. Other sessions' chunks are not counted: a subscription without a cursor may start
    up to a second before the connection (the implicit cursor, docs/delivery.md), so on an
    actor that streamed before, it first gets the end of the last round."""
    delays: list[float] = []
    async with aiohttp.ClientSession() as session:
        sockets = []
        for _ in range(conns):
            ws = await session.ws_connect(url, protocols=("rivet", "rivet_encoding.cbor"), max_msg_size=0)
            await ws.receive()  # Init (or the baseline's hello)
            await ws.send_bytes(SUBSCRIBE)
            sockets.append(ws)
        Path(ready_file).write_text("ready")

        async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
            got = 0
            while got < frames:
                msg = await ws.receive(timeout=60)
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"unexpected frame {msg.type}")
                # Plain CBOR, not the validating decoder: the client must not be the bottleneck.
                payload = cbor2.loads(msg.data)["body"]["val"]["args"][0]
                update = payload["event"]["params"]["update"]
                text = update.get("content", {}).get("text", "")
                if (payload["sessionId"] == session_id and update["sessionUpdate"] == "agent_message_chunk"
                        and text.startswith("chunk ")):
                    delays.append((time.time() - float(text.rsplit(" at ", 1)[1])) * 1000)
                    got += 1

        await asyncio.gather(*(drain(ws) for ws in sockets))
        for ws in sockets:
            await ws.close()
    print(json.dumps(delays), flush=True)


def start_latency_clients(url: str, subscribers: int, frames: int, tmp: Path,
                          session_id: str) -> tuple[subprocess.Popen[bytes], Path]:
    ready = tmp / f"ready-latency-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, __file__, "--latency-client", url, str(subscribers),
                             str(frames), str(ready), session_id], stdout=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("latency clients failed to connect")
        time.sleep(0.01)
    return proc, ready


def finish_latency_clients(proc: subprocess.Popen[bytes]) -> list[float]:
    out, _ = proc.communicate(timeout=300)
    return sorted(json.loads(out.decode().strip().splitlines()[-1]))


async def latency(sup: SupervisorProc, key: str, subscribers: int, count: int, rate: float,
                  tmp: Path) -> list[float]:
    async with Client(sup.url) as client:
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        url = f"ws://127.0.0.1:{sup.port}/gateway/vm/connect?rvt-method=getOrCreate&rvt-key={key}"
        proc, _ = await asyncio.to_thread(start_latency_clients, url, subscribers, count, tmp, sid)
        await asyncio.sleep(0.3)  # let every subscription register
        await client.action("vm", key, "sendPrompt", sid, f"chunks: {count} at {rate:g}/s")
        return await asyncio.to_thread(finish_latency_clients, proc)


async def producer_main(endpoint: str, count: int, rate: float, db: str) -> None:
    """The baseline's worker: the same session-event frames, stamped and paced as the local
    agent does it, each sent as one ZeroMQ message; no seq assignment. With `db`, each is
    first committed there, one transaction per event, as the worker's log commits it."""
    log = EventLog.open(Path(db)) if db else None
    base = log.last_seq if log is not None else 0
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    session_id = BARE_SESSION
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(1, count + 1):
        delay = start + (i - 1) / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        update = {"sessionUpdate": "agent_message_chunk",
                  "content": {"type": "text", "text": stamped_text(i, count)}}
        payload = {"sessionId": session_id, "event": {"jsonrpc": "2.0", "method": "session/update",
                                                      "params": {"sessionId": session_id, "update": update}},
                   "seq": base + i, "epoch": "0" * 16}
        if log is not None:
            log.write_encoded([EncodedEvent(base + i, "sessionEvent", session_id, cbor2.dumps(payload), now_ms())], [])
        await sock.send(encode_to_client(Event("sessionEvent", [payload]), Encoding.CBOR))
    sock.close()
    ctx.term()
    if log is not None:
        log.close()


async def broadcaster_main(port: int, endpoint: str, subscribers: int) -> None:
    """The baseline's supervisor: every frame pulled from ZeroMQ is written to every socket."""
    runner, sockets, all_in = await bare_server(port, subscribers)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    print("listening", flush=True)
    await all_in.wait()
    try:
        while True:
            frame = await sock.recv()
            for ws in tuple(sockets):
                await ws.send_bytes(frame)
    finally:
        sock.close(linger=0)
        ctx.term()
        await runner.cleanup()


async def bare_latency(subscribers: int, count: int, rate: float, tmp: Path, db: str) -> list[float]:
    port = free_port()
    endpoint = f"ipc://{tmp}/bare-{time.monotonic_ns()}.ipc"
    broadcaster = subprocess.Popen([sys.executable, __file__, "--broadcaster", str(port), endpoint,
                                    str(subscribers)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert broadcaster.stdout is not None
        if broadcaster.stdout.readline().strip() != b"listening":
            raise RuntimeError("the baseline broadcaster did not start")
        proc, _ = await asyncio.to_thread(start_latency_clients, f"ws://127.0.0.1:{port}/ws",
                                          subscribers, count, tmp, BARE_SESSION)
        await asyncio.sleep(0.3)
        producer = await asyncio.create_subprocess_exec(sys.executable, __file__, "--producer", endpoint,
                                                        str(count), str(rate), db, cwd=ROOT)
        delays = await asyncio.to_thread(finish_latency_clients, proc)
        await producer.wait()
        return delays
    finally:
        broadcaster.terminate()
        broadcaster.wait(10)


def fdatasync_times(directory: Path, count: int) -> list[float]:
    """ms per fdatasync of a 300-byte append in `directory`: what a `synchronous=FULL`
    commit of a small batch costs on this disk, measured in the same run."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 300)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return sorted(times)


async def main(args: argparse.Namespace) -> None:
    subs = [int(s) for s in args.subscribers.split(",")]
    with tempfile.TemporaryDirectory(prefix="actorvisor-bench-") as tmpdir:
        tmp = Path(tmpdir)
        sup = SupervisorProc(tmp / "state", free_port(), ["--log-level", "warning"], dict(os.environ))
        keep: EventReader | None = None
        sup.start()
        try:
            frames = await capture_frames(sup, args.events)
            rows = []
            for n in subs:
                ours, sup_us, worker_us = await full_path(sup, n, args.events, args.client_procs, tmp)
                bare = await bare_broadcast(frames, n, args.client_procs, tmp)
                rows.append((n, ours, bare, sup_us, worker_us))
            cases: tuple[list[float], list[float], list[float]] = ([], [], [])
            ratios = []
            key, db = f"latency-{time.monotonic_ns()}", str(tmp / "bare-committed.db")
            if args.warm:
                # Warm: every round on one actor, whose worker keeps its log open, so its WAL
                # is past its first cycle (a growing WAL doubles a commit's p50 on this
                # disk). The baseline's log is kept as warm: a connection held open here
                # keeps its WAL across producers (the last connection to close deletes it).
                EventLog.open(Path(db)).close()
                keep = EventReader(Path(db))
                keep.read(0, 1)  # a read opens the WAL, and from then on this keeps it
                await latency(sup, key, args.latency_subscribers, args.latency_events, args.rate, tmp)
                await bare_latency(args.latency_subscribers, args.latency_events, args.rate, tmp, db)
            for _ in range(args.latency_rounds):
                if not args.warm:
                    key, db = f"latency-{time.monotonic_ns()}", str(tmp / f"bare-{time.monotonic_ns()}.db")
                ours_round = await latency(sup, key, args.latency_subscribers, args.latency_events,
                                           args.rate, tmp)
                bare_round = await bare_latency(args.latency_subscribers, args.latency_events, args.rate,
                                                tmp, "")
                committed_round = await bare_latency(args.latency_subscribers, args.latency_events,
                                                     args.rate, tmp, db)
                for pooled, values in zip(cases, (ours_round, bare_round, committed_round)):
                    pooled += values
                ratios.append(pct(ours_round, 0.99) / pct(bare_round, 0.99))
            syncs = fdatasync_times(tmp / "state", 500)
        finally:
            if keep is not None:
                keep.close()
            sup.stop()
    lat, bare_lat, committed_lat = (sorted(values) for values in cases)

    size = statistics.mean(len(f) for f in frames)
    print(f"Fan-out of {args.events + 1} session events (~{size:.0f} B CBOR frames), "
          f"{args.client_procs} client processes, events/s delivered in total")
    print(f"{'subscribers':>12}{'actorvisor':>14}{'bare aiohttp':>14}{'ratio':>8}"
          f"{'supervisor CPU µs/event':>26}{'worker CPU µs/event':>22}")
    for n, ours, bare, sup_us, worker_us in rows:
        print(f"{n:>12}{ours:>14,.0f}{bare:>14,.0f}{ours / bare:>8.2f}{sup_us:>26.1f}{worker_us:>22.1f}")
    print(f"End-to-end latency (producer emit → subscriber), {args.latency_events} events at "
          f"{args.rate:g}/s to {args.latency_subscribers} subscribers, {args.latency_rounds} rounds "
          f"pooled, ms:")
    print(f"{'':>40}{'p50':>9}{'p99':>9}{'max':>9}")
    for label, values in (("actorvisor (worker → supervisor)", lat),
                          ("bare (producer → ZeroMQ → aiohttp)", bare_lat),
                          ("bare + a log commit per event", committed_lat)):
        print(f"{label:>40}{pct(values, 0.5):>9.2f}{pct(values, 0.99):>9.2f}{values[-1]:>9.2f}")
    print(f"p99 ratio actorvisor / bare: {pct(lat, 0.99) / pct(bare_lat, 0.99):.2f} "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"bare + commit / bare: {pct(committed_lat, 0.99) / pct(bare_lat, 0.99):.2f}")
    print(f"what the baseline does not do — this disk's fdatasync of a 300 B append (the commit "
          f"each event waits for, and often the one before it): p50 {pct(syncs, 0.5):.2f}, "
          f"p99 {pct(syncs, 0.99):.2f}, max {syncs[-1]:.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, conns, frames, ready = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        asyncio.run(client_main(url, conns, frames, ready))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--latency-client":
        url, conns, frames, ready = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        asyncio.run(latency_client_main(url, conns, frames, ready, sys.argv[6]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--producer":
        asyncio.run(producer_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--broadcaster":
        try:
            asyncio.run(broadcaster_main(int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
        except KeyboardInterrupt:
            pass
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--subscribers", default="1,10,100")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--latency-events", type=int, default=2000)
    parser.add_argument("--latency-subscribers", type=int, default=10)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                        help="measure a long-lived actor: one actor for every latency round, "
                             "after a round that is not counted (--no-warm: a new actor each round)")
    asyncio.run(main(parser.parse_args()))
