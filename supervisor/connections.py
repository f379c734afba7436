"""Client connections: strict in-order handling, owned subscriptions, a bounded outbox.

A connection handles its client's messages one at a time, in order: a subscription sent
before an action is registered before the action reaches the worker. Replies are awaited
in tasks the connection owns (so actions may overlap), and every outbound frame goes
through one bounded queue drained by one writer task. A client that stops reading fills
its queue and is disconnected with a reason the RivetKit client retries on; it never
slows anyone else down. Nothing here awaits a worker.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections import deque
from typing import Any

import structlog
from aiohttp import WSCloseCode, web

from protocol.client import (
    ActionRequest,
    ActionResponse,
    Encoding,
    ErrorMsg,
    SubscriptionRequest,
    ToClient,
    ToServer,
    encode_to_client,
)
from protocol.errors import ActorvisorError, ErrorCode

from . import metrics
from .actors import Actor, ActorManager
from .relay import Subscription

log = structlog.get_logger("supervisor.connections")

# At most this many payload bytes of queued frames go to the socket in one write.
COALESCE_BYTES = 256 * 1024
# WebSocket frame heads (FIN + opcode, then the 7-bit, 16-bit or 64-bit length).
_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack

CLOSE_GOING_AWAY = "ws.going_away"
CLOSE_SLOW_CONSUMER = "ws.slow_consumer"


def _ws_frame(frame: bytes | str) -> tuple[bytes, bytes]:
    """An uncompressed server frame (RFC 6455 §5.2, FIN, no mask) as aiohttp builds it:
    its head and its payload."""
    data, opcode = (frame.encode(), 0x81) if isinstance(frame, str) else (frame, 0x82)
    length = len(data)
    if length < 126:
        return _LEN1(opcode, length), data
    if length < 65536:
        return _LEN2(opcode, 126, length), data
    return _LEN3(opcode, 127, length), data


class _LoopPasses:
    """Numbers the event loop's passes in which a frame was written straight to a socket:
    one callback per such pass ends it (none while nothing is written)."""

    def __init__(self) -> None:
        self.number = 0
        self._open = False

    def current(self) -> int:
        if not self._open:
            self._open = True
            asyncio.get_running_loop().call_soon(self._close)
        return self.number

    def _close(self) -> None:
        self.number += 1
        self._open = False


_passes = _LoopPasses()


def error_frame(err: ActorvisorError, action_id: int | None = None) -> ErrorMsg:
    return ErrorMsg(err.code.group, err.code.code, err.message, err.metadata, action_id)


class Connection:
    def __init__(self, ws: web.WebSocketResponse, actor: Actor, manager: ActorManager,
                 encoding: Encoding, max_queue_bytes: int, *, opened_at: float,
                 implicit_grace: float, implicit_window: float,
                 transport: asyncio.Transport | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.transport = transport
        self.opened_at = opened_at
        self._implicit_grace = implicit_grace
        self._implicit_window = implicit_window
        self.ws = ws
        self.actor = actor
        self.encoding = encoding
        self._manager = manager
        self._max_queue_bytes = max_queue_bytes
        self._queue: deque[bytes | str] = deque()
        self.queued_bytes = 0
        self._wake = asyncio.Event()
        self._writer_idle = False  # the writer task waits on _wake, in no send
        self._direct_pass = -1  # the loop pass of the last frame written straight
        # Set while the queue is at most half full: a catch-up waits for it before each event.
        self._roomy = asyncio.Event()
        self._roomy.set()
        self._closing: tuple[int, str] | None = None
        self.subs: dict[str, Subscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.writer: asyncio.Task[None] | None = None
        self._evictor: asyncio.Task[None] | None = None
        self.log = log.bind(conn=self.id, actor=actor.id)

    # ---- outbound ------------------------------------------------------------------

    def send(self, msg: ToClient) -> None:
        self.send_frame(encode_to_client(msg, self.encoding))

    def send_frame(self, frame: bytes | str) -> None:
        if self._closing is not None:
            return
        if (self._writer_idle and not self._queue and len(frame) <= self._max_queue_bytes
                and self._direct_pass != _passes.current() and self._socket_idle()):
            # Nothing is queued or in flight and the kernel took everything so far: write
            # it now, as the writer would, without waking its task (a task step per
            # subscribed connection per event, the supervisor's largest cost in a paced
            # stream's latency). Once per loop pass: the frames that follow in the same
            # pass (a burst) queue, and the writer sends them in one write (one system
            # call per frame made a flood of 5,000 subscribers several times slower).
            # What the kernel does not take stays in the transport's buffer, and the next
            # frame then queues: at most one frame per connection is outside the bound.
            # A frame over the bound alone still queues, and cuts the client, as ever.
            assert self.transport is not None
            self.transport.write(b"".join(_ws_frame(frame)))
            self._direct_pass = _passes.number
            return
        self._queue.append(frame)
        self.queued_bytes += len(frame)
        self._wake.set()
        if self.queued_bytes > self._max_queue_bytes // 2:
            self._roomy.clear()
        if self.queued_bytes > self._max_queue_bytes:
            self.cut_slow()

    def cut_slow(self) -> None:
        if self._closing is not None:
            return
        self.log.warning("slow_consumer_disconnected", queued_bytes=self.queued_bytes)
        metrics.SLOW_CONSUMER_DISCONNECTS.inc()
        self.close_soon(WSCloseCode.TRY_AGAIN_LATER, CLOSE_SLOW_CONSUMER, drop_queue=True)
        self._evictor = asyncio.create_task(self._evict(), name=f"evict-{self.id}")

    send_event_frame = send_frame

    async def writable(self) -> None:
        await self._roomy.wait()

    def spare_bytes(self) -> int:
        return max(0, self._max_queue_bytes // 2 - self.queued_bytes)

    def owed_room(self) -> int:
        return self._max_queue_bytes - self.queued_bytes

    def _drained(self) -> None:
        if self.queued_bytes <= self._max_queue_bytes // 2:
            self._roomy.set()

    def report_error(self, code: str, message: str) -> None:
        parsed = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
        self.send(error_frame(ActorvisorError(parsed, message)))

    def close_soon(self, code: int, reason: str, *, drop_queue: bool = False) -> None:
        """Stop queueing; the writer flushes (or drops) what is queued, then closes."""
        if self._closing is None:
            self._closing = (code, reason)
            if drop_queue:
                self._queue.clear()
                self.queued_bytes = 0
            self._wake.set()
            self._roomy.set()  # nothing more is queued: a catch-up waiting here goes on to its end

    async def _evict(self) -> None:
        """A client that stopped reading: say why if its socket still takes a frame, then cut.

        The writer may be stuck in a send the kernel cannot take, so it is cancelled
        first; the close frame gets a second, and then the transport is aborted.
        """
        if self.writer is not None:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)
        try:
            await asyncio.wait_for(
                self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=CLOSE_SLOW_CONSUMER.encode()), 1.0)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    def _write_coalesced(self) -> bool:
        """Write the queued frames (up to COALESCE_BYTES) to the socket in one go.

        Under a burst each frame was one `send()` system call, the supervisor's largest
        cost per event after encoding; the frames are built here exactly as aiohttp builds
        an uncompressed server frame (RFC 6455 §5.2, no mask). Only when the queue holds
        more than one frame, the connection negotiated no compression and the transport
        is below its high-water mark (else aiohttp's own path applies backpressure)."""
        transport = self.transport
        if (len(self._queue) < 2 or transport is None or transport.is_closing() or self.ws.compress
                or transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]):
            return False
        parts: list[bytes] = []
        size = 0
        while self._queue and size < COALESCE_BYTES:
            frame = self._queue.popleft()
            self.queued_bytes -= len(frame)
            head, data = _ws_frame(frame)
            parts += (head, data)
            size += len(data)
        transport.write(b"".join(parts))
        return True

    def _socket_idle(self) -> bool:
        """The socket may be written straight to: nothing buffered, no compression."""
        transport = self.transport
        return (transport is not None and not transport.is_closing() and not self.ws.closed
                and not self.ws.compress and transport.get_write_buffer_size() == 0)

    async def run_writer(self) -> None:
        try:
            while True:
                while self._queue:
                    if self._write_coalesced():
                        self._drained()
                        # A scheduling point per batch, as aiohttp's send would give.
                        await asyncio.sleep(0)
                        continue
                    frame = self._queue.popleft()
                    self.queued_bytes -= len(frame)
                    self._drained()
                    if isinstance(frame, str):
                        await self.ws.send_str(frame)
                    else:
                        await self.ws.send_bytes(frame)
                if self._closing is not None:
                    code, reason = self._closing
                    await self.ws.close(code=code, message=reason.encode())
                    return
                self._wake.clear()
                self._writer_idle = True
                try:
                    await self._wake.wait()
                finally:
                    self._writer_idle = False
        except (ConnectionResetError, RuntimeError) as exc:
            self.log.info("connection_write_failed", error=str(exc))

    # ---- inbound -------------------------------------------------------------------

    def handle(self, msg: ToServer) -> None:
        """Handle one client message synchronously, so the next one sees its effects."""
        match msg:
            case SubscriptionRequest():
                self._subscription(msg)
            case ActionRequest():
                self._action(msg)

    def _subscription(self, msg: SubscriptionRequest) -> None:
        current = self.subs.pop(msg.event_name, None)
        if current is not None:
            self.actor.relay.unsubscribe(current)
        if msg.subscribe:
            self.subs[msg.event_name] = self.actor.relay.subscribe(self, msg.event_name,
                                                                   self._cursor_for(msg))

    def _cursor_for(self, msg: SubscriptionRequest) -> int | None:
        """The explicit cursor, or the implicit one early in the connection's life.

        The npm client sends its first HTTP actions before its WebSocket upgrade even when
        `connect()` came first, so events of those actions can predate the connection:
        a subscription made soon after the upgrade starts from the actor's last seq a
        grace window before it. A reconnecting client may see an event twice; every
        payload carries `seq`, so it can drop the repeat.
        """
        relay = self.actor.relay
        if msg.after is not None:
            if msg.epoch is not None and relay.epoch is not None and msg.epoch != relay.epoch:
                self.send(error_frame(ActorvisorError(
                    ErrorCode.EPOCH_CHANGED,
                    f"the event log was recreated (epoch {relay.epoch}, cursor from {msg.epoch}); "
                    f"{msg.event_name} restarts from the beginning of the new log",
                    {"epoch": relay.epoch, "eventName": msg.event_name})))
                return 0
            return msg.after
        if self._implicit_grace <= 0 or time.monotonic() - self.opened_at > self._implicit_window:
            return None
        return relay.cursor_at(self.opened_at - self._implicit_grace)

    def _action(self, msg: ActionRequest) -> None:
        try:
            fut = self._manager.submit(self.actor, msg.name, msg.args)
        except ActorvisorError as err:
            self.send(error_frame(err, msg.id))
            return
        task = asyncio.create_task(self._await_reply(msg, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await_reply(self, msg: ActionRequest, fut: asyncio.Future[Any]) -> None:
        try:
            output = await self._manager.reply(msg.name, fut)
        except ActorvisorError as err:
            self.send(error_frame(err, msg.id))
            return
        self.send(ActionResponse(msg.id, output))

    async def aclose(self) -> None:
        for sub in self.subs.values():
            self.actor.relay.unsubscribe(sub)
        self.subs.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._evictor is not None:
            await asyncio.gather(self._evictor, return_exceptions=True)
        if self.writer is not None and not self.writer.done():
            self.close_soon(WSCloseCode.GOING_AWAY, CLOSE_GOING_AWAY)
            try:
                await asyncio.wait_for(self.writer, 2.0)
            except TimeoutError:
                self.writer.cancel()
