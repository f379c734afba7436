"""Benchmark: WebSocket `Init` latency while N actors boot slowly, against a quiet baseline.

Starts one real supervisor (`--boot-delay`), warms one actor, then measures, in one run:
  baseline — connection setup (upgrade → Init) with no VM booting anywhere;
  booting  — the same while N cold actors boot (their workers start and sleep in boot),
             connections spread over the cold actors themselves.
The figure that matters is the ratio: connection setup must not wait for any VM.

    .venv/bin/python bench/conn_setup.py [--actors 20] [--conns 400] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.client import Encoding, Init, decode_to_client  # noqa: E402
from tests.support import SupervisorProc, free_port  # noqa: E402


async def one_connection(session: aiohttp.ClientSession, url: str, key: str) -> float:
    started = time.perf_counter()
    async with session.ws_connect(
        f"{url}/gateway/vm/connect?rvt-method=getOrCreate&rvt-key={key}",
        protocols=("rivet", "rivet_encoding.cbor"),
    ) as ws:
        msg = await ws.receive(timeout=30)
        elapsed = time.perf_counter() - started
        assert isinstance(decode_to_client(msg.data, Encoding.CBOR), Init)
    return elapsed * 1000


async def measure(url: str, keys: list[str], conns: int, concurrency: int) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:
        async def run(i: int) -> float:
            async with sem:
                return await one_connection(session, url, keys[i % len(keys)])
        return sorted(await asyncio.gather(*(run(i) for i in range(conns))))


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def wait_ready(url: str, key: str) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.post(f"{url}/gateway/vm/action/getRuntimeHealth?rvt-method=getOrCreate&rvt-key={key}",
                                    json={"args": []}, headers={"x-rivet-encoding": "json"}) as resp:
                if (await resp.json())["output"]["booted"]:
                    return
            await asyncio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=20, help="cold actors booting at once")
    parser.add_argument("--boot-delay", type=float, default=8.0)
    parser.add_argument("--conns", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=20,
                        help="connections in flight at once (a sequential pass is always run too)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="actorvisor-bench-") as tmp:
        sup = SupervisorProc(Path(tmp) / "state", free_port(), ["--boot-delay", str(args.boot_delay),
                             "--log-level", "warning"], dict(os.environ))
        sup.start()
        rows = []
        try:
            await wait_ready(sup.url, "warm")
            await measure(sup.url, ["warm"], 50, 1)  # warm-up, not reported
            for round_no, concurrency in enumerate((1, args.concurrency)):
                baseline = await measure(sup.url, ["warm"], args.conns, concurrency)
                cold = [f"cold-{round_no}-{i}" for i in range(args.actors)]
                started = time.perf_counter()
                booting = await measure(sup.url, cold, args.conns, concurrency)
                window = time.perf_counter() - started
                rows.append((concurrency, baseline, booting, window))
        finally:
            sup.stop()

    print(f"Init latency (WebSocket upgrade → Init), {args.conns} connections per case (ms)")
    print(f"{'case':<52}{'p50':>9}{'p99':>9}{'max':>9}{'mean':>9}")
    for concurrency, baseline, booting, window in rows:
        for label, values in [(f"c={concurrency} baseline: no VM booting", baseline),
                              (f"c={concurrency} while {args.actors} cold actors boot ({args.boot_delay:.0f} s)",
                               booting)]:
            print(f"{label:<52}{pct(values, .5):>9.2f}{pct(values, .99):>9.2f}{values[-1]:>9.2f}"
                  f"{statistics.mean(values):>9.2f}")
        print(f"  ratio booting/baseline: p50 {pct(booting, .5) / pct(baseline, .5):.2f}x, "
              f"p99 {pct(booting, .99) / pct(baseline, .99):.2f}x; the booting case took {window:.2f} s, "
              f"inside the {args.boot_delay:.0f} s boot: {window < args.boot_delay}")


if __name__ == "__main__":
    asyncio.run(main())
