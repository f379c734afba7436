"""The outbox: seq assignment, commit-before-send, order, group commit, size guard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from protocol.errors import ActorvisorError, ErrorCode
from protocol.worker import Reply, WorkerEvent, WorkerEvents, decode, decode_all
from vmworker.eventlog import EncodedEvent, EventLog, EventReader, SessionRow
from vmworker.outbox import Outbox

from .harness import payload


class _SlowLog(EventLog):
    """A real log whose commits take a while (a slow disk), so batching is observable."""

    batches: list[int] = []

    def write_encoded(self, events: Sequence[EncodedEvent], sessions: Iterable[SessionRow]) -> None:
        time.sleep(0.02)
        super().write_encoded(events, sessions)
        self.batches.append(len(events))


async def test_outbox_commits_before_send_in_order_and_groups_commits(tmp_path: Path) -> None:
    log = _SlowLog.open(tmp_path / "events.db")
    assert isinstance(log, _SlowLog)
    log.batches = []
    reader = EventReader(log.path)
    sent: list[tuple[object, int]] = []

    async def send(frame: bytes) -> None:
        # What was committed at the moment of sending: the event must already be there.
        committed = reader.read(0, 100_000).next_cursor
        sent.extend((msg, committed) for msg in decode_all(frame))

    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(log, send, executor)
        writer = asyncio.create_task(outbox.run())
        seqs = [await outbox.append("e", {"i": 0})]
        await asyncio.sleep(0.005)  # the writer is now inside its first (slow) commit
        for i in range(1, 200):
            seqs.append(await outbox.append("e", {"i": i}))
        outbox.send(Reply(1, True, "done"))
        await asyncio.wait_for(outbox.flush(), 10)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    reader.close()
    log.close()

    assert seqs == list(range(1, 201))
    events = [m for m, _ in sent if isinstance(m, WorkerEvent)]
    assert [e.seq for e in events] == seqs
    assert all(e.payload == {"i": e.seq - 1, "seq": e.seq, "epoch": log.epoch} and e.epoch == log.epoch
               for e in events)
    assert all(committed >= m.seq for m, committed in sent if isinstance(m, WorkerEvent))
    assert isinstance(sent[-1][0], Reply)  # the reply queued last went out last
    # Group commit: 200 events in far fewer transactions than events.
    assert sum(log.batches) == 200
    assert len(log.batches) <= 3, log.batches


async def test_outbox_unencodable_payload_fails_the_caller_without_using_a_seq(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(log, lambda frame: asyncio.sleep(0), executor)
        with pytest.raises(Exception):
            await outbox.append("e", {"bad": object()})
        assert await outbox.append("e", {}) == 1
    log.close()


async def test_outbox_refuses_a_message_the_supervisor_would_drop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmworker.outbox.MAX_WORKER_MESSAGE", 100)
    log = EventLog.open(tmp_path / "events.db")
    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(log, lambda frame: asyncio.sleep(0), executor)
        with pytest.raises(ActorvisorError) as info:
            outbox.send(Reply(1, True, "x" * 200))
        assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE
        outbox.send(Reply(1, True, "small"))
    log.close()


async def test_outbox_batches_events_into_frames_of_committed_bytes_keeping_queue_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmworker.outbox.FRAME_BYTES", 2000)
    log = _SlowLog.open(tmp_path / "events.db")
    assert isinstance(log, _SlowLog)
    log.batches = []
    frames: list[bytes] = []

    async def send(frame: bytes) -> None:
        frames.append(frame)

    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(log, send, executor)
        writer = asyncio.create_task(outbox.run())
        await outbox.append("e", {"i": 0})
        await asyncio.sleep(0.005)  # the writer is inside its first (slow) commit
        expected: list[object] = []
        for i in range(1, 400):
            await outbox.append("e" if i % 3 else "f", {"i": i, "pad": "x" * (i % 50)})
            expected.append(("event", i))
            if i % 97 == 0:
                outbox.send(Reply(i, True, i))
                expected.append(("reply", i))
        await asyncio.wait_for(outbox.flush(), 10)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    rows = {seq: blob for seq, blob in log._conn.execute("SELECT seq, payload FROM events")}
    log.close()

    batches = [decode(f) for f in frames]
    messages = [m for f in frames for m in decode_all(f)]
    got = [("reply", m.id) if isinstance(m, Reply) else ("event", payload(m)["i"])
           for m in messages if isinstance(m, (Reply, WorkerEvent))]
    assert got[1:] == expected  # the queue's order, every event once
    events = [m for m in messages if isinstance(m, WorkerEvent)]
    assert [e.seq for e in events] == list(range(1, 401))
    assert all(e.name == ("f" if payload(e)["i"] % 3 == 0 and e.seq > 1 else "e") for e in events)
    # Many events per frame, no frame over the payload budget unless it is one event, and
    # the bytes on the wire are the very bytes committed (encoded once).
    runs = [b for b in batches if isinstance(b, WorkerEvents)]
    assert len(runs) < 40 and max(len(b.names) for b in runs) > 10
    assert all(sum(map(len, b.payloads)) <= 2000 or len(b.payloads) == 1 for b in runs)
    assert all(rows[b.first + i] == p for b in runs for i, p in enumerate(b.payloads))


async def test_outbox_sends_nothing_of_a_batch_whose_commit_failed(tmp_path: Path) -> None:
    class _FailingLog(EventLog):
        fail = False

        def write_encoded(self, events: Sequence[EncodedEvent], sessions: Iterable[SessionRow]) -> None:
            if self.fail:
                raise OSError("disk gone")
            super().write_encoded(events, sessions)

    log = _FailingLog.open(tmp_path / "events.db")
    assert isinstance(log, _FailingLog)
    sent: list[object] = []

    async def send(frame: bytes) -> None:
        sent.extend(decode_all(frame))

    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(log, send, executor)
        writer = asyncio.create_task(outbox.run())
        await outbox.append("e", {})
        await outbox.flush()
        log.fail = True
        for _ in range(50):
            await outbox.append("e", {})
        with pytest.raises(OSError):
            await asyncio.wait_for(writer, 10)
    log.close()
    assert [m.seq for m in sent if isinstance(m, WorkerEvent)] == [1]


async def test_outbox_commits_on_the_loop_while_commits_are_cheap_and_off_it_after_a_slow_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two thread hops per commit were most of a paced event's latency, so a small batch
    is committed on the loop's own thread; a slow disk must not stall the loop, so after a
    commit slower than INLINE_COMMIT_S the next goes to the log's thread. (The outbox's
    clock is the test's: a commit takes as long as the test says, however loaded the disk.)"""
    import threading
    import types

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr("vmworker.outbox.time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    class _TimedLog(EventLog):
        seconds = 0.0
        threads: list[int] = []

        def write_encoded(self, events: Sequence[EncodedEvent], sessions: Iterable[SessionRow]) -> None:
            self.threads.append(threading.get_ident())
            super().write_encoded(events, sessions)
            clock.now += self.seconds

    log = _TimedLog.open(tmp_path / "events.db")
    assert isinstance(log, _TimedLog)
    log.threads = []
    loop_thread = threading.get_ident()
    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(log, lambda frame: asyncio.sleep(0), executor)
        writer = asyncio.create_task(outbox.run())

        async def commit_one(seconds: float) -> bool:
            log.seconds = seconds
            await outbox.append("e", {})
            await asyncio.wait_for(outbox.flush(), 10)
            return log.threads[-1] == loop_thread

        first = await commit_one(0.0005)   # cost unknown yet: on the log's thread
        cheap = [await commit_one(0.0005) for _ in range(5)]
        slow = await commit_one(0.05)      # still inline: the one before was cheap
        after_slow = await commit_one(0.0005)
        again = await commit_one(0.0005)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    log.close()
    assert (first, cheap, slow, after_slow, again) == (False, [True] * 5, True, False, True)
