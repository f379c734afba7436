"""A fake Anthropic Messages API: real HTTP and SSE on loopback, scripted per test.

It stands in for `POST /v1/messages` with `"stream": true`, the only call the `claude`
agent makes, and speaks the wire format the real API does: the `message_start`,
`content_block_start`, `content_block_delta` (`text_delta`, `input_json_delta`,
`thinking_delta`, `signature_delta`), `content_block_stop`, `message_delta`,
`message_stop`, `ping` and `error` events, and error responses shaped
`{"type": "error", "error": {"type": ..., "message": ...}}` with a `request-id` header.
The real, unpatched SDK talks to it through `ANTHROPIC_BASE_URL` / `base_url`.

A test scripts the responses, in order: `Reply` (a streamed message built from `Text`,
`Thinking`, `ToolUse`, `Hold` and `Cut` steps), `Fail` (an HTTP error status), `Drop` (the
connection closes without a response), `StreamError` (an `error` event mid-stream), or
a callable that picks one from the request. Every request is recorded — headers, parsed
body, and how it ended — in `requests`. Like the real API it answers 401 to a wrong key
and 400 to a conversation the API would reject (a `tool_use` without its `tool_result`
right after it, empty text blocks, a tool loop without its thinking block, ...), so a test cannot pass with an invalid history.
An unscripted request gets a 400 that says so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from aiohttp import web

DEFAULT_KEY = "sk-test-fake-0000"


@dataclass(frozen=True)
class Text:
    text: str
    pieces: int = 3  # how many text_delta events carry it


@dataclass(frozen=True)
class Thinking:
    text: str
    signature: str = "sig-fake"


@dataclass(frozen=True)
class ToolUse:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class Hold:
    """Stop streaming here until `release` is set (or the client goes away)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Cut:
    """Close the connection here, mid-stream, as a network failure would."""


Step = Union[Text, Thinking, ToolUse, Hold, Cut]


@dataclass(frozen=True)
class Reply:
    steps: tuple[Step, ...]
    stop_reason: str = "end_turn"

    def __init__(self, *steps: Step, stop_reason: str | None = None) -> None:
        object.__setattr__(self, "steps", steps)
        if stop_reason is None:
            stop_reason = "tool_use" if any(isinstance(s, ToolUse) for s in steps) else "end_turn"
        object.__setattr__(self, "stop_reason", stop_reason)


@dataclass(frozen=True)
class Fail:
    status: int
    error_type: str
    message: str = "scripted failure"
    retry_after_ms: int | None = 5


@dataclass(frozen=True)
class Drop:
    """Close the connection without sending a response."""


@dataclass(frozen=True)
class StreamError:
    """Start a 200 stream, send `steps`, then an SSE `error` event."""

    error_type: str
    message: str = "scripted stream error"
    steps: tuple[Step, ...] = ()


Response = Union[Reply, Fail, Drop, StreamError]
Script = Union[Response, Callable[["Recorded"], Response]]


@dataclass
class Recorded:
    index: int
    path: str
    headers: dict[str, str]
    body: Any
    outcome: str = "open"  # streamed | aborted | http <status> | dropped

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body["messages"])


def _split(text: str, pieces: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, pieces)))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _events(steps: tuple[Step, ...]) -> Iterator[tuple[str, dict[str, Any]] | Hold | Cut]:
    """SSE events for content blocks; `Hold` and `Cut` steps pass through."""
    index = 0
    for step in steps:
        if isinstance(step, Hold | Cut):
            yield step
            continue
        if isinstance(step, Text):
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "text", "text": ""}}
            for piece in _split(step.text, step.pieces):
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "text_delta", "text": piece}}
        elif isinstance(step, Thinking):
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "thinking", "thinking": "",
                                                            "signature": ""}}
            for piece in _split(step.text, 2):
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "thinking_delta", "thinking": piece}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "signature_delta",
                                                    "signature": step.signature}}
        else:
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "tool_use", "id": step.id,
                                                            "name": step.name, "input": {}}}
            raw = json.dumps(step.input)
            for piece in _split(raw, 3):
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": piece}}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
        index += 1


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def conversation_problem(messages: object, thinking: bool = False) -> str | None:
    """What the real API would reject in `messages` (None when it is valid); `thinking`:
    the request enables thinking."""
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    if messages[0].get("role") != "user":
        return "messages: first message must use the \"user\" role"
    pending: list[str] = []  # tool_use ids the next message must answer
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: must be user or assistant"
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            return f"messages.{i}: content must be a non-empty string or list"
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text" and not str(block.get("text", "")).strip():
                return f"messages.{i}.content.{j}: text content blocks must contain non-whitespace text"
            if kind == "thinking" and not block.get("signature"):
                return f"messages.{i}.content.{j}.signature: Field required"
        results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        if pending:
            missing = [t for t in pending if t not in results]
            if role != "user" or missing:
                return ("messages.{}: `tool_use` ids were found without `tool_result` blocks "
                        "immediately after: {}. Each `tool_use` block must have a corresponding "
                        "`tool_result` block in the next message.").format(i - 1, ", ".join(missing or pending))
        if results:
            unknown = [r for r in results if r not in pending]
            if unknown:
                return (f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` "
                        f"blocks: {unknown[0]}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message.")
            kinds = [b.get("type") for b in blocks]
            if kinds[:len(results)] != ["tool_result"] * len(results):
                return f"messages.{i}.content: tool_result blocks must come first in the content array"
        pending = [b["id"] for b in blocks if b.get("type") == "tool_use"] if role == "assistant" else []
    if pending:
        return (f"messages.{len(messages) - 1}: `tool_use` ids were found without `tool_result` "
                f"blocks immediately after: {', '.join(pending)}.")
    if thinking:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is not None:
            content = messages[last]["content"]
            blocks = content if isinstance(content, list) else []
            if (any(b.get("type") == "tool_use" for b in blocks)
                    and blocks[0].get("type") not in ("thinking", "redacted_thinking")):
                return (f"messages.{last}.content.0.type: Expected `thinking` or "
                        f"`redacted_thinking`, but found `{blocks[0].get('type')}`. When "
                        "`thinking` is enabled, a final `assistant` message must start with a "
                        "thinking block (preceeding the lastmost set of `tool_use` and "
                        "`tool_result` blocks).")
    return None


class FakeAnthropic:
    def __init__(self, api_key: str = DEFAULT_KEY) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self._script: deque[Script] = deque()
        self._ids = itertools.count(1)
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeAnthropic:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        # Cancel the handler when the client goes away: that is how a held stream
        # learns it was aborted.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def script(self, *responses: Script) -> None:
        self._script.extend(responses)

    @property
    def unused(self) -> int:
        return len(self._script)

    async def wait_requests(self, count: int, timeout: float = 20.0) -> list[Recorded]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    async def wait_outcome(self, index: int, outcome: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) > index
                                         and self.requests[index].outcome == outcome)

    async def _record(self, rec: Recorded, outcome: str | None = None) -> None:
        async with self._arrived:
            if outcome is None:
                self.requests.append(rec)
            else:
                rec.outcome = outcome
            self._arrived.notify_all()

    def _authorised(self, headers: dict[str, str]) -> bool:
        return (headers.get("x-api-key") == self.api_key
                or headers.get("authorization") == f"Bearer {self.api_key}")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        rec = Recorded(next(self._ids) - 1, request.path, headers, body)
        await self._record(rec)
        if not self._authorised(headers):
            return await self._fail(rec, Fail(401, "authentication_error", "invalid x-api-key",
                                              retry_after_ms=None))
        if "anthropic-version" not in headers:
            return await self._fail(rec, Fail(400, "invalid_request_error",
                                              "anthropic-version: header is required", None))
        problem = self._request_problem(body)
        if problem is not None:
            return await self._fail(rec, Fail(400, "invalid_request_error", problem, None))
        if not self._script:
            return await self._fail(rec, Fail(
                400, "invalid_request_error",
                f"fake: no scripted response left for request #{rec.index}", None))
        item = self._script.popleft()
        response = item(rec) if callable(item) else item
        match response:
            case Fail():
                return await self._fail(rec, response)
            case Drop():
                assert request.transport is not None
                request.transport.abort()
                await self._record(rec, "dropped")
                raise asyncio.CancelledError
            case Reply():
                return await self._stream(request, rec, response.steps, response.stop_reason, None)
            case StreamError():
                return await self._stream(request, rec, response.steps, None, response)
        raise AssertionError(f"unknown scripted response {response!r}")

    @staticmethod
    def _request_problem(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "request body must be a JSON object"
        if not isinstance(body.get("model"), str):
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return "max_tokens: Field required"
        if body.get("stream") is not True:
            return "fake: only streaming requests are scripted"
        thinking = body.get("thinking")
        enabled = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
        return conversation_problem(body.get("messages"), enabled)

    async def _fail(self, rec: Recorded, fail: Fail) -> web.Response:
        headers = {"request-id": f"req_fake_{rec.index}"}
        if fail.retry_after_ms is not None:
            headers["retry-after-ms"] = str(fail.retry_after_ms)
        await self._record(rec, f"http {fail.status}")
        return web.json_response(_error_body(fail.error_type, fail.message), status=fail.status,
                                 headers=headers)

    async def _stream(self, request: web.Request, rec: Recorded, steps: tuple[Step, ...],
                      stop_reason: str | None, error: StreamError | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "request-id": f"req_fake_{rec.index}",
        })
        try:
            await resp.prepare(request)

            async def send(name: str, data: dict[str, Any]) -> None:
                await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

            await send("message_start", {"type": "message_start", "message": {
                "id": f"msg_fake_{rec.index}", "type": "message", "role": "assistant",
                "content": [], "model": rec.body["model"], "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})
            await send("ping", {"type": "ping"})
            for item in _events(steps):
                if isinstance(item, Hold):
                    await item.release.wait()
                elif isinstance(item, Cut):
                    assert request.transport is not None
                    request.transport.abort()
                    await self._record(rec, "cut")
                    return resp
                else:
                    await send(*item)
            if error is not None:
                await send("error", _error_body(error.error_type, error.message))
                await resp.write_eof()
                await self._record(rec, "stream error")
                return resp
            await send("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                         "usage": {"output_tokens": 5}})
            await send("message_stop", {"type": "message_stop"})
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            await asyncio.shield(self._record(rec, "aborted"))
            raise
        await self._record(rec, "streamed")
        return resp
