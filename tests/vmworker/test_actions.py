"""Action arguments, results and error codes, in process (real VM, real log)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import ActionName

from .conftest import InProcessActor


async def error(actor: InProcessActor, name: str, *args: Any) -> ActorvisorError:
    with pytest.raises(ActorvisorError) as info:
        await actor.call(name, *args)
    return info.value


@pytest.mark.parametrize(("call", "code", "fragment"), [
    (("nope",), ErrorCode.UNKNOWN_ACTION, "no action 'nope'"),
    (("createSession", "pi"), ErrorCode.INVALID_ARGS, "argument 1 (agentType) must be one of"),
    (("createSession", ["local"]), ErrorCode.INVALID_ARGS, "argument 1 (agentType) must be one of"),
    (("createSession", "local", {"permissionPolicy": {}}), ErrorCode.INVALID_ARGS, "permissionPolicy"),
    (("createSession", "local", {"permissionPolicy": {"a": 1}}), ErrorCode.INVALID_ARGS, "permissionPolicy"),
    (("createSession", "local", []), ErrorCode.INVALID_ARGS, "must be an object"),
    (("createSession", "claude", {"thinking": "yes"}), ErrorCode.INVALID_ARGS, "thinking must be a boolean"),
    (("createSession", "claude", {"maxTokens": 0}), ErrorCode.INVALID_ARGS, "maxTokens must be an integer"),
    (("createSession", "local", {"bogus": 1}), ErrorCode.INVALID_ARGS, "unknown option 'bogus'"),
    (("createSession", "local", {"env": {"A B": "x"}}), ErrorCode.INVALID_ARGS, "not a valid variable name"),
    (("createSession", "local", {"permissionPolicy": "yolo"}), ErrorCode.INVALID_ARGS, "permissionPolicy"),
    (("createSession", "local", {"cwd": "/etc"}), ErrorCode.INVALID_PATH, "read-only system mount"),
    (("createSession", "local", {}, 3), ErrorCode.INVALID_ARGS, "takes at most 2 argument(s)"),
    (("sendPrompt", "s"), ErrorCode.INVALID_ARGS, "argument 2 (text) must be a string, got null"),
    (("sendPrompt", "missing", "hi"), ErrorCode.SESSION_NOT_FOUND, "no session 'missing'"),
    (("getSessionEvents", "missing"), ErrorCode.SESSION_NOT_FOUND, "no session"),
    (("replayEvents", {"limit": 0}), ErrorCode.INVALID_ARGS, "limit must be an integer from 1 to 10000"),
    (("replayEvents", {"limit": 10001}), ErrorCode.INVALID_ARGS, "limit"),
    (("replayEvents", {"after": -1}), ErrorCode.INVALID_ARGS, "after"),
    (("replayEvents", {"after": True}), ErrorCode.INVALID_ARGS, "after"),
    (("replayEvents", {"names": "x"}), ErrorCode.INVALID_ARGS, "names must be a list of strings"),
    (("readFile", 5), ErrorCode.INVALID_ARGS, "readFile: argument 1 (path) must be a string"),
    (("readFile", "/etc/shadow"), ErrorCode.INVALID_PATH, "read-only system mount /etc"),
    (("readFile", "/../../etc/passwd"), ErrorCode.INVALID_PATH, "escapes the VM root"),
    (("readFile", "/workspace/none"), ErrorCode.FILE_NOT_FOUND, "no such file"),
    (("writeFile", "/workspace/x", 5), ErrorCode.INVALID_ARGS, "must be a string or bytes"),
    (("mkdir", "/workspace/x", {"recursive": "yes"}), ErrorCode.INVALID_ARGS, "recursive must be a boolean"),
    (("exec", "a\0b"), ErrorCode.INVALID_ARGS, "without NUL bytes"),
    (("exec", "true", {"timeoutMs": 0}), ErrorCode.INVALID_ARGS, "timeoutMs"),
    (("exec", "true", {"cwd": "/workspace/none"}), ErrorCode.FILE_NOT_FOUND, None),
    (("exec", "true", {"env": ["A"]}), ErrorCode.INVALID_ARGS, "env must be an object"),
    (("respondPermission", "missing", "p", "once"), ErrorCode.SESSION_NOT_FOUND, None),
    (("respondPermission", "s", "p", ["once"]), ErrorCode.INVALID_ARGS, "argument 3 (reply)"),
])
async def test_errors(actor: InProcessActor, call: tuple[Any, ...], code: ErrorCode,
                      fragment: str | None) -> None:
    exc = await error(actor, *call)
    assert exc.code is code, exc
    if fragment is not None:
        assert fragment in exc.message


async def test_filesystem_actions(actor: InProcessActor) -> None:
    assert await actor.call("writeFile", "/workspace/a/b.txt", "héllo") is None
    assert await actor.call("readFile", "a/b.txt") == "héllo".encode()
    assert await actor.call("writeFile", "/workspace/bin", b"\x00\xff") is None
    assert await actor.call("readFile", "/workspace/bin") == b"\x00\xff"
    assert await actor.call("readdir", "/workspace") == ["a", "bin"]
    stat = await actor.call("stat", "/workspace/a/b.txt")
    assert isinstance(stat, dict)
    assert stat["size"] == 6 and stat["isFile"] and not stat["isDirectory"]
    assert not stat["isSymbolicLink"] and isinstance(stat["mtimeMs"], int) and stat["mode"] & 0o777 == 0o644
    assert await actor.call("exists", "/workspace/a") is True
    assert await actor.call("exists", "/workspace/zz") is False
    assert await actor.call("mkdir", "/workspace/m/n", {"recursive": True}) is None
    assert (await error(actor, "mkdir", "/workspace/m/n")).code is ErrorCode.FILE_EXISTS
    assert (await error(actor, "deleteFile", "/workspace/m")).code is ErrorCode.IS_A_DIRECTORY
    assert await actor.call("deleteFile", "/workspace/m", {"recursive": True}) is None
    assert await actor.call("deleteFile", "/workspace/bin") is None
    assert await actor.call("readdir", "/workspace") == ["a"]


async def test_symlink_planted_by_the_vm_is_refused(actor: InProcessActor) -> None:
    result = await actor.call("exec", "ln -s /etc /workspace/etc && ln -s / /workspace/a")
    assert result == {"exitCode": 0, "stdout": "", "stderr": ""}
    # Inside the VM, /etc is its own minimal /etc; on the host the link would point at the
    # host's. Either way the worker must not follow it.
    for path in ("/workspace/etc/passwd", "/workspace/a/root"):
        exc = await error(actor, "readFile", path)
        assert exc.code is ErrorCode.INVALID_PATH and "symlinks are not followed" in exc.message
    exc = await error(actor, "writeFile", "/workspace/a/etc/cron.d/x", "pwn")
    assert exc.code is ErrorCode.INVALID_PATH
    assert not os.path.exists("/etc/cron.d/x")


async def test_exec(actor: InProcessActor) -> None:
    await actor.call("mkdir", "/home/u", {"recursive": True})
    result = await actor.call("exec", "pwd; echo $X; echo oops >&2; exit 4",
                              {"cwd": "/home/u", "env": {"X": "y"}})
    assert result == {"exitCode": 4, "stdout": "/home/u\ny\n", "stderr": "oops\n"}
    result = await actor.call("exec", "printf '\\377ok'")
    assert result["stdout"] == "\ufffdok"
    exc = await error(actor, "exec", "sleep 5", {"timeoutMs": 200})
    assert exc.code is ErrorCode.ACTION_TIMEOUT and "timed out after 0.2 s" in exc.message


async def test_health(actor: InProcessActor) -> None:
    await actor.call("createSession", "local")
    health = await actor.call("getRuntimeHealth")
    assert isinstance(health, dict)
    assert health["phase"] == "ready" and health["booted"] is True
    assert health["pid"] == os.getpid() and health["sessions"] == 1
    assert health["restarts"] == 0 and health["eventsSeq"] == actor.outbox.last_seq
    assert set(health) == {"phase", "booted", "pid", "uptimeMs", "sessions", "eventsSeq", "restarts"}


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20) | st.sampled_from(["local", "/workspace/x", "x", "once", ""]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["after", "limit", "names", "recursive", "cwd", "env",
                                       "timeoutMs", "permissionPolicy", "x"]), inner, max_size=3),
    max_leaves=8,
)
# exec and sendPrompt would run random programs and prompts (e.g. `sleep: 600`); their
# argument checks are covered above.
_actions = st.sampled_from([a.value for a in ActionName
                            if a not in (ActionName.EXEC, ActionName.SEND_PROMPT)] + ["bogus"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_actions, args=st.lists(_values, max_size=4))
async def test_random_arguments_only_ever_produce_actorvisor_errors(
        actor: InProcessActor, name: str, args: list[Any]) -> None:
    try:
        await asyncio.wait_for(actor.call(name, *args), 10)
    except ActorvisorError as exc:
        assert exc.code is not ErrorCode.INTERNAL, exc
