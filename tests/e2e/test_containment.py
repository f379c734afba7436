"""The VM holds against its own processes, through the real service.

The service runs as root with the Anthropic key in its environment (as `make run` does);
an attacker controls one actor's VM through `exec`. Each attack must fail or hit a limit
inside that VM, with a `vmLimit` event in its log, while a second actor keeps answering
(its `getRuntimeHealth` latency is printed) and the attacked actor keeps working. Then
the actor sleeps, and nothing of its VM is left on the host."""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from protocol.aio import Client
from supervisor.actors import actor_id_for
from tests.support import LONG_SLEEP, leftover_sleeps
from tests.vmworker.test_sandbox import find_in_vm

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containment needs the service's root")

ATTACKS: list[tuple[str, str, int]] = [
    ("pids", f"for i in $(seq 5000); do sleep {LONG_SLEEP} 2>/dev/null & done; echo spawned", 60),
    ("memory", "python3 -c \"x = b'y' * (4 << 30)\"", 60),
    ("disk", "dd if=/dev/zero of=/workspace/fill bs=1M count=3072", 60),
    ("cpu", "for i in $(seq 8); do timeout 3 sh -c 'while :; do :; done' & done; wait", 30),
]


async def _probe(client: Client, key: str, stop: asyncio.Event, samples: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        health = await client.action("vm", key, "getRuntimeHealth")
        assert health["booted"]
        samples.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.02)


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 2 else max(samples)


async def _events(client: Client, key: str) -> list[dict[str, Any]]:
    page = await client.action("vm", key, "replayEvents", {"limit": 1000})
    return [{"name": e["name"], **e["args"][0]} for e in page["events"]]


async def test_attacks_from_inside_a_vm_fail_and_stay_inside_it(make_supervisor: Any) -> None:
    key = "sk-ant-e2e-" + secrets.token_hex(16)
    supervisor = make_supervisor(
        "--vm-memory-mb", "256", "--vm-pids", "256", "--vm-cpus", "0.5", "--vm-disk-mb", "128",
        env={"ANTHROPIC_API_KEY": key})
    async with Client(supervisor.url) as client:
        for actor in ("attacked", "bystander"):
            assert (await client.action("vm", actor, "exec", "echo up", {}))["stdout"] == "up\n"

        found = await client.action("vm", "attacked", "exec", find_in_vm(key), {})
        assert found["stdout"] == "", f"the key is readable in the VM at: {found['stdout']}"
        current = Path("/proc/sys/kernel/core_pattern").read_text().strip()
        wrote = await client.action("vm", "attacked", "exec",
                                    f"printf '%s\\n' '{current}' > /proc/sys/kernel/core_pattern", {})
        assert wrote["exitCode"] != 0

        for kind, command, timeout in ATTACKS:
            stop = asyncio.Event()
            samples: list[float] = []
            probe = asyncio.create_task(_probe(client, "bystander", stop, samples))
            try:
                result = await client.action("vm", "attacked", "exec", command, {"timeoutMs": timeout * 1000})
            finally:
                stop.set()
                await probe
            print(f"{kind}: exit {result['exitCode']}; bystander getRuntimeHealth "
                  f"p50 {statistics.median(samples):.1f} ms, p99 {_p99(samples):.1f} ms "
                  f"over {len(samples)} calls")
            if kind == "pids":
                held = leftover_sleeps()
                assert 0 < len(held) < 256
                for proc in held:
                    proc.kill()
                psutil.wait_procs(held, timeout=5)
            elif kind == "memory":
                assert result["exitCode"] == 137
            elif kind == "disk":
                assert result["exitCode"] != 0 and "No space left" in result["stderr"]
            alive = await client.action("vm", "attacked", "exec", "echo alive", {})
            assert alive["stdout"] == "alive\n"

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            kinds = {e["kind"] for e in await _events(client, "attacked") if e["name"] == "vmLimit"}
            if kinds >= {"pids", "memory", "disk", "cpu"}:
                break
            await asyncio.sleep(0.5)
        assert kinds >= {"pids", "memory", "disk", "cpu"}, kinds

        health = await client.action("vm", "attacked", "getRuntimeHealth")
        worker = psutil.Process(health["pid"])
        vm_uids = {p.uids().real for p in worker.children(recursive=True)} - {0}
        assert vm_uids, "the VM's processes run under a host uid of their own"
        await client.action("vm", "attacked", "exec", f"sleep {LONG_SLEEP} &", {})
        request = urllib.request.Request(
            f"{supervisor.url}/admin/actors/{actor_id_for('vm', 'attacked')}/sleep", method="POST")
        await asyncio.to_thread(urllib.request.urlopen, request)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (worker.is_running() or leftover_sleeps()):
            await asyncio.sleep(0.1)
        assert not leftover_sleeps()
        assert not [p for p in psutil.process_iter(["uids"])
                    if p.info["uids"] and p.info["uids"].real in vm_uids]
