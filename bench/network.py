"""Egress throughput: a download through the worker's proxy into a VM, next to the same
download on the host without the proxy, in the same run.

The upstream is an aiohttp server on the host's 127.0.0.1 serving a body of `--mb` MB,
allowed by an IP-literal rule. Inside the VM, curl fetches it through HTTP_PROXY (bridge
in the VM → Unix socket → proxy in this process → upstream); on the host, curl fetches it
directly. Figures are curl's own `speed_download`, best of `--runs`.

Run as root: `.venv/bin/python bench/network.py [--mb 256] [--runs 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import serve_http, vm_settings  # noqa: E402
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    vmroot.enter_private_mount_namespace()
    asyncio.run(main(args.mb, args.runs))
