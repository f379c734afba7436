"""The relay: each actor's sequenced event stream, its ring buffer and its fan-out.

Events arrive from the worker already committed to its SQLite log, in `seq` order. The
relay appends each to a bounded ring, encodes the client frame at most once per encoding
in use, and offers the same bytes to every subscription of that event name. A
subscription with a cursor is backfilled from the ring, or from the SQLite log (read in a
thread) when the ring no longer holds it, then continues live with no gap and no
duplicate: each subscription delivers only `seq` greater than the last it delivered.

The relay itself never skips a persisted event: when an event arrives whose seq is past
the next one expected (a worker killed between its commit and its send, a `hello` that
reports a log further on than what was relayed), the missing events are read from the
log and relayed first; everything that arrives meanwhile waits, in order, behind them.

The relay never awaits a worker and never writes to the event log; it reads the log only
through `vmworker.eventlog.read_raw_events`. Payloads carry their `epoch` as stored.
"""

from __future__ import annotations

import asyncio
import bisect
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2
import structlog

from protocol.client import Encoding, Event, encode_to_client, event_frame_from_cbor
from vmworker.eventlog import RawEvent, read_raw_events

from . import metrics

log = structlog.get_logger("supervisor.relay")


@dataclass(eq=False, slots=True)
class LoggedEvent:
    seq: int
    name: str
    # The payload with `epoch`; None until needed when the worker's `raw` bytes came alone.
    _payload: dict[str, Any] | None
    # The payload's CBOR as the worker committed it (with `epoch`, but for rows older than
    # that), and the epoch it goes with.
    raw: bytes | None = None
    epoch: str = ""
    _frames: dict[Encoding, bytes | str] = field(default_factory=dict)

    @property
    def payload(self) -> dict[str, Any]:
        if self._payload is None:
            assert self.raw is not None
            payload = cbor2.loads(self.raw)
            payload.setdefault("epoch", self.epoch)
            self._payload = payload
        return self._payload

    def frame(self, encoding: Encoding) -> bytes | str:
        """The client frame for this event, encoded once per encoding however many listen:
        spliced around the worker's bytes when they need no escaping (cbor, bare)."""
        cached = self._frames.get(encoding)
        if cached is None:
            if self.raw is not None:
                cached = event_frame_from_cbor(self.name, self.raw, self.epoch, encoding, self.seq)
            if cached is None:
                cached = encode_to_client(Event(self.name, [self.payload]), encoding)
            self._frames[encoding] = cached
        return cached


def history_frame(event: RawEvent, epoch: str, encoding: Encoding) -> bytes | str:
    """The client frame of an event read back from the log for one subscription's
    catch-up. Pages stay the driver's plain (seq, name, bytes) tuples, which the garbage
    collector stops tracking, and are framed when delivered, once: pages of decoded
    payloads held by thousands of resuming clients made full collections stall the
    supervisor for seconds under 5,000 connections (bench/connections.py)."""
    seq, name, raw = event
    return LoggedEvent(seq, name, None, raw, epoch).frame(encoding)


class Sink(Protocol):
    """What a subscription delivers into: a connection's outbound queue."""

    encoding: Encoding

    def send_event_frame(self, frame: bytes | str) -> None: ...

    def report_error(self, code: str, message: str) -> None: ...

    async def writable(self) -> None:
        """Return once the sink's queue has room for another event of history."""
        ...

    def spare_bytes(self) -> int:
        """How many bytes of frames may be queued now, at once, without pacing."""
        ...

    def owed_room(self) -> int:
        """How many bytes of live events may be held for the sink before it counts as a
        consumer that cannot keep up: what is left of its queue's bound."""
        ...

    def cut_slow(self) -> None:
        """Disconnect the sink's client as a slow consumer (it resumes by cursor)."""
        ...


class Subscription:
    """One sink's interest in one event name, and the highest seq it has delivered."""

    # Live events held while catching up, at most; past it they are read from the log.
    MAX_BACKLOG = 10_000

    def __init__(self, sink: Sink, name: str, delivered: int) -> None:
        self.sink = sink
        self.name = name
        self.delivered = delivered
        self._backlog: deque[LoggedEvent] | None = None
        self._held_bytes = 0
        self.overflowed = False
        self.task: asyncio.Task[None] | None = None

    @property
    def catching_up(self) -> bool:
        return self._backlog is not None

    def offer(self, event: LoggedEvent) -> None:
        if event.seq <= self.delivered:
            return
        if self._backlog is not None:
            if self.overflowed:
                return  # it is in the log: the catch-up reads it there
            if len(self._backlog) == self.MAX_BACKLOG:
                self.overflowed = True
                return
            self._backlog.append(event)
            self._held_bytes += len(event.frame(self.sink.encoding))
            if self._held_bytes > self.sink.owed_room():
                # The live stream outgrew the client's bound while it read its history:
                # it does not keep up, as a full queue would say.
                self._backlog.clear()
                self._held_bytes = 0
                self.overflowed = True
                self.sink.cut_slow()
            return
        self.delivered = event.seq
        self.sink.send_event_frame(event.frame(self.sink.encoding))

    def begin_catch_up(self) -> None:
        """(Again) hold live events from here on: all before are in the log."""
        self._backlog = deque()
        self._held_bytes = 0
        self.overflowed = False

    async def deliver_history(self, history: Iterable[RawEvent], epoch: str) -> None:
        """Deliver events read from the log, each once the sink has room for it, while
        live ones keep waiting in the backlog."""
        for event in history:
            await self._deliver_paced(event[0], lambda: history_frame(event, epoch, self.sink.encoding))

    async def _deliver_paced(self, seq: int, frame: Callable[[], bytes | str]) -> None:
        if seq > self.delivered:
            await self.sink.writable()
            self.delivered = seq
            self.sink.send_event_frame(frame())

    async def drain_backlog(self) -> bool:
        """Deliver the live events held meanwhile, at the sink's pace (more may come while
        it waits), then go live; False if some were not held (read the log again)."""
        backlog = self._backlog
        assert backlog is not None
        while backlog and not self.overflowed:
            event = backlog.popleft()
            self._held_bytes -= len(event.frame(self.sink.encoding))
            await self._deliver_paced(event.seq, lambda: event.frame(self.sink.encoding))
        if self.overflowed:
            return False
        self._backlog = None  # no await since the backlog was last seen empty: nothing missed
        return True

    def end_catch_up(self) -> None:
        """Deliver whatever arrived live meanwhile, in order, without repeats; go live."""
        backlog, self._backlog = self._backlog or deque(), None
        for event in backlog:
            self.offer(event)


def read_history(db_path: Path, after: int, name: str | None, limit: int,
                 upto: int | None = None) -> tuple[list[RawEvent], str]:
    """Committed events with seq > after (and <= upto), of one name or all, from a
    worker's log, and the log's epoch (for rows older than payloads carrying theirs);
    blocking: call it in a thread."""
    rows, log_epoch = read_raw_events(db_path, after, limit, None if name is None else [name], upto)
    return rows, log_epoch or ""


class ActorRelay:
    HISTORY_PAGE = 2000
    MARK_EVERY = 0.01
    MARKS_KEPT_FOR = 15.0

    def __init__(self, actor_id: str, db_path: Path, ring_size: int) -> None:
        self.actor_id = actor_id
        self.db_path = db_path
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.ring: deque[LoggedEvent] = deque(maxlen=ring_size)
        self._subs: dict[str, set[Subscription]] = {}
        self.events_relayed = 0
        # (monotonic time, last seq at that time), for implicit cursors: independent of
        # the ring so that a burst that overflows the ring cannot move a cursor forward.
        self._mark_times: list[float] = []
        self._mark_seqs: list[int] = []
        # While a gap is being filled from the log: what arrived since, replayed in order.
        self._held: list[Callable[[], None]] | None = None
        self._fill_task: asyncio.Task[None] | None = None
        self.gaps_filled = 0

    def on_worker_hello(self, epoch: str | None, last_seq: int) -> None:
        if self._held is not None:
            self._held.append(lambda: self.on_worker_hello(epoch, last_seq))
            return
        if (epoch is not None and epoch == self.epoch and self.last_seq is not None
                and last_seq > self.last_seq):
            # The log went on without us (a worker killed after committing, before
            # sending): relay what it holds before anything of the new worker's.
            self._fill(last_seq, lambda: self.on_worker_hello(epoch, last_seq))
            return
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            log.warning("event_log_epoch_changed", actor=self.actor_id, old=self.epoch, new=epoch)
            self.ring.clear()
            self._mark_times.clear()
            self._mark_seqs.clear()
        self.epoch = epoch or self.epoch
        self.last_seq = last_seq
        self._mark(time.monotonic(), last_seq, force=True)

    def _mark(self, now: float, seq: int, *, force: bool = False) -> None:
        if not force and self._mark_times and now - self._mark_times[-1] < self.MARK_EVERY:
            return
        self._mark_times.append(now)
        self._mark_seqs.append(seq)
        # Keep one mark older than the horizon so cursors at the horizon still resolve.
        cut = bisect.bisect_left(self._mark_times, now - self.MARKS_KEPT_FOR) - 1
        if cut > 0:
            del self._mark_times[:cut]
            del self._mark_seqs[:cut]

    def cursor_at(self, when: float) -> int | None:
        """A seq no later than the actor's last seq at monotonic time `when`.

        None when no worker of this actor had said hello by then and none has since:
        every event still to come is then newer than `when`.
        """
        if not self._mark_times:
            return None
        i = bisect.bisect_right(self._mark_times, when) - 1
        # No mark that early: the worker said hello after `when`, so all it emitted is newer.
        return self._mark_seqs[max(i, 0)]

    def publish(self, seq: int, epoch: str, name: str, payload: dict[str, Any] | None,
                raw: bytes | None = None) -> None:
        """Relay one committed event: its decoded `payload`, its CBOR bytes `raw`, or both."""
        if self._held is not None:
            self._held.append(lambda: self.publish(seq, epoch, name, payload, raw))
            return
        if self.last_seq is not None and seq <= self.last_seq:
            # A frame of a worker that was overtaken by a fill from the log: already relayed.
            log.debug("event_seq_already_relayed", actor=self.actor_id, seq=seq, last=self.last_seq)
            return
        if self.last_seq is not None and seq != self.last_seq + 1 and epoch == self.epoch:
            self._fill(seq - 1, lambda: self.publish(seq, epoch, name, payload, raw))
            return
        self._relay(seq, epoch, name, payload, raw)

    def _fill(self, upto: int, then: Callable[[], None]) -> None:
        """Relay the log's events after `last_seq` up to `upto`, then `then()` and whatever
        arrived meanwhile, in arrival order."""
        log.warning("event_seq_gap_filling", actor=self.actor_id, after=self.last_seq, upto=upto)
        self._held = [then]
        self._fill_task = asyncio.create_task(self._fill_from_log(upto), name=f"gap-fill-{self.actor_id}")

    async def _fill_from_log(self, upto: int) -> None:
        try:
            while self.last_seq is not None and self.last_seq < upto:
                page, epoch = await asyncio.to_thread(read_history, self.db_path, self.last_seq, None,
                                                      self.HISTORY_PAGE, upto)
                for seq, name, raw in page:
                    self._relay(seq, self.epoch or epoch, name, None, raw)
                if len(page) < self.HISTORY_PAGE:
                    # Whatever the log lacks below `upto` was compacted away: nothing to relay.
                    self.last_seq = upto
                    break
            self.gaps_filled += 1
        except (sqlite3.Error, OSError, ValueError) as exc:
            # Never silent: a subscriber that misses events is told so.
            log.error("event_gap_fill_failed", actor=self.actor_id, error=str(exc))
            for subs in self._subs.values():
                for sub in subs:
                    sub.sink.report_error("actor.internal_error", f"could not read event history: {exc}")
            self.last_seq = upto
        finally:
            held, self._held, self._fill_task = self._held or [], None, None
            for i, step in enumerate(held):
                step()
                if self._held is not None:
                    # That step found another gap: the rest waits behind its fill.
                    self._held.extend(held[i + 1:])
                    break

    def _relay(self, seq: int, epoch: str, name: str, payload: dict[str, Any] | None,
               raw: bytes | None = None) -> None:
        # The mark is taken before this event counts, so it never claims an event too early.
        self._mark(time.monotonic(), self.last_seq if self.last_seq is not None else seq - 1)
        self.epoch = epoch
        self.last_seq = seq
        # Payloads carry their epoch as appended (eventlog.stored_payload): nothing to patch.
        event = LoggedEvent(seq, name, payload, raw, epoch)
        self.ring.append(event)
        self.events_relayed += 1
        metrics.EVENTS_RELAYED.inc()
        for sub in tuple(self._subs.get(name, ())):
            sub.offer(event)

    def subscribe(self, sink: Sink, name: str, after: int | None) -> Subscription:
        """Register at once; backfill from `after` (exclusive) when a cursor is given."""
        if after is None:
            sub = Subscription(sink, name, self.last_seq or 0)
            self._subs.setdefault(name, set()).add(sub)
            return sub
        sub = Subscription(sink, name, after)
        self._subs.setdefault(name, set()).add(sub)
        if self.last_seq is not None and after >= self.last_seq:
            return sub
        # Behind by what the ring holds and the sink has room for: replayed at once, so
        # the history is queued before anything the connection sends next (an action's
        # reply arrives behind every event relayed before it). Further behind, the replay
        # is paced by the sink (_catch_up), or it could overflow the queue it resumes into.
        replay = self._ring_since(after, name, sink)
        if replay is not None:
            metrics.REPLAYS.labels("ring").inc()
            for event in replay:
                sub.offer(event)
            return sub
        metrics.REPLAYS.labels("log").inc()
        sub.begin_catch_up()
        sub.task = asyncio.create_task(self._catch_up(sub), name=f"catch-up-{self.actor_id}")
        return sub

    def _ring_since(self, after: int, name: str, sink: Sink) -> list[LoggedEvent] | None:
        """The ring's events of `name` after `after`, oldest first, if the ring reaches back
        that far and their frames fit in the sink's spare room; else None."""
        if not self.ring or after < self.ring[0].seq - 1:
            return None
        room = sink.spare_bytes()
        replay = []
        for event in reversed(self.ring):
            if event.seq <= after:
                break
            if event.name == name:
                room -= len(event.frame(sink.encoding))
                if room < 0:
                    return None
                replay.append(event)
        replay.reverse()
        return replay

    async def _catch_up(self, sub: Subscription) -> None:
        """Deliver the log from the cursor a page at a time, each event only once the sink
        has room for it: a client far behind (one resuming after a slow-consumer
        disconnect) reads its history at its own pace instead of overflowing its queue
        again and being cut off forever. Everything published before a page is read was
        committed before it was published, so the log holds it; what is published after
        waits in the backlog (bounded: past MAX_BACKLOG it is read from the log instead),
        and is delivered (at the same pace) once a short page has reached the log's end."""
        try:
            while True:
                sub.begin_catch_up()
                page, epoch = await asyncio.to_thread(read_history, self.db_path, sub.delivered,
                                                      sub.name, self.HISTORY_PAGE)
                await sub.deliver_history(page, epoch)
                if len(page) < self.HISTORY_PAGE and not sub.overflowed and await sub.drain_backlog():
                    return
        except (sqlite3.Error, OSError, ValueError) as exc:
            log.error("history_read_failed", actor=self.actor_id, error=str(exc))
            sub.sink.report_error("actor.internal_error", f"could not read event history: {exc}")
        sub.end_catch_up()

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.name)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.name]
        if sub.task is not None:
            sub.task.cancel()

    def has_catch_up(self) -> bool:
        return self._held is not None or any(sub.catching_up for subs in self._subs.values() for sub in subs)

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())
