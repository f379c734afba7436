"""The `claude` agent: a tool-using agent loop on Anthropic's Messages API.

Each turn rebuilds the conversation from the session's event log (`history.rebuild`),
adds the prompt, and streams requests through the official SDK's async client until the
model ends its turn: text deltas become `agent_message_chunk`, thinking deltas
`agent_thought_chunk` (a block's last one carrying its signature, which the API needs to
continue a tool loop), each `tool_use` a `tool_call` (pending, announced as soon as its
input is complete) that runs in the VM (`tools`) after the response, going `in_progress`
then `completed`/`failed`. With the `ask` policy every call first waits for
`respondPermission`; a rejection or an unanswered request becomes an error result the
model reads and works around.

Cancelling the turn's task aborts the HTTP stream or the running tool (the sandbox kills
its processes) and fails every announced call that has no result yet, so the log always
pairs each `tool_use` with a `tool_result`. API failures go through the SDK's retries
(429, 5xx, 529 overloaded, dropped connections, with backoff and `retry-after`); those
and failures once a response has begun (an `error` event, a connection cut mid-stream,
which nobody retries: its text is already out) end the turn with a notice in the session (an `agent_message_chunk` marked
`_meta.actorvisor.error`, left out of the rebuilt history) and an `actor.agent_error`.

The API key comes from the session's `env` or the worker's environment; it is handed to
the SDK and nowhere else: never logged, never emitted, never persisted, never passed into
the VM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

import anthropic
import httpx2
from anthropic import AsyncAnthropic
from anthropic.lib.streaming import ParsedContentBlockStopEvent
from anthropic.types import (
    MessageParam,
    RawContentBlockDeltaEvent,
    RedactedThinkingBlock,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)

from protocol.errors import ActorvisorError, ErrorCode

from .. import credentials
from ..vmfs import WORKSPACE
from . import tools
from .base import (
    Agent,
    PermissionReply,
    SessionOptions,
    StopReason,
    ToolStatus,
    Turn,
    UpdateKind,
    chunk,
    tool_call,
    tool_call_update,
)
from .history import META, add_user_blocks, add_user_text, rebuild

DEFAULT_MODEL: Final = "claude-sonnet-5-5"  # the newest Sonnet the installed SDK lists
DEFAULT_MAX_TOKENS: Final = 16_384
DEFAULT_MAX_RETRIES: Final = 4
DEFAULT_PERMISSION_TIMEOUT_S: Final = 300.0
MAX_REQUESTS_PER_TURN: Final = 100

ENV_API_KEY: Final = "ANTHROPIC_API_KEY"
ENV_AUTH_TOKEN: Final = "ANTHROPIC_AUTH_TOKEN"
ENV_BASE_URL: Final = "ANTHROPIC_BASE_URL"
ENV_MAX_RETRIES: Final = "ACTORVISOR_CLAUDE_MAX_RETRIES"
ENV_PERMISSION_TIMEOUT: Final = "ACTORVISOR_PERMISSION_TIMEOUT_S"

DEFAULT_SYSTEM_PROMPT: Final = """\
You are an agent working inside a sandboxed Linux VM with no network access. Your working \
directory is {cwd}. Files persist under /workspace, /tmp and /home; the rest of the file \
system is read-only. Use the tools to look around, read and change files and run commands; \
paths may be absolute or relative to the working directory. Work step by step, check what \
you did, and finish with a short answer that says what you did."""

MODE_INSTRUCTIONS: Final = {
    "plan": "\n\nYou are in plan mode: look around with the read-only tools if you need to, "
            "then answer with a plan. Do not change files or run commands that change anything.",
}
"""What `setMode` adds to the instructions; `default` adds nothing. (`bypassPermissions`
acts on the session's permission policy instead, in sessions.py.)"""

THOUGHT_BUDGETS: Final = {"low": 1024, "medium": 4096, "high": 16384}
"""`setThoughtLevel` → extended thinking budget in tokens; `off` leaves thinking to the
session's `thinking`/`thinkingBudget` options."""

_STOP_REASONS: Final = {
    "end_turn": StopReason.END_TURN,
    "stop_sequence": StopReason.END_TURN,
    "pause_turn": StopReason.END_TURN,
    "max_tokens": StopReason.MAX_TOKENS,
    "model_context_window_exceeded": StopReason.MAX_TOKENS,
    "refusal": StopReason.REFUSAL,
}


def _env_number(environ: Mapping[str, str], name: str, default: float, low: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = low - 1
    if value < low:
        raise ActorvisorError(ErrorCode.AGENT_ERROR,
                              f"{name}={raw!r:.40} in the worker's environment must be a number >= {low:g}")
    return value


@dataclass(frozen=True, slots=True)
class ClaudeConfig:
    """Everything a claude session needs to call the API. The credential is kept out of
    `repr`, so it cannot reach a log line through this object."""

    api_key: str | None = field(repr=False)
    auth_token: str | None = field(repr=False)
    base_url: str | None
    model: str
    max_tokens: int
    thinking: dict[str, Any] | None
    system_prompt: str
    max_retries: int
    permission_timeout_s: float

    @classmethod
    def resolve(cls, options: SessionOptions, environ: Mapping[str, str]) -> ClaudeConfig:
        """Session options first, then the worker's environment; raises a readable
        `actor.agent_error` when there is no credential."""
        api_key = options.env.get(ENV_API_KEY) or environ.get(ENV_API_KEY) or None
        auth_token = None if api_key else (options.env.get(ENV_AUTH_TOKEN)
                                           or environ.get(ENV_AUTH_TOKEN) or None)
        if api_key is None and auth_token is None:
            raise ActorvisorError(
                ErrorCode.AGENT_ERROR,
                "the claude agent needs an Anthropic API key: set ANTHROPIC_API_KEY in the "
                "supervisor's environment, or pass it in createSession's options.env (a key "
                "given there is kept in memory only, so after a worker restart the session "
                "needs the supervisor's)")
        thinking: dict[str, Any] | None = None
        level_budget = THOUGHT_BUDGETS.get(options.thought_level or "")
        if level_budget is not None:
            thinking = {"type": "enabled", "budget_tokens": level_budget}
        elif options.thinking_budget is not None:
            thinking = {"type": "enabled", "budget_tokens": options.thinking_budget}
        elif options.thinking:
            thinking = {"type": "adaptive", "display": "summarized"}
        max_tokens = options.max_tokens or DEFAULT_MAX_TOKENS + (
            level_budget or options.thinking_budget or 0)
        cwd = options.cwd or WORKSPACE
        return cls(
            api_key=api_key,
            auth_token=auth_token,
            base_url=options.env.get(ENV_BASE_URL) or environ.get(ENV_BASE_URL) or None,
            model=options.model or DEFAULT_MODEL,
            max_tokens=max_tokens,
            thinking=thinking,
            system_prompt=options.instructions(DEFAULT_SYSTEM_PROMPT.format(cwd=cwd))
            + MODE_INSTRUCTIONS.get(options.mode or "", ""),
            max_retries=int(_env_number(environ, ENV_MAX_RETRIES, DEFAULT_MAX_RETRIES, 0)),
            permission_timeout_s=_env_number(environ, ENV_PERMISSION_TIMEOUT,
                                             DEFAULT_PERMISSION_TIMEOUT_S, 0.001),
        )


ApiFailure = anthropic.APIError | httpx2.TransportError
"""What a request can fail with: the SDK's errors, or the transport's once streaming."""


def describe_api_error(exc: ApiFailure, config: ClaudeConfig) -> str:
    """A message a person can act on; built from the status and the API's own message,
    never from request data."""
    retried = f" (gave up after {config.max_retries} retries)" if config.max_retries else ""
    if isinstance(exc, httpx2.TransportError):
        return f"the connection to the Anthropic API broke mid-response: {type(exc).__name__}: {exc}"
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        what = ("timed out" if isinstance(exc, anthropic.APITimeoutError)
                else "could not be reached")
        where = config.base_url or "https://api.anthropic.com"
        return f"the Anthropic API at {where} {what}{retried}{reason}"
    if isinstance(exc, anthropic.APIStatusError):
        kind = exc.type or "error"
        detail = exc.api_message or "no message"
        request = f" [request-id {exc.request_id}]" if exc.request_id else ""
        if exc.status_code == 200:
            return f"the API stream failed mid-response: {kind}: {detail}{request}"
        status = f"{exc.status_code} {kind}"
        if isinstance(exc, anthropic.AuthenticationError):
            return (f"the Anthropic API rejected the credentials ({status}: {detail}); check "
                    f"ANTHROPIC_API_KEY{request}")
        if isinstance(exc, anthropic.PermissionDeniedError):
            return f"the API key may not do this ({status}: {detail}){request}"
        if isinstance(exc, anthropic.NotFoundError):
            return f"not found ({status}: {detail}); is the model id {config.model!r} right?{request}"
        if isinstance(exc, anthropic.RateLimitError | anthropic.InternalServerError):
            return f"the Anthropic API is unavailable ({status}: {detail}){retried}{request}"
        return f"the Anthropic API refused the request ({status}: {detail}){request}"
    return f"the Anthropic API call failed: {type(exc).__name__}"


@dataclass(slots=True)
class _Response:
    content: list[dict[str, Any]]
    tool_uses: list[ToolUseBlock]
    stop_reason: str | None


class _Thoughts:
    """Streams one thinking block's deltas one step behind, so that the last one can
    carry what the block ends with (its signature) for the history rebuild."""

    def __init__(self) -> None:
        self._held: str | None = None

    async def add(self, turn: Turn, text: str) -> None:
        if self._held is not None:
            await turn.emit(chunk(UpdateKind.AGENT_THOUGHT_CHUNK, self._held))
        self._held = text

    async def close(self, turn: Turn, ending: dict[str, Any] | None) -> None:
        """End the block; `ending` None means it was cut off (nothing to sign it with)."""
        held, self._held = self._held, None
        if ending is not None:
            await turn.emit({**chunk(UpdateKind.AGENT_THOUGHT_CHUNK, held or ""),
                             "_meta": {META: ending}})
        elif held is not None:
            await turn.emit(chunk(UpdateKind.AGENT_THOUGHT_CHUNK, held))


class _OpenCalls:
    """Tool calls announced in this turn that have no final update yet."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def add(self, tool_id: str) -> None:
        self.ids.append(tool_id)

    def done(self, tool_id: str) -> None:
        if tool_id in self.ids:
            self.ids.remove(tool_id)

    async def fail_all(self, turn: Turn, text: str) -> None:
        while self.ids:
            tool_id = self.ids.pop(0)
            await turn.emit(tool_call_update(tool_id, ToolStatus.FAILED, text=text,
                                             raw_output={"error": text}))


class ClaudeAgent(Agent):
    def __init__(self, config: ClaudeConfig) -> None:
        self._config = config
        self._client: AsyncAnthropic | None = None
        self._always_allowed: set[str] = set()

    def _api(self) -> AsyncAnthropic:
        if self._client is None:
            cfg = self._config
            self._client = AsyncAnthropic(api_key=cfg.api_key, auth_token=cfg.auth_token,
                                          base_url=cfg.base_url, max_retries=cfg.max_retries)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def run_turn(self, prompt: str, turn: Turn) -> StopReason:
        messages = rebuild(await turn.history())
        add_user_text(messages, prompt)
        calls = _OpenCalls()
        try:
            for _ in range(MAX_REQUESTS_PER_TURN):
                response = await self._request(turn, messages, calls)
                if response.content:
                    messages.append({"role": "assistant", "content": response.content})
                if response.stop_reason != "tool_use" or not response.tool_uses:
                    await calls.fail_all(turn, f"Not run: the response ended with "
                                               f"{response.stop_reason} before the tools ran.")
                    return _STOP_REASONS.get(response.stop_reason or "", StopReason.END_TURN)
                results = [await self._run_tool(turn, use, calls) for use in response.tool_uses]
                add_user_blocks(messages, results)
            return StopReason.MAX_TURN_REQUESTS
        except asyncio.CancelledError:
            await calls.fail_all(turn, "Cancelled before it finished.")
            raise
        except (anthropic.APIError, httpx2.TransportError) as exc:
            message = describe_api_error(exc, self._config)
            await calls.fail_all(turn, f"Not run: {message}.")
            await turn.emit({**chunk(UpdateKind.AGENT_MESSAGE_CHUNK, f"[error] {message}"),
                             "_meta": {META: {"error": _error_meta(exc)}}})
            raise ActorvisorError(ErrorCode.AGENT_ERROR, message) from None

    async def _request(self, turn: Turn, messages: list[dict[str, Any]],
                       calls: _OpenCalls) -> _Response:
        cfg = self._config
        extra: dict[str, Any] = {}
        if cfg.thinking is not None:
            extra["thinking"] = cfg.thinking
        thoughts = _Thoughts()
        try:
            async with self._api().messages.stream(
                model=cfg.model,
                max_tokens=cfg.max_tokens,
                system=cfg.system_prompt,
                messages=cast("list[MessageParam]", messages),
                tools=cast(Any, tools.definitions()),
                **extra,
            ) as stream:
                async for event in stream:
                    if isinstance(event, RawContentBlockDeltaEvent):
                        if isinstance(event.delta, TextDelta) and event.delta.text:
                            await turn.emit(chunk(UpdateKind.AGENT_MESSAGE_CHUNK, event.delta.text))
                        elif isinstance(event.delta, ThinkingDelta) and event.delta.thinking:
                            await thoughts.add(turn, event.delta.thinking)
                    elif isinstance(event, ParsedContentBlockStopEvent):
                        block = event.content_block
                        if isinstance(block, ToolUseBlock):
                            await turn.emit(self._tool_call(turn, block))
                            calls.add(block.id)
                        elif isinstance(block, ThinkingBlock):
                            await thoughts.close(turn, {"signature": block.signature})
                        elif isinstance(block, RedactedThinkingBlock):
                            await thoughts.close(turn, {"redactedThinking": block.data})
                final = await stream.get_final_message()
        finally:
            await thoughts.close(turn, None)
        content: list[dict[str, Any]] = []
        uses: list[ToolUseBlock] = []
        for block in final.content:
            if isinstance(block, TextBlock):
                if block.text.strip():
                    content.append({"type": "text", "text": block.text})
            elif isinstance(block, ThinkingBlock):
                content.append({"type": "thinking", "thinking": block.thinking,
                                "signature": block.signature})
            elif isinstance(block, RedactedThinkingBlock):
                content.append({"type": "redacted_thinking", "data": block.data})
            elif isinstance(block, ToolUseBlock):
                content.append({"type": "tool_use", "id": block.id, "name": block.name,
                                "input": _input(block)})
                uses.append(block)
        return _Response(content, uses, final.stop_reason)

    def _tool_call(self, turn: Turn, use: ToolUseBlock) -> dict[str, Any]:
        data = _input(use)
        title, kind, locations = tools.presentation(use.name, data, turn.options.cwd or WORKSPACE)
        update = tool_call(use.id, title, kind, data)
        if locations:
            update["locations"] = locations
        update["_meta"] = {META: {"toolName": use.name}}
        return update

    async def _run_tool(self, turn: Turn, use: ToolUseBlock, calls: _OpenCalls) -> dict[str, Any]:
        refusal = await self._permission(turn, use)
        if refusal is not None:
            result = tools.ToolResult(refusal, True, {"error": refusal})
        else:
            await turn.emit(tool_call_update(use.id, ToolStatus.IN_PROGRESS))
            result = await tools.run_tool(turn, use.name, use.input)
        status = ToolStatus.FAILED if result.is_error else ToolStatus.COMPLETED
        await turn.emit(tool_call_update(use.id, status, text=result.text,
                                         raw_output=result.raw_output))
        calls.done(use.id)
        return {"type": "tool_result", "tool_use_id": use.id, "content": result.text,
                "is_error": result.is_error}

    async def _permission(self, turn: Turn, use: ToolUseBlock) -> str | None:
        """None when the call may run, else why not (what the model is told)."""
        if use.name in self._always_allowed:
            return None
        request = {k: v for k, v in self._tool_call(turn, use).items() if k != "sessionUpdate"}
        timeout = self._config.permission_timeout_s
        try:
            async with asyncio.timeout(timeout):
                reply = await turn.request_permission(request)
        except TimeoutError:
            return (f"Nobody answered the permission request within {timeout:g} s, so the "
                    "tool call was not run.")
        if reply is PermissionReply.ALWAYS:
            self._always_allowed.add(use.name)
        if reply is PermissionReply.REJECT:
            return ("The user rejected this tool call, so it was not run. Do not retry it "
                    "unchanged; carry on another way or ask the user.")
        return None


def _input(use: ToolUseBlock) -> dict[str, Any]:
    return dict(use.input) if isinstance(use.input, dict) else {}


def _error_meta(exc: ApiFailure) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": type(exc).__name__}
    if isinstance(exc, anthropic.APIStatusError):
        out.update(status=exc.status_code, type=exc.type, requestId=exc.request_id)
    return out


def create(options: SessionOptions) -> ClaudeAgent:
    return ClaudeAgent(ClaudeConfig.resolve(options, credentials.environment()))
