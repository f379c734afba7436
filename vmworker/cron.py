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

import time
from typing import Any, Final

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import AgentType, EventName

from .eventlog import now_ms
from .outbox import Outbox
from .sessions import SessionManager, parse_options
from .vm import DEFAULT_EXEC_TIMEOUT_S, Vm

MAX_RESULT_CHARS: Final = 4096


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_RESULT_CHARS:
        return value[:MAX_RESULT_CHARS] + f"… ({len(value) - MAX_RESULT_CHARS} more characters)"
    return value


async def run_job(job: Any, fired_at: Any, *, vm: Vm, sessions: SessionManager,
                  outbox: Outbox) -> dict[str, Any]:
    """Run `job` once; returns its last `cronEvent`'s `event`. Never raises for the job's
    own failure: that is the `cron:error` event."""
    if not isinstance(job, dict) or not isinstance(job.get("action"), dict):
        raise ActorvisorError(ErrorCode.INVALID_ARGS, "runCronJob: argument 1 (job) must be a job object")
    job_id, schedule, action = str(job.get("id")), str(job.get("schedule")), job["action"]
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
    if action.get("type") == "exec":
        result = await vm.exec(str(action["line"]), cwd=None, env={}, timeout_s=DEFAULT_EXEC_TIMEOUT_S)
        return {k: _cut(v) for k, v in result.to_wire().items()}
    kind = AgentType(action["agentType"])
    options = parse_options(action.get("options") or {}, what="cron session options",
                            agent_type=kind, default_policy=sessions.default_policy)
    session_id = sessions.create(kind, options)
    try:
        reply = await sessions.prompt(session_id, str(action["prompt"]))
    finally:
        await sessions.close(session_id)
    return {"sessionId": session_id, "text": _cut(reply.get("text")), "stopReason": reply.get("stopReason")}
