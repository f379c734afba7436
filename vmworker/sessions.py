"""Sessions of one actor: their state, their turns, their permission requests.

Owns the session table (mirrored to the log's `sessions` table through the outbox), the
one-turn-per-session rule, turn cancellation, and the `Turn` that agents act through:
every update an agent emits becomes a `sessionEvent` via `Outbox.append`, so it is
sequenced and committed before anyone sees it; `SessionLog` reads a session's past
updates back, for agents that rebuild their conversation from the log. It never writes to
the socket or SQLite directly and never touches host paths (the VM is reached only
through `Vm`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import structlog

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import AgentType, EventName

from .agents import PROFILES, create_agent
from .agents.base import (
    DEFAULT_PERMISSION_OPTIONS,
    Agent,
    PermissionPolicy,
    PermissionReply,
    SessionOptions,
    StopReason,
    UpdateKind,
    text_content,
)
from .eventlog import EventReader, SessionRow, now_ms
from .outbox import Outbox
from .sandbox import ExecResult, validate_env
from .vm import Vm
from .vmfs import normalize

MAX_PROMPT_CHARS: Final = 1024 * 1024
MAX_TOKENS_LIMIT: Final = 1_000_000
HISTORY_PAGE: Final = 10_000
EMIT_YIELD_S: Final = 0.001
_OPTION_KEYS: Final = ("cwd", "env", "model", "systemPrompt", "permissionPolicy", "maxTokens",
                       "thinking", "thinkingBudget", "mcpServers", "additionalInstructions",
                       "skipOsInstructions", "mode", "thoughtLevel")
MAX_MCP_SERVERS: Final = 32
MAX_INSTRUCTIONS_CHARS: Final = 64 * 1024
MAX_NAME_CHARS: Final = 256

log = structlog.get_logger()


class SessionStatus(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"
    DESTROYED = "destroyed"


def _invalid(message: str) -> ActorvisorError:
    return ActorvisorError(ErrorCode.INVALID_ARGS, message)


def _string_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 256 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_NAME_CHARS
            and len(v) <= MAX_INSTRUCTIONS_CHARS for k, v in value.items()):
        raise _invalid(f"{what} must be an object of at most 256 string values")
    return dict(value)


def parse_mcp_servers(value: object, what: str) -> tuple[dict[str, Any], ...]:
    """agentOS's `mcpServers`: `{type: "local", command, args?, env?}` or
    `{type: "remote", url, headers?}`."""
    if not isinstance(value, list) or len(value) > MAX_MCP_SERVERS:
        raise _invalid(f"{what} must be a list of at most {MAX_MCP_SERVERS} servers")
    servers = []
    for i, server in enumerate(value):
        where = f"{what}[{i}]"
        if not isinstance(server, dict):
            raise _invalid(f"{where} must be an object")
        kind = server.get("type")
        fields = {"local": ("type", "command", "args", "env"),
                  "remote": ("type", "url", "headers")}.get(kind if isinstance(kind, str) else "")
        if fields is None:
            raise _invalid(f"{where}.type must be 'local' or 'remote'; got {kind!r:.80}")
        unknown = sorted(str(k) for k in server if k not in fields)
        if unknown:
            raise _invalid(f"{where}: unknown field {unknown[0]!r:.80}; expected {', '.join(fields)}")
        required = "command" if kind == "local" else "url"
        if not isinstance(server.get(required), str) or not server[required]:
            raise _invalid(f"{where}.{required} must be a non-empty string")
        out: dict[str, Any] = {"type": kind, required: server[required]}
        if server.get("args") is not None:
            args = server["args"]
            if not isinstance(args, list) or len(args) > 256 or not all(isinstance(a, str) for a in args):
                raise _invalid(f"{where}.args must be a list of at most 256 strings")
            out["args"] = list(args)
        for key in ("env", "headers"):
            if server.get(key) is not None:
                out[key] = _string_map(server[key], f"{where}.{key}")
        servers.append(out)
    return tuple(servers)


def _choice(value: object, allowed: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _invalid(f"{what} must be one of {', '.join(repr(a) for a in allowed)}; "
                       f"got {value!r:.80}")
    return value


def parse_options(value: object, *, what: str = "options",
                  agent_type: AgentType = AgentType.LOCAL,
                  default_policy: PermissionPolicy = PermissionPolicy.ASK) -> SessionOptions:
    """Validate `createSession` options; every error names the offending field."""
    if value is None:
        return SessionOptions()
    if not isinstance(value, dict):
        raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what} must be an object")
    unknown = sorted(str(k) for k in value if k not in _OPTION_KEYS)
    if unknown:
        raise ActorvisorError(
            ErrorCode.INVALID_ARGS,
            f"{what}: unknown option {unknown[0]!r:.80}; expected {', '.join(_OPTION_KEYS)}",
        )
    cwd = value.get("cwd")
    if cwd is not None:
        cwd = str(normalize(cwd, what=f"{what}.cwd"))
    env = validate_env({} if value.get("env") is None else value["env"], what=f"{what}.env")
    strings: dict[str, str | None] = {}
    for key in ("model", "systemPrompt"):
        item = value.get(key)
        if item is not None and not isinstance(item, str):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what}.{key} must be a string")
        strings[key] = item
    policy = value.get("permissionPolicy")
    if policy is None:
        policy = default_policy.value
    if not isinstance(policy, str) or policy not in {p.value for p in PermissionPolicy}:
        raise ActorvisorError(
            ErrorCode.INVALID_ARGS,
            f"{what}.permissionPolicy must be 'allow_all' or 'ask'; got {policy!r:.80}",
        )
    limits: dict[str, int | None] = {}
    for key in ("maxTokens", "thinkingBudget"):
        item = value.get(key)
        if item is not None and (not isinstance(item, int) or isinstance(item, bool)
                                 or not 1 <= item <= MAX_TOKENS_LIMIT):
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  f"{what}.{key} must be an integer from 1 to {MAX_TOKENS_LIMIT}")
        limits[key] = item
    flags: dict[str, bool] = {}
    for key in ("thinking", "skipOsInstructions"):
        item = value.get(key)
        if item is not None and not isinstance(item, bool):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what}.{key} must be a boolean")
        flags[key] = bool(item)
    extra = value.get("additionalInstructions")
    if extra is not None and (not isinstance(extra, str) or len(extra) > MAX_INSTRUCTIONS_CHARS):
        raise _invalid(f"{what}.additionalInstructions must be a string of at most "
                       f"{MAX_INSTRUCTIONS_CHARS} characters")
    mcp = value.get("mcpServers")
    profile = PROFILES[agent_type]
    mode = value.get("mode")
    if mode is not None:
        mode = _choice(mode, [m for m, _ in profile.modes], f"{what}.mode")
    level = value.get("thoughtLevel")
    if level is not None:
        level = _choice(level, profile.thought_levels, f"{what}.thoughtLevel")
    return SessionOptions(cwd, env, strings["model"], strings["systemPrompt"],
                          PermissionPolicy(policy), limits["maxTokens"], flags["thinking"],
                          limits["thinkingBudget"],
                          parse_mcp_servers(mcp, f"{what}.mcpServers") if mcp is not None else (),
                          extra, flags["skipOsInstructions"], mode, level)


@dataclass(eq=False)
class Session:
    id: str
    agent_type: AgentType
    options: SessionOptions
    created_at: int
    status: SessionStatus = SessionStatus.IDLE
    agent: Agent | None = None
    turn: SessionTurn | None = None
    permissions: dict[str, asyncio.Future[PermissionReply]] = field(default_factory=dict)

    def row(self) -> SessionRow:
        return SessionRow(self.id, self.agent_type.value, self.options.to_wire(),
                          self.created_at, self.status.value)

    def summary(self) -> dict[str, Any]:
        return {"sessionId": self.id, "agentType": self.agent_type.value,
                "createdAt": self.created_at, "status": self.status.value}


class SessionTurn:
    """One running turn: the `agents.base.Turn` an agent acts through."""

    def __init__(self, session: Session, outbox: Outbox, vm: Vm, log: SessionLog) -> None:
        self._session = session
        self._outbox = outbox
        self._vm = vm
        self._log = log
        self.first_seq: int | None = None  # of the turn's first update: its prompt
        self.text_parts: list[str] = []
        self.task: asyncio.Task[StopReason] | None = None
        self.cancel_requested = False
        self._last_yield = 0.0

    @property
    def session_id(self) -> str:
        return self._session.id

    @property
    def options(self) -> SessionOptions:
        return self._session.options

    async def emit(self, update: dict[str, Any]) -> None:
        if update.get("sessionUpdate") == UpdateKind.AGENT_MESSAGE_CHUNK.value:
            content = update.get("content")
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                self.text_parts.append(content["text"])
        event = {
            "jsonrpc": "2.0",
            "method": "session/update",
            "params": {"sessionId": self.session_id, "update": update},
        }
        seq = await self._outbox.append(EventName.SESSION_EVENT.value,
                                        {"sessionId": self.session_id, "event": event},
                                        session_id=self.session_id)
        if self.first_seq is None:
            self.first_seq = seq
        # A scheduling point at least every EMIT_YIELD_S: the outbox streams while the agent
        # produces, and an agent that never awaits anything else cannot starve other
        # actions. (One per update cost a loop iteration and an epoll call per event.)
        now = time.monotonic()
        if now - self._last_yield >= EMIT_YIELD_S:
            self._last_yield = now
            await asyncio.sleep(0)

    async def exec(self, command: str, *, timeout_s: float = 60.0) -> ExecResult:
        cwd = normalize(self.options.cwd) if self.options.cwd is not None else None
        return await self._vm.exec(command, cwd=cwd, env=self.options.vm_env, timeout_s=timeout_s)

    async def read_file(self, path: str) -> bytes:
        return await self._vm.read_file(normalize(path))

    async def write_file(self, path: str, data: bytes) -> None:
        await self._vm.write_file(normalize(path), data)

    async def history(self) -> list[dict[str, Any]]:
        before = self.first_seq if self.first_seq is not None else self._outbox.last_seq + 1
        return await self._log.updates(self.session_id, before)

    async def request_permission(
        self, tool_call: dict[str, Any], options: list[dict[str, Any]] | None = None
    ) -> PermissionReply:
        if self.options.permission_policy is PermissionPolicy.ALLOW_ALL or (
                self.options.mode == "bypassPermissions"):
            return PermissionReply.ONCE
        permission_id = uuid.uuid4().hex
        options = options or DEFAULT_PERMISSION_OPTIONS
        future: asyncio.Future[PermissionReply] = asyncio.get_running_loop().create_future()
        self._session.permissions[permission_id] = future
        try:
            await self._outbox.append(
                EventName.PERMISSION_REQUEST.value,
                {"sessionId": self.session_id,
                 "request": {"permissionId": permission_id,
                             "description": _describe(tool_call),
                             # The ACP `session/request_permission` params, as agentOS has.
                             "params": {"sessionId": self.session_id, "toolCall": tool_call,
                                        "options": options},
                             "toolCall": tool_call, "options": options}},
                session_id=self.session_id,
            )
            return await future
        except asyncio.CancelledError:
            # Still pending means nobody answered: tell watchers the question is moot, so
            # a UI can close its dialog.
            if permission_id in self._session.permissions:
                self._outbox.append_nowait(
                    EventName.PERMISSION_RESOLVED.value,
                    {"sessionId": self.session_id, "permissionId": permission_id,
                     "reply": "cancelled"},
                    session_id=self.session_id,
                )
            raise
        finally:
            self._session.permissions.pop(permission_id, None)


def _describe(tool_call: dict[str, Any]) -> str:
    """One line a person (or a filter like agentOS's selective approval) can read:
    the tool's kind and title, e.g. `read: Read /workspace/config.json`."""
    title = str(tool_call.get("title") or tool_call.get("toolCallId") or "tool call")
    kind = tool_call.get("kind")
    return f"{kind}: {title}" if isinstance(kind, str) else title


class SessionLog:
    """Reads a session's past updates back from the event log, for agents that rebuild
    their conversation from it. Shares the log's reader thread with the actions."""

    def __init__(self, outbox: Outbox, reader: EventReader, executor: ThreadPoolExecutor) -> None:
        self._outbox = outbox
        self._reader = reader
        self._executor = executor

    async def updates(self, session_id: str, before_seq: int) -> list[dict[str, Any]]:
        """The `update` of every `sessionEvent` of the session with seq < `before_seq`."""
        # Everything queued before now is committed after this, so the read sees it.
        await self._outbox.flush()
        loop = asyncio.get_running_loop()
        updates: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await loop.run_in_executor(self._executor, self._reader.read_session,
                                              session_id, EventName.SESSION_EVENT.value,
                                              after, HISTORY_PAGE)
            for record in page.events:
                if record.seq >= before_seq:
                    return updates
                update = record.payload.get("event", {}).get("params", {}).get("update")
                if isinstance(update, dict):
                    updates.append(update)
            after = page.next_cursor
            if not page.has_more:
                return updates


    async def seqs(self, session_id: str) -> list[int]:
        """The seq of every event logged for the session (all names), oldest first."""
        await self._outbox.flush()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._reader.session_seqs, session_id)


class SessionManager:
    def __init__(self, outbox: Outbox, vm: Vm, rows: list[SessionRow], log: SessionLog,
                 default_policy: PermissionPolicy = PermissionPolicy.ASK) -> None:
        self._outbox = outbox
        self._vm = vm
        self._log = log
        self.default_policy = default_policy
        self._prompt_ids = itertools.count(1)
        self._sessions: dict[str, Session] = {}
        for row in rows:
            # A session that was running when the last worker died is idle now: its turn
            # died with that process.
            status = SessionStatus(row.status)
            if status is SessionStatus.RUNNING:
                status = SessionStatus.IDLE
            agent_type = AgentType(row.agent_type)
            self._sessions[row.session_id] = Session(
                row.session_id, agent_type,
                parse_options(row.options, agent_type=agent_type, default_policy=default_policy),
                row.created_at, status)

    @property
    def open_count(self) -> int:
        return sum(s.status not in (SessionStatus.CLOSED, SessionStatus.DESTROYED)
                   for s in self._sessions.values())

    def summaries(self) -> list[dict[str, Any]]:
        return [s.summary() for s in sorted(self._sessions.values(),
                                            key=lambda s: (s.created_at, s.id))
                if s.status is not SessionStatus.DESTROYED]

    def get(self, session_id: str) -> Session:
        """Any session ever created here, closed ones included, destroyed ones not."""
        session = self._sessions.get(session_id)
        if session is None:
            raise ActorvisorError(ErrorCode.SESSION_NOT_FOUND, f"no session {session_id!r:.80}")
        if session.status is SessionStatus.DESTROYED:
            raise ActorvisorError(ErrorCode.SESSION_NOT_FOUND,
                                  f"session {session_id} was destroyed, with its events")
        return session

    def _open(self, session_id: str) -> Session:
        session = self.get(session_id)
        if session.status is SessionStatus.CLOSED:
            raise ActorvisorError(ErrorCode.SESSION_NOT_FOUND, f"session {session_id} is closed")
        return session

    def create(self, agent_type: AgentType, options: SessionOptions) -> str:
        agent = create_agent(agent_type, options)
        session = Session(str(uuid.uuid4()), agent_type, options, now_ms(), agent=agent)
        self._sessions[session.id] = session
        self._outbox.save_session(session.row())
        return session.id

    def _set_status(self, session: Session, status: SessionStatus) -> None:
        session.status = status
        self._outbox.save_session(session.row())

    async def prompt(self, session_id: str, text: str) -> dict[str, Any]:
        session = self._open(session_id)
        if session.turn is not None:
            raise ActorvisorError(ErrorCode.SESSION_BUSY,
                                  f"session {session_id} is already running a prompt")
        if session.agent is None:
            session.agent = create_agent(session.agent_type, session.options)
        agent = session.agent
        turn = SessionTurn(session, self._outbox, self._vm, self._log)
        # Claim the session before the first await: one turn per session.
        session.turn = turn
        self._set_status(session, SessionStatus.RUNNING)
        try:
            # The prompt itself goes into the log first, so history can be rebuilt.
            await turn.emit({"sessionUpdate": UpdateKind.USER_MESSAGE_CHUNK.value,
                             "content": text_content(text)})
            stop = await self._run_turn(agent, turn, text)
        finally:
            session.turn = None
            if session.status is SessionStatus.RUNNING:
                self._set_status(session, SessionStatus.IDLE)
        # `response` is the ACP `session/prompt` JSON-RPC response agentOS returns.
        return {"text": "".join(turn.text_parts), "stopReason": stop.value,
                "response": {"jsonrpc": "2.0", "id": next(self._prompt_ids),
                             "result": {"stopReason": stop.value}}}

    @staticmethod
    async def _run_turn(agent: Agent, turn: SessionTurn, text: str) -> StopReason:
        if turn.cancel_requested:
            return StopReason.CANCELLED
        task = asyncio.create_task(agent.run_turn(text, turn))
        turn.task = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            # The action itself is being cancelled (worker shutdown): the turn goes too.
            task.cancel()
            await asyncio.wait({task})
            raise
        if task.cancelled():
            return StopReason.CANCELLED
        exc = task.exception()
        if isinstance(exc, ActorvisorError):
            raise exc
        if exc is not None:
            log.error("agent_failed", session=turn.session_id, exc_info=exc)
            raise ActorvisorError(ErrorCode.AGENT_ERROR,
                                  f"agent failed: {type(exc).__name__}: {exc}") from exc
        return task.result()

    def cancel(self, session_id: str) -> bool:
        """Cancel the session's running turn; False when there is none."""
        turn = self._open(session_id).turn
        if turn is None or turn.cancel_requested:
            return False
        turn.cancel_requested = True
        if turn.task is not None:
            turn.task.cancel()
        return True

    async def close(self, session_id: str) -> None:
        session = self._open(session_id)
        self._set_status(session, SessionStatus.CLOSED)
        turn = session.turn
        if turn is not None:
            turn.cancel_requested = True
            if turn.task is not None:
                turn.task.cancel()
                await asyncio.wait({turn.task})
        if session.agent is not None:
            await session.agent.close()
            session.agent = None

    async def destroy(self, session_id: str) -> dict[str, Any]:
        """Close the session and delete its events, leaving one `sessionDestroyed` marker.

        The marker is appended before the deletion is queued, so the log's last seq never
        moves back and a cursor anywhere in the deleted range still reads on from there
        (docs/delivery.md, "Deletion")."""
        session = self.get(session_id)
        if session.status is not SessionStatus.CLOSED:
            await self.close(session_id)
        self._set_status(session, SessionStatus.DESTROYED)
        # Everything of the session queued so far (the close's own events too) is
        # committed after this, so the read below sees all of it.
        await self._outbox.flush()
        seqs = await self._log.seqs(session_id)
        marker = await self._outbox.append(
            EventName.SESSION_DESTROYED.value,
            {"sessionId": session_id, "deletedEvents": len(seqs),
             "throughSeq": seqs[-1] if seqs else None},
            session_id=session_id)
        if seqs:
            self._outbox.delete(seqs)
        await self._outbox.flush()
        return {"sessionId": session_id, "deletedEvents": len(seqs), "markerSeq": marker}

    def _idle(self, session_id: str, what: str) -> Session:
        session = self._open(session_id)
        if session.turn is not None:
            raise ActorvisorError(ErrorCode.SESSION_BUSY,
                                  f"{what}: session {session_id} is running a prompt; "
                                  "cancel it or wait for it to finish")
        return session

    async def configure(self, session_id: str, what: str, **changes: Any) -> dict[str, Any]:
        """Change the session's model, mode or thought level; the next prompt uses it.

        The agent is rebuilt from the new options (agents rebuild their conversation from
        the log, so nothing of it is lost)."""
        session = self._idle(session_id, what)
        profile = PROFILES[session.agent_type]
        if "mode" in changes:
            changes["mode"] = _choice(changes["mode"], [m for m, _ in profile.modes],
                                      f"{what}: argument 2 (modeId)")
        if "thought_level" in changes:
            changes["thought_level"] = _choice(changes["thought_level"], profile.thought_levels,
                                               f"{what}: argument 2 (level)")
        if "model" in changes:
            model = changes["model"]
            if not isinstance(model, str) or not model or len(model) > MAX_NAME_CHARS:
                raise _invalid(f"{what}: argument 2 (modelId) must be a non-empty string of "
                               f"at most {MAX_NAME_CHARS} characters; got {model!r:.80}")
        session.options = dataclasses.replace(session.options, **changes)
        self._outbox.save_session(session.row())
        if session.agent is not None:
            await session.agent.close()
            session.agent = None
        return {"jsonrpc": "2.0", "id": next(self._prompt_ids), "result": {},
                "configOptions": self.config_options(session_id)}

    def modes(self, session_id: str) -> dict[str, Any]:
        """ACP `SessionModeState`."""
        session = self.get(session_id)
        profile = PROFILES[session.agent_type]
        return {"currentModeId": session.options.mode or profile.modes[0][0],
                "availableModes": [{"id": m, "name": m, "description": d}
                                   for m, d in profile.modes]}

    def config_options(self, session_id: str) -> list[dict[str, Any]]:
        """ACP `SessionConfigOption`s: model, mode and thought level, with current values."""
        session = self.get(session_id)
        profile = PROFILES[session.agent_type]
        model = session.options.model or profile.models[0]
        models = list(profile.models) + ([model] if model not in profile.models else [])

        def select(ident: str, name: str, current: str, values: Sequence[str]) -> dict[str, Any]:
            return {"id": ident, "name": name, "category": ident, "type": "select",
                    "currentValue": current,
                    "options": [{"value": v, "name": v} for v in values]}

        return [
            select("model", "Model", model, models),
            select("mode", "Mode", session.options.mode or profile.modes[0][0],
                   [m for m, _ in profile.modes]),
            select("thought_level", "Thought level",
                   session.options.thought_level or profile.thought_levels[0],
                   profile.thought_levels),
        ]

    def respond_permission(self, session_id: str, permission_id: str,
                                 reply: PermissionReply) -> None:
        session = self._open(session_id)
        future = session.permissions.pop(permission_id, None)
        if future is None or future.done():
            raise ActorvisorError(
                ErrorCode.PERMISSION_NOT_FOUND,
                f"no pending permission request {permission_id!r:.80} in session {session_id}",
            )
        # Logged before the agent resumes, so the reply precedes whatever it causes.
        self._outbox.append_nowait(
            EventName.PERMISSION_RESOLVED.value,
            {"sessionId": session_id, "permissionId": permission_id, "reply": reply.value},
            session_id=session_id,
        )
        future.set_result(reply)

    def cancel_all(self) -> list[asyncio.Task[StopReason]]:
        """Cancel every running turn (shutdown); returns the tasks to wait for."""
        tasks = []
        for session in self._sessions.values():
            if session.turn is not None:
                session.turn.cancel_requested = True
                if session.turn.task is not None:
                    session.turn.task.cancel()
                    tasks.append(session.turn.task)
        return tasks
