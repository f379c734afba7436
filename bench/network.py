"""Egress throughput: a download through the worker's proxy into a VM, next to the same
download on the host without the proxy, in the same run. Then preview URLs: the latency of
a request through a preview URL (supervisor → worker's ingress socket → in-VM bridge →
`python3 -m http.server` in the VM) next to the same request to the same server program
run directly on the host, and to `vmFetch` (`--preview-requests`, 0 skips it).

The upstream is an aiohttp server on the host's 127.0.0.1 serving a body of `--mb` MB,
allowed by an IP-literal rule. Inside the VM, curl fetches it through HTTP_PROXY (bridge
in the VM → Unix socket → proxy in this process → upstream); on the host, curl fetches it
directly. Figures are curl's own `speed_download`, best of `--runs`.

Run as root: `.venv/bin/python bench/network.py [--mb 256] [--runs 3] [--preview-requests 300]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.aio import Client  # noqa: E402
from protocol.errors import ActorvisorError  # noqa: E402
from tests.support import SupervisorProc, eventually, free_port, serve_http, vm_settings  # noqa: E402
from vmworker import vmroot  # noqa: E402
from vmworker.netpolicy import Policy  # noqa: E402
from vmworker.vm import Vm  # noqa: E402


async def main(mb: int, runs: int) -> None:
    body = secrets.token_bytes(1 << 20) * mb

    async def blob(_: web.Request) -> web.Response:
        return web.Response(body=body)
    runner, port = await serve_http(blob, "/blob")
    tmp = Path(tempfile.mkdtemp(prefix="bench-net-"))
    state = tmp / "state"
    actor_dir = state / "actors" / "bench"
    actor_dir.mkdir(parents=True)
    vm = Vm(actor_dir, "bench", state, 0.0, vm_settings(state, disk_mb=64), lambda *_: None)
    url = f"http://127.0.0.1:{port}/blob"
    curl = f"curl -sS --noproxy '' -o /dev/null -w '%{{speed_download}}' {url}"
    try:
        await vm.boot()
        vm.policy = Policy.parse(allow=[f"127.0.0.1:{port}"])
        via_proxy, direct = [], []
        for _ in range(runs):
            r = await vm.exec(curl, timeout_s=300)
            assert r.exit_code == 0, r
            via_proxy.append(float(r.stdout) / 1e6)
            proc = await asyncio.create_subprocess_shell(
                f"curl -sS --noproxy '*' -o /dev/null -w '%{{speed_download}}' {url}",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            direct.append(float(out) / 1e6)
        print(f"download {mb} MB, best of {runs}:")
        print(f"  direct on the host (baseline):  {max(direct):8.1f} MB/s")
        print(f"  VM via bridge + proxy:          {max(via_proxy):8.1f} MB/s "
              f"({max(via_proxy) / max(direct):.0%} of direct)")
    finally:
        await vm.stop()
        await runner.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def _percentiles(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:6.2f} ms   p99 {q[98]:6.2f} ms"


async def _timed(n: int, request: object) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await request()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def preview_latency(requests: int) -> None:
    """The same GET of a small file: directly to `python3 -m http.server` on the host, through
    a preview URL to the same program in a VM, and with vmFetch. One keep-alive client."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-preview-"))
    (tmp / "www").mkdir()
    (tmp / "www" / "hello.txt").write_text("hello\n")
    (tmp / "preview.toml").write_text(f'preview_secret_file = "{tmp / "secret"}"\n')
    sup = SupervisorProc(tmp / "state", free_port(), ["--config", str(tmp / "preview.toml")], dict(os.environ))
    host_port = free_port()
    host_server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "http.server", str(host_port), "--bind", "127.0.0.1", cwd=tmp / "www",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        sup.start()
        async with Client(sup.url) as client, aiohttp.ClientSession() as http:
            await client.action("vm", "bench", "writeFile", "/workspace/hello.txt", b"hello\n")
            await client.action("vm", "bench", "spawn", "sh", ["-c", "cd /workspace && exec python3 -m http.server 8000"])

            async def up() -> bool:
                try:
                    answer = await client.action("vm", "bench", "vmFetch", 8000, "/hello.txt")
                    return bool(answer["status"] == 200)
                except ActorvisorError:
                    return False
            await eventually(up, timeout=30)
            preview = await client.action("vm", "bench", "createSignedPreviewUrl", 8000, 3600)

            async def get(url: str) -> bool:
                async with http.get(url) as r:
                    assert r.status == 200 and await r.read() == b"hello\n"
                    return True

            async def host_up() -> bool:
                try:
                    return await get(direct_url)
                except aiohttp.ClientError:
                    return False
            direct_url = f"http://127.0.0.1:{host_port}/hello.txt"
            await eventually(host_up, timeout=10)
            preview_url = f"{sup.url}{preview['path']}hello.txt"
            await get(preview_url)
            direct = await _timed(requests, lambda: get(direct_url))
            via_preview = await _timed(requests, lambda: get(preview_url))
            via_fetch = await _timed(max(requests // 5, 20),
                                     lambda: client.action("vm", "bench", "vmFetch", 8000, "/hello.txt"))
        print(f"GET /hello.txt, {requests} requests, one keep-alive client:")
        print(f"  direct to http.server on the host (baseline): {_percentiles(direct)}")
        print(f"  preview URL to http.server in the VM:         {_percentiles(via_preview)}")
        print(f"  vmFetch action ({len(via_fetch)} requests):               {_percentiles(via_fetch)}")
    finally:
        host_server.kill()
        await host_server.wait()
        sup.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preview-requests", type=int, default=300)
    args = parser.parse_args()
    vmroot.enter_private_mount_namespace()
    if args.mb > 0:
        asyncio.run(main(args.mb, args.runs))
    if args.preview_requests > 0:
        asyncio.run(preview_latency(args.preview_requests))
