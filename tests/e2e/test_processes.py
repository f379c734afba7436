"""Processes and shells through the real service: the npm client, a flood, lifecycles."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
import urllib.request
from typing import Any

import psutil
import pytest

from protocol.aio import Client
from protocol.errors import ActorvisorError, ErrorCode
from protocol.processes import Processes, ProcessExit
from supervisor.actors import actor_id_for
from tests.support import LONG_SLEEP, eventually, leftover_sleeps

from .test_npm_client import ENCODINGS, run_node
from .test_slow_consumer import open_stalled_subscriber


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("mode", ["live", "reconnect"])
def test_npm_client_gets_every_line_once_in_order(supervisor: Any, encoding: str, mode: str) -> None:
    result = run_node(supervisor.url, "processes.mjs", encoding, mode, timeout=120)
    assert (result["lines"], result["inOrder"]) == (20000, True), result
    assert result["exit"] == {"exitCode": 0, "signal": None} and result["exitLast"]
    assert result["waited"] == {"exitCode": 0, "signal": None}
    assert result["dataTypes"] == ["[object Uint8Array]"], "data is bytes, as agentOS sends it"
    if mode == "reconnect":
        assert result["resumedAfter"] is not None


async def _events(client: Client, key: str, names: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await client.action("vm", key, "replayEvents", {"after": after, "names": names, "limit": 10000})
        out += [{"name": e["name"], **e["args"][0]} for e in page["events"]]
        after = page["nextCursor"]
        if not page["hasMore"]:
            return out


async def test_a_flood_with_a_stalled_subscriber_stays_bounded(make_supervisor: Any) -> None:
    supervisor = make_supervisor()
    async with Client(supervisor.url) as client:
        for key in ("flood", "calm"):
            await client.action("vm", key, "getRuntimeHealth")
        # A subscriber that never reads: its connection is cut at the queue bound.
        stalled = open_stalled_subscriber(supervisor.port, "flood", "processOutput")
        worker = psutil.Process((await client.action("vm", "flood", "getRuntimeHealth"))["pid"])
        sup = psutil.Process(supervisor.proc.pid)
        peak = {"worker": 0, "supervisor": 0}
        samples: list[float] = []
        pid = (await client.action("vm", "flood", "spawn", "sh", ["-c", "yes | head -c 200M"]))["pid"]
        waiting = asyncio.create_task(client.action("vm", "flood", "waitProcess", pid))
        while not waiting.done():
            started = time.perf_counter()
            await client.action("vm", "calm", "getRuntimeHealth")
            samples.append((time.perf_counter() - started) * 1000)
            peak["worker"] = max(peak["worker"], worker.memory_info().rss)
            peak["supervisor"] = max(peak["supervisor"], sup.memory_info().rss)
            await asyncio.sleep(0.05)
        assert (await waiting) == {"exitCode": 0, "signal": None}
        p99 = statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]
        print(f"200 MB flood: peak RSS worker {peak['worker'] / 2**20:.0f} MiB, supervisor "
              f"{peak['supervisor'] / 2**20:.0f} MiB; another actor's getRuntimeHealth p50 "
              f"{statistics.median(samples):.1f} ms, p99 {p99:.1f} ms over {len(samples)} calls")
        assert peak["worker"] < 400 * 2**20 and peak["supervisor"] < 400 * 2**20
        logged = await _events(client, "flood", ["processOutput"])
        kept = sum(len(e["data"]) for e in logged if e["pid"] == pid)
        assert kept <= 8 * 2**20 * 5 // 4, kept
        marks = await _events(client, "flood", ["processOutputCompacted"])
        assert sum(m["droppedBytes"] for m in marks) + kept == 200 * 2**20
        stalled.close()


@pytest.mark.parametrize("ending", ["sleep", "crash", "shutdown"])
async def test_processes_and_shells_end_with_their_vm(make_supervisor: Any, ending: str) -> None:
    supervisor = make_supervisor()
    key = f"ends-{ending}"
    async with Client(supervisor.url) as client:
        pid = (await client.action("vm", key, "spawn", "sleep", [LONG_SLEEP]))["pid"]
        shell = (await client.action("vm", key, "openShell", {}))["shellId"]
        await client.action("vm", key, "writeShell", shell, f"sleep {LONG_SLEEP} &\n")
        await eventually(lambda: len(leftover_sleeps()) == 2)
        worker = (await client.action("vm", key, "getRuntimeHealth"))["pid"]
        actor = actor_id_for("vm", key)
        if ending == "sleep":
            request = urllib.request.Request(f"{supervisor.url}/admin/actors/{actor}/sleep", method="POST")
            await asyncio.to_thread(urllib.request.urlopen, request)
        elif ending == "crash":
            os.kill(worker, signal.SIGKILL)
        else:
            supervisor.stop()
        await eventually(lambda: not psutil.pid_exists(worker) and not leftover_sleeps())
    if ending == "shutdown":
        supervisor.start()
    async with Client(supervisor.url) as client:
        async def logged() -> list[dict[str, Any]] | None:
            found = await _events(client, key, ["processExit", "shellExit", "vmShutdown"])
            names = {e["name"] for e in found}
            return found if {"processExit", "shellExit", "vmShutdown"} <= names else None
        events = await eventually(logged)
    exits = {e["name"]: e for e in events if e["name"] != "vmShutdown"}
    assert exits["processExit"]["pid"] == pid and exits["shellExit"]["shellId"] == shell
    reason = "vmLost" if ending == "crash" else "vmStopped"
    assert exits["processExit"]["reason"] == exits["shellExit"]["reason"] == reason
    assert exits["processExit"]["signal"] in ("SIGTERM", "SIGKILL", "SIGHUP")
    assert any(e["name"] == "vmShutdown" for e in events)


async def test_the_python_client_drives_processes_and_shells(supervisor: Any) -> None:
    async with Client(supervisor.url) as client:
        conn = await client.connect("vm", "py-procs", reconnect=False)
        procs = Processes(conn)
        # Output from the first instant (no sleep before writing) is not missed.
        proc = await procs.spawn("sh", ["-c", "seq 1 3000; echo oops >&2; exit 3"])
        chunks = [chunk async for chunk in proc.output()]
        out = b"".join(c.data for c in chunks if c.stream == "stdout")
        assert out.decode().split() == [str(i) for i in range(1, 3001)]
        assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"oops\n"
        assert [c.seq for c in chunks] == sorted({c.seq for c in chunks})
        assert await proc.wait() == ProcessExit(3, None)
        assert any(p.pid == proc.pid and not p.running and p.exit_code == 3 for p in await procs.list())

        cat = await procs.spawn("cat", stream_stdin=True)
        for part in ("one ", b"two ", "three"):
            await cat.write(part)
        await cat.close_stdin()
        assert b"".join([c.data async for c in cat.output()]) == b"one two three"

        shell = await procs.open_shell(command="/bin/sh", cols=80, rows=24)
        output = aiter(shell.output())
        await shell.write("stty size\n")
        screen = b""
        while b"24 80" not in screen:  # resized only once the first size was printed
            screen += (await anext(output)).data
        await shell.resize(120, 40)
        await shell.write("stty size; exit 0\n")
        screen += b"".join([c.data async for c in output])
        assert b"24 80" in screen and b"40 120" in screen, screen
        assert await shell.wait() == ProcessExit(0, None)
        await conn.close()


async def test_per_vm_limits_come_from_the_service_config(make_supervisor: Any) -> None:
    supervisor = make_supervisor("--vm-max-processes", "2", "--vm-max-shells", "1")
    async with Client(supervisor.url) as client:
        pids = [(await client.action("vm", "capped", "spawn", "sleep", [LONG_SLEEP]))["pid"] for _ in range(2)]
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", "capped", "spawn", "true")
        assert info.value.code is ErrorCode.VM_LIMIT and "2" in info.value.message
        await client.action("vm", "capped", "openShell", {})
        with pytest.raises(ActorvisorError) as info:
            await client.action("vm", "capped", "openShell", {})
        assert info.value.code is ErrorCode.VM_LIMIT
        # A process that ends frees its place; the actor kept serving throughout.
        await client.action("vm", "capped", "stopProcess", pids[0])
        pid = (await client.action("vm", "capped", "spawn", "true"))["pid"]
        assert await client.action("vm", "capped", "waitProcess", pid) == {"exitCode": 0, "signal": None}
        await client.action("vm", "capped", "stopProcess", pids[1])
