"""Running one cron job in the worker (`runCronJob`, sent only by the supervisor's scheduler).

The supervisor owns the schedule (supervisor/cron.py) and has validated the job; here it
runs through the same code as the `exec` action or a `createSession` + `sendPrompt` +
`closeSession`, and its life is logged as `cronEvent`s, durable and sequenced like every
event, so clients see them live and can read them back after the actor slept.

Each `cronEvent` payload is agentOS's `{event: {type, jobId, time, ...}}` with
`type` one of `cron:fire`, `cron:complete` (`durationMs`) and `cron:error` (`error`),
plus our fields `id`, `schedule`, `firedAt` and, once it ended, `result` (the exec
result, or the prompt's `sessionId`, `text` and `stopReason`; long strings cut to
`MAX_RESULT_CHARS`).
"""

from __future__ import annotations

import shlex
import time
from typing import Any, Final

from protocol.errors import ActorvisorError
from protocol.names import AgentType, EventName

from .actions import MAX_ARGS, MAX_COMMAND_BYTES, _invalid, _type
from .eventlog import now_ms
from .outbox import Outbox
from .sessions import MAX_PROMPT_CHARS, SessionManager, parse_options
from .vm import DEFAULT_EXEC_TIMEOUT_S, Vm

MAX_RESULT_CHARS: Final = 4096


def check_keys(value: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    for key in value:
        if key not in allowed:
            raise _invalid(f"{what}: unknown field {key!r:.80}; expected {', '.join(allowed)}")


def command_line(command: str, args: list[str]) -> str:
    """agentOS runs `command` followed by its args; quoted here, so an arg stays one word."""
    return " ".join([command, *(shlex.quote(x) for x in args)])


def parse_action(value: object, what: str = "scheduleCron: options.action") -> dict[str, Any]:
    """Validate a job's action; returns it as it is stored and run. The supervisor checks
    it when the job is scheduled, the worker again before running it."""
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be an object, got {_type(value)}")
    kind = value.get("type")
    if kind == "exec":
        check_keys(value, ("type", "command", "args"), what)
        command = value.get("command")
        if not isinstance(command, str) or not command.strip():
            raise _invalid(f"{what}.command must be a non-empty string, got {_type(command)}")
        args = value.get("args") or []
        if not isinstance(args, list) or len(args) > MAX_ARGS or not all(isinstance(x, str) for x in args):
            raise _invalid(f"{what}.args must be a list of at most {MAX_ARGS} strings")
        line = command_line(command, args)
        if "\0" in line or len(line.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
            raise _invalid(f"{what}: the command line must be at most {MAX_COMMAND_BYTES} bytes, "
                           "without NUL bytes")
        return {"type": "exec", "command": command, "args": list(args)}
    if kind == "session":
        check_keys(value, ("type", "agentType", "prompt", "options", "cwd"), what)
        agent = value.get("agentType")
        if not isinstance(agent, str) or agent not in {t.value for t in AgentType}:
            raise _invalid(f"{what}.agentType must be one of "
                           f"{', '.join(repr(t.value) for t in AgentType)}; got {agent!r:.80}")
        prompt = value.get("prompt")
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise _invalid(f"{what}.prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
        options = value.get("options")
        if options is not None and not isinstance(options, dict):
            raise _invalid(f"{what}.options must be an object, got {_type(options)}")
        options = dict(options or {})
        if value.get("cwd") is not None:  # agentOS's serializable form puts cwd beside prompt
            options.setdefault("cwd", value["cwd"])
        parse_options(options, what=f"{what}.options", agent_type=AgentType(agent))
        return {"type": "session", "agentType": agent, "prompt": prompt, "options": options}
    raise _invalid(f"{what}.type must be 'exec' or 'session', got {kind!r:.80}")


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_RESULT_CHARS:
        return value[:MAX_RESULT_CHARS] + f"… ({len(value) - MAX_RESULT_CHARS} more characters)"
    return value


async def run_job(job: Any, fired_at: Any, *, vm: Vm, sessions: SessionManager,
                  outbox: Outbox) -> dict[str, Any]:
    """Run `job` once; returns its last `cronEvent`'s `event`. Never raises for the job's
    own failure: that is the `cron:error` event."""
    if not isinstance(job, dict) or not isinstance(job.get("id"), str) or not isinstance(job.get("schedule"), str):
        raise _invalid("runCronJob: argument 1 (job) must be {id, schedule, action}")
    job_id, schedule = job["id"], job["schedule"]
    action = parse_action(job.get("action"), "runCronJob: argument 1 (job).action")
    base = {"jobId": job_id, "id": job_id, "schedule": schedule,
            "firedAt": fired_at if isinstance(fired_at, int) else now_ms()}
    await outbox.append(EventName.CRON_EVENT.value,
                        {"event": {"type": "cron:fire", **base, "time": now_ms()}})
    started = time.monotonic()
    try:
        result = await _run_action(action, vm=vm, sessions=sessions)
    except ActorvisorError as err:
        event = {"type": "cron:error", **base, "time": now_ms(), "error": err.message,
                 "code": err.code.value}
    else:
        event = {"type": "cron:complete", **base, "time": now_ms(),
                 "durationMs": round((time.monotonic() - started) * 1000), "result": result}
    await outbox.append(EventName.CRON_EVENT.value, {"event": event})
    return event


async def _run_action(action: dict[str, Any], *, vm: Vm, sessions: SessionManager) -> dict[str, Any]:
    if action["type"] == "exec":
        line = command_line(action["command"], action["args"])
        result = await vm.exec(line, cwd=None, env={}, timeout_s=DEFAULT_EXEC_TIMEOUT_S)
        return {k: _cut(v) for k, v in result.to_wire().items()}
    kind = AgentType(action["agentType"])
    options = parse_options(action["options"], what="cron session options",
                            agent_type=kind, default_policy=sessions.default_policy)
    session_id = sessions.create(kind, options)
    try:
        reply = await sessions.prompt(session_id, action["prompt"])
    finally:
        await sessions.close(session_id)
    return {"sessionId": session_id, "text": _cut(reply.get("text")), "stopReason": reply.get("stopReason")}
