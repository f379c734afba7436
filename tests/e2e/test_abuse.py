"""Abuse, bounded in time and count: connection floods over the cap are refused cleanly
while /healthz keeps answering and an open stream keeps working, slowloris connections are
closed within the header timeout, actor creations past the cap get `actor.overloaded`,
and the log stays small. Load comes from a separate process (tests/e2e/abuse_load.py)."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

import aiohttp

from tests.support import ROOT, MakeSupervisor, SupervisorProc

LOAD = ROOT / "tests" / "e2e" / "abuse_load.py"


def log_events(sup: SupervisorProc) -> collections.Counter[str]:
    events: collections.Counter[str] = collections.Counter()
    for line in sup.logs().splitlines():
        try:
            events[json.loads(line).get("event", "?")] += 1
        except ValueError:
            events[line[:60]] += 1
    return events


def load(port: int, count: int, mode: str, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(LOAD), str(port), str(count), mode, str(hold)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


async def _flood(sup: SupervisorProc) -> tuple[list[float], dict[str, int], dict[str, int], int]:
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s, \
            aiohttp.ClientSession() as wss:
        async with s.get(f"{sup.url}/healthz") as r:   # the monitor's kept-alive connection
            assert r.status == 200
        async with wss.ws_connect(f"{sup.url}/gateway/vm/connect?rvt-method=getOrCreate&rvt-key=abuse",
                                protocols=["rivet", "rivet_encoding.json"]) as ws:
            init = await ws.receive(timeout=30)
            assert "Init" in str(init.data)
            proc = load(sup.port, 6000, "idle", 3.0)
            try:
                while proc.poll() is None:
                    t = time.monotonic()
                    async with s.get(f"{sup.url}/healthz") as r:
                        assert r.status == 200
                    latencies.append(time.monotonic() - t)
                    await asyncio.sleep(0.05)
                out = proc.stdout.read().splitlines()  # type: ignore[union-attr]
            finally:
                proc.kill()
                proc.wait()
            assert not ws.closed   # the stream opened before the flood is still up
        async with s.get(f"{sup.url}/metrics") as r:
            metrics = await r.text()
    refused = int(float(next(line.split()[1] for line in metrics.splitlines()
                             if line.startswith("actorvisor_connections_refused "))))
    return latencies, json.loads(out[0]), json.loads(out[1]), refused


def test_connection_flood_over_the_cap(make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--max-connections", "5000", "--max-connections-per-address", "10000",
                          "--header-timeout", "120", "--idle-timeout", "120")
    latencies, opened, result, refused = asyncio.run(_flood(sup))
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    print(f"\n/healthz under 6000 connections vs cap 5000: n={len(latencies)} "
          f"p50={latencies[len(latencies) // 2] * 1000:.1f} ms p99={p99 * 1000:.1f} ms; "
          f"load {opened} {result}")
    # 5000 admitted minus our two; the rest answered 503 and closed, none hung or reset.
    assert result["refused"] >= 990 and result["refused"] == refused
    assert result["still_open"] >= 4990
    assert sup.proc is not None
    assert sup.proc.poll() is None
    assert sum(log_events(sup).values()) < 50, log_events(sup).most_common(5)


def test_slowloris_closed_within_header_timeout(make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--header-timeout", "2", "--max-connections-per-address", "5000")
    proc = load(sup.port, 1000, "partial", 20.0)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    opened, result = (json.loads(line) for line in out.splitlines())
    print(f"\nslowloris: {opened} {result}")
    assert result["still_open"] == 0 and result["refused"] == 0
    assert result["last_close_s"] < opened["open_s"] + 2 + 3
    assert sum(log_events(sup).values()) < 50, log_events(sup).most_common(5)


async def _creations(url: str, count: int) -> list[tuple[int, dict[str, str]]]:
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> tuple[int, dict[str, str]]:
            async with s.post(f"{url}/gateway/vm/action/getRuntimeHealth?rvt-method=getOrCreate"
                              f"&rvt-key=many-{i}", data=b'{"args":[]}',
                              headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.json()
        return [await one(i) for i in range(count)]


def test_actor_creations_past_the_cap_are_overloaded(make_supervisor: MakeSupervisor) -> None:
    # Scaled down from 400-vs-300 (each worker is a VM; the test machine is shared).
    sup = make_supervisor("--max-running-actors", "4")
    results = asyncio.run(_creations(sup.url, 7))
    ok = [r for r in results if r[0] == 200]
    over = [r for r in results if r[0] == 503]
    assert len(ok) == 4 and len(over) == 3, results
    assert all(body["group"] == "actor" and body["code"] == "overloaded" for _, body in over)


async def _register(url: str, count: int, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    """Actor creations through the manager API (a key recorded, no worker started)."""
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> tuple[int, dict[str, Any]]:
            async with s.put(f"{url}/actors", json={"name": "vm", "key": f"{prefix}-{i}"}) as r:
                return r.status, await r.json()
        return [await one(i) for i in range(count)]


def test_actor_creations_per_client_per_minute(make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--max-creations-per-minute", "300")
    results = asyncio.run(_register(sup.url, 400, "rate"))
    ok = [body for status, body in results if status == 200]
    over = [body for status, body in results if status == 503]
    assert len(ok) == 300 and len(over) == 100, collections.Counter(s for s, _ in results)
    assert all(body["code"] == "overloaded" and "retry in" in body["message"] for body in over)
    # Existing actors are not creations: reaching them again is never refused.
    again = asyncio.run(_register(sup.url, 5, "rate"))
    assert [status for status, _ in again] == [200] * 5
    # A gateway getOrCreate of a new key counts too, and is refused before any worker starts.
    def workers() -> list[object]:
        with urllib.request.urlopen(f"{sup.url}/admin/workers") as resp:
            return [(a.get("key"), a.get("pid")) for a in json.load(resp)["actors"]]
    before = workers()
    results = asyncio.run(_creations(sup.url, 1))
    assert results[0][0] == 503 and results[0][1]["code"] == "overloaded"
    assert workers() == before
