"""Connection setup never waits for a VM: `Init` arrives at once while workers boot slowly."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from protocol.client import Encoding, Init, decode_to_client
from tests.support import MakeSupervisor


async def open_and_wait_init(session: aiohttp.ClientSession, url: str, key: str,
                             encoding: Encoding) -> tuple[float, aiohttp.ClientWebSocketResponse]:
    started = time.perf_counter()
    ws = await session.ws_connect(
        f"{url}/gateway/vm/connect?rvt-namespace=default&rvt-method=getOrCreate&rvt-key={key}",
        protocols=("rivet", f"rivet_encoding.{encoding.value}"))
    msg = await ws.receive(timeout=10)
    elapsed = time.perf_counter() - started
    assert ws.protocol == "rivet"
    init = decode_to_client(msg.data, encoding)
    assert isinstance(init, Init)
    return elapsed, ws


async def test_init_is_immediate_while_cold_actors_boot(
        make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--boot-delay", "8")
    encodings = [Encoding.JSON, Encoding.CBOR, Encoding.BARE]
    async with aiohttp.ClientSession() as session:
        # 20 connections to 5 cold actors, all at once.
        results = await asyncio.gather(*(
            open_and_wait_init(session, sup.url, f"cold-{i % 5}", encodings[i % 3]) for i in range(20)))
        latencies = sorted(r[0] for r in results)
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[-1] * 1000
        print(f"\nInit latency with 5 actors booting (8 s): p50={p50:.1f} ms p99={p99:.1f} ms")
        assert p99 < 1000, f"Init took {p99:.0f} ms"
        # The workers really are booting (not ready) while Init was answered.
        async with session.get(f"{sup.url}/admin/workers") as resp:
            actors = (await resp.json())["actors"]
        assert len(actors) == 5
        assert {a["state"] for a in actors} <= {"spawning", "booting"}
        for _, ws in results:
            await ws.close()
