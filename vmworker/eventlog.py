"""The actor's durable event log: one SQLite database (WAL) at `<actor dir>/events.db`.

Owns the schema, the epoch, the stored shape of a payload, and every SQL statement run
on the log by either process: the worker's writer and reader, and the supervisor's
read-only reads (`read_raw_events` for replay and gap fills, `session_counts` for
`/admin/workers`) and its one write (`append_for_dead_worker`, a `vmShutdown` the worker
could not write). It is synchronous on purpose: callers run it in threads, so no event
loop blocks on the disk. It never assigns `seq` for a living worker (the outbox does, in
the order events are produced) and never talks to the network.

Schema (version 1) — the supervisor opens the file from another process, so treat these
columns as a contract:

    meta(key TEXT PRIMARY KEY, value TEXT)
        'epoch'          random id created with the file; a new file means a new epoch,
                         and `seq` restarts at 1 in it
        'schema_version' '1'
    events(seq INTEGER PRIMARY KEY,   -- per actor, strictly increasing, gap-free from 1
           name TEXT NOT NULL,        -- event name (sessionEvent, vmBooted, ...)
           session_id TEXT,           -- set for session-scoped events, else NULL
           payload BLOB NOT NULL,     -- CBOR of the handler argument, including "seq"
                                      -- and "epoch" (`stored_payload`)
           created_at INTEGER NOT NULL)  -- unix ms
    sessions(session_id TEXT PRIMARY KEY, agent_type TEXT, options BLOB /* CBOR */,
             created_at INTEGER /* unix ms */,
             status TEXT /* idle|running|closed|destroyed */)

A row in `events` exists only once its transaction committed; the worker publishes an
event only after that commit, so anything a client has seen is in this file.
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cbor2

from protocol.names import EventName

from . import actorlock

SCHEMA_VERSION: Final = 1
MAX_PAGE_BYTES: Final = 16 * 1024 * 1024
VM_SHUTDOWN: Final = EventName.VM_SHUTDOWN.value

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    session_id TEXT,
    payload BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, seq)
    WHERE session_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    agent_type TEXT,
    options BLOB,
    created_at INTEGER,
    status TEXT
);
"""


# Rows per INSERT statement. CPython's sqlite3 lets go of the GIL around every statement
# step and must win it back afterwards: `executemany` steps once per row, so while the
# event loop's thread was busy the writer waited up to a switch interval per row (11k
# rows/s, against 245k with the loop idle). A batch is inserted with a few multi-row
# statements instead: full chunks of this many rows, then the rest in power-of-two
# chunks, so at most 10 distinct statements are ever prepared (and cached) per log.
_ROWS_PER_INSERT: Final = 512


@functools.lru_cache(maxsize=None)
def _insert_events_sql(rows: int) -> str:
    return ("INSERT INTO events (seq, name, session_id, payload, created_at) VALUES "
            + ",".join(["(?,?,?,?,?)"] * rows))


def _insert_chunks(count: int) -> list[int]:
    """Row counts of the INSERT statements for `count` rows (see `_ROWS_PER_INSERT`)."""
    chunks = [_ROWS_PER_INSERT] * (count // _ROWS_PER_INSERT)
    rest = count % _ROWS_PER_INSERT
    size = _ROWS_PER_INSERT
    while rest:
        size //= 2
        if rest >= size:
            chunks.append(size)
            rest -= size
    return chunks


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def log_path(actor_dir: Path) -> Path:
    """Where an actor's event log lives."""
    return actor_dir / "events.db"


def stored_payload(payload: dict[str, Any], seq: int, epoch: str) -> dict[str, Any]:
    """An event's payload as it is stored, sent live and replayed: with its `seq` and the
    `epoch` of the log it is in, so every reader gets the same map."""
    return {**payload, "seq": seq, "epoch": epoch}


# A committed event as stored, undecoded: (seq, name, the payload's CBOR bytes). A plain
# tuple, as the driver returns it: the garbage collector stops tracking it.
RawEvent = tuple[int, str, bytes]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One durable event. `payload` already contains `seq`."""

    seq: int
    name: str
    session_id: str | None
    payload: dict[str, Any]
    created_at: int


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """An event as its row: `payload` is the CBOR map (with "seq") that is stored."""

    seq: int
    name: str
    session_id: str | None
    payload: bytes
    created_at: int


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    agent_type: str
    options: dict[str, Any]
    created_at: int
    status: str


@dataclass(frozen=True, slots=True)
class Page:
    """A cursor read: `next_cursor` is the last seq returned (or the `after` asked for)."""

    events: list[EventRecord]
    next_cursor: int
    has_more: bool


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so a
    # group commit is exactly one transaction, never one per statement.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class EventLog:
    """Writer side of the log. Use from one thread at a time."""

    def __init__(self, path: Path, conn: sqlite3.Connection, epoch: str, last_seq: int) -> None:
        self.path = path
        self._conn = conn
        self.epoch = epoch
        self.last_seq = last_seq

    @classmethod
    def open(cls, path: Path) -> EventLog:
        """Open or create the log; a new file gets a new epoch."""
        conn = _connect(path)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk before we publish, even across a power loss; group
            # commit amortises the fsync over every event queued meanwhile.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                epoch = secrets.token_hex(8)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("epoch", epoch), ("schema_version", str(SCHEMA_VERSION))],
                )
            else:
                epoch = row[0]
                version = conn.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()
                if version is None or int(version[0]) != SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{path}: schema version {version and version[0]!r}, "
                        f"this worker speaks {SCHEMA_VERSION}"
                    )
            last_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, epoch, last_seq)

    def write_batch(self, events: Sequence[EventRecord], sessions: Iterable[SessionRow]) -> None:
        """Commit events and session rows in one transaction (the group commit)."""
        self.write_encoded(
            [EncodedEvent(e.seq, e.name, e.session_id, cbor2.dumps(e.payload), e.created_at)
             for e in events],
            sessions,
        )

    def write_encoded(self, events: Sequence[EncodedEvent], sessions: Iterable[SessionRow]) -> None:
        """`write_batch` for payloads already encoded (the outbox encodes each once)."""
        if events and events[0].seq != self.last_seq + 1:
            # The outbox hands seqs out in order; a hole here would break the contract
            # every reader relies on, so refuse rather than write it.
            raise RuntimeError(f"seq gap: log at {self.last_seq}, batch starts at {events[0].seq}")
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            start = 0
            for size in _insert_chunks(len(events)):
                conn.execute(_insert_events_sql(size),
                             [v for e in events[start:start + size]
                              for v in (e.seq, e.name, e.session_id, e.payload, e.created_at)])
                start += size
            conn.executemany(
                "INSERT INTO sessions (session_id, agent_type, options, created_at, status)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET"
                " status = excluded.status, options = excluded.options",
                [
                    (s.session_id, s.agent_type, cbor2.dumps(s.options), s.created_at, s.status)
                    for s in sessions
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if events:
            self.last_seq = events[-1].seq

    def delete_events(self, seqs: Sequence[int]) -> None:
        """Delete events a marker event has replaced (compacted process output); the log's
        last seq never moves back, since the marker comes after them."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close_unended_run(self, reason: str, run_from: int | None = None) -> EventRecord | None:
        """Append `vmShutdown{reason}` for the last worker run on this log if it ended
        without one (killed, or orphaned before it could commit its own), and return it.

        A run's last event is its `vmShutdown`, so a log whose last event is anything else
        belongs to a run that ended unrecorded; an empty log has no run to close. A caller
        that knows where the run began (`run_from`: the log's last seq in the run's hello)
        also closes a run that wrote nothing after it. Whoever next holds the actor's lock
        calls this (the supervisor for a reaped worker, a new worker before its own first
        event): exactly one `vmShutdown` per run, never two.
        """
        row = self._conn.execute("SELECT seq, name FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None and run_from is None:
            return None
        if row is not None and row[1] == VM_SHUTDOWN and (run_from is None or row[0] > run_from):
            return None
        seq = self.last_seq + 1
        record = EventRecord(seq, VM_SHUTDOWN, None,
                             stored_payload({"reason": reason}, seq, self.epoch), now_ms())
        self.write_batch([record], [])
        return record

    def load_sessions(self) -> list[SessionRow]:
        rows = self._conn.execute(
            "SELECT session_id, agent_type, options, created_at, status FROM sessions"
            " ORDER BY created_at, session_id"
        ).fetchall()
        return [SessionRow(r[0], r[1], cbor2.loads(r[2]), r[3], r[4]) for r in rows]

    def close(self) -> None:
        self._conn.close()


class EventReader:
    """Read side: cursor queries over a separate connection (WAL readers never block
    the writer). Use from one thread at a time."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        # read_only: another process's view (the supervisor's), which must never create
        # the file or take a write lock on it.
        if read_only:
            self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0,
                                         check_same_thread=False)
        else:
            self._conn = _connect(path)
        self._conn.execute("PRAGMA query_only = ON")
        self._epoch: str | None = None

    def read(self, after: int, limit: int, names: Sequence[str] | None = None,
             upto: int | None = None, byte_budget: bool = True) -> Page:
        """Events with seq > after (and <= upto), oldest first, at most `limit` of them
        and, with `byte_budget`, at most MAX_PAGE_BYTES of payload past the first."""
        sql, params = self._range("seq, name, session_id, payload, created_at", after, names, upto)
        return self._page(sql, params, after, limit, byte_budget)

    def read_raw(self, after: int, limit: int, names: Sequence[str] | None = None,
                 upto: int | None = None) -> tuple[list[RawEvent], str | None]:
        """`read` without decoding: (seq, name, payload's CBOR bytes) rows, and the log's
        epoch for rows older than payloads carrying theirs. Bytes are no work for the
        garbage collector; a page of decoded payloads is a dozen objects per event."""
        sql, params = self._range("seq, name, payload", after, names, upto)
        rows: list[RawEvent] = self._conn.execute(sql + " ORDER BY seq LIMIT ?", [*params, limit]).fetchall()
        return rows, self._log_epoch()

    @staticmethod
    def _range(columns: str, after: int, names: Sequence[str] | None,
               upto: int | None) -> tuple[str, list[Any]]:
        sql = f"SELECT {columns} FROM events WHERE seq > ?"
        params: list[Any] = [after]
        if names is not None:
            sql += f" AND name IN ({','.join('?' * len(names))})"
            params.extend(names)
        if upto is not None:
            sql += " AND seq <= ?"
            params.append(upto)
        return sql, params

    def read_session(self, session_id: str, name: str, after: int, limit: int) -> Page:
        sql = (
            "SELECT seq, name, session_id, payload, created_at FROM events"
            " WHERE session_id = ? AND name = ? AND seq > ?"
        )
        return self._page(sql, [session_id, name, after], after, limit)

    def session_seqs(self, session_id: str) -> list[int]:
        """Every seq logged for one session, whatever the event name (for deletion)."""
        rows = self._conn.execute("SELECT seq FROM events WHERE session_id = ? ORDER BY seq",
                                  [session_id]).fetchall()
        return [r[0] for r in rows]

    def _page(self, sql: str, params: list[Any], after: int, limit: int,
              byte_budget: bool = True) -> Page:
        # One row more than asked tells whether there is a next page without a COUNT.
        cursor = self._conn.execute(sql + " ORDER BY seq LIMIT ?", [*params, limit + 1])
        events: list[EventRecord] = []
        size = 0
        for seq, name, session_id, blob, created_at in cursor:
            size += len(blob)
            # A page must fit in one worker message: past the byte budget it ends early
            # (never empty), and the caller pages on with the cursor.
            if len(events) == limit or (events and byte_budget and size > MAX_PAGE_BYTES):
                return Page(events, events[-1].seq, True)
            payload = cbor2.loads(blob)
            if "epoch" not in payload:
                # A row written before payloads carried their epoch.
                payload["epoch"] = self._log_epoch()
            events.append(EventRecord(seq, name, session_id, payload, created_at))
        return Page(events, events[-1].seq if events else after, False)

    def _log_epoch(self) -> str | None:
        if self._epoch is None:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            self._epoch = row[0] if row is not None else None
        return self._epoch

    def close(self) -> None:
        self._conn.close()


# ---- the supervisor's side: another process, no connection kept --------------------


def read_events(path: Path, after: int, limit: int, names: Sequence[str] | None = None,
                upto: int | None = None) -> Page:
    """Committed events with seq > after (and <= upto), read-only (blocking: call it in a
    thread). No byte budget: the page is not sent as one message. A log not yet created
    holds nothing."""
    if not path.exists():
        return Page([], after, False)
    reader = EventReader(path, read_only=True)
    try:
        return reader.read(after, limit, names, upto, byte_budget=False)
    finally:
        reader.close()


def read_raw_events(path: Path, after: int, limit: int, names: Sequence[str] | None = None,
                    upto: int | None = None) -> tuple[list[RawEvent], str | None]:
    """`read_events` undecoded (`EventReader.read_raw`), for the relay's replays."""
    if not path.exists():
        return [], None
    reader = EventReader(path, read_only=True)
    try:
        return reader.read_raw(after, limit, names, upto)
    finally:
        reader.close()


def session_counts(path: Path) -> tuple[int, int] | None:
    """(open, running) sessions in an actor's log, read-only (blocking); None when the
    file cannot be read (it is only a figure on a dashboard)."""
    if not path.exists():
        return 0, 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            row = conn.execute("SELECT count(*), coalesce(sum(status = 'running'), 0)"
                               " FROM sessions WHERE status != 'closed'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return int(row[0]), int(row[1])


def append_for_dead_worker(path: Path, reason: str, run_from: int | None) -> EventRecord | None:
    """`vmShutdown{reason}` on behalf of a worker that is gone (blocking), unless its run
    (which began after `run_from`, the last seq of its hello) already has one
    (`EventLog.close_unended_run`). Holds the actor's lock: never beside a living writer."""
    with actorlock.held(path.parent):
        event_log = EventLog.open(path)
        try:
            return event_log.close_unended_run(reason, run_from)
        finally:
            event_log.close()
