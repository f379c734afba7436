from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from protocol.errors import ActorvisorError, ErrorCode
from tests.support import LONG_SLEEP, leftover_sleeps
from vmworker.sandbox import MAX_OUTPUT_BYTES, Sandbox, SandboxPaths, bwrap_argv, prepare


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    paths = SandboxPaths.for_actor(tmp_path / "actor")
    prepare(paths)
    box = Sandbox(paths)
    try:
        yield box
    finally:
        await box.kill_all()


async def sh(box: Sandbox, script: str, **kwargs: object) -> tuple[int, str, str]:
    result = await box.run(["/bin/bash", "-c", script], **kwargs)  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def host_listener() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_argv_isolates_by_construction(tmp_path: Path) -> None:
    argv = bwrap_argv(SandboxPaths.for_actor(tmp_path), ["true"], env={"A": "b"})
    assert argv[0] == "bwrap"
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert "--share-net" not in argv
    sources = [argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind", "--ro-bind-try")]
    assert not any(s in ("/", "/etc", "/root", "/home", "/etc/shadow") for s in sources)
    assert argv[-2:] == ["--", "true"]


async def test_vm_cannot_see_host_secrets(sandbox: Sandbox) -> None:
    code, _, err = await sh(sandbox, "cat /etc/shadow")
    assert code != 0 and "No such file" in err
    code, _, err = await sh(sandbox, "ls /root")
    assert code != 0 and "No such file" in err
    _, out, _ = await sh(sandbox, "ls -A /etc; ls -A /home")
    assert set(out.split()) <= {"alternatives", "group", "hosts", "ld.so.cache", "localtime",
                                "nsswitch.conf", "passwd"}
    _, out, _ = await sh(sandbox, "cat /etc/passwd")
    assert out.startswith("root:x:0:0:root:/workspace:")
    # Every mount the VM has, by mount point: nothing of the host's home, /root, or another
    # actor's directory can be among them.
    _, out, _ = await sh(sandbox, "cut -d' ' -f5 /proc/self/mountinfo")
    mounts = set(out.split())
    allowed = {"/", "/usr", "/workspace", "/tmp", "/home", "/proc", "/dev"}
    assert {m for m in mounts if m not in allowed and not m.startswith(("/etc/", "/dev/", "/proc/"))} == set()


async def test_vm_has_no_network(sandbox: Sandbox, host_listener: int) -> None:
    code, _, err = await sh(sandbox, f"exec 3<>/dev/tcp/127.0.0.1/{host_listener}")
    assert code != 0 and "refused" in err.lower()
    code, out, _ = await sh(sandbox, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert (code, out.split()) == (0, ["lo"])


async def test_workspace_persists_in_the_actor_root(sandbox: Sandbox) -> None:
    code, _, _ = await sh(sandbox, "echo hello > /workspace/out.txt && echo t > /tmp/t && mkdir -p /home/u")
    assert code == 0
    root = sandbox.paths.root
    assert (root / "workspace/out.txt").read_text() == "hello\n"
    assert (root / "tmp/t").exists() and (root / "home/u").is_dir()
    code, out, _ = await sh(sandbox, "cat out.txt; pwd; echo $HOME")
    assert out.split() == ["hello", "/workspace", "/workspace"]


async def test_system_is_read_only_and_capabilities_dropped(sandbox: Sandbox) -> None:
    code, _, err = await sh(sandbox, "touch /usr/x || touch /etc/x || touch /x || mkdir /opt")
    assert code != 0 and "Read-only" in err
    _, out, _ = await sh(sandbox, "grep CapEff /proc/self/status")
    assert out.split() == ["CapEff:", "0000000000000000"]
    code, _, _ = await sh(sandbox, "unshare --user true")
    assert code != 0, "nested user namespaces must be disabled"


async def test_environment_is_cleared_and_rebuilt(sandbox: Sandbox) -> None:
    os.environ["AVW_HOST_SECRET"] = "leak"
    try:
        _, out, _ = await sh(sandbox, "env | sort", env={"MINE": "1"})
    finally:
        del os.environ["AVW_HOST_SECRET"]
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert "AVW_HOST_SECRET" not in names
    assert {"PATH", "HOME", "LANG", "MINE"} <= names


async def test_exit_code_and_output_cap(sandbox: Sandbox) -> None:
    code, out, err = await sh(sandbox, "echo out; echo err >&2; exit 7")
    assert (code, out, err) == (7, "out\n", "err\n")
    code, out, _ = await sh(sandbox, f"head -c {MAX_OUTPUT_BYTES + 100} /dev/zero | tr '\\0' a")
    assert code == 0
    assert out.startswith("a" * MAX_OUTPUT_BYTES)
    assert out.endswith("[output truncated: 100 more bytes not shown]")


async def test_timeout_kills_the_whole_tree(sandbox: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(ActorvisorError) as info:
        await sh(sandbox, f"sleep {LONG_SLEEP} & sleep {LONG_SLEEP} & echo started; wait", timeout_s=0.5)
    assert info.value.code is ErrorCode.ACTION_TIMEOUT
    assert info.value.metadata["stdout"] == "started\n"
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.2)
    assert not leftover_sleeps()


async def test_cancelling_the_caller_kills_the_command(sandbox: Sandbox) -> None:
    task = asyncio.create_task(sh(sandbox, f"sleep {LONG_SLEEP}"))
    await asyncio.sleep(0.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.2)
    assert not leftover_sleeps()


async def test_cancelling_at_any_moment_of_start_up_leaves_nothing(sandbox: Sandbox) -> None:
    # The sandbox's init is tied to bwrap only once it has set --die-with-parent; a
    # cancel in the first milliseconds must not leave it (and its command) behind.
    for step in range(20):
        task = asyncio.create_task(sandbox.run(["sleep", LONG_SLEEP]))
        await asyncio.sleep(step * 0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for _ in range(50):
        if not leftover_sleeps():
            break
        await asyncio.sleep(0.1)
    assert not leftover_sleeps()
    assert not _bwraps_of_this_test(sandbox)


def _bwraps_of_this_test(sandbox: Sandbox) -> list[psutil.Process]:
    root = str(sandbox.paths.root)
    return [p for p in psutil.process_iter(["cmdline"])
            if any(root in arg for arg in (p.info["cmdline"] or []))]


async def test_background_process_does_not_outlive_its_command(sandbox: Sandbox) -> None:
    code, _, _ = await sh(sandbox, f"(sleep {LONG_SLEEP} >/dev/null 2>&1 &); echo done", timeout_s=10)
    assert code == 0
    await asyncio.sleep(0.2)
    assert not leftover_sleeps()
