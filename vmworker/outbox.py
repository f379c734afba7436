"""The worker's one ordered path to the supervisor: sequence, persist, then send.

Owns `seq` assignment and the order of every outbound frame. `append()` gives a durable
event the next seq at the moment it is called; `send()` queues a non-durable message
(hello, phase, reply) behind everything queued before it. One writer task
drains the queue in batches: it commits every durable event of the batch in a single
SQLite transaction, then sends the whole batch in queue order,
each run of consecutive events as one `events` frame carrying the payload bytes that were
committed (an event is CBOR-encoded once, for disk and wire). So an event is never sent before it is committed, and a reply queued after an action's
events is never sent before them. This module never reorders, never drops, and never
sends an event whose commit failed: a failed commit stops the writer, and the worker
exits, because the contract "persist, then publish" can no longer be kept.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from protocol.errors import ActorvisorError, ErrorCode
from protocol.worker import MAX_WORKER_MESSAGE, WorkerEvents, WorkerToSupervisor, encode

from .eventlog import EncodedEvent, EventLog, SessionRow, now_ms, stored_payload

# A batch bigger than this is split, so one transaction (and the latency it adds to the
# first event in it) stays bounded even when an agent floods the queue.
MAX_BATCH: Final = 4096
# Producers that get this far ahead of the disk wait in `append()`: backpressure instead
# of unbounded memory.
HIGH_WATER: Final = 16384
# One `events` frame carries at most this many payload bytes: the supervisor handles a
# frame in one go, so this bounds how long one frame holds its event loop.
FRAME_BYTES: Final = 256 * 1024
# Room for a frame's envelope and an event's name and length prefixes.
_FRAME_OVERHEAD: Final = 4096
# Where a commit runs. Handing it to the log's thread and back costs two thread wake-ups
# (measured: 0.1 ms there and 0.12 ms back at p50, 0.35 ms at p90, and the event waits
# for the GIL on the way back when the loop is busy), which at a paced 1,000 events/s put
# one event in ten behind the previous one's commit. So a small batch is committed on the
# loop's own thread while commits are cheap (the last one took at most INLINE_COMMIT_S:
# the fsync of a healthy disk); a big batch, or any batch after a slow commit (a loaded
# disk), goes to the log's thread, so the worker's loop never stalls for long.
INLINE_COMMIT_S: Final = 0.002
INLINE_MAX_ITEMS: Final = 256


@dataclass(frozen=True, slots=True)
class _Durable:
    record: EncodedEvent


@dataclass(frozen=True, slots=True)
class _Plain:
    frame: bytes


@dataclass(frozen=True, slots=True)
class _SessionWrite:
    row: SessionRow


@dataclass(frozen=True, slots=True)
class _Delete:
    seqs: list[int]


_Item = _Durable | _Plain | _SessionWrite | _Delete


def _too_large(size: int) -> ActorvisorError:
    return ActorvisorError(ErrorCode.MESSAGE_TOO_LARGE,
                           f"result is {size} bytes; one message carries at most "
                           f"{MAX_WORKER_MESSAGE}")


def _encode(msg: WorkerToSupervisor) -> bytes:
    frame = encode(msg)
    if len(frame) > MAX_WORKER_MESSAGE:
        # The supervisor would drop it as malformed and the caller would wait forever.
        raise _too_large(len(frame))
    return frame


def _frames(batch: list[_Item], epoch: str) -> list[bytes]:
    """What a committed batch sends, in queue order: each run of consecutive events as
    `events` frames of at most FRAME_BYTES of payload (or one event), each plain message
    as its own frame."""
    frames: list[bytes] = []
    run: list[EncodedEvent] = []
    size = 0

    def close_run() -> None:
        nonlocal size
        if run:
            frames.append(encode(WorkerEvents(run[0].seq, epoch, [e.name for e in run],
                                              [e.payload for e in run])))
            run.clear()
            size = 0

    for item in batch:
        if isinstance(item, _Durable):
            if run and size + len(item.record.payload) > FRAME_BYTES:
                close_run()
            run.append(item.record)
            size += len(item.record.payload)
        elif isinstance(item, _Plain):
            close_run()
            frames.append(item.frame)
    close_run()
    return frames


class Outbox:
    def __init__(
        self,
        log: EventLog,
        send: Callable[[bytes], Awaitable[Any]],
        executor: ThreadPoolExecutor,
    ) -> None:
        self._log = log
        self._send = send
        self._executor = executor
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Condition()
        self._enqueued = 0
        self._done = 0
        self.last_seq = log.last_seq
        self.epoch = log.epoch
        # How long the last commit took; the first goes to the log's thread to find out.
        self._last_commit_s = float("inf")

    async def append(self, name: str, payload: dict[str, Any], session_id: str | None = None) -> int:
        """Queue a durable event; returns its seq. Waits only when far ahead of the disk."""
        seq = self.append_nowait(name, payload, session_id)
        if len(self._queue) > HIGH_WATER:
            await self._wait_for(self._done + len(self._queue) - HIGH_WATER // 2)
        return seq

    def append_nowait(self, name: str, payload: dict[str, Any], session_id: str | None = None) -> int:
        """`append` without backpressure, for paths that must not await (cancellation)."""
        seq = self.last_seq + 1
        # Encoding here, not in the writer, makes a payload that cannot be encoded the
        # caller's error, before it consumes a seq, instead of a dead writer.
        blob = cbor2.dumps(stored_payload(payload, seq, self.epoch))
        if len(blob) + len(name) + _FRAME_OVERHEAD > MAX_WORKER_MESSAGE:
            raise _too_large(len(blob))
        self.last_seq = seq
        self._put(_Durable(EncodedEvent(seq, name, session_id, blob, now_ms())))
        return seq

    def send(self, msg: WorkerToSupervisor) -> None:
        """Queue a non-durable message behind everything queued so far."""
        self._put(_Plain(_encode(msg)))

    def save_session(self, row: SessionRow) -> None:
        """Queue a session row write; it commits with the next batch, in order."""
        self._put(_SessionWrite(row))

    def delete(self, seqs: list[int]) -> None:
        """Queue the deletion of committed events (compaction); runs after what is queued."""
        self._put(_Delete(seqs))

    async def flush(self) -> None:
        """Wait until everything queued before this call has been sent."""
        await self._wait_for(self._enqueued)

    def _put(self, item: _Item) -> None:
        self._queue.append(item)
        self._enqueued += 1
        self._wakeup.set()

    async def _wait_for(self, count: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= count)

    def _commit(self, events: list[EncodedEvent], sessions: list[SessionRow]) -> None:
        started = time.perf_counter()
        self._log.write_encoded(events, sessions)
        self._last_commit_s = time.perf_counter() - started

    async def run(self) -> None:
        """The writer task. Returns never; raises if a commit fails."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch: list[_Item] = []
                while self._queue and len(batch) < MAX_BATCH:
                    batch.append(self._queue.popleft())
                events = [i.record for i in batch if isinstance(i, _Durable)]
                sessions = [i.row for i in batch if isinstance(i, _SessionWrite)]
                if events or sessions:
                    if len(batch) <= INLINE_MAX_ITEMS and self._last_commit_s <= INLINE_COMMIT_S:
                        self._commit(events, sessions)
                    else:
                        await loop.run_in_executor(self._executor, self._commit, events, sessions)
                if deletes := [seq for i in batch if isinstance(i, _Delete) for seq in i.seqs]:
                    await loop.run_in_executor(self._executor, self._log.delete_events, deletes)
                for frame in _frames(batch, self.epoch):
                    await self._send(frame)
                async with self._progress:
                    self._done += len(batch)
                    self._progress.notify_all()
