"""The supervisor's end of the worker channel: one ZeroMQ ROUTER, bound on ipc://.

Each worker connects a DEALER whose identity is its actor id. The hub decodes frames and
hands them to one callback; it sends without ever blocking the event loop (a full pipe is
reported to the caller, never awaited). It knows nothing about actor states.

It also owns the workers' liveness signal, and keeps it out of the event loop: libzmq
pings every connection each `ping_interval` (ZMTP `HEARTBEAT_IVL`) from its I/O thread,
where each worker's libzmq answers from its own, and drops a connection that answers
nothing for `ping_timeout` (`HEARTBEAT_TIMEOUT`). So an idle worker costs no Python on
either side. The socket monitor reports connections accepted and dropped; the hub names
each by the peer's pid (`SO_PEERCRED`) and tells a second callback. A drop is a
suspicion, not a verdict: the actor manager decides (docs/delivery.md, "Liveness").
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol import worker as wire
from protocol.errors import ProtocolError

log = structlog.get_logger("supervisor.hub")

# The hub yields to the event loop after this many messages (a batch frame counts its
# events) or this long, whichever comes first. The count alone let one pass run for 20 s
# when each event cost milliseconds (5,000 subscribers, 2 cores): no connection was
# accepted, no writer ran and no timer fired meanwhile (bench/connections.py's Init p99).
YIELD_EVERY = 256
YIELD_AFTER_S = 0.005

OnMessage = Callable[[str, wire.WorkerToSupervisor], None]
# (worker pid, connected): a connection from that process was accepted, or dropped.
OnLink = Callable[[int, bool], None]

_LINK_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


def peer_pid(fd: int) -> int | None:
    """The pid of the process at the other end of a Unix socket, or None if it is closed.

    Reads a duplicate of the fd: libzmq owns the original and may close it meanwhile.
    """
    try:
        with socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid or None


class WorkerHub:
    def __init__(self, runtime_dir: Path, on_message: OnMessage, on_link: OnLink = lambda pid, up: None,
                 *, ping_interval: float = 1.0, ping_timeout: float = 10.0) -> None:
        self.path = runtime_dir / "workers.ipc"
        self.endpoint = f"ipc://{self.path}"
        self._on_message = on_message
        self._on_link = on_link
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker reuses its actor id as identity: let it take over the route.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(ping_interval * 1000)))
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(ping_timeout * 1000)))
        self._task: asyncio.Task[None] | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._links: dict[int, int] = {}   # connection fd → worker pid

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        self._monitor = self._sock.get_monitor_socket(_LINK_EVENTS)
        self._sock.bind(self.endpoint)
        self._task = asyncio.create_task(self._recv_loop(), name="hub-recv")
        self._monitor_task = asyncio.create_task(self._monitor_loop(self._monitor), name="hub-monitor")

    @property
    def watching(self) -> bool:
        """Whether link events still reach the manager (false once the monitor died)."""
        return self._monitor_task is not None and not self._monitor_task.done()

    def send(self, actor_id: str, msg: wire.SupervisorToWorker) -> bool:
        """Queue a message to a worker; False if it is not connected or its pipe is full."""
        try:
            self._sock.send_multipart([actor_id.encode(), wire.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("worker_send_failed", actor=actor_id, error=str(exc))
            return False
        return True

    def input_pending(self) -> bool:
        """Frames or link events are waiting to be read: what we believe about a worker
        now may be stale because of us, not it."""
        return any(not sock.closed and int(sock.get(zmq.EVENTS)) & zmq.POLLIN
                   for sock in (self._sock, self._monitor) if sock is not None)

    async def _recv_loop(self) -> None:
        handled = 0
        since = time.perf_counter()
        while True:
            # zmq.asyncio's receive is an asyncio.Future, done already when a message waits.
            receiving = cast("asyncio.Future[list[bytes]]", self._sock.recv_multipart())
            if not receiving.done():
                frames = await receiving  # the loop runs meanwhile
                handled, since = 0, time.perf_counter()
            else:
                # zmq.asyncio returns queued frames without yielding: under a flood of
                # events, let connections, link events and the watchdog run.
                frames = receiving.result()
                if handled >= YIELD_EVERY or time.perf_counter() - since >= YIELD_AFTER_S:
                    await asyncio.sleep(0)
                    handled, since = 0, time.perf_counter()
            if len(frames) != 2:
                log.warning("worker_frame_malformed", parts=len(frames))
                continue
            identity, data = frames
            try:
                actor_id = identity.decode()
                msg = wire.decode(data)
                if isinstance(msg, (wire.Action, wire.Sleep, wire.Shutdown)):
                    log.warning("worker_message_unexpected", actor=actor_id, type=type(msg).__name__)
                    continue
                messages = wire.expand(msg, decode=False)
            except (UnicodeDecodeError, ProtocolError) as exc:
                log.warning("worker_message_invalid", error=str(exc))
                continue
            handled += len(messages)
            for message in messages:
                try:
                    self._on_message(actor_id, message)
                except Exception:
                    log.exception("worker_message_handler_failed", actor=actor_id)

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                fd = int(event["value"])
                if event["event"] == zmq.EVENT_ACCEPTED:
                    pid = peer_pid(fd)
                    if pid is None:
                        continue  # already gone: its DISCONNECTED follows
                    self._links[fd] = pid
                    self._report_link(pid, True)
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    pid = self._links.pop(fd, None)
                    if pid is not None:
                        self._report_link(pid, False)
        finally:
            monitor.close(linger=0)

    def _report_link(self, pid: int, up: bool) -> None:
        try:
            self._on_link(pid, up)
        except Exception:
            log.exception("worker_link_handler_failed", pid=pid, up=up)

    async def close(self) -> None:
        for task in (self._monitor_task, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._monitor_task is not None:
            self._sock.disable_monitor()
        self._sock.close(linger=0)
        self._ctx.term()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
