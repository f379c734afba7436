"""Agents that answer prompts in a session, and the one place that picks one by type.

`create_agent` maps an `AgentType` to an implementation of `base.Agent`, resolving what
the agent needs to start (for `claude`: a credential, else a readable error). It never
starts a turn and never validates options beyond what picking the agent needs.
"""

from __future__ import annotations

from protocol.names import AgentType

from .base import Agent, SessionOptions
from .local import LocalAgent


def create_agent(agent_type: AgentType, options: SessionOptions) -> Agent:
    match agent_type:
        case AgentType.LOCAL:
            return LocalAgent()
        case AgentType.CLAUDE:
            # Imported on first use: the SDK costs a second and tens of MB, which an actor
            # that only runs `local` sessions should not pay (the zygote preloads it anyway).
            from . import claude

            return claude.create(options)
