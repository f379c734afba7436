"""The zygote: a warm process that forks workers on request, and the spawner that drives it.

A fresh interpreter that imports the worker's modules (the `anthropic` SDK alone takes
over a second and tens of MB) makes every cold actor slow. The zygote imports them once,
then forks a worker per request, so a worker starts in milliseconds and idle workers
share the zygote's pages copy-on-write.

What must never exist in the zygote before a fork: a ZeroMQ context, an event loop, a
thread, an open database. It is a plain blocking loop over two fds — its stdin (requests)
and a self-pipe woken by SIGCHLD — so the forked child inherits nothing it cannot use.

Wire (one JSON object per line): supervisor → zygote `{"op":"spawn","id":N,"argv":[...],
"limits":{...}}`; zygote → supervisor `{"op":"spawned","id":N,"pid":P}`,
`{"op":"error","id":N,"error":"..."}`, `{"op":"exit","pid":P,"status":S}` (S as asyncio
reports it: the exit code, or minus the signal number). The zygote dies with the
supervisor (PR_SET_PDEATHSIG), and its workers die with it in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import json
import os
import selectors
import signal
import sys
from typing import Any

from supervisor.spawner import ROOT, Place, WorkerSpec, apply_limits, place_process

PR_SET_PDEATHSIG = 1


def _preload() -> None:
    # Everything a worker imports, imported once here, before any fork.
    import vmworker.main  # noqa: F401

    with contextlib.suppress(ImportError):
        import anthropic  # noqa: F401

    # What was preloaded lives as long as every worker forked from here: out of the
    # collector's reach (the permanent generation, inherited by each fork), a worker's full
    # collection no longer walks its ~180,000 objects (115 ms measured) nor writes into
    # their pages, which stay shared with this process instead of being copied into each.
    gc.collect()
    gc.freeze()


def _child(argv: list[str], limits: dict[str, int]) -> None:
    """Runs in the forked worker: become a process-group leader, then run the worker."""
    from vmworker.main import main as worker_main

    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the zygote's stdout is its protocol pipe: never write into it
    os.close(devnull)
    code = 1
    try:
        apply_limits(limits)
        code = worker_main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def zygote_main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return 0
    _preload()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    out = sys.stdout.buffer
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "requests")
    sel.register(wake_r, selectors.EVENT_READ, "sigchld")
    pending = b""

    def emit(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    while True:
        for key, _ in sel.select():
            if key.data == "sigchld":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    emit({"op": "exit", "pid": pid, "status": os.waitstatus_to_exitcode(status)})
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                return 0  # the supervisor closed our stdin: it is stopping
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                try:
                    pid = os.fork()
                except OSError as exc:
                    emit({"op": "error", "id": request["id"], "error": str(exc)})
                    continue
                if pid == 0:
                    sel.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _child(request["argv"], request.get("limits", {}))
                emit({"op": "spawned", "id": request["id"], "pid": pid})


class _ZygoteWorker:
    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self._pid = pid
        self._exited = exited

    @property
    def pid(self) -> int:
        return self._pid

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def signal_group(self, sig: signal.Signals) -> None:
        if self._exited.done():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, sig)


class ZygoteSpawner:
    """Forks workers from a warm zygote; starts (or restarts) the zygote when needed."""

    def __init__(self, python: str | None = None, place: Place | None = None) -> None:
        self._python = python or sys.executable
        self._place = place
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._spawning: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._lock = asyncio.Lock()

    @property
    def zygote_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def _ensure_zygote(self) -> asyncio.subprocess.Process:
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None:
                self._proc = await asyncio.create_subprocess_exec(
                    self._python, "-m", "supervisor.zygote",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    start_new_session=True, cwd=str(ROOT),
                )
                # Before any spawn request: every worker it forks is born there.
                await place_process(self._place, self._proc.pid)
                self._reader = asyncio.create_task(self._read(self._proc), name="zygote-reader")
            return self._proc

    async def spawn(self, spec: WorkerSpec) -> _ZygoteWorker:
        proc = await self._ensure_zygote()
        assert proc.stdin is not None
        request_id = next(self._ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._spawning[request_id] = fut
        proc.stdin.write(json.dumps({"op": "spawn", "id": request_id, "argv": spec.worker_args(),
                                     "limits": spec.limits}).encode() + b"\n")
        try:
            await proc.stdin.drain()
            pid = await fut
        except (ConnectionError, BrokenPipeError) as exc:
            raise OSError(f"zygote unavailable: {exc}") from exc
        finally:
            self._spawning.pop(request_id, None)
        exited = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return _ZygoteWorker(pid, exited)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        while line := await proc.stdout.readline():
            msg = json.loads(line)
            match msg["op"]:
                case "spawned":
                    self._exits.setdefault(msg["pid"], loop.create_future())
                    if (fut := self._spawning.get(msg["id"])) and not fut.done():
                        fut.set_result(msg["pid"])
                case "error":
                    if (fut := self._spawning.get(msg["id"])) and not fut.done():
                        fut.set_exception(OSError(msg["error"]))
                case "exit":
                    exited = self._exits.pop(msg["pid"], None)
                    if exited is not None and not exited.done():
                        exited.set_result(msg["status"])
        await proc.wait()
        # The zygote is gone, and its workers died with it (PR_SET_PDEATHSIG).
        for fut in self._spawning.values():
            if not fut.done():
                fut.set_exception(OSError("the zygote exited"))
        for pid, exited in list(self._exits.items()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            if not exited.done():
                exited.set_result(-signal.SIGKILL)
        self._exits.clear()

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(zygote_main())
