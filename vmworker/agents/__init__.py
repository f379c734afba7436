"""Agents that answer prompts in a session, and the one place that picks one by type.

`create_agent` maps an `AgentType` to an implementation of `base.Agent`, resolving what
the agent needs to start (for `claude`: a credential, else a readable error). It never
starts a turn and never validates options beyond what picking the agent needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from protocol.names import AgentType

from .base import Agent, SessionOptions
from .local import LocalAgent

CLAUDE_MODELS: Final = ("claude-sonnet-5-5", "claude-opus-4-1", "claude-haiku-4-5")


@dataclass(frozen=True, slots=True)
class AgentProfile:
    """What an agent type advertises (ACP `initialize`): who it is, what a prompt may
    carry, and the values `setModel`/`setMode`/`setThoughtLevel` accept. The first mode
    and level are the defaults; models are free-form ids, `models` only lists known ones."""

    agent_info: dict[str, Any]
    capabilities: dict[str, Any]
    models: tuple[str, ...]
    modes: tuple[tuple[str, str], ...]  # (id, description)
    thought_levels: tuple[str, ...]


_CAPABILITIES: Final = {
    "loadSession": True,
    "promptCapabilities": {"image": False, "audio": False, "embeddedContext": False},
    "mcpCapabilities": {"http": False, "sse": False},
}

PROFILES: Final = {
    AgentType.LOCAL: AgentProfile(
        {"name": "local", "title": "actorvisor local agent", "version": "1"}, _CAPABILITIES,
        ("local",),
        (("default", "runs the commands and writes the files the prompt asks for"),
         ("plan", "says what it would run or write, without doing it")),
        ("on", "off")),
    AgentType.CLAUDE: AgentProfile(
        {"name": "claude", "title": "actorvisor claude agent", "version": "1"}, _CAPABILITIES,
        CLAUDE_MODELS,
        (("default", "asks before each tool call unless the session allows all"),
         ("plan", "answers with a plan; told not to change anything"),
         ("bypassPermissions", "runs tools without asking")),
        ("off", "low", "medium", "high")),
}


def create_agent(agent_type: AgentType, options: SessionOptions) -> Agent:
    match agent_type:
        case AgentType.LOCAL:
            return LocalAgent()
        case AgentType.CLAUDE:
            # Imported on first use: the SDK costs a second and tens of MB, which an actor
            # that only runs `local` sessions should not pay (the zygote preloads it anyway).
            from . import claude

            return claude.create(options)
