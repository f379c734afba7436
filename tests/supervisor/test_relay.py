"""The relay's subscriptions: cursor backfill from ring or log, then live, no gap, no repeat."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from protocol.client import Encoding, Event, decode_to_client
from supervisor.relay import ActorRelay, Subscription, history_frame, read_history
from tests.support import eventually


class Sink:
    encoding = Encoding.CBOR

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.errors: list[tuple[str, str]] = []

    def send_event_frame(self, frame: bytes | str) -> None:
        msg = decode_to_client(frame, self.encoding)
        assert isinstance(msg, Event)
        self.seqs.append(msg.args[0]["seq"])

    def report_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))

    async def writable(self) -> None:
        return None

    def spare_bytes(self) -> int:
        return 1 << 20

    def owed_room(self) -> int:
        return 1 << 30

    def cut_slow(self) -> None:
        self.errors.append(("cut", "slow consumer"))


def make_log(path: Path, count: int,
             payload: Callable[[int], dict[str, Any]] = lambda seq: {"seq": seq}) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('epoch', 'epoch-1')")
    db.execute("CREATE TABLE events(seq INTEGER PRIMARY KEY, name TEXT NOT NULL, session_id TEXT,"
               " payload BLOB NOT NULL, created_at INTEGER NOT NULL)")
    db.executemany("INSERT INTO events VALUES (?, ?, NULL, ?, 0)",
                   [(s, "sessionEvent", cbor2.dumps(payload(s))) for s in range(1, count + 1)])
    db.commit()
    db.close()


def publish(relay: ActorRelay, seq: int) -> None:
    relay.publish(seq, "epoch-1", "sessionEvent", {"seq": seq})


async def test_live_subscription_sees_only_new_events(tmp_path: Path) -> None:
    relay = ActorRelay("a", tmp_path / "events.db", ring_size=16)
    relay.on_worker_hello("epoch-1", 0)
    publish(relay, 1)
    sink = Sink()
    relay.subscribe(sink, "sessionEvent", None)
    for seq in (2, 3):
        publish(relay, seq)
    relay.publish(4, "epoch-1", "vmBooted", {"seq": 4})
    assert sink.seqs == [2, 3]


async def test_cursor_within_ring_backfills_synchronously(tmp_path: Path) -> None:
    relay = ActorRelay("a", tmp_path / "events.db", ring_size=16)
    relay.on_worker_hello("epoch-1", 0)
    for seq in range(1, 11):
        publish(relay, seq)
    sink = Sink()
    relay.subscribe(sink, "sessionEvent", 4)
    assert sink.seqs == list(range(5, 11))
    publish(relay, 11)
    assert sink.seqs == list(range(5, 12))


async def test_cursor_older_than_ring_reads_the_log_while_live_events_wait(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    total = 5000
    make_log(db, total)
    relay = ActorRelay("a", db, ring_size=100)
    relay.on_worker_hello("epoch-1", total - 100)
    relay.HISTORY_PAGE = 700
    for seq in range(total - 99, total + 1):
        publish(relay, seq)
    sink = Sink()
    sub = relay.subscribe(sink, "sessionEvent", 10)
    assert sub.catching_up and sub.task is not None
    # Live events published during the catch-up are held back, then delivered once.
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO events VALUES (?, 'sessionEvent', NULL, ?, 0)",
                         [(s, cbor2.dumps({"seq": s})) for s in range(total + 1, total + 51)])
    for seq in range(total + 1, total + 51):
        publish(relay, seq)
    await asyncio.wait_for(sub.task, 10)
    assert sink.seqs == list(range(11, total + 51))
    assert not sink.errors


class NarrowSink(Sink):
    """A client that reads slowly: room for `room` more frames, given back by the test."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self._more = asyncio.Event()

    async def writable(self) -> None:
        while self.room <= 0:
            self._more.clear()
            await self._more.wait()

    def spare_bytes(self) -> int:
        return 0

    def send_event_frame(self, frame: bytes | str) -> None:
        assert self.room > 0, "a frame was queued past the sink's room"
        super().send_event_frame(frame)
        self.room -= 1

    def give(self, frames: int) -> None:
        self.room += frames
        self._more.set()


def far_behind(tmp_path: Path) -> tuple[Path, ActorRelay]:
    """A 300-event log, of which a 10-event ring holds the last: a cursor at 0 is paced."""
    db = tmp_path / "events.db"
    make_log(db, 300)
    relay = ActorRelay("a", db, ring_size=10)
    relay.on_worker_hello("epoch-1", 300)
    relay.HISTORY_PAGE = 40
    return db, relay


def append_logged(db: Path, relay: ActorRelay, seqs: range) -> None:
    """As a worker does: committed to the log first, then published."""
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO events VALUES (?, 'sessionEvent', NULL, ?, 0)",
                         [(s, cbor2.dumps({"seq": s})) for s in seqs])
    for seq in seqs:
        publish(relay, seq)


async def test_a_catch_up_goes_at_its_readers_pace_and_loses_nothing_past_its_backlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client far behind (one resuming after a slow-consumer disconnect) is given its
    history only as fast as it reads: queueing it all at once overflowed its queue again
    and cut it off on every resume. Live events meanwhile, more than the backlog holds,
    are read from the log instead: each seq arrives once, in order."""
    monkeypatch.setattr(Subscription, "MAX_BACKLOG", 5)
    db, relay = far_behind(tmp_path)
    sink = NarrowSink(room=25)
    sub = relay.subscribe(sink, "sessionEvent", 0)
    await eventually(lambda: len(sink.seqs) == 25, timeout=5)
    append_logged(db, relay, range(301, 321))  # 20 live events while it waits: 5 held
    await asyncio.sleep(0.05)
    assert len(sink.seqs) == 25 and sub.catching_up
    for _ in range(40):  # the reader comes back a little at a time
        sink.give(10)
        await asyncio.sleep(0.01)
    assert sub.task is not None
    await asyncio.wait_for(sub.task, 10)
    append_logged(db, relay, range(321, 326))  # live again
    assert sink.seqs == list(range(1, 326))
    assert not sink.errors


class TightSink(Sink):
    """A client with `spare` bytes of room now and `owed` bytes of bound left."""

    def __init__(self, spare: int, owed: int) -> None:
        super().__init__()
        self.spare, self.owed = spare, owed

    def spare_bytes(self) -> int:
        return self.spare

    def owed_room(self) -> int:
        return self.owed


async def test_a_cursor_the_ring_covers_is_replayed_at_once_if_it_fits_however_many_events(
        tmp_path: Path) -> None:
    """Replayed before the subscription returns, so anything the connection sends next (an
    action's reply, the client's barrier) comes behind it: an event count (64) used to send
    the npm quickstart's grace-window backfill of ~240 small events through the paced
    catch-up, and replies overtook the live events it held."""
    relay = ActorRelay("a", tmp_path / "events.db", ring_size=500)
    relay.on_worker_hello("epoch-1", 0)
    for seq in range(1, 301):
        publish(relay, seq)
    roomy = TightSink(spare=1 << 20, owed=1 << 20)
    sub = relay.subscribe(roomy, "sessionEvent", 10)
    assert roomy.seqs == list(range(11, 301)) and not sub.catching_up
    frame_bytes = sum(len(e.frame(Encoding.CBOR)) for e in relay.ring if e.seq > 10)
    tight = TightSink(spare=frame_bytes - 1, owed=1 << 20)
    sub = relay.subscribe(tight, "sessionEvent", 10)
    assert sub.catching_up and tight.seqs == []  # does not fit: paced through the log
    relay.unsubscribe(sub)


async def test_a_reader_stalled_in_its_catch_up_is_cut_once_the_live_stream_outgrows_its_bound(
        tmp_path: Path) -> None:
    """A client that never reads never fills its queue while its history is paced, so the
    live events held for it count against its bound: past it, it is cut as a full queue
    would be, and nothing more is held for it."""
    db, relay = far_behind(tmp_path)
    sink = NarrowSink(room=5)
    frame_bytes = len(cbor2.dumps({"seq": 301})) + 40  # a little over one frame
    sink.owed_room = lambda: 20 * frame_bytes  # type: ignore[method-assign]
    sub = relay.subscribe(sink, "sessionEvent", 0)
    await eventually(lambda: len(sink.seqs) == 5, timeout=5)
    append_logged(db, relay, range(301, 311))
    assert sink.errors == [] and sub.catching_up
    append_logged(db, relay, range(311, 400))
    assert sink.errors == [("cut", "slow consumer")]
    assert sub.overflowed and sink.seqs == [1, 2, 3, 4, 5]
    relay.unsubscribe(sub)


async def test_unsubscribe_stops_delivery(tmp_path: Path) -> None:
    relay = ActorRelay("a", tmp_path / "events.db", ring_size=16)
    relay.on_worker_hello("epoch-1", 0)
    sink = Sink()
    sub = relay.subscribe(sink, "sessionEvent", None)
    publish(relay, 1)
    relay.unsubscribe(sub)
    publish(relay, 2)
    assert sink.seqs == [1]
    assert relay.subscriber_count() == 0


async def test_a_gap_is_filled_from_the_log_before_anything_after_it(tmp_path: Path) -> None:
    # A worker killed between its commit and its send: seqs 3..7 are in the log only.
    make_log(tmp_path / "events.db", 8)
    relay = ActorRelay("a", tmp_path / "events.db", ring_size=16)
    relay.on_worker_hello("epoch-1", 0)
    live, ring_cursor = Sink(), Sink()
    relay.subscribe(live, "sessionEvent", None)
    publish(relay, 1)
    publish(relay, 2)
    publish(relay, 8)          # e.g. the vmShutdown written on the dead worker's behalf
    relay.subscribe(ring_cursor, "sessionEvent", 1)
    publish(relay, 9)          # arrives while the fill reads the log: waits behind it
    publish(relay, 5)          # a late frame of the dead worker: already in the fill
    await asyncio.sleep(0.2)
    assert live.seqs == list(range(1, 10))
    assert ring_cursor.seqs == list(range(2, 10))
    assert relay.last_seq == 9 and relay.gaps_filled == 1 and not relay.has_catch_up()


async def test_a_hello_ahead_of_the_relay_is_filled_from_the_log(tmp_path: Path) -> None:
    make_log(tmp_path / "events.db", 6)
    relay = ActorRelay("a", tmp_path / "events.db", ring_size=16)
    relay.on_worker_hello("epoch-1", 0)
    sink = Sink()
    relay.subscribe(sink, "sessionEvent", None)
    publish(relay, 1)
    relay.on_worker_hello("epoch-1", 6)  # the new worker's log ends at 6; 2..6 never came live
    publish(relay, 7)
    await asyncio.sleep(0.2)
    assert sink.seqs == list(range(1, 8))
    assert relay.last_seq == 7


def test_a_history_page_is_kept_as_committed_bytes_not_decoded_objects(tmp_path: Path) -> None:
    """Thousands of resuming clients each held pages of decoded payloads (five objects an
    event, all tracked by the garbage collector): one full collection stalled the
    supervisor for 17 s under 5,000 connections. A page is now tuples of bytes, which the
    collector does not track."""
    import gc

    db = tmp_path / "events.db"
    update = {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "hi"}}
    make_log(db, 2000, lambda seq: {"sessionId": "s", "event": {"params": {"update": update}}, "seq": seq})
    gc.collect()
    before = len(gc.get_objects())
    page, epoch = read_history(db, 0, "sessionEvent", 2000)
    gc.collect(0)  # (a young collection stops tracking tuples of atomics, as it would anyway)
    tracked = len(gc.get_objects()) - before
    assert len(page) == 2000 and tracked <= 10, tracked
    # Framed on delivery, with the log's epoch for a row written before payloads had one.
    for encoding in Encoding:
        frame = decode_to_client(history_frame(page[5], epoch, encoding), encoding)
        assert isinstance(frame, Event) and frame.args[0]["seq"] == 6 and frame.args[0]["epoch"] == "epoch-1"
