"""agentOS's documented calls on the in-process actor: shapes, deletion, bad input."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.errors import ActorvisorError, ErrorCode

from .conftest import InProcessActor


async def test_create_session_and_history_shapes(actor: InProcessActor) -> None:
    created = await actor.call("createSession", "local", {"additionalInstructions": "be brief",
                                                          "skipOsInstructions": True})
    assert isinstance(created, dict)
    assert set(created) == {"sessionId", "capabilities", "agentInfo"}
    sid = created["sessionId"]
    reply: Any = await actor.call("prompt", sid, "hello")
    assert reply["text"] == "You said: hello\n" and reply["response"]["result"]["stopReason"] == "end_turn"
    await actor.outbox.flush()
    events: Any = await actor.call("getSessionEvents", sid)
    assert [set(e) for e in events] == [{"seq", "sessionId", "event", "createdAt"}] * len(events)
    seq: Any = await actor.call("getSequencedEvents", sid, {"since": events[0]["seq"]})
    assert [e["sequenceNumber"] for e in seq] == [e["seq"] for e in events[1:]]
    assert [e["notification"] for e in seq] == [e["event"] for e in events[1:]]
    persisted: Any = await actor.call("listPersistedSessions")
    assert [p["sessionId"] for p in persisted] == [sid]


async def test_destroy_deletes_events_and_keeps_a_marker(actor: InProcessActor) -> None:
    sid = (await actor.call("createSession", "local"))["sessionId"]
    await actor.call("sendPrompt", sid, "chunks: 5")
    await actor.outbox.flush()
    before: Any = await actor.call("getSessionEvents", sid)
    result: Any = await actor.call("destroySession", sid)
    assert result["deletedEvents"] == len(before)
    assert result["markerSeq"] > before[-1]["seq"]
    await actor.outbox.flush()
    assert actor.log.last_seq == result["markerSeq"]  # the log's end never moves back
    with pytest.raises(ActorvisorError) as info:
        await actor.call("getSessionEvents", sid)
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND and "destroyed" in info.value.message
    assert await actor.call("listPersistedSessions") == []


async def test_modes_and_config_options(actor: InProcessActor) -> None:
    sid = (await actor.call("createSession", "local"))["sessionId"]
    await actor.call("setModel", sid, "claude-sonnet-4-6")
    await actor.call("setMode", sid, "plan")
    assert (await actor.call("getModes", sid))["currentModeId"] == "plan"
    options: Any = await actor.call("getConfigOptions", sid)
    assert {o["id"]: o["currentValue"] for o in options}["model"] == "claude-sonnet-4-6"
    reply: Any = await actor.call("sendPrompt", sid, "run: touch /workspace/planned")
    assert reply["text"] == "Plan: would run `touch /workspace/planned`.\n"
    assert await actor.call("exists", "/workspace/planned") is False
    with pytest.raises(ActorvisorError) as info:
        await actor.call("setMode", sid, "yolo")
    assert info.value.code is ErrorCode.INVALID_ARGS and "'plan'" in info.value.message


async def test_filesystem_batch_tree_move_delete(actor: InProcessActor) -> None:
    written: Any = await actor.call("writeFiles", [{"path": "/workspace/src/a.txt", "content": "a"},
                                                   {"path": "/workspace/src/b/c.txt", "content": b"cc"}])
    assert all(w["success"] for w in written)
    read: Any = await actor.call("readFiles", ["/workspace/src/a.txt", "/workspace/none"])
    assert read[0]["content"] == b"a" and read[1]["code"] == "actor.file_not_found"
    tree: Any = await actor.call("readdirRecursive", "/workspace/src")
    assert tree == [{"type": "file", "path": "/workspace/src/a.txt", "size": 1},
                    {"type": "directory", "path": "/workspace/src/b", "size": tree[1]["size"]},
                    {"type": "file", "path": "/workspace/src/b/c.txt", "size": 2}]
    assert len(await actor.call("readdirRecursive", "/workspace/src", {"maxDepth": 1})) == 2
    await actor.call("move", "/workspace/src/a.txt", "/workspace/src/b/a.txt")
    await actor.call("delete", "/workspace/src/b", {"recursive": True})
    assert await actor.call("readdir", "/workspace/src") == []
    result: Any = await actor.call("execArgv", "/bin/echo", ["a b", "$HOME"])
    assert result["stdout"] == "a b $HOME\n"


@pytest.mark.parametrize(("call", "code", "fragment"), [
    (("writeFiles", "x"), ErrorCode.INVALID_ARGS, "must be a list"),
    (("writeFiles", [{}] * 1001), ErrorCode.INVALID_ARGS, "the limit is 1000"),
    (("writeFiles", [{"path": "/workspace/a", "content": 3}]), ErrorCode.INVALID_ARGS, "content"),
    (("writeFiles", [{"path": "/etc/passwd", "content": ""}]), ErrorCode.INVALID_PATH, "read-only"),
    (("readFiles", ["/workspace/../../x"]), ErrorCode.INVALID_PATH, "escapes"),
    (("readdirRecursive", "/workspace", {"maxDepth": 0}), ErrorCode.INVALID_ARGS, "maxDepth"),
    (("readdirRecursive", "/workspace", {"exclude": "x"}), ErrorCode.INVALID_ARGS, "exclude"),
    (("move", "/workspace/a", "/root/x"), ErrorCode.INVALID_PATH, "outside"),
    (("move", "/workspace", "/tmp/w"), ErrorCode.INVALID_PATH, "mount point"),
    (("execArgv", "", []), ErrorCode.INVALID_ARGS, "file"),
    (("execArgv", "/bin/true", "notalist"), ErrorCode.INVALID_ARGS, "list"),
    (("createSession", "local", {"mcpServers": [{"type": "ftp"}]}), ErrorCode.INVALID_ARGS, "'local' or 'remote'"),
    (("createSession", "local", {"skipOsInstructions": "yes"}), ErrorCode.INVALID_ARGS, "boolean"),
    (("getSequencedEvents", "missing"), ErrorCode.SESSION_NOT_FOUND, "no session"),
    (("destroySession", 3), ErrorCode.INVALID_ARGS, "string"),
])
async def test_bad_input(actor: InProcessActor, call: tuple[Any, ...], code: ErrorCode,
                         fragment: str) -> None:
    with pytest.raises(ActorvisorError) as info:
        await actor.call(*call)
    assert info.value.code is code and fragment in info.value.message
