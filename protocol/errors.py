"""Error codes and the one exception type that carries them across every boundary.

An error is a `group.code` pair plus a message a person can act on. The same
`ActorvisorError` is raised by decoders, by the worker's action handlers and by the
supervisor, then rendered into whatever wire format the peer speaks. This module never
decides *when* an error happens, only how it is named and carried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every error actorvisor reports, as `group.code`."""

    ACTOR_NOT_FOUND = "actor.not_found"
    UNKNOWN_KIND = "actor.unknown_kind"
    UNKNOWN_ACTION = "actor.unknown_action"
    INVALID_ARGS = "actor.invalid_args"
    INVALID_PATH = "actor.invalid_path"
    INVALID_KEY = "actor.invalid_key"
    SESSION_NOT_FOUND = "actor.session_not_found"
    SESSION_BUSY = "actor.session_busy"
    PERMISSION_NOT_FOUND = "actor.permission_not_found"
    PROCESS_NOT_FOUND = "actor.process_not_found"
    SHELL_NOT_FOUND = "actor.shell_not_found"
    FILE_NOT_FOUND = "actor.file_not_found"
    FILE_EXISTS = "actor.file_exists"
    NOT_A_DIRECTORY = "actor.not_a_directory"
    IS_A_DIRECTORY = "actor.is_a_directory"
    AGENT_ERROR = "actor.agent_error"
    EPOCH_CHANGED = "actor.epoch_changed"
    WORKER_CRASHED = "actor.worker_crashed"
    FAILED = "actor.failed"
    BOOT_TIMEOUT = "actor.boot_timeout"
    OVERLOADED = "actor.overloaded"
    STOPPED = "actor.stopped"
    ACTION_TIMEOUT = "actor.action_timeout"
    VM_LIMIT = "actor.vm_limit"
    INTERNAL = "actor.internal_error"
    INVALID_MESSAGE = "protocol.invalid_message"
    MESSAGE_TOO_LARGE = "protocol.message_too_large"
    UNSUPPORTED_ENCODING = "protocol.unsupported_encoding"
    FORBIDDEN = "auth.forbidden"

    @property
    def group(self) -> str:
        return self.value.split(".", 1)[0]

    @property
    def code(self) -> str:
        return self.value.split(".", 1)[1]

    @classmethod
    def parse(cls, group: str, code: str) -> ErrorCode | None:
        try:
            return cls(f"{group}.{code}")
        except ValueError:
            return None


@dataclass
class ActorvisorError(Exception):
    """An error with a stable code, safe to show to a client."""

    code: ErrorCode
    message: str
    metadata: Any = field(default=None)

    def __post_init__(self) -> None:
        Exception.__init__(self, f"{self.code.value}: {self.message}")

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    @property
    def group(self) -> str:
        return self.code.group

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "group": self.code.group,
            "code": self.code.code,
            "message": self.message,
        }
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ActorvisorError:
        """Rebuild an error received from a peer; unknown codes become internal errors."""
        if not isinstance(data, dict):
            return cls(ErrorCode.INTERNAL, f"malformed error from peer: {data!r:.200}")
        group, code = data.get("group"), data.get("code")
        message = data.get("message")
        if not isinstance(message, str):
            message = "no message"
        parsed = (
            ErrorCode.parse(group, code)
            if isinstance(group, str) and isinstance(code, str)
            else None
        )
        if parsed is None:
            return cls(ErrorCode.INTERNAL, f"{group}.{code}: {message}", data.get("metadata"))
        return cls(parsed, message, data.get("metadata"))


class ProtocolError(ActorvisorError):
    """Bytes from a peer that do not form a valid message. The only thing decoders raise."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_MESSAGE) -> None:
        super().__init__(code, message)
