"""`python -m vmworker` as a real process against a test-owned ROUTER on an ipc socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time

import cbor2
import psutil

from protocol.errors import ErrorCode
from protocol.worker import Action, ExitCode, Hello, Phase, Reply, Shutdown, Sleep, WorkerEvent
from tests.support import LONG_SLEEP, descendants, leftover_sleeps
from vmworker import actorlock

from .harness import WorkerHarness, payload
from .test_sessions import ours


def events(h: WorkerHarness) -> list[WorkerEvent]:
    return [m for m in h.received if isinstance(m, WorkerEvent)]


async def test_hello_comes_before_boot_and_health_is_answered_mid_boot(harness: WorkerHarness) -> None:
    harness.boot_delay = 2.0
    harness.generation = 4
    await harness.start()
    hello = harness.received[0]
    assert isinstance(hello, Hello)
    assert harness.proc is not None and hello.pid == harness.proc.pid
    assert hello.actor_id == "actor1" and hello.last_seq == 0 and hello.epoch
    health = await harness.call("getRuntimeHealth")
    # Answered while the VM still boots: health never waits for the boot.
    assert health["phase"] == "booting" and health["booted"] is False
    assert health["restarts"] == 4 and health["pid"] == hello.pid
    # An action that needs the VM waits for it instead of failing.
    session = asyncio.create_task(harness.call("createSession", "local"))

    booted = await harness.wait_event("vmBooted")
    assert booted.seq == 1 and payload(booted)["bootMs"] >= 2000
    assert booted.epoch == hello.epoch
    await session
    kinds = [type(m).__name__ if not isinstance(m, Phase) else f"phase:{m.phase}"
             for m in harness.received]
    assert kinds[:2] == ["Hello", "phase:booting"]
    assert kinds.index("WorkerEvent") < kinds.index("phase:ready")
    ready = next(m for m in harness.received if isinstance(m, Phase) and m.phase == "ready")
    assert ready.detail == {"bootMs": payload(booted)["bootMs"]}


async def test_prompt_events_are_committed_ordered_before_reply_and_match_history(
        harness: WorkerHarness) -> None:
    await harness.start()
    await harness.wait_event("vmBooted")
    session_id = (await harness.call("createSession", "local"))["sessionId"]
    before = len(harness.received)
    reply = await harness.request("sendPrompt", session_id, "think: hm\nrun: echo hi\nchunks: 50\nbye")
    assert reply.ok and reply.value["stopReason"] == "end_turn"

    tail = harness.received[before:]
    reply_at = tail.index(reply)
    turn_events = [m for m in tail if isinstance(m, WorkerEvent) and m.name == "sessionEvent"]
    # Every event of the turn arrived before its reply, in seq order, gap-free.
    assert all(tail.index(m) < reply_at for m in turn_events)
    seqs = [m.seq for m in turn_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert harness.uncommitted == []
    assert payload(turn_events[0])["event"]["params"]["update"]["sessionUpdate"] == "user_message_chunk"

    history = await harness.call("getSessionEvents", session_id)
    assert isinstance(history, list) and history[-1]["seq"] == seqs[-1]
    assert [(e["seq"], e["event"]) for e in history] == [
        (m.seq, payload(m)["event"]) for m in turn_events]
    assert all(m.payload == {"sessionId": session_id, "seq": m.seq, "epoch": m.epoch,
                             "event": payload(m)["event"]} for m in turn_events)


async def test_sleep_flushes_vm_shutdown_and_exits_0_leaving_no_process(harness: WorkerHarness) -> None:
    await harness.start()
    await harness.wait_event("vmBooted")
    session_id = (await harness.call("createSession", "local"))["sessionId"]
    exec_task = asyncio.create_task(harness.request("exec", f"sleep {LONG_SLEEP}"))
    prompt_task = asyncio.create_task(harness.request("sendPrompt", session_id, "hi\nsleep: 300"))
    await asyncio.sleep(0.5)
    assert harness.proc is not None
    assert descendants(harness.proc.pid), "the exec should be running in the VM"
    # A long turn never blocks other actions.
    t = time.monotonic()
    assert (await harness.call("getRuntimeHealth"))["sessions"] == 1
    assert time.monotonic() - t < 1

    await harness.send(Sleep())
    assert await harness.wait_exit() == 0
    shutdown = await harness.wait_event("vmShutdown")
    assert shutdown.payload == {"reason": "sleep", "seq": shutdown.seq, "epoch": shutdown.epoch}
    assert shutdown.seq == events(harness)[-1].seq
    prompt = await prompt_task
    assert prompt.ok and ours(prompt.value) == {"text": "You said: hi\n", "stopReason": "cancelled"}
    exec_reply = await exec_task
    assert not exec_reply.ok and exec_reply.error is not None
    assert exec_reply.error.code is ErrorCode.STOPPED
    # The replies went out before vmShutdown.
    assert harness.received.index(prompt) < harness.received.index(shutdown)
    assert descendants(harness.proc.pid) == []
    assert not leftover_sleeps()




async def test_shutdown_means_destroy_and_sigterm_means_sleep(harness: WorkerHarness) -> None:
    await harness.start()
    await harness.wait_event("vmBooted")
    await harness.send(Shutdown())
    assert await harness.wait_exit() == 0
    assert payload(await harness.wait_event("vmShutdown"))["reason"] == "destroy"

    await harness.start()
    await harness.wait_event("vmBooted")
    assert harness.proc is not None
    harness.proc.send_signal(signal.SIGTERM)
    assert await harness.wait_exit() == 0
    assert payload(await harness.wait_event("vmShutdown"))["reason"] == "sleep"


async def test_restart_keeps_epoch_seq_and_sessions(harness: WorkerHarness) -> None:
    await harness.start()
    first_hello = harness.received[0]
    assert isinstance(first_hello, Hello)
    await harness.wait_event("vmBooted")
    session_id = (await harness.call("createSession", "local"))["sessionId"]
    await harness.call("sendPrompt", session_id, "one")
    await harness.send(Sleep())
    assert await harness.wait_exit() == 0
    last = events(harness)[-1].seq

    await harness.start()
    hello = harness.received[0]
    assert isinstance(hello, Hello)
    assert (hello.epoch, hello.last_seq) == (first_hello.epoch, last)
    booted = await harness.wait_event("vmBooted")
    assert booted.seq == last + 1
    assert [s["sessionId"] for s in await harness.call("listSessions")] == [session_id]
    assert (await harness.call("sendPrompt", session_id, "two"))["text"] == "You said: two\n"
    replay = await harness.call("replayEvents", {"names": ["vmBooted", "vmShutdown"]})
    assert [e["name"] for e in replay["events"]] == ["vmBooted", "vmShutdown", "vmBooted"]


async def test_bad_frames_are_ignored_and_logged_as_json_lines(harness: WorkerHarness) -> None:
    await harness.start()
    for frame in (b"", b"\xff\xfe", b"\xa1\x61t\x63bad", b"\x83\x01\x02\x03"):
        await harness.send_raw(frame)
    reply = await harness.request("getRuntimeHealth")
    assert reply.ok
    lines = [json.loads(line) for line in harness.worker_log().splitlines()]
    bad = [line for line in lines if line["event"] == "bad_frame"]
    assert len(bad) == 4
    assert all(line["actor"] == "actor1" and line["pid"] == reply.value["pid"] for line in lines)


async def test_sigterm_during_boot_stops_promptly(harness: WorkerHarness) -> None:
    harness.boot_delay = 30.0
    await harness.start()
    assert harness.proc is not None
    started = time.monotonic()
    harness.proc.send_signal(signal.SIGTERM)
    assert await harness.wait_exit() == 0
    assert time.monotonic() - started < 5
    assert [e.name for e in events(harness)] == ["vmShutdown"]


async def test_unknown_action_and_bad_args_get_error_replies(harness: WorkerHarness) -> None:
    await harness.start()
    err = await harness.call_error("launchMissiles")
    assert err.code is ErrorCode.UNKNOWN_ACTION
    err = await harness.call_error("readFile", "/etc/shadow")
    assert err.code is ErrorCode.INVALID_PATH


async def test_the_worker_leaves_when_its_supervisor_process_is_gone(harness: WorkerHarness) -> None:
    # A stand-in for the supervisor's process: the worker watches its pid, not its words.
    stand_in = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        harness.supervisor_pid = stand_in.pid
        await harness.start()
        await harness.wait_event("vmBooted")
        assert harness.proc is not None and harness.proc.returncode is None
    finally:
        stand_in.kill()
        await stand_in.wait()
    assert await harness.wait_exit() == 3
    # Its goodbye is in the log, and not sent: nobody is there to read it (see the orphan).
    assert last_logged(harness) == ("vmShutdown", "error")
    assert "supervisor_lost" in harness.worker_log()
    assert not [m for m in events(harness) if m.name == "vmShutdown"]


def last_logged(harness: WorkerHarness) -> tuple[str, str | None]:
    """The name and reason of the last event in the worker's log."""
    with sqlite3.connect(f"file:{harness.actor_dir / 'events.db'}?mode=ro", uri=True) as db:
        name, blob = db.execute("SELECT name, payload FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    return name, cbor2.loads(blob).get("reason")


async def test_boot_failure_is_reported_and_fails_vm_actions(harness: WorkerHarness) -> None:
    # A disk image that is not one: the VM cannot mount its disk.
    (harness.actor_dir / "disk.img").mkdir(parents=True)
    await harness.start()
    failed = await harness.wait_for(lambda m: isinstance(m, Phase) and m.phase == "failed")
    assert isinstance(failed, Phase) and "mount failed" in failed.detail["error"]
    err = await harness.call_error("exec", "true")
    assert err.code is ErrorCode.FAILED and "failed to boot" in err.message
    health = await harness.call("getRuntimeHealth")
    assert (health["phase"], health["booted"]) == ("failed", False)
    assert isinstance(await harness.request("listSessions"), Reply)


async def test_kill_9_mid_flood_loses_nothing_that_was_sent_and_reuses_no_seq(
        harness: WorkerHarness) -> None:
    await harness.start()
    await harness.wait_event("vmBooted")
    session_id = (await harness.call("createSession", "local"))["sessionId"]
    # Paced so that the kill lands inside the flood however far the harness lags behind:
    # unpaced, a worker that commits on its own loop could finish all 20,000 first.
    await harness.send(Action(99, "sendPrompt", [session_id, "chunks: 20000 at 4000/s"]))
    # Batched frames are arriving: kill the worker while commits and sends are in flight.
    await harness.wait_for(lambda m: isinstance(m, WorkerEvent) and payload(m).get("event", {})
                           .get("params", {}).get("update", {}).get("content", {})
                           .get("text", "").startswith("chunk 3000 of 20000 "), timeout=60)
    assert harness.proc is not None
    os.killpg(harness.proc.pid, signal.SIGKILL)
    await harness.wait_exit()
    await asyncio.sleep(0.2)  # frames libzmq had already taken in
    sent = events(harness)
    seqs = [e.seq for e in sent]
    assert seqs == list(range(1, len(seqs) + 1)), "every seq once, in order"
    assert harness.uncommitted == [], "an event was sent before its commit"
    assert not any(isinstance(m, Reply) and m.id == 99 for m in harness.received)

    with sqlite3.connect(f"file:{harness.actor_dir / 'events.db'}?mode=ro", uri=True) as db:
        rows = dict(db.execute("SELECT seq, payload FROM events WHERE seq <= ?", (seqs[-1],)).fetchall())
        last = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    assert {seq: cbor2.loads(blob) for seq, blob in rows.items()} == {e.seq: e.payload for e in sent}
    # The restarted worker continues after everything committed, never reusing a seq a
    # subscriber may have seen.
    await harness.start()
    # Frames the killed worker had queued may still reach the router after the restart;
    # the new worker's first word is its hello.
    hello = next(m for m in harness.received if isinstance(m, Hello))
    # Nobody recorded the killed run's end: the new worker does, before its own first event.
    assert hello.last_seq == last + 1 and last >= seqs[-1]
    with sqlite3.connect(f"file:{harness.actor_dir / 'events.db'}?mode=ro", uri=True) as db:
        name, blob = db.execute("SELECT name, payload FROM events WHERE seq = ?", (last + 1,)).fetchone()
    assert (name, cbor2.loads(blob)["reason"]) == ("vmShutdown", "crash")
    assert (await harness.wait_event("vmBooted")).seq == last + 2


async def test_one_worker_per_actor_a_second_waits_for_the_lock_and_writes_nothing(
        harness: WorkerHarness) -> None:
    harness.actor_dir.mkdir(parents=True, exist_ok=True)
    # A living worker of this actor, as a restarted supervisor's orphan would be: its lock.
    holder = actorlock.acquire(harness.actor_dir, timeout_s=0)
    assert holder is not None
    starting = asyncio.create_task(harness.start("--lock-timeout", "1.5"))
    while harness.proc is None:
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(harness.proc.wait(), 60) == ExitCode.ACTOR_BUSY
    assert not starting.done(), "no hello from a worker that never took the lock"
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    assert not (harness.actor_dir / "events.db").exists(), "it opened the log beside a living writer"
    assert harness.received == []

    os.close(holder)  # the other worker is gone: the next one runs and holds the lock itself
    await harness.start()
    assert actorlock.acquire(harness.actor_dir, timeout_s=0.2) is None
    assert (await harness.call("getRuntimeHealth"))["pid"] == harness.proc.pid


async def test_an_orphaned_worker_speaks_to_no_one_and_logs_its_own_goodbye(
        harness: WorkerHarness) -> None:
    await harness.start(parent=True)
    hello = harness.received[0]
    assert isinstance(hello, Hello)
    await harness.wait_event("vmBooted")
    session_id = (await harness.call("createSession", "local"))["sessionId"]
    await harness.send(Action(99, "sendPrompt", [session_id, "chunks: 100000 at 2000/s"]))
    await harness.wait_for(lambda m: isinstance(m, WorkerEvent) and m.seq > 200)
    assert harness.proc is not None
    # Its parent dies as a killed supervisor's zygote does: the kernel sends it SIGTERM.
    os.kill(harness.proc.pid, signal.SIGKILL)
    started = time.monotonic()
    while psutil.pid_exists(hello.pid) and time.monotonic() - started < 30:
        await asyncio.sleep(0.05)
    assert not psutil.pid_exists(hello.pid)
    await asyncio.sleep(0.2)  # frames libzmq had already taken in

    assert last_logged(harness) == ("vmShutdown", "error")
    assert "supervisor_gone" in harness.worker_log()
    # Its supervisor is gone: it sent nothing after it learned so, not even its goodbye,
    # which a new supervisor on this socket would have taken for a stranger's.
    assert not [m for m in events(harness) if m.name == "vmShutdown"]
    assert not any(isinstance(m, Phase) and m.phase == "stopping" for m in harness.received)
