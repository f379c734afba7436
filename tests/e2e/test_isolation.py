"""One OS process per actor, and a VM that is a real sandbox."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from protocol.aio import Client
from protocol.errors import ActorvisorError, ErrorCode
from supervisor.actors import actor_id_for
from tests.support import SupervisorProc, eventually


async def test_one_process_per_actor_and_a_kill_stays_contained(supervisor: SupervisorProc) -> None:
    assert supervisor.proc is not None
    async with Client(supervisor.url) as client:
        keys = [f"iso-{i}" for i in range(3)]
        health = await asyncio.gather(*(client.action("vm", k, "getRuntimeHealth") for k in keys))
        pids = [h["pid"] for h in health]
        assert len(set(pids)) == 3
        assert set(pids) <= set(supervisor.worker_pids())
        for pid in pids:
            # Each worker leads its own process group, apart from the supervisor's.
            assert os.getpgid(pid) == pid != os.getpgid(supervisor.proc.pid)

        # A turn in flight on the victim fails with a clear error when its worker dies.
        victim = keys[0]
        session = await client.action("vm", victim, "createSession", "local", {})
        turn = asyncio.create_task(
            client.action("vm", victim, "exec", "sleep 30", {}))
        await asyncio.sleep(0.5)
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(ActorvisorError) as info:
            await asyncio.wait_for(turn, 10)
        assert info.value.code is ErrorCode.WORKER_CRASHED

        # The others never noticed.
        for key, pid in zip(keys[1:], pids[1:]):
            out = await client.action("vm", key, "exec", "echo alive", {})
            assert out["stdout"] == "alive\n"
            assert (await client.action("vm", key, "getRuntimeHealth"))["pid"] == pid

        # The next action starts the victim again, in a new process, with its log intact.
        again = await client.action("vm", victim, "getRuntimeHealth")
        assert again["pid"] != pids[0]
        sessions = await client.action("vm", victim, "listSessions")
        assert session["sessionId"] in [s["sessionId"] for s in sessions]


async def test_vm_is_a_sandbox(supervisor: SupervisorProc, tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        async with Client(supervisor.url) as client:
            async def sh(command: str) -> dict[str, Any]:
                result: dict[str, Any] = await client.action("vm", "sandboxed", "exec", command, {})
                return result

            shadow = await sh("cat /etc/shadow")
            assert shadow["exitCode"] != 0
            secret = tmp_path / "host-secret.txt"
            secret.write_text("top secret")
            home = await sh(f"cat {secret}; ls -A /root")
            assert "top secret" not in home["stdout"]
            assert not set(home["stdout"].split()) & set(os.listdir("/root"))
            net = await sh(f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected")
            assert "connected" not in net["stdout"] and net["exitCode"] != 0
            ifaces = await sh("cat /proc/net/dev")
            names = {line.split(":")[0].strip() for line in ifaces["stdout"].splitlines() if ":" in line}
            assert names == {"lo"}
            state = await sh("ls /; echo ---; cat /proc/self/status | grep CapEff")
            assert "CapEff:\t0000000000000000" in state["stdout"]

            wrote = await sh("echo persisted > /workspace/note.txt && pwd")
            assert wrote["stdout"].strip() == "/workspace"
            first = await client.action("vm", "sandboxed", "getRuntimeHealth")
            # The actor's disk outlives its VM: sleep it, and the next action's VM has it.
            request = urllib.request.Request(
                f"{supervisor.url}/admin/actors/{actor_id_for('vm', 'sandboxed')}/sleep", method="POST")
            await asyncio.to_thread(urllib.request.urlopen, request)
            await eventually(lambda: first["pid"] not in supervisor.worker_pids())
            assert await client.action("vm", "sandboxed", "readFile", "/workspace/note.txt") == b"persisted\n"
            again = await client.action("vm", "sandboxed", "getRuntimeHealth")
        assert again["booted"] and again["pid"] != first["pid"]
        assert (supervisor.state_dir / "actors" / actor_id_for("vm", "sandboxed") / "disk.img").is_file()
    finally:
        listener.close()
