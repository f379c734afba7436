"""The supervisor's end of the worker channel: one ZeroMQ ROUTER, bound on ipc://.

Each worker connects a DEALER whose identity is its actor id. The hub decodes frames and
hands them to one callback; it sends without ever blocking the event loop (a full pipe is
reported to the caller, never awaited). It knows nothing about actor states.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
import zmq
import zmq.asyncio

from protocol import worker as wire
from protocol.errors import ProtocolError

log = structlog.get_logger("supervisor.hub")

# Messages handled between two yields to the event loop (a batch frame counts its events).
YIELD_EVERY = 256

OnMessage = Callable[[str, wire.WorkerToSupervisor], None]


class WorkerHub:
    def __init__(self, runtime_dir: Path, on_message: OnMessage) -> None:
        self.path = runtime_dir / "workers.ipc"
        self.endpoint = f"ipc://{self.path}"
        self._on_message = on_message
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker reuses its actor id as identity: let it take over the route.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        self._sock.bind(self.endpoint)
        self._task = asyncio.create_task(self._recv_loop(), name="hub-recv")

    def send(self, actor_id: str, msg: wire.SupervisorToWorker) -> bool:
        """Queue a message to a worker; False if it is not connected or its pipe is full."""
        try:
            self._sock.send_multipart([actor_id.encode(), wire.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("worker_send_failed", actor=actor_id, error=str(exc))
            return False
        return True

    def input_pending(self) -> bool:
        """Frames are waiting to be read: any silence seen now is ours, not a worker's."""
        return bool(int(self._sock.get(zmq.EVENTS)) & zmq.POLLIN)

    async def _recv_loop(self) -> None:
        handled = 0
        while True:
            frames = await self._sock.recv_multipart()
            if handled >= YIELD_EVERY:
                # zmq.asyncio returns queued frames without yielding: under a flood of
                # events, let connections, heartbeats and the watchdog run.
                handled = 0
                await asyncio.sleep(0)
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

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._sock.close(linger=0)
        self._ctx.term()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
