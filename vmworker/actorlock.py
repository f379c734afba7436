"""At most one worker per actor, ever: an exclusive `flock` on `<actor dir>/worker.lock`.

A worker takes it before it opens the event log and holds it for its whole life (the
kernel drops it when the process ends, however it ends); the supervisor takes it too
before it appends on behalf of a dead worker. A second worker of the same actor — a new
one started by a restarted supervisor while the orphaned old one still drains — waits
for the lock instead of writing beside a living writer, and gives up after a bound
longer than a worker's whole shutdown (ExitCode.ACTOR_BUSY, nothing written).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

LOCK_NAME: Final = "worker.lock"
WAIT_S: Final = 30.0      # > the worker's drain budget (stop timeout) plus its hard deadline


def acquire(actor_dir: Path, timeout_s: float = WAIT_S, poll_s: float = 0.05) -> int | None:
    """The held lock's fd (close-on-exec, kept open for the holder's life), or None if
    another process still held it after `timeout_s`."""
    fd = os.open(actor_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(poll_s)


@contextlib.contextmanager
def held(actor_dir: Path, timeout_s: float = WAIT_S) -> Iterator[None]:
    """The lock for a short step (the supervisor's append for a dead worker)."""
    fd = acquire(actor_dir, timeout_s)
    if fd is None:
        raise RuntimeError(f"{actor_dir / LOCK_NAME}: still held by a living worker")
    try:
        yield
    finally:
        os.close(fd)
