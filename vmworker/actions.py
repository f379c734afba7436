"""The `vm` actor's actions (PROTOCOL.md §3): argument validation and dispatch.

Owns the table of actions, the exact shape of each one's arguments and result, and the
rule of which actions wait for the VM to boot. Every argument error is an
`actor.invalid_args` that names the action, the argument and what was expected. Handlers
delegate to `Vm`, `SessionManager` and the event log reader; this module never touches
the socket, never sends replies (the worker loop does, through the outbox), and holds no
state of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import ActionName, AgentType, EventName

from .agents import PROFILES
from .agents.base import PermissionReply
from .eventlog import EventReader, Page
from .outbox import Outbox
from .processes import ProcessTable, parse_signal
from .sandbox import validate_env
from .sessions import MAX_PROMPT_CHARS, SessionManager, parse_options
from .vm import DEFAULT_EXEC_TIMEOUT_S, Vm
from .vmfs import WORKSPACE, VmPath, normalize

DEFAULT_PAGE: Final = 1000
MAX_PAGE: Final = 10_000
MAX_COMMAND_BYTES: Final = 128 * 1024 - 1  # the kernel's limit for one argv string
MAX_TIMEOUT_MS: Final = 3_600_000
MAX_ARGS: Final = 4000
MAX_TERMINAL: Final = 1000
MAX_FETCH_REQUEST: Final = 64 * 1024      # vmFetch request bodies travel in one argv string
MAX_BATCH_FILES: Final = 1000
MAX_TREE_DEPTH: Final = 64
MAX_TREE_ENTRIES: Final = 20_000
MAX_EXCLUDES: Final = 256


def _invalid(message: str) -> ActorvisorError:
    return ActorvisorError(ErrorCode.INVALID_ARGS, message)


class Args:
    """Positional arguments of one action call, checked with messages that name them."""

    def __init__(self, action: str, values: list[Any], names: Sequence[str]) -> None:
        if len(values) > len(names):
            raise _invalid(f"{action} takes at most {len(names)} argument(s)"
                           f"{' (' + ', '.join(names) + ')' if names else ''}, got {len(values)}")
        self.action = action
        self._values = values
        self._names = names

    def what(self, index: int) -> str:
        return f"{self.action}: argument {index + 1} ({self._names[index]})"

    def get(self, index: int) -> Any:
        # JS `undefined`/`null` both mean "not given" for an optional argument.
        return self._values[index] if index < len(self._values) else None

    def string(self, index: int, *, max_len: int | None = None) -> str:
        value = self.get(index)
        if not isinstance(value, str):
            raise _invalid(f"{self.what(index)} must be a string, got {_type(value)}")
        if max_len is not None and len(value) > max_len:
            raise _invalid(f"{self.what(index)} is longer than {max_len} characters")
        return value

    def path(self, index: int) -> VmPath:
        return normalize(self.get(index), what=self.what(index))

    def options(self, index: int, allowed: Sequence[str]) -> dict[str, Any]:
        value = self.get(index)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _invalid(f"{self.what(index)} must be an object, got {_type(value)}")
        for key in value:
            if key not in allowed:
                raise _invalid(f"{self.what(index)}: unknown option {key!r:.80}; "
                               f"expected {', '.join(allowed) or 'none'}")
        return {k: v for k, v in value.items() if v is not None}

    def option_bool(self, index: int, opts: dict[str, Any], key: str) -> bool:
        value = opts.get(key, False)
        if not isinstance(value, bool):
            raise _invalid(f"{self.what(index)}.{key} must be a boolean, got {_type(value)}")
        return value

    def option_int(self, index: int, opts: dict[str, Any], key: str, default: int,
                   low: int, high: int) -> int:
        value = opts.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _invalid(f"{self.what(index)}.{key} must be an integer from {low} to {high}, "
                           f"got {value!r:.80}")
        return value


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True, slots=True)
class _Spec:
    handler: Callable[[Args], Awaitable[Any]]
    params: tuple[str, ...]
    needs_vm: bool


class Actions:
    """Dispatches one action call to its handler and returns the wire result."""

    def __init__(
        self,
        vm: Vm,
        sessions: SessionManager,
        outbox: Outbox,
        reader: EventReader,
        read_executor: ThreadPoolExecutor,
        restarts: int,
        processes: ProcessTable | None = None,
    ) -> None:
        self._vm = vm
        self._processes = processes
        self._sessions = sessions
        self._outbox = outbox
        self._reader = reader
        self._read_executor = read_executor
        self._restarts = restarts
        self._started = time.monotonic()
        spec = _Spec
        self._table: dict[str, _Spec] = {
            ActionName.CREATE_SESSION: spec(self._create_session, ("agentType", "options"), True),
            ActionName.SEND_PROMPT: spec(self._send_prompt, ("sessionId", "text"), True),
            ActionName.CANCEL_PROMPT: spec(self._cancel_prompt, ("sessionId",), True),
            ActionName.CLOSE_SESSION: spec(self._close_session, ("sessionId",), True),
            ActionName.LIST_SESSIONS: spec(self._list_sessions, (), False),
            ActionName.GET_SESSION_EVENTS: spec(self._get_session_events,
                                                ("sessionId", "options"), False),
            ActionName.REPLAY_EVENTS: spec(self._replay_events, ("options",), False),
            ActionName.RESPOND_PERMISSION: spec(self._respond_permission,
                                                ("sessionId", "permissionId", "reply"), True),
            ActionName.READ_FILE: spec(self._read_file, ("path",), True),
            ActionName.WRITE_FILE: spec(self._write_file, ("path", "content"), True),
            ActionName.READDIR: spec(self._readdir, ("path",), True),
            ActionName.STAT: spec(self._stat, ("path",), True),
            ActionName.MKDIR: spec(self._mkdir, ("path", "options"), True),
            ActionName.EXISTS: spec(self._exists, ("path",), True),
            ActionName.DELETE_FILE: spec(self._delete_file, ("path", "options"), True),
            ActionName.EXEC: spec(self._exec, ("command", "options"), True),
            ActionName.GET_RUNTIME_HEALTH: spec(self._health, (), False),
            ActionName.SPAWN: spec(self._spawn, ("command", "args", "options"), True),
            ActionName.WRITE_PROCESS_STDIN: spec(self._write_stdin, ("pid", "data"), True),
            ActionName.CLOSE_PROCESS_STDIN: spec(self._close_stdin, ("pid",), True),
            ActionName.KILL_PROCESS: spec(self._kill_process, ("pid", "signal"), True),
            ActionName.STOP_PROCESS: spec(self._stop_process, ("pid",), True),
            ActionName.WAIT_PROCESS: spec(self._wait_process, ("pid",), True),
            ActionName.LIST_PROCESSES: spec(self._list_processes, (), True),
            ActionName.GET_PROCESS: spec(self._get_process, ("pid",), True),
            ActionName.OPEN_SHELL: spec(self._open_shell, ("options",), True),
            ActionName.WRITE_SHELL: spec(self._write_shell, ("shellId", "data"), True),
            ActionName.RESIZE_SHELL: spec(self._resize_shell, ("shellId", "cols", "rows"), True),
            ActionName.CLOSE_SHELL: spec(self._close_shell, ("shellId",), True),
            ActionName.WAIT_SHELL: spec(self._wait_shell, ("shellId",), True),
            ActionName.LIST_SHELLS: spec(self._list_shells, (), True),
            ActionName.VM_FETCH: spec(self._vm_fetch, ("port", "path", "options"), True),
            ActionName.GET_NETWORK_POLICY: spec(self._get_network_policy, (), False),
            # agentOS parity (docs/agentos-parity.md)
            ActionName.PROMPT: spec(self._send_prompt, ("sessionId", "text"), True),
            ActionName.CANCEL_SESSION: spec(self._cancel_prompt, ("sessionId",), True),
            ActionName.DESTROY_SESSION: spec(self._destroy_session, ("sessionId",), True),
            ActionName.LIST_PERSISTED_SESSIONS: spec(self._list_sessions, (), False),
            ActionName.SET_MODEL: spec(self._set_model, ("sessionId", "modelId"), False),
            ActionName.SET_MODE: spec(self._set_mode, ("sessionId", "modeId"), False),
            ActionName.SET_THOUGHT_LEVEL: spec(self._set_thought_level, ("sessionId", "level"),
                                               False),
            ActionName.GET_MODES: spec(self._get_modes, ("sessionId",), False),
            ActionName.GET_CONFIG_OPTIONS: spec(self._get_config_options, ("sessionId",), False),
            ActionName.GET_SEQUENCED_EVENTS: spec(self._get_sequenced_events,
                                                  ("sessionId", "options"), False),
            ActionName.WRITE_FILES: spec(self._write_files, ("entries",), True),
            ActionName.READ_FILES: spec(self._read_files, ("paths",), True),
            ActionName.READDIR_RECURSIVE: spec(self._readdir_recursive, ("path", "options"), True),
            ActionName.MOVE: spec(self._move, ("from", "to"), True),
            ActionName.DELETE: spec(self._delete_file, ("path", "options"), True),
            ActionName.EXEC_ARGV: spec(self._exec_argv, ("file", "args", "options"), True),
            # sent by the supervisor's cron scheduler only (supervisor/cron.py)
            ActionName.RUN_CRON_JOB: spec(self._run_cron_job, ("job", "firedAt"), True),
        }

    async def dispatch(self, name: str, args: list[Any]) -> Any:
        spec = self._table.get(name)
        if spec is None:
            raise ActorvisorError(ErrorCode.UNKNOWN_ACTION,
                                  f"the vm actor has no action {name!r:.80}")
        checked = Args(name, args, spec.params)
        if spec.needs_vm:
            await self._vm.wait_ready()
            self._vm.note_activity()
        return await spec.handler(checked)

    async def _run_cron_job(self, a: Args) -> Any:
        from . import cron  # cron builds on this module's limits: imported once both exist

        return await cron.run_job(a.get(0), a.get(1), vm=self._vm, sessions=self._sessions,
                                  outbox=self._outbox)

    # sessions

    async def _create_session(self, a: Args) -> Any:
        agent_type = a.get(0)
        if not isinstance(agent_type, str) or agent_type not in {t.value for t in AgentType}:
            raise _invalid(f"createSession: argument 1 (agentType) must be one of "
                           f"{', '.join(repr(t.value) for t in AgentType)}; got {agent_type!r:.80}")
        kind = AgentType(agent_type)
        options = parse_options(a.get(1), what="createSession: argument 2 (options)",
                                agent_type=kind, default_policy=self._sessions.default_policy)
        profile = PROFILES[kind]
        # agentOS's SessionRecord shape: the ACP `initialize` answer comes with the id.
        return {"sessionId": self._sessions.create(kind, options),
                "capabilities": profile.capabilities, "agentInfo": profile.agent_info}

    async def _send_prompt(self, a: Args) -> Any:
        session_id, text = a.string(0), a.string(1, max_len=MAX_PROMPT_CHARS)
        return await self._sessions.prompt(session_id, text)

    async def _cancel_prompt(self, a: Args) -> Any:
        return {"cancelled": self._sessions.cancel(a.string(0))}

    async def _close_session(self, a: Args) -> Any:
        await self._sessions.close(a.string(0))
        return None

    async def _list_sessions(self, a: Args) -> Any:
        return self._sessions.summaries()

    async def _destroy_session(self, a: Args) -> Any:
        return await self._sessions.destroy(a.string(0))

    async def _set_model(self, a: Args) -> Any:
        return await self._sessions.configure(a.string(0), "setModel", model=a.get(1))

    async def _set_mode(self, a: Args) -> Any:
        return await self._sessions.configure(a.string(0), "setMode", mode=a.get(1))

    async def _set_thought_level(self, a: Args) -> Any:
        return await self._sessions.configure(a.string(0), "setThoughtLevel",
                                              thought_level=a.get(1))

    async def _get_modes(self, a: Args) -> Any:
        return self._sessions.modes(a.string(0))

    async def _get_config_options(self, a: Args) -> Any:
        return self._sessions.config_options(a.string(0))

    async def _respond_permission(self, a: Args) -> Any:
        session_id, permission_id, reply = a.string(0), a.string(1), a.get(2)
        if not isinstance(reply, str) or reply not in {r.value for r in PermissionReply}:
            raise _invalid("respondPermission: argument 3 (reply) must be 'once', 'always' or "
                           f"'reject'; got {reply!r:.80}")
        self._sessions.respond_permission(session_id, permission_id, PermissionReply(reply))
        return None

    # history

    def _cursor(self, a: Args, index: int, opts: dict[str, Any]) -> tuple[int, int]:
        after = a.option_int(index, opts, "after", 0, 0, 2**63 - 1)
        limit = a.option_int(index, opts, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        return after, limit

    async def _read(self, fn: Callable[..., Page], *args: Any) -> Page:
        return await asyncio.get_running_loop().run_in_executor(self._read_executor, fn, *args)

    async def _get_session_events(self, a: Args) -> Any:
        session_id = a.string(0)
        self._sessions.get(session_id)
        after, limit = self._cursor(a, 1, a.options(1, ("after", "limit")))
        page = await self._read(self._reader.read_session, session_id,
                                EventName.SESSION_EVENT.value, after, limit)
        # agentOS's shape: an array of PersistedSessionEvent. To page, pass the last
        # element's seq as `after`; a page shorter than `limit` may still not be the last
        # (pages also end at a byte budget), an empty one is.
        return [{"seq": e.seq, "sessionId": session_id, "event": e.payload.get("event"),
                 "createdAt": e.created_at} for e in page.events]

    async def _get_sequenced_events(self, a: Args) -> Any:
        session_id = a.string(0)
        self._sessions.get(session_id)
        opts = a.options(1, ("since", "limit"))
        since = a.option_int(1, opts, "since", 0, 0, 2**63 - 1)
        limit = a.option_int(1, opts, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        page = await self._read(self._reader.read_session, session_id,
                                EventName.SESSION_EVENT.value, since, limit)
        return [{"sequenceNumber": e.seq, "notification": e.payload.get("event")}
                for e in page.events]

    async def _replay_events(self, a: Args) -> Any:
        opts = a.options(0, ("after", "limit", "names"))
        after, limit = self._cursor(a, 0, opts)
        names = opts.get("names")
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(n, str) for n in names)):
            raise _invalid("replayEvents: argument 1 (options).names must be a list of strings")
        page = await self._read(self._reader.read, after, limit, names)
        return {
            "epoch": self._outbox.epoch,
            "events": [{"seq": e.seq, "name": e.name, "args": [e.payload]} for e in page.events],
            "nextCursor": page.next_cursor,
            "hasMore": page.has_more,
        }

    # filesystem

    async def _read_file(self, a: Args) -> Any:
        return await self._vm.read_file(a.path(0))

    async def _write_file(self, a: Args) -> Any:
        content = a.get(1)
        if isinstance(content, str):
            content = content.encode("utf-8")
        elif isinstance(content, bytearray | memoryview):
            content = bytes(content)
        if not isinstance(content, bytes):
            raise _invalid(f"writeFile: argument 2 (content) must be a string or bytes, "
                           f"got {_type(content)}")
        await self._vm.write_file(a.path(0), content)
        return None

    def _list(self, a: Args, index: int, max_len: int) -> list[Any]:
        value = a.get(index)
        if not isinstance(value, list):
            raise _invalid(f"{a.what(index)} must be a list, got {_type(value)}")
        if len(value) > max_len:
            raise _invalid(f"{a.what(index)} has {len(value)} items; the limit is {max_len}")
        return value

    async def _write_files(self, a: Args) -> Any:
        entries = []
        for i, entry in enumerate(self._list(a, 0, MAX_BATCH_FILES)):
            where = f"{a.what(0)}[{i}]"
            if not isinstance(entry, dict) or set(entry) - {"path", "content"}:
                raise _invalid(f"{where} must be an object {{path, content}}, got "
                               f"{_type(entry) if not isinstance(entry, dict) else sorted(entry)}")
            content = entry.get("content")
            if isinstance(content, str):
                content = content.encode("utf-8")
            elif isinstance(content, bytearray | memoryview):
                content = bytes(content)
            if not isinstance(content, bytes):
                raise _invalid(f"{where}.content must be a string or bytes, got {_type(content)}")
            entries.append((normalize(entry.get("path"), what=f"{where}.path"), content))
        results = []
        for path, content in entries:
            try:
                await self._vm.write_file(path, content)
                results.append({"path": str(path), "success": True})
            except ActorvisorError as exc:
                results.append({"path": str(path), "success": False, "error": exc.message,
                                "code": exc.code.value})
        return results

    async def _read_files(self, a: Args) -> Any:
        paths = [normalize(p, what=f"{a.what(0)}[{i}]")
                 for i, p in enumerate(self._list(a, 0, MAX_BATCH_FILES))]
        results: list[dict[str, Any]] = []
        for path in paths:
            try:
                results.append({"path": str(path), "content": await self._vm.read_file(path)})
            except ActorvisorError as exc:
                results.append({"path": str(path), "error": exc.message, "code": exc.code.value})
        return results

    async def _readdir_recursive(self, a: Args) -> Any:
        opts = a.options(1, ("maxDepth", "exclude"))
        depth = a.option_int(1, opts, "maxDepth", MAX_TREE_DEPTH, 1, MAX_TREE_DEPTH)
        exclude = opts.get("exclude", [])
        if (not isinstance(exclude, list) or len(exclude) > MAX_EXCLUDES
                or not all(isinstance(n, str) for n in exclude)):
            raise _invalid(f"{a.what(1)}.exclude must be a list of at most {MAX_EXCLUDES} names")
        return await self._vm.readdir_recursive(a.path(0), max_depth=depth,
                                                exclude=frozenset(exclude),
                                                max_entries=MAX_TREE_ENTRIES)

    async def _move(self, a: Args) -> Any:
        await self._vm.move(a.path(0), a.path(1))
        return None

    async def _exec_argv(self, a: Args) -> Any:
        file = a.string(0, max_len=MAX_COMMAND_BYTES)
        if not file or "\0" in file:
            raise _invalid("execArgv: argument 1 (file) must be a non-empty string without NUL bytes")
        argv = [file, *self._argv_strings(a, 1)]
        opts = a.options(2, ("cwd", "env", "timeoutMs"))
        env = validate_env(opts.get("env", {}), what="execArgv: argument 3 (options).env")
        timeout_ms = a.option_int(2, opts, "timeoutMs", round(DEFAULT_EXEC_TIMEOUT_S * 1000),
                                  1, MAX_TIMEOUT_MS)
        cwd = normalize(opts["cwd"], what="execArgv: argument 3 (options).cwd") if "cwd" in opts else None
        result = await self._vm.run(argv, cwd=cwd, env=env, timeout_s=timeout_ms / 1000)
        return result.to_wire()

    async def _readdir(self, a: Args) -> Any:
        return await self._vm.readdir(a.path(0))

    async def _stat(self, a: Args) -> Any:
        return await self._vm.stat(a.path(0))

    async def _exists(self, a: Args) -> Any:
        return await self._vm.exists(a.path(0))

    async def _mkdir(self, a: Args) -> Any:
        recursive = a.option_bool(1, a.options(1, ("recursive",)), "recursive")
        await self._vm.mkdir(a.path(0), recursive=recursive)
        return None

    async def _delete_file(self, a: Args) -> Any:
        recursive = a.option_bool(1, a.options(1, ("recursive",)), "recursive")
        await self._vm.delete(a.path(0), recursive=recursive)
        return None

    async def _exec(self, a: Args) -> Any:
        command = a.string(0)
        if "\0" in command or len(command.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
            raise _invalid(f"exec: argument 1 (command) must be at most {MAX_COMMAND_BYTES} "
                           "bytes, without NUL bytes")
        opts = a.options(1, ("cwd", "env", "timeoutMs"))
        env = validate_env(opts.get("env", {}), what="exec: argument 2 (options).env")
        timeout_ms = a.option_int(1, opts, "timeoutMs", round(DEFAULT_EXEC_TIMEOUT_S * 1000),
                                  1, MAX_TIMEOUT_MS)
        cwd = opts.get("cwd")
        if cwd is not None:
            cwd = normalize(cwd, what="exec: argument 2 (options).cwd")
        result = await self._vm.exec(command, cwd=cwd, env=env,
                                     timeout_s=timeout_ms / 1000)
        return result.to_wire()

    # processes and shells

    @property
    def _procs(self) -> ProcessTable:
        if self._processes is None:
            raise ActorvisorError(ErrorCode.STOPPED, "this worker runs no process table")
        return self._processes

    def _argv_strings(self, a: Args, index: int) -> list[str]:
        value = a.get(index)
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > MAX_ARGS:
            raise _invalid(f"{a.what(index)} must be a list of at most {MAX_ARGS} strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or "\0" in item or len(item) > MAX_COMMAND_BYTES:
                raise _invalid(f"{a.what(index)}[{i}] must be a string without NUL bytes, "
                               f"at most {MAX_COMMAND_BYTES} characters; got {_type(item)}")
        return list(value)

    async def _cwd(self, a: Args, index: int, opts: dict[str, Any]) -> str:
        cwd = normalize(opts["cwd"], what=f"{a.what(index)}.cwd") if "cwd" in opts else normalize(WORKSPACE)
        info = await self._vm.stat(cwd)
        if not info["isDirectory"]:
            raise ActorvisorError(ErrorCode.NOT_A_DIRECTORY, f"cwd {cwd}: not a directory")
        return str(cwd)

    def _data(self, a: Args, index: int) -> bytes:
        value = a.get(index)
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise _invalid(f"{a.what(index)} must be a string or bytes, got {_type(value)}")

    def _dimension(self, a: Args, index: int, value: object, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TERMINAL:
            raise _invalid(f"{a.what(index)}: {name} must be an integer from 1 to {MAX_TERMINAL}, "
                           f"got {value!r:.40}")
        return value

    async def _spawn(self, a: Args) -> Any:
        command = a.string(0, max_len=MAX_COMMAND_BYTES)
        if not command or "\0" in command:
            raise _invalid("spawn: argument 1 (command) must be a non-empty string without NUL bytes")
        args = self._argv_strings(a, 1)
        opts = a.options(2, ("env", "cwd", "streamStdin"))
        env = validate_env(opts.get("env", {}), what="spawn: argument 3 (options).env")
        pid = await self._procs.spawn(command, args, env, await self._cwd(a, 2, opts),
                                      a.option_bool(2, opts, "streamStdin"))
        return {"pid": pid}

    async def _write_stdin(self, a: Args) -> Any:
        await self._procs.write_stdin(a.get(0), self._data(a, 1))
        return None

    async def _close_stdin(self, a: Args) -> Any:
        await self._procs.close_stdin(a.get(0))
        return None

    async def _kill_process(self, a: Args) -> Any:
        raw = a.get(1)
        sig = signal.SIGTERM if raw is None else parse_signal(raw, a.what(1))
        await self._procs.kill(a.get(0), sig)
        return None

    async def _stop_process(self, a: Args) -> Any:
        return await self._procs.stop(a.get(0))

    async def _wait_process(self, a: Args) -> Any:
        return await self._procs.wait(a.get(0))

    async def _list_processes(self, a: Args) -> Any:
        return self._procs.list()

    async def _get_process(self, a: Args) -> Any:
        return self._procs.get(a.get(0))

    async def _open_shell(self, a: Args) -> Any:
        opts = a.options(0, ("command", "args", "env", "cwd", "cols", "rows"))
        command = opts.get("command")
        if command is not None and (not isinstance(command, str) or not command or "\0" in command):
            raise _invalid("openShell: argument 1 (options).command must be a non-empty string")
        args = opts.get("args")
        if args is not None:
            args = self._argv_strings(Args("openShell", [args], ("options.args",)), 0)
        env = validate_env(opts.get("env", {}), what="openShell: argument 1 (options).env")
        cols = self._dimension(a, 0, opts.get("cols", 80), "cols")
        rows = self._dimension(a, 0, opts.get("rows", 24), "rows")
        shell_id = await self._procs.open_shell(command, args, env, await self._cwd(a, 0, opts), rows, cols)
        return {"shellId": shell_id}

    async def _write_shell(self, a: Args) -> Any:
        await self._procs.write_shell(a.get(0), self._data(a, 1))
        return None

    async def _resize_shell(self, a: Args) -> Any:
        cols = self._dimension(a, 1, a.get(1), "cols")
        rows = self._dimension(a, 2, a.get(2), "rows")
        self._procs.resize_shell(a.get(0), cols, rows)
        return None

    async def _close_shell(self, a: Args) -> Any:
        return await self._procs.close_shell(a.get(0))

    async def _wait_shell(self, a: Args) -> Any:
        return await self._procs.wait_shell(a.get(0))

    async def _list_shells(self, a: Args) -> Any:
        return self._procs.list_shells()

    # network

    async def _vm_fetch(self, a: Args) -> Any:
        port = a.get(0)
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise _invalid(f"{a.what(0)} must be an integer from 1 to 65535, got {port!r:.40}")
        path = a.string(1, max_len=8192)
        if not path.startswith("/") or any(c in path for c in "\r\n\0 "):
            raise _invalid(f"{a.what(1)} must start with '/' and hold no spaces or control characters")
        opts = a.options(2, ("method", "headers", "body"))
        method = opts.get("method", "GET")
        if not isinstance(method, str) or not method.isalpha() or len(method) > 16:
            raise _invalid(f"{a.what(2)}.method must be an HTTP method name")
        headers = opts.get("headers", {})
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k.isprintable() and v.isprintable()
                and ":" not in k for k, v in headers.items()):
            raise _invalid(f"{a.what(2)}.headers must be an object of header names to strings")
        body = opts.get("body", b"")
        body = body.encode() if isinstance(body, str) else body
        if not isinstance(body, bytes | bytearray) or len(body) > MAX_FETCH_REQUEST:
            raise _invalid(f"{a.what(2)}.body must be a string or bytes of at most "
                           f"{MAX_FETCH_REQUEST} bytes")
        return await self._vm.fetch(port, path, method.upper(), headers, bytes(body))

    async def _get_network_policy(self, a: Args) -> Any:
        return self._vm.policy.to_wire()

    # runtime

    async def _health(self, a: Args) -> Any:
        return {
            "phase": self._vm.phase.value,
            "booted": self._vm.booted,
            "pid": os.getpid(),
            "uptimeMs": round((time.monotonic() - self._started) * 1000),
            "sessions": self._sessions.open_count,
            "eventsSeq": self._outbox.last_seq,
            "restarts": self._restarts,
        }
