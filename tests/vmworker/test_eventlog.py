"""The SQLite event log: schema, seq and epoch across reopen, cursor reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import cbor2
import pytest

from vmworker.eventlog import (
    EncodedEvent,
    EventLog,
    EventReader,
    EventRecord,
    Page,
    SessionRow,
    append_for_dead_worker,
    log_path,
    read_events,
    read_raw_events,
    session_counts,
    stored_payload,
)


def record(seq: int, name: str = "e", session: str | None = None) -> EventRecord:
    return EventRecord(seq, name, session, {"n": seq, "seq": seq}, 1000 + seq)


def test_seq_continues_gap_free_and_epoch_is_stable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = EventLog.open(path)
    epoch = log.epoch
    assert log.last_seq == 0
    log.write_batch([record(1), record(2)], [])
    log.close()

    log = EventLog.open(path)
    assert (log.epoch, log.last_seq) == (epoch, 2)
    with pytest.raises(RuntimeError, match="seq gap"):
        log.write_batch([record(4)], [])
    log.write_batch([record(3)], [])
    log.close()

    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")] == [1, 2, 3]
    assert dict(conn.execute("SELECT key, value FROM meta")) == {"epoch": epoch, "schema_version": "1"}
    conn.close()


def test_recreated_log_gets_a_new_epoch_and_restarts_at_seq_1(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = EventLog.open(path)
    old = log.epoch
    log.write_batch([record(1)], [])
    log.close()
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    log = EventLog.open(path)
    assert log.epoch != old
    assert log.last_seq == 0
    log.close()


def test_payload_is_cbor_with_seq_and_readable_by_another_process_connection(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    log.write_batch([record(1, "sessionEvent", "s1")], [SessionRow("s1", "local", {}, 5, "idle")])
    # The supervisor's read-only replay connection, while the writer is still open.
    ro = sqlite3.connect(f"file:{tmp_path / 'events.db'}?mode=ro", uri=True)
    name, session, blob = ro.execute("SELECT name, session_id, payload FROM events").fetchone()
    assert (name, session, cbor2.loads(blob)) == ("sessionEvent", "s1", {"n": 1, "seq": 1})
    ro.close()
    log.close()


def test_cursor_reads_page_with_has_more_and_filter(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    log.write_batch([record(i, "a" if i % 2 else "b", "s1" if i <= 4 else "s2")
                     for i in range(1, 11)], [])
    reader = EventReader(log.path)
    page = reader.read(after=0, limit=4)
    assert [e.seq for e in page.events] == [1, 2, 3, 4]
    assert (page.next_cursor, page.has_more) == (4, True)
    page = reader.read(after=8, limit=4)
    assert [e.seq for e in page.events] == [9, 10]
    assert (page.next_cursor, page.has_more) == (10, False)
    page = reader.read(after=10, limit=4)
    assert (page.events, page.next_cursor, page.has_more) == ([], 10, False)
    assert [e.seq for e in reader.read(0, 100, ["b"]).events] == [2, 4, 6, 8, 10]
    assert [e.seq for e in reader.read_session("s1", "a", 0, 100).events] == [1, 3]
    reader.close()
    log.close()


def test_a_page_stops_at_the_byte_budget_but_is_never_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmworker.eventlog.MAX_PAGE_BYTES", 2500)
    log = EventLog.open(tmp_path / "events.db")
    log.write_batch([EventRecord(i, "e", None, {"blob": b"x" * 1000, "seq": i}, 0)
                     for i in range(1, 6)], [])
    reader = EventReader(log.path)
    page = reader.read(after=0, limit=100)
    assert ([e.seq for e in page.events], page.has_more) == ([1, 2], True)
    monkeypatch.setattr("vmworker.eventlog.MAX_PAGE_BYTES", 10)
    page = reader.read(after=4, limit=100)
    assert ([e.seq for e in page.events], page.has_more) == ([5], False)
    reader.close()
    log.close()


def test_sessions_round_trip_and_status_updates(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    log.write_batch([], [SessionRow("s1", "local", {"env": {"A": "1"}}, 7, "idle")])
    log.write_batch([], [SessionRow("s1", "local", {"env": {"A": "1"}}, 7, "closed")])
    assert log.load_sessions() == [SessionRow("s1", "local", {"env": {"A": "1"}}, 7, "closed")]
    log.close()


def test_encoded_rows_are_stored_verbatim_and_keep_the_seq_contract(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    blobs = [cbor2.dumps(stored_payload({"x": "y" * seq}, seq, log.epoch)) for seq in (1, 2, 3)]
    log.write_encoded([EncodedEvent(i + 1, "e", None, b, 7) for i, b in enumerate(blobs)], [])
    with pytest.raises(RuntimeError, match="seq gap"):
        log.write_encoded([EncodedEvent(5, "e", None, blobs[0], 7)], [])
    assert log.last_seq == 3
    stored = [r[0] for r in sqlite3.connect(log.path).execute("SELECT payload FROM events ORDER BY seq")]
    assert stored == blobs
    reader = EventReader(log.path)
    assert [e.payload for e in reader.read(0, 10).events] == [cbor2.loads(b) for b in blobs]
    reader.close()
    log.close()


def test_a_run_that_ended_unrecorded_is_closed_once(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    assert log.close_unended_run("crash") is None  # no run has written anything yet
    log.write_batch([record(1, "vmBooted"), record(2, "sessionEvent", "s1")], [])
    closed = log.close_unended_run("crash")
    assert closed is not None and (closed.seq, closed.name) == (3, "vmShutdown")
    assert closed.payload == {"reason": "crash", "seq": 3, "epoch": log.epoch}
    # Whoever comes next sees the run closed and adds nothing, even after a reopen.
    assert log.close_unended_run("crash") is None
    log.close()
    log = EventLog.open(tmp_path / "events.db")
    assert (log.last_seq, log.close_unended_run("hang")) == (3, None)
    # A run known to have begun at seq 3 (its hello said so) that wrote nothing since is
    # closed too; its own goodbye, once written, is not doubled.
    hung = log.close_unended_run("hang", run_from=3)
    assert hung is not None and (hung.seq, hung.payload["reason"]) == (4, "hang")
    assert log.close_unended_run("crash", run_from=3) is None
    log.close()
    fresh = EventLog.open(tmp_path / "fresh.db")
    assert fresh.close_unended_run("hang", run_from=0) is not None  # hello'd, then killed
    fresh.close()


def test_the_supervisor_reads_and_appends_through_the_same_contract(tmp_path: Path) -> None:
    path = log_path(tmp_path)
    assert read_events(path, 0, 10) == Page([], 0, False) and session_counts(path) == (0, 0)
    log = EventLog.open(path)
    # A row written before payloads carried their epoch reads with the log's.
    log.write_batch([EventRecord(1, "e", None, {"seq": 1}, 0)],
                    [SessionRow("s1", "local", {}, 0, "running"), SessionRow("s2", "local", {}, 0, "closed")])
    log.close()
    record = append_for_dead_worker(path, "crash", None)
    assert record is not None and record.payload == {"reason": "crash", "seq": 2, "epoch": log.epoch}
    page = read_events(path, 0, 1)
    assert ([e.payload for e in page.events], page.has_more) == ([{"seq": 1, "epoch": log.epoch}], True)
    assert [e.payload for e in read_events(path, 1, 10, ["vmShutdown"]).events] == [record.payload]
    assert read_events(path, 0, 10, upto=1).events[-1].seq == 1
    assert session_counts(path) == (1, 1)
    # The relay's undecoded read: the committed bytes, and the epoch for rows without one.
    assert read_raw_events(log_path(tmp_path / "none"), 0, 10) == ([], None)
    rows, epoch = read_raw_events(path, 0, 10)
    assert epoch == log.epoch and [(seq, name) for seq, name, _ in rows] == [(1, "e"), (2, "vmShutdown")]
    assert [cbor2.loads(raw) for _, _, raw in rows] == [{"seq": 1}, record.payload]
    assert read_raw_events(path, 0, 10, ["vmShutdown"], upto=1) == ([], log.epoch)


@pytest.mark.parametrize("count", [1, 511, 512, 1537])
def test_a_batch_of_any_size_is_inserted_whole_in_order(tmp_path: Path, count: int) -> None:
    # A batch goes in as a few multi-row INSERTs (full chunks, then power-of-two ones).
    log = EventLog.open(tmp_path / "events.db")
    log.write_batch([record(seq, session="s" if seq % 2 else None) for seq in range(1, count + 1)], [])
    assert log.last_seq == count
    reader = EventReader(tmp_path / "events.db")
    events = reader.read(0, count + 10).events
    reader.close()
    assert [(e.seq, e.session_id, e.payload, e.created_at) for e in events] == [
        (seq, "s" if seq % 2 else None, {"n": seq, "seq": seq, "epoch": log.epoch}, 1000 + seq)
        for seq in range(1, count + 1)]
    log.close()
