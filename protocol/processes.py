"""Typed helpers for a VM's processes and shells over an `aio.Connection`.

The actions and events are agentOS's (`spawn`, `processOutput`, `openShell`, `shellData`,
...); these wrappers only give them Python types and names:

    async with Client() as client:
        conn = await client.connect("vm", "my-agent")
        procs = Processes(conn)
        proc = await procs.spawn("sh", ["-c", "echo hi; exit 3"])
        async for chunk in proc.output():
            print(chunk.stream, chunk.data)
        print(await proc.wait())           # ProcessExit(exit_code=3, signal=None)

`Process.output()` and `Shell.output()` subscribe before the process can write (the
connection subscribes from its head `seq`), so no byte is missed, and end after the exit
event; the bytes are the exact bytes the process wrote, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .aio import Connection
from .names import EventName


@dataclass(frozen=True)
class ProcessExit:
    exit_code: int | None
    signal: str | None
    reason: str | None = None  # "vmStopped" / "vmLost" when the VM ended it

    @classmethod
    def from_wire(cls, payload: Mapping[str, Any]) -> ProcessExit:
        reason = payload.get("reason")
        return cls(payload.get("exitCode"), payload.get("signal"),
                   reason if isinstance(reason, str) else None)


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" | "stderr" | "pty"
    data: bytes
    seq: int


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    command: str
    args: list[str]
    cwd: str
    started_at: int
    running: bool
    exit_code: int | None
    signal: str | None

    @classmethod
    def from_wire(cls, payload: Mapping[str, Any]) -> ProcessInfo:
        return cls(payload["pid"], payload["command"], list(payload["args"]), payload["cwd"],
                   payload["startedAt"], payload["running"], payload["exitCode"], payload["signal"])


class _Stream:
    """Output events of one process or shell. Created before the action that starts it, it
    holds every event until it learns its id (an early chunk is kept), then keeps its own."""

    def __init__(self, conn: Connection, output: str, exit: str, key: str) -> None:
        self._conn, self._output, self._exit, self._key = conn, output, exit, key
        self._ident: object = None
        self._early: list[tuple[bool, Any]] = []
        self._queue: asyncio.Queue[Output | ProcessExit] = asyncio.Queue()
        self._ended = False
        conn.on(output, self._on_output)
        conn.on(exit, self._on_exit)

    def resolve(self, ident: object) -> _Stream:
        self._ident = ident
        early, self._early = self._early, []
        for is_exit, payload in early:
            (self._on_exit if is_exit else self._on_output)(payload)
        return self

    def _mine(self, is_exit: bool, payload: Any) -> bool:
        if self._ident is None:
            self._early.append((is_exit, payload))
            return False
        return isinstance(payload, dict) and payload.get(self._key) == self._ident and not self._ended

    def _on_output(self, payload: Any, *_: Any) -> None:
        if self._mine(False, payload):
            self._queue.put_nowait(Output(str(payload.get("stream", "pty")), bytes(payload["data"]),
                                          int(payload["seq"])))

    def _on_exit(self, payload: Any, *_: Any) -> None:
        if self._mine(True, payload):
            self._ended = True
            self._queue.put_nowait(ProcessExit.from_wire(payload))
            self._conn.off(self._output, self._on_output)
            self._conn.off(self._exit, self._on_exit)

    async def output(self) -> AsyncIterator[Output]:
        while True:
            item = await self._queue.get()
            if isinstance(item, ProcessExit):
                return
            yield item


class Process:
    """A process spawned in the VM. `pid` is its pid in the VM's PID namespace."""

    def __init__(self, conn: Connection, pid: int, stream: _Stream) -> None:
        self._conn, self.pid, self._stream = conn, pid, stream

    def output(self) -> AsyncIterator[Output]:
        """Every chunk of stdout and stderr, in order, until the process exits."""
        return self._stream.output()

    async def write(self, data: str | bytes) -> None:
        await self._conn.call("writeProcessStdin", self.pid, data)

    async def close_stdin(self) -> None:
        await self._conn.call("closeProcessStdin", self.pid)

    async def kill(self, signal: str | int = "SIGTERM") -> None:
        await self._conn.call("killProcess", self.pid, signal)

    async def stop(self) -> ProcessExit:
        """SIGTERM, then SIGKILL after the grace period; answers with the exit."""
        return ProcessExit.from_wire(await self._conn.call("stopProcess", self.pid))

    async def wait(self) -> ProcessExit:
        return ProcessExit.from_wire(await self._conn.call("waitProcess", self.pid))

    async def info(self) -> ProcessInfo:
        return ProcessInfo.from_wire(await self._conn.call("getProcess", self.pid))


class Shell:
    """A pseudo-terminal in the VM; its output is the terminal's bytes (stream "pty")."""

    def __init__(self, conn: Connection, shell_id: str, stream: _Stream) -> None:
        self._conn, self.id, self._stream = conn, shell_id, stream

    def output(self) -> AsyncIterator[Output]:
        return self._stream.output()

    async def write(self, data: str | bytes) -> None:
        await self._conn.call("writeShell", self.id, data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._conn.call("resizeShell", self.id, cols, rows)

    async def close(self) -> ProcessExit:
        return ProcessExit.from_wire(await self._conn.call("closeShell", self.id))

    async def wait(self) -> ProcessExit:
        return ProcessExit.from_wire(await self._conn.call("waitShell", self.id))


class Processes:
    """The process and shell actions of one connection, typed."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def spawn(self, command: str, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, stream_stdin: bool = False) -> Process:
        options: dict[str, Any] = {"streamStdin": stream_stdin}
        if env is not None:
            options["env"] = dict(env)
        if cwd is not None:
            options["cwd"] = cwd
        stream = _Stream(self._conn, EventName.PROCESS_OUTPUT, EventName.PROCESS_EXIT, "pid")
        pid = int((await self._conn.call("spawn", command, list(args), options))["pid"])
        return Process(self._conn, pid, stream.resolve(pid))

    async def open_shell(self, *, command: str | None = None, args: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None, cwd: str | None = None,
                         cols: int = 80, rows: int = 24) -> Shell:
        options: dict[str, Any] = {"cols": cols, "rows": rows}
        for name, value in (("command", command), ("env", env), ("cwd", cwd)):
            if value is not None:
                options[name] = dict(value) if isinstance(value, Mapping) else value
        if args is not None:
            options["args"] = list(args)
        stream = _Stream(self._conn, EventName.SHELL_DATA, EventName.SHELL_EXIT, "shellId")
        shell_id = str((await self._conn.call("openShell", options))["shellId"])
        return Shell(self._conn, shell_id, stream.resolve(shell_id))

    async def list(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_wire(p) for p in await self._conn.call("listProcesses")]
