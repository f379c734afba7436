"""Supervisor ⇄ worker messages (PROTOCOL.md §6): one CBOR map per ZeroMQ frame, key `t`.

Worker → supervisor: `hello`, `phase`, `event`, `events`, `reply`.
Supervisor → worker: `action`, `sleep`, `shutdown`.

No message carries liveness: libzmq's ZMTP heartbeat does, in the I/O threads of both
ends (the supervisor's ROUTER pings, each worker's libzmq answers), so an idle worker
costs neither event loop anything (docs/delivery.md, "Liveness").

`events` is a run of consecutive durable events in one frame (the worker's group commit,
sent as one ZeroMQ message): each payload travels as the very CBOR bytes the worker
committed to its log, so the worker encodes an event once for disk and wire. `expand()`
turns it back into the `event`s it stands for, in order.

Only the shapes live here. Ordering guarantees (a reply never overtakes the events its
action produced) are the worker's job: it sends both on one socket, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import cbor2

from .errors import ActorvisorError, ProtocolError

WORKER_PROTOCOL_VERSION: Final = 1
MAX_WORKER_MESSAGE: Final = 64 * 1024 * 1024


class ExitCode(IntEnum):
    """How a worker process ends; the supervisor reads it when it reaps the worker."""

    OK = 0                 # asked to stop (sleep, shutdown, SIGTERM); vmShutdown is logged
    FATAL = 1              # the event log failed: persist-then-publish cannot be kept
    SUPERVISOR_LOST = 3    # the supervisor process (--supervisor-pid) is gone, never
                           # merely late; vmShutdown{reason: "error"} is logged
    VM_LOST = 4            # the VM's init died under the worker; vmShutdown{reason: "error"}
                           # is logged and the next action starts a new worker and VM
    ACTOR_BUSY = 5         # another worker of this actor still held its lock: this one
                           # wrote nothing (vmworker/actorlock.py)


GOODBYE_LOGGED: Final = frozenset({ExitCode.OK, ExitCode.SUPERVISOR_LOST, ExitCode.VM_LOST})
"""Exit codes after which the worker's own vmShutdown is already in the log."""

NOTHING_TO_RECORD: Final = GOODBYE_LOGGED | {ExitCode.ACTOR_BUSY}
"""Exit codes after which the supervisor appends no vmShutdown on the worker's behalf."""


@dataclass(frozen=True, slots=True)
class Hello:
    actor_id: str
    pid: int
    epoch: str | None = None
    last_seq: int = 0
    v: int = WORKER_PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Phase:
    phase: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """A durable event, already committed to the worker's SQLite log."""

    seq: int
    epoch: str
    name: str
    # None when the receiver left it undecoded (`expand(..., decode=False)`): see `raw`.
    payload: dict[str, Any] | None
    # The payload's CBOR as committed, when it came in an `events` batch: the relay splices
    # it into client frames instead of decoding, escaping and encoding it again. Not sent.
    raw: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class WorkerEvents:
    """Consecutive durable events (seq `first`, `first + 1`, ...), all committed.

    `payloads` are CBOR maps as stored in the log; `names[i]` goes with `payloads[i]`.
    """

    first: int
    epoch: str
    names: list[str]
    payloads: list[bytes]


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    ok: bool
    value: Any = None
    error: ActorvisorError | None = None


@dataclass(frozen=True, slots=True)
class Action:
    id: int
    name: str
    args: list[Any]


@dataclass(frozen=True, slots=True)
class Sleep:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


WorkerToSupervisor = Hello | Phase | WorkerEvent | WorkerEvents | Reply
SupervisorToWorker = Action | Sleep | Shutdown
WorkerMessage = WorkerToSupervisor | SupervisorToWorker


def encode(msg: WorkerMessage) -> bytes:
    """Encode one worker-channel message as a CBOR map."""
    body: dict[str, Any]
    match msg:
        case Hello():
            body = {"t": "hello", "v": msg.v, "actorId": msg.actor_id, "pid": msg.pid,
                    "epoch": msg.epoch, "lastSeq": msg.last_seq}
        case Phase():
            body = {"t": "phase", "phase": msg.phase, "detail": msg.detail}
        case WorkerEvent():
            body = {"t": "event", "seq": msg.seq, "epoch": msg.epoch, "name": msg.name,
                    "payload": msg.payload}
        case WorkerEvents():
            body = {"t": "events", "first": msg.first, "epoch": msg.epoch, "names": msg.names,
                    "payloads": msg.payloads}
        case Reply():
            body = {"t": "reply", "id": msg.id, "ok": msg.ok}
            if msg.ok:
                body["value"] = msg.value
            else:
                assert msg.error is not None
                body["error"] = msg.error.to_dict()
        case Action():
            body = {"t": "action", "id": msg.id, "name": msg.name, "args": msg.args}
        case Sleep():
            body = {"t": "sleep"}
        case Shutdown():
            body = {"t": "shutdown"}
    return cbor2.dumps(body)


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"worker message {body.get('t')!r}: field {key!r} is missing or mistyped")
    return value


def decode(data: bytes) -> WorkerMessage:
    """Decode one worker-channel frame. Raises `ProtocolError` and nothing else."""
    if len(data) > MAX_WORKER_MESSAGE:
        raise ProtocolError("worker message too large")
    try:
        body = cbor2.loads(data)
    except Exception as exc:
        raise ProtocolError(f"worker message is not valid CBOR: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("worker message is not a CBOR map")
    match body.get("t"):
        case "hello":
            epoch = body.get("epoch")
            last_seq = body.get("lastSeq")
            return Hello(
                actor_id=_field(body, "actorId", str),
                pid=_field(body, "pid", int),
                epoch=epoch if isinstance(epoch, str) else None,
                last_seq=last_seq if isinstance(last_seq, int) else 0,
                v=_field(body, "v", int),
            )
        case "phase":
            detail = body.get("detail")
            return Phase(_field(body, "phase", str), detail if isinstance(detail, dict) else {})
        case "event":
            return WorkerEvent(
                seq=_field(body, "seq", int),
                epoch=_field(body, "epoch", str),
                name=_field(body, "name", str),
                payload=_field(body, "payload", dict),
            )
        case "events":
            return _events(body)
        case "reply":
            ok = _field(body, "ok", bool)
            if ok:
                return Reply(_field(body, "id", int), True, body.get("value"))
            return Reply(_field(body, "id", int), False,
                         error=ActorvisorError.from_dict(body.get("error")))
        case "action":
            return Action(_field(body, "id", int), _field(body, "name", str),
                          _field(body, "args", list))
        case "sleep":
            return Sleep()
        case "shutdown":
            return Shutdown()
        case other:
            raise ProtocolError(f"unknown worker message type {other!r:.50}")


def _events(body: dict[str, Any]) -> WorkerEvents:
    first = _field(body, "first", int)
    names = _field(body, "names", list)
    payloads = _field(body, "payloads", list)
    if first < 1 or len(names) != len(payloads) or not names:
        raise ProtocolError("worker message 'events': needs first >= 1 and as many names "
                            "as payloads, at least one")
    if not all(isinstance(n, str) for n in names) or not all(isinstance(p, bytes) for p in payloads):
        raise ProtocolError("worker message 'events': names must be strings, payloads bytes")
    return WorkerEvents(first, _field(body, "epoch", str), names, payloads)


def expand(msg: WorkerToSupervisor, *, decode: bool = True) -> list[WorkerToSupervisor]:
    """A batch as the single messages it stands for; any other message as itself.

    Raises `ProtocolError` if a payload is not a CBOR map (nothing of the batch is then
    returned, so a receiver never relays half of a malformed batch). With `decode=False`
    (the supervisor's hub) payloads stay bytes (`WorkerEvent.raw`, `payload` None) and
    only their head is checked to be a definite-length map's: decoding every event, and
    keeping the decoded trees in the relay's ring, cost the hub more than anything else.
    """
    if not isinstance(msg, WorkerEvents):
        return [msg]
    events: list[WorkerToSupervisor] = []
    if not decode:
        for i, (name, blob) in enumerate(zip(msg.names, msg.payloads, strict=True)):
            if not _is_map_head(blob):
                raise ProtocolError(f"worker message 'events': payload {i} is not a CBOR map")
            events.append(WorkerEvent(msg.first + i, msg.epoch, name, None, blob))
        return events
    for i, (name, blob) in enumerate(zip(msg.names, msg.payloads, strict=True)):
        try:
            payload = cbor2.loads(blob)
        except Exception as exc:
            raise ProtocolError(f"worker message 'events': payload {i} is not valid CBOR: {exc}") from None
        if not isinstance(payload, dict):
            raise ProtocolError(f"worker message 'events': payload {i} is not a CBOR map")
        events.append(WorkerEvent(msg.first + i, msg.epoch, name, payload, blob))
    return events


def _is_map_head(blob: bytes) -> bool:
    """`blob` starts with a definite-length CBOR map head and is long enough for it."""
    if not blob or blob[0] >> 5 != 5:
        return False
    extra = {24: 1, 25: 2, 26: 4, 27: 8}.get(blob[0] & 0x1F, 0 if blob[0] & 0x1F < 24 else -1)
    return extra >= 0 and len(blob) > extra


def decode_all(data: bytes) -> list[WorkerToSupervisor]:
    """Decode one worker → supervisor frame into the messages it carries, in order.

    Raises `ProtocolError` and nothing else (also for a supervisor → worker message)."""
    msg = decode(data)
    if isinstance(msg, (Action, Sleep, Shutdown)):
        raise ProtocolError(f"worker sent a supervisor message {type(msg).__name__}")
    return expand(msg)
