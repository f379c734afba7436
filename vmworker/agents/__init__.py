"""Agents that answer prompts in a session, and the one place that picks one by type.

`create_agent` maps an `AgentType` to an implementation of `base.Agent`. It never starts
a turn and never validates options beyond what picking the agent needs.
"""

from __future__ import annotations

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import AgentType

from .base import Agent, SessionOptions
from .local import LocalAgent


def create_agent(agent_type: AgentType, options: SessionOptions) -> Agent:
    match agent_type:
        case AgentType.LOCAL:
            return LocalAgent()
        case AgentType.CLAUDE:
            raise ActorvisorError(
                ErrorCode.INVALID_ARGS,
                "agent type 'claude' is not available yet; use 'local'",
            )
