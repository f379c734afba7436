"""Processes and terminals that clients start in the VM, and their output as durable events.

Owns every process started with `spawn` and every shell started with `openShell`: their
stdin, signals, window sizes, exit, and the byte streams they write. Each is one more
process of the actor's one VM, started by its init (`sandbox.Machine.spawn`) in a session of
its own — a shell on a pseudo-terminal made inside the VM, so nothing it does reaches a
host terminal. Output becomes `processOutput` / `shellData` events in the actor's log, so it
is sequenced, replayable by cursor and relayed like every session event:

- **coalesced**: bytes are gathered for up to COALESCE_S or CHUNK_BYTES per event, so a
  flood of small writes is not a flood of events; bytes are exact (no decoding here);
- **backpressure**: a pipe is read only while its buffer here is under BUFFER_BYTES, and
  output is appended only while the log keeps up (OUTPUT_IN_FLIGHT bytes not yet sent), so
  a process that writes faster than the log and the relay take it blocks on its full pipe;
- **bounded**: each process or shell keeps at most `output_log_bytes` of output in the log;
  past that its oldest chunks are deleted and a `processOutputCompacted` marker says which
  (docs/delivery.md).

Every process and shell ends with its `processExit` / `shellExit` in the log, also when the
VM stops under it (reason `vmStopped`) or its worker died (`vmLost`, logged by the next
worker from `<actor>/running.json`). This module never runs anything on the host and never
buffers output without bound.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import json
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import EventName

from .outbox import Outbox
from .sandbox import BASE_ENV, Machine, PipeReader, Process, set_done, set_window_size

CHUNK_BYTES: Final = 16 * 1024
COALESCE_S: Final = 0.005
BUFFER_BYTES: Final = 4 * CHUNK_BYTES
OUTPUT_IN_FLIGHT: Final = 1024 * 1024
EXIT_DRAIN_S: Final = 0.1
STOP_GRACE_S: Final = 5.0
MAX_WRITE_BYTES: Final = 1024 * 1024
FINISHED_KEPT: Final = 256
DEFAULT_SHELL: Final = ("/bin/bash", "-l")

log = structlog.get_logger()

SIGNALS: Final = {s.name: int(s) for s in signal.Signals if s.name.startswith("SIG") and "_" not in s.name}


def parse_signal(value: object, what: str) -> int:
    """`"SIGINT"`, `"INT"` or a number, as agentOS and `kill` accept them."""
    if isinstance(value, bool):
        raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what} must be a signal name or number")
    if isinstance(value, int):
        if value in SIGNALS.values():
            return value
        raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what}: {value} is not a signal number")
    if isinstance(value, str):
        name = value.upper()
        number = SIGNALS.get(name) or SIGNALS.get(f"SIG{name}")
        if number is not None:
            return number
        raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what}: {value[:40]!r} is not a signal name")
    raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what} must be a signal name or number")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


@dataclass(frozen=True, slots=True)
class ProcessLimits:
    max_processes: int = 64
    max_shells: int = 16
    output_log_bytes: int = 8 * 1024 * 1024


class OutputStream:
    """One pipe or pty master → coalesced chunks handed to `emit`, with backpressure."""

    def __init__(self, fd: int, emit: Callable[[bytes], Awaitable[None]]) -> None:
        self._emit = emit
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self.reader = PipeReader(fd, self._on_data)
        self.reader.eof.add_done_callback(lambda _: self._arrived.set())
        self.done = asyncio.ensure_future(self._pump())

    def _on_data(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) >= BUFFER_BYTES:
            self.reader.pause()
        self._arrived.set()

    async def _pump(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._buffer and self.reader.eof.done():
                return
            if len(self._buffer) < CHUNK_BYTES and not self.reader.eof.done():
                # Gather small writes: a few ms, or until a chunk is full.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(COALESCE_S):
                        while len(self._buffer) < CHUNK_BYTES and not self.reader.eof.done():
                            await self._arrived.wait()
                            self._arrived.clear()
            while self._buffer:
                chunk = bytes(self._buffer[:CHUNK_BYTES])
                del self._buffer[:CHUNK_BYTES]
                await self._emit(chunk)
            self.reader.resume()
            if self.reader.eof.done():
                return

    async def finish(self, timeout: float) -> None:
        """Wait for EOF up to `timeout`, then take what the pipe holds and stop reading."""
        await asyncio.wait([self.reader.eof], timeout=timeout)
        if not self.reader.eof.done():
            self.reader.drain()
            self.reader.close()
        await self.done


@dataclass(eq=False)
class Running:
    """A process or shell the API started."""

    kind: str                       # "process" | "shell"
    id: int | str                   # pid (VM namespace) or shell id
    pid: int
    command: str
    args: list[str]
    cwd: str
    started_at: int
    proc: Process
    streams: list[OutputStream] = field(default_factory=list)
    stdin_fd: int | None = None
    master_fd: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    logged: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, bytes) in the log
    logged_bytes: int = 0
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"command": self.command, "args": self.args, "cwd": self.cwd,
                               "startedAt": self.started_at, "running": not self.ended.is_set(),
                               "exitCode": self.exit_code, "signal": self.signal}
        if self.kind == "process":
            return {"pid": self.pid, **out}
        return {"shellId": self.id, "pid": self.pid, **out}


class ProcessTable:
    """Every process and shell of one VM started through the API."""

    def __init__(self, outbox: Outbox, actor_dir: Path, limits: ProcessLimits) -> None:
        self._outbox = outbox
        self._limits = limits
        self._registry = actor_dir / "running.json"
        self._processes: dict[int, Running] = {}
        self._shells: dict[str, Running] = {}
        self._finished: deque[Running] = deque()
        self._shell_ids = 0
        self._in_flight = 0
        self._machine: Machine | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._closing = False
        # One save at a time: two threads renaming the same partial file race.
        self._saving = asyncio.Lock()

    def attach(self, machine: Machine) -> None:
        self._machine = machine

    def _machine_or_fail(self) -> Machine:
        if self._machine is None or self._machine.gone.done() or self._closing:
            raise ActorvisorError(ErrorCode.STOPPED, "the VM is not running")
        return self._machine

    # -- what a previous worker left ---------------------------------------------------

    async def close_leftovers(self) -> None:
        """Log the end of every process and shell a dead worker's VM took with it."""
        try:
            entries = json.loads(await asyncio.to_thread(self._registry.read_text))
        except (FileNotFoundError, ValueError):
            return
        for entry in entries:
            if entry.get("kind") == "shell":
                await self._outbox.append(EventName.SHELL_EXIT.value, {
                    "shellId": entry.get("id"), "exitCode": None, "signal": "SIGKILL", "reason": "vmLost"})
            else:
                await self._outbox.append(EventName.PROCESS_EXIT.value, {
                    "pid": entry.get("id"), "exitCode": None, "signal": "SIGKILL", "reason": "vmLost"})
        async with self._saving:
            await asyncio.to_thread(self._save, [])

    def _save(self, entries: list[dict[str, Any]]) -> None:
        partial = self._registry.with_suffix(".partial")
        partial.write_text(json.dumps(entries))
        os.replace(partial, self._registry)

    async def _save_running(self) -> None:
        async with self._saving:  # the table as it is when this save's turn comes
            entries = [{"kind": r.kind, "id": r.id} for r in (*self._processes.values(), *self._shells.values())
                       if not r.ended.is_set()]
            await asyncio.to_thread(self._save, entries)

    # -- processes ---------------------------------------------------------------------

    async def spawn(self, command: str, args: list[str], env: dict[str, str], cwd: str,
                    stream_stdin: bool) -> int:
        machine = self._machine_or_fail()
        if self._running("process") >= self._limits.max_processes:
            raise ActorvisorError(ErrorCode.VM_LIMIT, f"the VM runs {self._limits.max_processes} "
                                  "spawned processes already (its limit); stop one first")
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if stream_stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None
        try:
            proc = await machine.spawn([command, *args], env={**BASE_ENV, **env}, cwd=cwd,
                                       stdio=(in_r, out_w, err_w))
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        running = Running("process", proc.pid, proc.pid, command, args, cwd, _now_ms(), proc,
                          stdin_fd=in_w)
        if in_w is not None:
            os.set_blocking(in_w, False)
        for name, fd in (("stdout", out_r), ("stderr", err_r)):
            running.streams.append(OutputStream(fd, self._emitter(running, {"pid": proc.pid, "stream": name})))
        self._processes[proc.pid] = running
        self._watch(running)
        await self._save_running()
        return proc.pid

    def _get(self, pid: object) -> Running:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"pid must be an integer, got {pid!r:.40}")
        running = self._processes.get(pid)
        if running is None:
            raise ActorvisorError(ErrorCode.PROCESS_NOT_FOUND, f"no process {pid} was spawned in this VM")
        return running

    async def write_stdin(self, pid: object, data: bytes) -> None:
        running = self._get(pid)
        if running.stdin_fd is None:
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  f"process {running.pid} has no open stdin (spawn it with "
                                  "{streamStdin: true}; closeProcessStdin closes it)")
        await self._write(running, running.stdin_fd, data)

    async def close_stdin(self, pid: object) -> None:
        running = self._get(pid)
        if running.stdin_fd is not None:
            async with running.stdin_lock:
                fd, running.stdin_fd = running.stdin_fd, None
                if fd is not None:
                    os.close(fd)

    async def kill(self, pid: object, sig: int) -> None:
        running = self._get(pid)
        await self._signal(running, sig)

    async def stop(self, pid: object, grace_s: float = STOP_GRACE_S) -> dict[str, Any]:
        running = self._get(pid)
        await self._signal(running, signal.SIGTERM)
        try:
            await asyncio.wait_for(running.ended.wait(), grace_s)
        except TimeoutError:
            await self._signal(running, signal.SIGKILL)
            await running.ended.wait()
        return {"exitCode": running.exit_code, "signal": running.signal}

    async def wait(self, pid: object) -> dict[str, Any]:
        running = self._get(pid)
        await running.ended.wait()
        return {"exitCode": running.exit_code, "signal": running.signal}

    def get(self, pid: object) -> dict[str, Any]:
        return self._get(pid).info()

    def list(self) -> list[dict[str, Any]]:
        return [r.info() for r in self._processes.values()]

    # -- shells ------------------------------------------------------------------------

    async def open_shell(self, command: str | None, args: builtins.list[str] | None, env: dict[str, str],
                         cwd: str, rows: int, cols: int) -> str:
        machine = self._machine_or_fail()
        if self._running("shell") >= self._limits.max_shells:
            raise ActorvisorError(ErrorCode.VM_LIMIT, f"the VM has {self._limits.max_shells} open "
                                  "shells already (its limit); close one first")
        argv = [command, *(args or [])] if command else list(DEFAULT_SHELL)
        self._shell_ids += 1
        shell_id = f"shell-{self._shell_ids}-{os.urandom(3).hex()}"
        proc = await machine.spawn(argv, env={**BASE_ENV, "TERM": "xterm-256color", **env}, cwd=cwd,
                                   pty=(rows, cols))
        assert proc.master_fd is not None
        master = proc.master_fd
        write_fd = os.dup(master)
        os.set_blocking(write_fd, False)
        running = Running("shell", shell_id, proc.pid, argv[0], argv[1:], cwd, _now_ms(), proc,
                          master_fd=write_fd)
        running.streams.append(OutputStream(master, self._emitter(running, {"shellId": shell_id})))
        self._shells[shell_id] = running
        self._watch(running)
        await self._save_running()
        return shell_id

    def _shell(self, shell_id: object) -> Running:
        if not isinstance(shell_id, str):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"shellId must be a string, got {shell_id!r:.40}")
        running = self._shells.get(shell_id)
        if running is None:
            raise ActorvisorError(ErrorCode.SHELL_NOT_FOUND, f"no shell {shell_id[:80]!r} in this VM")
        return running

    async def write_shell(self, shell_id: object, data: bytes) -> None:
        running = self._shell(shell_id)
        if running.master_fd is None or running.ended.is_set():
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"shell {running.id} has ended")
        await self._write(running, running.master_fd, data)

    def resize_shell(self, shell_id: object, cols: int, rows: int) -> None:
        running = self._shell(shell_id)
        if running.master_fd is None or running.ended.is_set():
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"shell {running.id} has ended")
        # The kernel sends SIGWINCH to the terminal's foreground process group.
        set_window_size(running.master_fd, rows, cols)

    async def close_shell(self, shell_id: object) -> dict[str, Any]:
        running = self._shell(shell_id)
        if not running.ended.is_set():
            # A hang-up, as when a terminal window closes; KILL if it is ignored.
            await self._signal(running, signal.SIGHUP)
            try:
                await asyncio.wait_for(running.ended.wait(), STOP_GRACE_S)
            except TimeoutError:
                await self._signal(running, signal.SIGKILL)
                await running.ended.wait()
        return {"exitCode": running.exit_code, "signal": running.signal}

    async def wait_shell(self, shell_id: object) -> dict[str, Any]:
        running = self._shell(shell_id)
        await running.ended.wait()
        return {"exitCode": running.exit_code, "signal": running.signal}

    def list_shells(self) -> builtins.list[dict[str, Any]]:
        return [r.info() for r in self._shells.values()]

    # -- shared ------------------------------------------------------------------------

    def _running(self, kind: str) -> int:
        table = self._processes if kind == "process" else self._shells
        return sum(1 for r in table.values() if not r.ended.is_set())

    async def _signal(self, running: Running, sig: int) -> None:
        if running.ended.is_set():
            return
        machine = self._machine_or_fail()
        await machine.kill(running.pid, sig, group=True)

    async def _write(self, running: Running, fd: int, data: bytes) -> None:
        if len(data) > MAX_WRITE_BYTES:
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  f"data is {len(data)} bytes; one write takes at most {MAX_WRITE_BYTES}")
        loop = asyncio.get_running_loop()
        async with running.stdin_lock:
            view = memoryview(data)
            while view:
                current = running.stdin_fd if running.kind == "process" else running.master_fd
                if current != fd:
                    raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{running.kind} {running.id}: input is closed")
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    writable: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(fd, set_done, writable)
                    try:
                        waits: list[asyncio.Future[Any]] = [
                            writable, asyncio.ensure_future(running.ended.wait())]
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        loop.remove_writer(fd)
                    if running.ended.is_set():
                        raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                              f"{running.kind} {running.id} has ended") from None
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EIO):
                        raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                              f"{running.kind} {running.id}: its input is closed") from None
                    raise

    def _emitter(self, running: Running, head: dict[str, Any]) -> Callable[[bytes], Awaitable[None]]:
        name = EventName.PROCESS_OUTPUT if running.kind == "process" else EventName.SHELL_DATA

        async def emit(data: bytes) -> None:
            seq = await self._outbox.append(name.value, {**head, "data": data})
            running.logged.append((seq, len(data)))
            running.logged_bytes += len(data)
            if running.logged_bytes > self._limits.output_log_bytes * 5 // 4:
                self._compact(running, head)
            self._in_flight += len(data)
            if self._in_flight >= OUTPUT_IN_FLIGHT:
                # The log and the supervisor set the pace: wait until what is queued is sent.
                self._in_flight = 0
                await self._outbox.flush()
        return emit

    def _compact(self, running: Running, head: dict[str, Any]) -> None:
        dropped, seqs = 0, []
        while running.logged_bytes > self._limits.output_log_bytes and running.logged:
            seq, size = running.logged.popleft()
            running.logged_bytes -= size
            dropped += size
            seqs.append(seq)
        self._outbox.delete(seqs)
        key = {k: v for k, v in head.items() if k in ("pid", "shellId")}
        self._outbox.append_nowait(EventName.OUTPUT_COMPACTED.value, {
            **key, "droppedBytes": dropped, "throughSeq": seqs[-1], "keptBytes": running.logged_bytes})

    def _watch(self, running: Running) -> None:
        task = asyncio.create_task(self._await_exit(running), name=f"{running.kind}-{running.id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _await_exit(self, running: Running, reason: str | None = None) -> None:
        try:
            status: int | None = await running.proc.exited
        except ActorvisorError:
            status, reason = None, "vmStopped"
        for stream in running.streams:
            await stream.finish(EXIT_DRAIN_S)
        if status is not None and os.WIFSIGNALED(status):
            running.signal = signal_name(os.WTERMSIG(status))
            running.exit_code = None
        elif status is not None:
            running.exit_code = os.WEXITSTATUS(status)
        else:
            running.signal = "SIGKILL"
        if self._closing and reason is None:
            reason = "vmStopped"
        for fd in (running.stdin_fd, running.master_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        running.stdin_fd = running.master_fd = None
        payload: dict[str, Any] = {"exitCode": running.exit_code, "signal": running.signal}
        if reason:
            payload["reason"] = reason
        if running.kind == "process":
            await self._outbox.append(EventName.PROCESS_EXIT.value, {"pid": running.pid, **payload})
        else:
            await self._outbox.append(EventName.SHELL_EXIT.value, {"shellId": running.id, **payload})
        running.ended.set()
        self._finished.append(running)
        while len(self._finished) > FINISHED_KEPT:
            old = self._finished.popleft()
            (self._processes if old.kind == "process" else self._shells).pop(old.id, None)  # type: ignore[arg-type]
        if not self._closing:
            await self._save_running()

    def stopping(self) -> None:
        """The VM is about to stop: the exits that follow get reason `vmStopped`."""
        self._closing = True

    async def close(self) -> None:
        """The VM has stopped: wait until every process and shell has its exit logged."""
        self._closing = True
        if self._watchers:
            await asyncio.wait(self._watchers, timeout=10.0)
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.to_thread(self._save, [])


def _now_ms() -> int:
    return int(time.time() * 1000)
