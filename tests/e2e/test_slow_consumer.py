"""A client that stops reading is cut at its queue bound; nobody else waits for it."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import psutil

from protocol.aio import Client
from protocol.client import Encoding, SubscriptionRequest, encode_to_server
from tests.support import MakeSupervisor

FAST_CLIENTS = 20
TURNS = 6
BIG_PROMPT = "y" * 600_000  # each turn: ~1.2 MB of events (the prompt, then its echo)
QUEUE_BOUND = 4 * 2**20


def ws_frame(payload: bytes) -> bytes:
    """A masked binary WebSocket frame, as a client must send it."""
    mask = os.urandom(4)
    header = bytearray([0x82])
    if len(payload) < 126:
        header.append(0x80 | len(payload))
    else:
        header.append(0x80 | 126)
        header += len(payload).to_bytes(2, "big")
    return bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def open_stalled_subscriber(port: int, key: str, event: str = "sessionEvent") -> socket.socket:
    """A raw WebSocket client with a tiny receive buffer that subscribes, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /gateway/vm/connect?rvt-method=getOrCreate&rvt-key={key} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: rivet, rivet_encoding.cbor\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101"), response
    frame = encode_to_server(SubscriptionRequest(event, True), Encoding.CBOR)
    assert isinstance(frame, bytes)
    sock.sendall(ws_frame(frame))
    return sock


async def timed_turns(client: Client, key: str, sid: str, streams: list[list[int]]) -> list[float]:
    """Run turns; per turn and fast client, seconds from the prompt to the turn's last event."""
    delays = []
    for _ in range(TURNS):
        start = time.perf_counter()
        await client.action("vm", key, "sendPrompt", sid, BIG_PROMPT)
        last = (await client.action("vm", key, "getRuntimeHealth"))["eventsSeq"]
        pending = set(range(len(streams)))
        deadline = time.monotonic() + 60
        while pending:
            for i in list(pending):
                if streams[i] and streams[i][-1] >= last:
                    delays.append(time.perf_counter() - start)
                    pending.discard(i)
            assert time.monotonic() < deadline, "a fast client did not get the whole turn"
            await asyncio.sleep(0.002)
    return sorted(delays)


def closed_by_server(sock: socket.socket) -> str:
    """How the server ended this connection; raises TimeoutError if it is still open."""
    sock.settimeout(10)
    while True:
        try:
            if not sock.recv(1 << 20):
                return "eof"
        except ConnectionResetError:
            return "reset"


async def test_stalled_client_is_cut_and_delays_nobody(
        make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--conn-queue-bytes", str(QUEUE_BOUND))
    assert sup.proc is not None
    supervisor_proc = psutil.Process(sup.proc.pid)
    async with Client(sup.url) as client:
        key = "fanout"
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        streams: list[list[int]] = [[] for _ in range(FAST_CLIENTS)]
        conns = []
        for stream in streams:
            conn = await client.connect("vm", key, reconnect=False)
            conn.on("sessionEvent", lambda p, stream=stream: stream.append(p["seq"]))
            conns.append(conn)
        await client.action("vm", key, "listSessions")

        without = await timed_turns(client, key, sid, streams)
        rss_before = supervisor_proc.memory_info().rss
        stalled = open_stalled_subscriber(sup.port, key)
        try:
            await asyncio.sleep(0.2)
            with_stalled = await timed_turns(client, key, sid, streams)
            rss_after = supervisor_proc.memory_info().rss
            how = closed_by_server(stalled)
        finally:
            stalled.close()

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

        print(f"\n{FAST_CLIENTS} subscribers x {TURNS} turns of ~1.2 MB: turn delivered at "
              f"p50 {pct(without, .5):.0f} ms / p99 {pct(without, .99):.0f} ms without a stalled client, "
              f"p50 {pct(with_stalled, .5):.0f} ms / p99 {pct(with_stalled, .99):.0f} ms with one; "
              f"the stalled client was cut ({how}) at the {QUEUE_BOUND / 2**20:.0f} MiB bound; "
              f"supervisor RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
        logged = (await client.action("vm", key, "getRuntimeHealth"))["eventsSeq"]
        for stream in streams:
            assert stream == sorted(set(stream)) and stream[-1] == logged
        assert all(not c.errors for c in conns)
        assert how in ("eof", "reset")
        assert sup.logs().count("slow_consumer_disconnected") == 1
        # Memory does not follow the stalled client's backlog; generous, not a timing figure.
        assert rss_after - rss_before < 100 * 2**20
        for conn in conns:
            await conn.close()
