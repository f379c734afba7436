"""The contract between a session and the agent that answers its prompts.

An `Agent` runs one turn at a time: `run_turn(prompt, turn)` streams ACP `session/update`
updates through `turn.emit`, may run tools in the VM through `turn`, may ask the user
for permission through `turn.request_permission`, and returns why it stopped. A turn is
cancelled by cancelling the task that runs it (asyncio cancellation): an agent that must
clean up catches `CancelledError`, cleans up, and re-raises or returns
`StopReason.CANCELLED`. Agents never write to the event log or the socket themselves —
everything they emit goes through `turn.emit`, which sequences and persists it — and never
touch host paths: the VM is reachable only through `Turn`.

The helpers build ACP update objects (https://agentclientprotocol.com, schema
`SessionUpdate`) so that every agent emits the same field shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol

from ..sandbox import ExecResult


class StopReason(StrEnum):
    """ACP stop reasons a turn can end with."""

    END_TURN = "end_turn"
    MAX_TOKENS = "max_tokens"
    MAX_TURN_REQUESTS = "max_turn_requests"
    REFUSAL = "refusal"
    CANCELLED = "cancelled"


class PermissionPolicy(StrEnum):
    ALLOW_ALL = "allow_all"
    ASK = "ask"


class PermissionReply(StrEnum):
    ONCE = "once"
    ALWAYS = "always"
    REJECT = "reject"


class UpdateKind(StrEnum):
    """ACP `sessionUpdate` discriminators."""

    USER_MESSAGE_CHUNK = "user_message_chunk"
    AGENT_MESSAGE_CHUNK = "agent_message_chunk"
    AGENT_THOUGHT_CHUNK = "agent_thought_chunk"
    TOOL_CALL = "tool_call"
    TOOL_CALL_UPDATE = "tool_call_update"
    PLAN = "plan"


class ToolKind(StrEnum):
    READ = "read"
    EDIT = "edit"
    DELETE = "delete"
    MOVE = "move"
    SEARCH = "search"
    EXECUTE = "execute"
    THINK = "think"
    FETCH = "fetch"
    OTHER = "other"


class ToolStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


SECRET_ENV: Final = frozenset({"ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"})
"""Agent credentials a session's `env` may carry. They configure the agent only: never
passed into the VM, never persisted (so a restarted worker no longer has them)."""


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """Validated `createSession` options; `cwd` is a normalised VM path.

    `thinking` asks for adaptive thinking; `thinking_budget` for manual extended thinking
    with that many tokens (for models without adaptive thinking)."""

    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    system_prompt: str | None = None
    permission_policy: PermissionPolicy = PermissionPolicy.ALLOW_ALL
    max_tokens: int | None = None
    thinking: bool = False
    thinking_budget: int | None = None
    # agentOS's options: MCP servers the session asks for (recorded; see agentos-parity.md),
    # instructions appended to the OS preamble, or the preamble left out entirely.
    mcp_servers: tuple[dict[str, Any], ...] = ()
    additional_instructions: str | None = None
    skip_os_instructions: bool = False
    # Set with setMode / setThoughtLevel; None is the agent's default.
    mode: str | None = None
    thought_level: str | None = None

    def instructions(self, preamble: str) -> str:
        """The system instructions an agent gets: `systemPrompt` when given, else the OS
        preamble (left out under `skipOsInstructions`), then `additionalInstructions`."""
        base = (self.system_prompt if self.system_prompt is not None
                else "" if self.skip_os_instructions else preamble)
        if self.additional_instructions:
            return f"{base}\n\n{self.additional_instructions}" if base else self.additional_instructions
        return base

    @property
    def vm_env(self) -> dict[str, str]:
        """The environment commands in the VM get: `env` without agent credentials."""
        return {k: v for k, v in self.env.items() if k not in SECRET_ENV}

    def to_wire(self) -> dict[str, Any]:
        """The options as persisted: credentials are left out."""
        out: dict[str, Any] = {"env": self.vm_env,
                               "permissionPolicy": self.permission_policy.value}
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.model is not None:
            out["model"] = self.model
        if self.system_prompt is not None:
            out["systemPrompt"] = self.system_prompt
        if self.max_tokens is not None:
            out["maxTokens"] = self.max_tokens
        if self.thinking:
            out["thinking"] = True
        if self.thinking_budget is not None:
            out["thinkingBudget"] = self.thinking_budget
        if self.mcp_servers:
            out["mcpServers"] = [_without_secrets(s) for s in self.mcp_servers]
        if self.additional_instructions is not None:
            out["additionalInstructions"] = self.additional_instructions
        if self.skip_os_instructions:
            out["skipOsInstructions"] = True
        if self.mode is not None:
            out["mode"] = self.mode
        if self.thought_level is not None:
            out["thoughtLevel"] = self.thought_level
        return out


def _without_secrets(server: dict[str, Any]) -> dict[str, Any]:
    """An MCP server as persisted: its env and headers may carry tokens, so their values
    are kept in memory only, like the session's agent credentials."""
    return {k: ({name: "" for name in v} if k in ("env", "headers") and isinstance(v, dict) else v)
            for k, v in server.items()}


class Turn(Protocol):
    """What an agent can do during one turn of one session."""

    @property
    def session_id(self) -> str: ...

    @property
    def options(self) -> SessionOptions: ...

    async def emit(self, update: dict[str, Any]) -> None:
        """Publish one ACP update (the `update` object of a `session/update`)."""

    async def exec(self, command: str, *, timeout_s: float = 60.0) -> ExecResult:
        """Run `/bin/sh -c command` in the VM with the session's cwd and `vm_env`."""

    async def read_file(self, path: str) -> bytes:
        """Read a VM file (same rules as the `readFile` action)."""

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a VM file, creating parent directories (same rules as `writeFile`)."""

    async def history(self) -> list[dict[str, Any]]:
        """The session's ACP updates logged before this turn, oldest first: what an agent
        rebuilds its conversation from (after a worker restart too)."""

    async def request_permission(
        self, tool_call: dict[str, Any], options: list[dict[str, Any]] | None = None
    ) -> PermissionReply:
        """Ask the user (a `permissionRequest` event) and wait for `respondPermission`.

        Under the `allow_all` policy this answers `once` at once, without an event."""


class Agent(ABC):
    """One agent instance per session; it may keep conversation state between turns."""

    @abstractmethod
    async def run_turn(self, prompt: str, turn: Turn) -> StopReason:
        """Answer one prompt, streaming updates through `turn`."""

    async def close(self) -> None:
        """Release what the agent holds (HTTP clients, ...) when its session closes."""
        return None


def text_content(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def chunk(kind: UpdateKind, text: str) -> dict[str, Any]:
    """A message or thought chunk update."""
    return {"sessionUpdate": kind.value, "content": text_content(text)}


def tool_call(
    tool_call_id: str, title: str, kind: ToolKind, raw_input: dict[str, Any]
) -> dict[str, Any]:
    """Announce a tool call (status pending)."""
    return {
        "sessionUpdate": UpdateKind.TOOL_CALL.value,
        "toolCallId": tool_call_id,
        "title": title,
        "kind": kind.value,
        "status": ToolStatus.PENDING.value,
        "rawInput": raw_input,
    }


def tool_call_update(
    tool_call_id: str,
    status: ToolStatus,
    *,
    text: str | None = None,
    raw_output: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Progress or result of a tool call; `text` becomes its ACP content."""
    update: dict[str, Any] = {
        "sessionUpdate": UpdateKind.TOOL_CALL_UPDATE.value,
        "toolCallId": tool_call_id,
        "status": status.value,
    }
    if text is not None:
        update["content"] = [{"type": "content", "content": text_content(text)}]
    if raw_output is not None:
        update["rawOutput"] = raw_output
    return update


DEFAULT_PERMISSION_OPTIONS: list[dict[str, Any]] = [
    {"optionId": PermissionReply.ONCE.value, "name": "Allow once", "kind": "allow_once"},
    {"optionId": PermissionReply.ALWAYS.value, "name": "Always allow", "kind": "allow_always"},
    {"optionId": PermissionReply.REJECT.value, "name": "Reject", "kind": "reject_once"},
]
"""ACP `PermissionOption`s whose ids are the replies `respondPermission` accepts."""
