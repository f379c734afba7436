"""Blocking file writes of the supervisor, done off its event loop and in the order asked.

The supervisor's one event loop serves every connection and every worker, so a write that
waits on the disk (an fsync on a busy disk can take seconds) must not run on it. A
`FileWriter` owns one worker thread and runs the writes handed to it there, one after
another in the order they were submitted: two writes of one file never land out of order,
so the last snapshot taken is the one left on disk. Its owner changes its state in memory
on the loop at once and takes the snapshot there; only the bytes go to the thread, and the
owner awaits the write's future before it answers a client a durable "done". A writer
never runs a write on the loop, never drops or cancels a queued one, and `drain()` waits
for all of them (a service stopping awaits it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class FileWriter:
    """One worker thread running its owner's file writes in submission order.

    A single thread rather than `asyncio.to_thread`'s shared pool: the pool would run two
    queued writes of one file at once, in either order. The thread starts with the first
    write and ends when the writer is garbage collected.
    """

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: set[asyncio.Future[Any]] = set()

    def submit(self, write: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `write` after every write submitted before it. The future returned is done
        when it has run; cancelling that future (a client that went away) does not stop
        or drop the write."""
        running = asyncio.get_running_loop().run_in_executor(self._executor, write)
        self._pending.add(running)
        running.add_done_callback(self._pending.discard)
        return asyncio.shield(running)

    async def drain(self) -> None:
        """Wait until every write submitted so far, and any submitted meanwhile, has run."""
        while self._pending:
            await asyncio.wait(set(self._pending))
