"""The tools the `claude` agent offers the model, and running them in the VM.

Owns each tool's name, description and input schema as the Messages API sees them, how
a call is shown to ACP clients (title, kind, locations), and what the model gets back:
one text that is both the `tool_result` content and the ACP `tool_call_update` content,
so a conversation rebuilt from the event log hands the model exactly what it saw. Tools
reach the VM only through `Turn` (`exec`, `read_file`, `write_file`), so they run in the
actor's sandbox with its path rules, never on the host. A tool never raises for a bad
call: invalid input, a missing file, a failing command all become an error result the
model can read and act on. Permissions are not decided here (the agent asks first).
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from protocol.errors import ActorvisorError, ErrorCode

from ..vmfs import WORKSPACE
from .base import ToolKind, Turn

MAX_OUTPUT_CHARS: Final = 30_000   # of a command's output shown to the model
MAX_READ_CHARS: Final = 100_000    # of a file shown to the model at once
BASH_DEFAULT_TIMEOUT_S: Final = 120
BASH_MAX_TIMEOUT_S: Final = 600
_TITLE_CHARS: Final = 120


@dataclass(frozen=True, slots=True)
class ToolResult:
    """`text` is the tool_result content; `raw_output` goes to ACP `rawOutput`."""

    text: str
    is_error: bool
    raw_output: dict[str, Any] = field(default_factory=dict)


class ToolInputError(Exception):
    """The model called a tool with input that does not fit its schema."""


def truncate(text: str, limit: int) -> str:
    """`text` if it fits, else its head and tail around a marker that says how much went."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    dropped = len(text) - 2 * keep
    return f"{text[:keep]}\n[... {dropped} characters truncated ...]\n{text[-keep:]}"


def resolve(path: str, cwd: str) -> str:
    """A tool path as a VM path: relative paths are taken from the session's cwd."""
    return path if path.startswith("/") else f"{cwd.rstrip('/')}/{path}"


def _string(data: dict[str, Any], key: str, *, required: bool = True, empty: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ToolInputError(f"`{key}` must be a string")
    if not empty and not value:
        raise ToolInputError(f"`{key}` must not be empty")
    return value


def _optional_int(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ToolInputError(f"`{key}` must be an integer from {low} to {high}")
    return value


def _error(exc: ActorvisorError) -> ToolResult:
    return ToolResult(exc.message, True, {"error": exc.to_dict()})


async def _bash(turn: Turn, data: dict[str, Any], cwd: str) -> ToolResult:
    command = _string(data, "command", empty=False)
    timeout_s = _optional_int(data, "timeout_seconds", 1, BASH_MAX_TIMEOUT_S) or BASH_DEFAULT_TIMEOUT_S
    try:
        result = await turn.exec(command, timeout_s=timeout_s)
    except ActorvisorError as exc:
        if exc.code is not ErrorCode.ACTION_TIMEOUT:
            return _error(exc)
        partial = exc.metadata if isinstance(exc.metadata, dict) else {}
        stdout, stderr = str(partial.get("stdout", "")), str(partial.get("stderr", ""))
        text = _command_text(stdout, stderr, None)
        text = truncate(f"Command timed out after {timeout_s} s and was killed.\n{text}".rstrip(),
                        MAX_OUTPUT_CHARS)
        return ToolResult(text, True, {"error": exc.to_dict()["message"], "timedOut": True,
                                       "stdout": truncate(stdout, MAX_OUTPUT_CHARS),
                                       "stderr": truncate(stderr, MAX_OUTPUT_CHARS)})
    text = truncate(_command_text(result.stdout, result.stderr, result.exit_code), MAX_OUTPUT_CHARS)
    return ToolResult(text, result.exit_code != 0, {
        "exitCode": result.exit_code,
        "stdout": truncate(result.stdout, MAX_OUTPUT_CHARS),
        "stderr": truncate(result.stderr, MAX_OUTPUT_CHARS),
    })


def _command_text(stdout: str, stderr: str, exit_code: int | None) -> str:
    parts = [stdout.rstrip("\n")] if stdout.strip() else []
    if stderr.strip():
        parts.append(f"[stderr]\n{stderr.rstrip(chr(10))}")
    if exit_code:
        parts.append(f"[exit code {exit_code}]")
    return "\n".join(parts) or "(no output)"


async def _read_file(turn: Turn, data: dict[str, Any], cwd: str) -> ToolResult:
    path = resolve(_string(data, "path", empty=False), cwd)
    offset = _optional_int(data, "offset", 1, 2**31)
    limit = _optional_int(data, "limit", 1, 2**31)
    try:
        content = await turn.read_file(path)
    except ActorvisorError as exc:
        return _error(exc)
    if b"\0" in content[:8192]:
        return ToolResult(f"{path} is a binary file ({len(content)} bytes); use bash "
                          "(e.g. `xxd` or `file`) to inspect it.", True,
                          {"path": path, "bytes": len(content), "binary": True})
    text = content.decode("utf-8", "replace")
    if offset is not None or limit is not None:
        lines = text.splitlines(keepends=True)
        start = (offset or 1) - 1
        text = "".join(lines[start:start + limit if limit is not None else None])
    shown = text
    if len(text) > MAX_READ_CHARS:
        shown = (text[:MAX_READ_CHARS] + f"\n[... {len(text) - MAX_READ_CHARS} more characters "
                 "not shown; read on with `offset` and `limit` (lines) ...]")
    return ToolResult(shown or "(empty)", False,
                      {"path": path, "bytes": len(content), "truncated": shown != text})


async def _write_file(turn: Turn, data: dict[str, Any], cwd: str) -> ToolResult:
    path = resolve(_string(data, "path", empty=False), cwd)
    encoded = _string(data, "content").encode("utf-8")
    try:
        await turn.write_file(path, encoded)
    except ActorvisorError as exc:
        return _error(exc)
    return ToolResult(f"Wrote {len(encoded)} bytes to {path}.", False,
                      {"path": path, "bytes": len(encoded)})


async def _edit_file(turn: Turn, data: dict[str, Any], cwd: str) -> ToolResult:
    path = resolve(_string(data, "path", empty=False), cwd)
    old = _string(data, "old_string", empty=False)
    new = _string(data, "new_string")
    replace_all = data.get("replace_all", False)
    if not isinstance(replace_all, bool):
        raise ToolInputError("`replace_all` must be a boolean")
    if old == new:
        raise ToolInputError("`old_string` and `new_string` are the same; nothing to change")
    try:
        raw = await turn.read_file(path)
    except ActorvisorError as exc:
        return _error(exc)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ToolResult(f"{path} is not UTF-8 text; edit it with bash instead.", True,
                          {"path": path})
    count = text.count(old)
    if count == 0:
        return ToolResult(f"`old_string` was not found in {path}; nothing was changed. Read the "
                          "file and copy the text exactly, whitespace included.", True,
                          {"path": path, "occurrences": 0})
    if count > 1 and not replace_all:
        return ToolResult(f"`old_string` occurs {count} times in {path}; nothing was changed. "
                          "Include more surrounding text to make it unique, or set "
                          "`replace_all`.", True, {"path": path, "occurrences": count})
    updated = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    try:
        await turn.write_file(path, updated.encode("utf-8"))
    except ActorvisorError as exc:
        return _error(exc)
    noun = "occurrence" if count == 1 else "occurrences"
    return ToolResult(f"Replaced {count} {noun} in {path}.", False,
                      {"path": path, "replacements": count})


async def _list_dir(turn: Turn, data: dict[str, Any], cwd: str) -> ToolResult:
    path = resolve(_string(data, "path", required=False) or cwd, cwd)
    # `ls` in the VM shows what the VM sees, read-only system directories included.
    try:
        result = await turn.exec(f"ls -1Ap -- {shlex.quote(path)}", timeout_s=30)
    except ActorvisorError as exc:
        return _error(exc)
    if result.exit_code != 0:
        return ToolResult(result.stderr.strip() or f"ls failed with exit code {result.exit_code}",
                          True, {"path": path, "exitCode": result.exit_code})
    entries = result.stdout.splitlines()
    text = truncate(result.stdout.rstrip("\n"), MAX_OUTPUT_CHARS) or "(empty directory)"
    return ToolResult(text, False, {"path": path, "entries": len(entries)})


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    kind: ToolKind
    run: Callable[[Turn, dict[str, Any], str], Awaitable[ToolResult]]

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "input_schema": self.input_schema}


def _schema(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


_PATH = {"type": "string", "description": "Absolute, or relative to the working directory."}

TOOLS: Final[dict[str, Tool]] = {tool.name: tool for tool in (
    Tool("bash",
         "Run a shell command (`/bin/sh -c`) in the VM, in the working directory. There is no "
         "network. Returns stdout, then stderr after a `[stderr]` line, then `[exit code N]` "
         f"when it is not 0. Long output is cut in the middle. Default timeout "
         f"{BASH_DEFAULT_TIMEOUT_S} s; the command and everything it started are killed then.",
         _schema(["command"],
                 command={"type": "string", "description": "The command line."},
                 timeout_seconds={"type": "integer", "minimum": 1,
                                  "maximum": BASH_MAX_TIMEOUT_S,
                                  "description": "Kill the command after this many seconds."}),
         ToolKind.EXECUTE, _bash),
    Tool("read_file",
         "Read a UTF-8 text file from the VM. Optionally only `limit` lines from line "
         f"`offset` (1-based). At most {MAX_READ_CHARS} characters are returned at once.",
         _schema(["path"], path=_PATH,
                 offset={"type": "integer", "minimum": 1, "description": "First line, 1-based."},
                 limit={"type": "integer", "minimum": 1, "description": "Number of lines."}),
         ToolKind.READ, _read_file),
    Tool("write_file",
         "Create or overwrite a file in the VM with `content` (UTF-8), creating parent "
         "directories. Files persist under /workspace, /tmp and /home.",
         _schema(["path", "content"], path=_PATH,
                 content={"type": "string", "description": "The whole new content."}),
         ToolKind.EDIT, _write_file),
    Tool("edit_file",
         "Replace an exact string in a VM text file. `old_string` must occur exactly once "
         "(whitespace included) unless `replace_all` is true; otherwise nothing is changed "
         "and an error says why.",
         _schema(["path", "old_string", "new_string"], path=_PATH,
                 old_string={"type": "string", "description": "The exact text to replace."},
                 new_string={"type": "string", "description": "The replacement text."},
                 replace_all={"type": "boolean",
                              "description": "Replace every occurrence (default false)."}),
         ToolKind.EDIT, _edit_file),
    Tool("list_dir",
         "List a VM directory, one entry per line; directories end with `/`. Defaults to "
         "the working directory.",
         _schema([], path=_PATH),
         ToolKind.READ, _list_dir),
)}


def definitions() -> list[dict[str, Any]]:
    """The `tools` parameter of a Messages API request."""
    return [tool.definition() for tool in TOOLS.values()]


def presentation(name: str, data: dict[str, Any], cwd: str) -> tuple[str, ToolKind, list[dict[str, Any]]]:
    """How a call is shown to ACP clients: its title, kind and file locations."""
    tool = TOOLS.get(name)
    kind = tool.kind if tool is not None else ToolKind.OTHER
    if name == "bash":
        command = str(data.get("command", ""))
        title = f"bash: {command}" if len(command) <= _TITLE_CHARS else f"bash: {command[:_TITLE_CHARS]}…"
        return title, kind, []
    path = data.get("path")
    if isinstance(path, str) and path:
        full = resolve(path, cwd)
        return f"{name} {full}", kind, [{"path": full}]
    if name == "list_dir":
        return f"list_dir {cwd}", kind, [{"path": cwd}]
    return name, kind, []


async def run_tool(turn: Turn, name: str, data: object) -> ToolResult:
    """Run one tool call in the VM; every failure is a result, never an exception."""
    tool = TOOLS.get(name)
    if tool is None:
        return ToolResult(f"There is no tool named {name!r}; the tools are "
                          f"{', '.join(TOOLS)}.", True, {"error": "unknown tool"})
    if not isinstance(data, dict):
        return ToolResult(f"{name}: the input must be an object.", True, {"error": "invalid input"})
    try:
        return await tool.run(turn, data, turn.options.cwd or WORKSPACE)
    except ToolInputError as exc:
        return ToolResult(f"{name}: {exc}", True, {"error": "invalid input"})
