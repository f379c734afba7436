"""A `claude` session's Messages API history, rebuilt from its logged ACP updates.

The event log is the conversation: every turn starts from what the log says, whether
the worker has been up all along or was just restarted after a crash or a sleep. That
works because the agent logs everything the API needs — the prompt
(`user_message_chunk`), the reply text (`agent_message_chunk`), each tool call with its
id, tool name (`_meta.actorvisor.toolName`) and input (`rawInput`), and each result as
the exact text the model saw (`tool_call_update` content, `failed` meaning an error), and
each thinking block (`agent_thought_chunk`s, the last one carrying the block's signature in
`_meta.actorvisor.signature`, or a redacted block's data in `redactedThinking`).

The rebuilt history is always one the API accepts: user first; a `tool_result` for every
`tool_use`, in the message right after it, before any text; a tool call that never got
its result (the worker died mid-tool) is answered with an "interrupted" error; consecutive
user entries are merged; blank text blocks, error notices and unsigned (cut-off)
thinking are left out, as is an assistant message with nothing but thinking in it. Signed
thinking blocks go back verbatim: the API requires them before a `tool_use` whose loop the
conversation continues. This module only reads updates; it never calls the API.
"""

from __future__ import annotations

from typing import Any, Final

from .base import ToolStatus, UpdateKind

META: Final = "actorvisor"
"""Our key inside ACP `_meta` objects."""

INTERRUPTED: Final = ("The tool call was interrupted before it finished (the turn was cancelled "
                      "or the worker stopped); its effects, if any, are unknown.")

Message = dict[str, Any]
Block = dict[str, Any]

_THINKING: Final = ("thinking", "redacted_thinking")


def meta(update: dict[str, Any]) -> dict[str, Any]:
    value = update.get("_meta")
    ours = value.get(META) if isinstance(value, dict) else None
    return ours if isinstance(ours, dict) else {}


def _text(update: dict[str, Any]) -> str:
    content = update.get("content")
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return str(content["text"])
    return ""


def _result_text(update: dict[str, Any]) -> str:
    parts = []
    for item in update.get("content") or []:
        inner = item.get("content") if isinstance(item, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("text"), str):
            parts.append(inner["text"])
    return "".join(parts) or "(no output)"


def add_user_blocks(messages: list[Message], blocks: list[Block]) -> None:
    """Append user content, merged into a trailing user message (tool results stay first)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == "user":
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": "user", "content": list(blocks)})


def add_user_text(messages: list[Message], text: str) -> None:
    # The API refuses blank text blocks; a blank prompt still has to say something.
    add_user_blocks(messages, [{"type": "text", "text": text if text.strip() else "(empty prompt)"}])


class _Rebuild:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.assistant: list[Block] = []
        self.results: dict[str, Block] = {}
        self.thinking = ""

    def _tool_ids(self) -> list[str]:
        return [b["id"] for b in self.assistant if b["type"] == "tool_use"]

    def close_assistant(self) -> None:
        content = [b for b in self.assistant if b["type"] != "text" or b["text"].strip()]
        if any(b["type"] not in _THINKING for b in content):
            self.messages.append({"role": "assistant", "content": content})
            add_user_blocks(self.messages, [
                self.results.get(tool_id) or {"type": "tool_result", "tool_use_id": tool_id,
                                              "content": INTERRUPTED, "is_error": True}
                for tool_id in self._tool_ids()])
        self.assistant, self.results, self.thinking = [], {}, ""

    def open_assistant(self) -> list[Block]:
        # Results in hand mean the tools ran: what follows is the model's next response.
        if self.results:
            self.close_assistant()
        return self.assistant

    def feed(self, update: dict[str, Any]) -> None:
        kind = update.get("sessionUpdate")
        if kind == UpdateKind.USER_MESSAGE_CHUNK.value:
            self.close_assistant()
            add_user_text(self.messages, _text(update))
        elif kind == UpdateKind.AGENT_MESSAGE_CHUNK.value:
            text = _text(update)
            if not text or "error" in meta(update):
                return
            self.thinking = ""  # a new block began: unsigned thinking before it was cut off
            blocks = self.open_assistant()
            if blocks and blocks[-1]["type"] == "text":
                blocks[-1]["text"] += text
            else:
                blocks.append({"type": "text", "text": text})
        elif kind == UpdateKind.AGENT_THOUGHT_CHUNK.value:
            ending = meta(update)
            if not self.thinking:
                self.open_assistant()
            self.thinking += _text(update)
            if isinstance(ending.get("signature"), str):
                self.assistant.append({"type": "thinking", "thinking": self.thinking,
                                       "signature": ending["signature"]})
                self.thinking = ""
            elif isinstance(ending.get("redactedThinking"), str):
                self.assistant.append({"type": "redacted_thinking",
                                       "data": ending["redactedThinking"]})
                self.thinking = ""
        elif kind == UpdateKind.TOOL_CALL.value:
            name = meta(update).get("toolName")
            tool_id = update.get("toolCallId")
            raw_input = update.get("rawInput")
            if not isinstance(name, str) or not isinstance(tool_id, str):
                return  # not a call this agent made; nothing the API could pair it with
            self.thinking = ""
            self.open_assistant().append({"type": "tool_use", "id": tool_id, "name": name,
                                          "input": raw_input if isinstance(raw_input, dict) else {}})
        elif kind == UpdateKind.TOOL_CALL_UPDATE.value:
            tool_id = update.get("toolCallId")
            status = update.get("status")
            if tool_id in self._tool_ids() and status in (ToolStatus.COMPLETED.value,
                                                          ToolStatus.FAILED.value):
                self.results[str(tool_id)] = {
                    "type": "tool_result", "tool_use_id": tool_id,
                    "content": _result_text(update),
                    "is_error": status == ToolStatus.FAILED.value}


def rebuild(updates: list[dict[str, Any]]) -> list[Message]:
    """The Messages API `messages` for a session whose logged updates are `updates`."""
    state = _Rebuild()
    for update in updates:
        state.feed(update)
    state.close_assistant()
    return state.messages
