"""The VM's way out, seen from inside a real VM: only the proxy, and only what the policy allows.

Boots a real VM in-process (bwrap, vminit, the bridge) with an upstream HTTP server on the
host's 127.0.0.1 standing in for the internet; curl in the VM uses the proxy variables it
is given, nothing else."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from protocol.errors import ActorvisorError
from tests.support import serve_http, vm_settings
from vmworker.netpolicy import Policy
from vmworker.vm import Vm
from vmworker.vmfs import normalize

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containment needs the service's root")


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    async def page(r: web.Request) -> web.Response:
        return web.Response(text="hello from upstream")
    runner, port = await serve_http(page)
    try:
        yield port
    finally:
        await runner.cleanup()


@pytest.fixture
async def vm(tmp_path: Path) -> AsyncIterator[tuple[Vm, list[dict[str, Any]]]]:
    state = tmp_path / "state"
    actor_dir = state / "actors" / f"t{secrets.token_hex(4)}"
    actor_dir.mkdir(parents=True)
    reports: list[dict[str, Any]] = []
    machine = Vm(actor_dir, actor_dir.name, state, 0.0,
                 vm_settings(state, memory_mb=256, pids=128, cpus=0.5), lambda *_: None, reports.append)
    try:
        await machine.boot()
        yield machine, reports
    finally:
        await machine.stop()


async def test_default_deny_then_allowed_by_rule(vm: tuple[Vm, list[dict[str, Any]]], upstream: int) -> None:
    machine, reports = vm
    url = f"http://127.0.0.1:{upstream}/"
    # NO_PROXY names loopback for servers inside the VM; the host's upstream goes via the proxy.
    curl = f"curl -sS --noproxy '' -w ' %{{http_code}}' {url}"
    r = await machine.exec(curl)
    assert r.stdout.endswith(" 403") and "blocked by network policy" in r.stdout, r
    assert reports[-1]["allowed"] is False and reports[-1]["port"] == upstream
    # Around the proxy: the VM's own loopback has no such server, and there is no other way.
    r = await machine.exec(f"curl -sS --noproxy '*' {url}")
    assert r.exit_code != 0
    machine.policy = Policy.parse(allow=[f"127.0.0.1:{upstream}"])
    r = await machine.exec(curl)
    assert r.stdout == "hello from upstream 200", r
    assert reports[-1]["allowed"] is True and reports[-1]["rule"] == f"allow 127.0.0.1:{upstream}"
    r = await machine.exec(f"python3 -c \"import urllib.request as u; "
                           f"print(u.urlopen('{url}').read().decode())\"", env={"NO_PROXY": "", "no_proxy": ""})
    assert r.stdout.strip() == "hello from upstream", r


def test_service_config_sets_the_default_policy(tmp_path: Path) -> None:
    from supervisor.app import VmHostError, prepare_vms
    from supervisor.config import Config, load_file
    conf = tmp_path / "a.toml"
    conf.write_text('[network]\nallow = ["*.example.com", "127.0.0.1:8080"]\ndeny = ["x.example.com"]\n')
    values = load_file(conf)
    assert values["network_allow"] == ("*.example.com", "127.0.0.1:8080")
    assert values["network_deny"] == ("x.example.com",)
    conf.write_text('[network]\nwiden = ["a.com"]\n')
    with pytest.raises(ValueError, match=r"\[network\]"):
        load_file(conf)
    with pytest.raises(VmHostError, match="network policy: rule 'a..b'"):
        prepare_vms(Config(state_dir=tmp_path / "s", network_allow=("a..b",)))


async def test_vm_fetch_reaches_a_server_in_the_vm(vm: tuple[Vm, list[dict[str, Any]]]) -> None:
    import asyncio
    machine, _ = vm
    await machine.write_file(normalize("/workspace/hello.txt"), b"hi")
    server = asyncio.create_task(machine.exec(
        "cd /workspace && timeout 20 python3 -m http.server 8000 >/dev/null 2>&1", timeout_s=30))
    try:
        for _ in range(50):
            with contextlib.suppress(ActorvisorError):
                reply = await machine.fetch(8000, "/", "GET", {}, b"")
                break
            await asyncio.sleep(0.2)
        assert reply["status"] == 200 and b"hello.txt" in reply["body"], reply
        with pytest.raises(ActorvisorError, match="nothing answered on port 8001"):
            await machine.fetch(8001, "/", "GET", {}, b"")
    finally:
        await machine.exec("pkill -f http.server || true")
        await server
