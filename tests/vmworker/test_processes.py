"""Processes and shells in the VM, through the actions, with their output in the log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any, cast

import pytest

from protocol.errors import ActorvisorError, ErrorCode
from protocol.worker import WorkerEvent
from tests.support import LONG_SLEEP, eventually, leftover_sleeps
from vmworker.outbox import Outbox
from vmworker.processes import ProcessLimits, ProcessTable

from .conftest import InProcessActor
from .harness import payload


def events(actor: InProcessActor, name: str, **match: Any) -> list[dict[str, Any]]:
    return [payload(m) for m in actor.sent if isinstance(m, WorkerEvent) and m.name == name
            and all(payload(m).get(k) == v for k, v in match.items())]


async def exited(actor: InProcessActor, name: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await actor.outbox.flush()
        if found := events(actor, name, **match):
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {name} {match}")


def output(actor: InProcessActor, pid: int, stream: str = "stdout") -> bytes:
    return b"".join(e["data"] for e in events(actor, "processOutput", pid=pid, stream=stream))


async def test_spawn_streams_every_line_once_in_order_then_exit(actor: InProcessActor) -> None:
    pid = (await actor.call("spawn", "sh", ["-c", "for i in $(seq 1 20000); do echo $i; done"]))["pid"]
    assert await actor.call("waitProcess", pid) == {"exitCode": 0, "signal": None}
    exit_event = await exited(actor, "processExit", pid=pid)
    lines = output(actor, pid).decode().split()
    assert lines == [str(i) for i in range(1, 20001)]
    chunks = events(actor, "processOutput", pid=pid)
    assert len(chunks) < 2000, "small writes are coalesced"
    assert all(c["seq"] < exit_event["seq"] for c in chunks)
    info = await actor.call("getProcess", pid)
    assert (info["running"], info["exitCode"], info["command"], info["args"][0]) == (False, 0, "sh", "-c")


async def test_output_is_binary_exact(actor: InProcessActor) -> None:
    pid = (await actor.call("spawn", "sh", ["-c", "head -c 1000000 /dev/urandom | tee /workspace/r.bin"]))["pid"]
    await actor.call("waitProcess", pid)
    await exited(actor, "processExit", pid=pid)
    data = output(actor, pid)
    assert len(data) == 1_000_000
    assert hashlib.sha256(data).digest() == hashlib.sha256(await actor.call("readFile", "/workspace/r.bin")).digest()


async def test_stdin_and_signals(actor: InProcessActor) -> None:
    pid = (await actor.call("spawn", "cat", [], {"streamStdin": True}))["pid"]
    for chunk in ("one\n", b"two\n", "three\n"):
        await actor.call("writeProcessStdin", pid, chunk)
    await actor.call("closeProcessStdin", pid)
    assert await actor.call("waitProcess", pid) == {"exitCode": 0, "signal": None}
    await exited(actor, "processExit", pid=pid)
    assert output(actor, pid) == b"one\ntwo\nthree\n"
    err = await _error(actor.call("writeProcessStdin", pid, "late"))
    assert err.code is ErrorCode.INVALID_ARGS

    sleeper = (await actor.call("spawn", "sleep", [LONG_SLEEP]))["pid"]
    await actor.call("killProcess", sleeper, "SIGINT")
    assert await actor.call("waitProcess", sleeper) == {"exitCode": None, "signal": "SIGINT"}
    event = await exited(actor, "processExit", pid=sleeper)
    assert event["signal"] == "SIGINT"

    stubborn = (await actor.call("spawn", "sh", ["-c", f"trap '' TERM; echo deaf; sleep {LONG_SLEEP}"]))["pid"]
    await eventually(lambda: output(actor, stubborn) == b"deaf\n")  # its trap is set
    started = time.monotonic()
    task = asyncio.create_task(actor.call("stopProcess", stubborn))
    result = await task
    assert result["signal"] == "SIGKILL" and time.monotonic() - started >= 4
    assert not leftover_sleeps()


async def test_shell_is_a_real_terminal(actor: InProcessActor) -> None:
    shell = (await actor.call("openShell", {"cols": 80, "rows": 24}))["shellId"]

    async def screen_has(text: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await actor.outbox.flush()
            data = b"".join(e["data"] for e in events(actor, "shellData", shellId=shell))
            if text.encode() in data:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared in: {data[-500:]!r}")

    await actor.call("writeShell", shell, "stty size\n")
    await screen_has("24 80")
    await actor.call("resizeShell", shell, 120, 40)
    await actor.call("writeShell", shell, "stty size\n")
    await screen_has("40 120")
    await actor.call("writeShell", shell, f"sleep {LONG_SLEEP}\n")
    await asyncio.sleep(0.5)
    assert leftover_sleeps()
    await actor.call("writeShell", shell, "\u0003")
    await actor.call("writeShell", shell, "echo back-at-$((40+2))\n")
    await screen_has("back-at-42")
    assert not leftover_sleeps()
    await actor.call("writeShell", shell, "exit\n")
    assert await actor.call("waitShell", shell) == {"exitCode": 0, "signal": None}
    assert (await exited(actor, "shellExit", shellId=shell))["exitCode"] == 0


async def test_output_kept_in_the_log_is_bounded(actor: InProcessActor) -> None:
    # The fixture keeps 1 MiB per process: 8 MiB of output leaves about 1 MiB and a marker.
    pid = (await actor.call("spawn", "sh", ["-c", "yes | head -c 8000000"]))["pid"]
    await actor.call("waitProcess", pid)
    await exited(actor, "processExit", pid=pid)
    assert len(output(actor, pid)) == 8_000_000, "live subscribers still got every byte"
    markers = events(actor, "processOutputCompacted", pid=pid)
    assert markers and sum(m["droppedBytes"] for m in markers) >= 6_000_000
    kept = await actor.call("replayEvents", {"names": ["processOutput"], "limit": 10000})
    logged = sum(len(e["args"][0]["data"]) for e in kept["events"] if e["args"][0]["pid"] == pid)
    assert logged <= (1 << 20) * 5 // 4


async def test_bad_input_is_refused_precisely(actor: InProcessActor) -> None:
    cases: list[tuple[str, list[Any], ErrorCode]] = [
        ("spawn", [""], ErrorCode.INVALID_ARGS),
        ("spawn", ["echo", "notalist"], ErrorCode.INVALID_ARGS),
        ("spawn", ["echo", [1, 2]], ErrorCode.INVALID_ARGS),
        ("spawn", ["echo", [], {"cwd": "/etc"}], ErrorCode.INVALID_PATH),
        ("spawn", ["echo", [], {"bogus": 1}], ErrorCode.INVALID_ARGS),
        ("spawn", ["no-such-program-here", []], ErrorCode.INVALID_ARGS),
        ("killProcess", [999999, "SIGTERM"], ErrorCode.PROCESS_NOT_FOUND),
        ("killProcess", ["12", "SIGTERM"], ErrorCode.INVALID_ARGS),
        ("waitProcess", [424242], ErrorCode.PROCESS_NOT_FOUND),
        ("writeShell", ["shell-nope", "x"], ErrorCode.SHELL_NOT_FOUND),
        ("openShell", [{"cols": 0}], ErrorCode.INVALID_ARGS),
        ("openShell", [{"rows": 10**9}], ErrorCode.INVALID_ARGS),
        ("openShell", [{"cols": -3}], ErrorCode.INVALID_ARGS),
    ]
    for name, args, code in cases:
        err = await _error(actor.call(name, *args))
        assert err.code is code, (name, args, err)
    pid = (await actor.call("spawn", "sleep", [LONG_SLEEP]))["pid"]
    for bad in ("SIGNOPE", 0.5, True, 999, [1]):
        err = await _error(actor.call("killProcess", pid, bad))
        assert err.code is ErrorCode.INVALID_ARGS, bad
    err = await _error(actor.call("writeProcessStdin", pid, "x"))
    assert err.code is ErrorCode.INVALID_ARGS
    await actor.call("killProcess", pid, 9)
    assert (await actor.call("waitProcess", pid))["signal"] == "SIGKILL"
    assert (await actor.call("exec", "echo fine"))["stdout"] == "fine\n"


async def test_processes_and_shells_share_the_one_machine(actor: InProcessActor) -> None:
    server = (await actor.call("spawn", "python3", ["-m", "http.server", "8000", "--bind", "127.0.0.1"]))["pid"]
    shell = (await actor.call("openShell", {}))["shellId"]
    fetch = ("for i in $(seq 100); do python3 -c \"import urllib.request as u; "
             "print(u.urlopen('http://127.0.0.1:8000/').status)\" 2>/dev/null && break; sleep 0.05; done")
    result = await actor.call("exec", fetch)
    assert result["stdout"].strip() == "200"
    ps = (await actor.call("exec", "ps -e -o pid=,args="))["stdout"]
    assert any(line.split(None, 1)[0] == str(server) and "http.server" in line for line in ps.splitlines())
    assert "bash" in ps
    # A process started inside the shell is the VM's, not the API's: listProcesses shows
    # only what `spawn` started.
    await actor.call("writeShell", shell, f"sleep {LONG_SLEEP} &\n")
    listed = await actor.call("listProcesses")
    assert [p["pid"] for p in listed] == [server]
    await actor.call("stopProcess", server)
    await actor.call("closeShell", shell)


async def _error(call: Any) -> ActorvisorError:
    with pytest.raises(ActorvisorError) as info:
        await call
    return info.value



async def test_concurrent_saves_of_the_registry_do_not_race(tmp_path: Path) -> None:
    # Each spawn and exit saves running.json from a thread; saved at once, they raced on
    # one partial file (FileNotFoundError on the rename, a failed spawn).
    table = ProcessTable(cast(Outbox, None), tmp_path, ProcessLimits())
    await asyncio.gather(*(table._save_running() for _ in range(200)))
    assert json.loads((tmp_path / "running.json").read_text()) == []
