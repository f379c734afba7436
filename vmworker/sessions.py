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
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import structlog

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import AgentType, EventName

from .agents import create_agent
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
_OPTION_KEYS: Final = ("cwd", "env", "model", "systemPrompt", "permissionPolicy", "maxTokens",
                       "thinking", "thinkingBudget")

log = structlog.get_logger()


class SessionStatus(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"


def parse_options(value: object, *, what: str = "options") -> SessionOptions:
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
        policy = PermissionPolicy.ALLOW_ALL.value
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
    thinking = value.get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what}.thinking must be a boolean")
    return SessionOptions(cwd, env, strings["model"], strings["systemPrompt"],
                          PermissionPolicy(policy), limits["maxTokens"], bool(thinking),
                          limits["thinkingBudget"])


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
        # A scheduling point per update: the outbox streams while the agent produces, and
        # an agent that never awaits anything else cannot starve other actions.
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
        if self.options.permission_policy is PermissionPolicy.ALLOW_ALL:
            return PermissionReply.ONCE
        permission_id = uuid.uuid4().hex
        future: asyncio.Future[PermissionReply] = asyncio.get_running_loop().create_future()
        self._session.permissions[permission_id] = future
        try:
            await self._outbox.append(
                EventName.PERMISSION_REQUEST.value,
                {"sessionId": self.session_id,
                 "request": {"permissionId": permission_id, "toolCall": tool_call,
                             "options": options or DEFAULT_PERMISSION_OPTIONS}},
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


class SessionManager:
    def __init__(self, outbox: Outbox, vm: Vm, rows: list[SessionRow], log: SessionLog) -> None:
        self._outbox = outbox
        self._vm = vm
        self._log = log
        self._sessions: dict[str, Session] = {}
        for row in rows:
            # A session that was running when the last worker died is idle now: its turn
            # died with that process.
            status = SessionStatus(row.status)
            if status is SessionStatus.RUNNING:
                status = SessionStatus.IDLE
            self._sessions[row.session_id] = Session(
                row.session_id, AgentType(row.agent_type), parse_options(row.options),
                row.created_at, status)

    @property
    def open_count(self) -> int:
        return sum(s.status is not SessionStatus.CLOSED for s in self._sessions.values())

    def summaries(self) -> list[dict[str, Any]]:
        return [s.summary() for s in sorted(self._sessions.values(),
                                            key=lambda s: (s.created_at, s.id))]

    def get(self, session_id: str) -> Session:
        """Any session ever created here, closed ones included."""
        session = self._sessions.get(session_id)
        if session is None:
            raise ActorvisorError(ErrorCode.SESSION_NOT_FOUND, f"no session {session_id!r:.80}")
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
        return {"text": "".join(turn.text_parts), "stopReason": stop.value}

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
