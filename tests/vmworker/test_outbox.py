"""The outbox: seq assignment, commit-before-send, order, group commit, size guard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from protocol.errors import ActorvisorError, ErrorCode
from protocol.worker import Reply, WorkerEvent, decode
from vmworker.eventlog import EventLog, EventReader, EventRecord, SessionRow
from vmworker.outbox import Outbox


class _SlowLog(EventLog):
    """A real log whose commits take a while (a slow disk), so batching is observable."""

    batches: list[int] = []

    def write_batch(self, events: Sequence[EventRecord], sessions: Iterable[SessionRow]) -> None:
        time.sleep(0.02)
        super().write_batch(events, sessions)
        self.batches.append(len(events))


async def test_outbox_commits_before_send_in_order_and_groups_commits(tmp_path: Path) -> None:
    log = _SlowLog.open(tmp_path / "events.db")
    log.batches = []
    reader = EventReader(log.path)
    sent: list[tuple[object, int]] = []

    async def send(frame: bytes) -> None:
        msg = decode(frame)
        # What was committed at the moment of sending: the event must already be there.
        committed = reader.read(0, 100_000).next_cursor
        sent.append((msg, committed))

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
    assert all(e.payload == {"i": e.seq - 1, "seq": e.seq} and e.epoch == log.epoch for e in events)
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
