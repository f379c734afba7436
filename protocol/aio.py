"""The asyncio Python client: the I/O layer over this package's sans-I/O codecs.

Like the `websockets` library's asyncio layer, it only moves bytes: every frame is built
and parsed by `protocol.client`. A connection keeps, per event name, the highest `seq`
it has seen and re-subscribes with that cursor when it reconnects, so a consumer that
uses `reconnect=True` sees every durable event once, in order. An event log recreated
under it (a new epoch) is reported in `Connection.errors` (`actor.epoch_changed`).

    async with Client("http://127.0.0.1:6420") as client:
        conn = await client.connect("vm", "my-agent")
        conn.on("sessionEvent", print)
        session = await conn.call("createSession", "local")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from .client import (
    ActionRequest,
    ActionResponse,
    Encoding,
    ErrorMsg,
    Event,
    Init,
    SubscriptionRequest,
    content_type,
    decode_http_action_response,
    decode_http_error,
    decode_to_client,
    encode_http_action_request,
    encode_to_server,
)
from .errors import ActorvisorError, ErrorCode

Handler = Callable[..., Awaitable[None] | None]

DEFAULT_URL = "http://127.0.0.1:6420"


def error_from_msg(msg: ErrorMsg) -> ActorvisorError:
    return ActorvisorError.from_dict(
        {"group": msg.group, "code": msg.code, "message": msg.message, "metadata": msg.metadata})


class Client:
    """Entry point: HTTP actions and WebSocket connections to one actorvisor service."""

    def __init__(self, url: str = DEFAULT_URL, encoding: Encoding = Encoding.CBOR,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.encoding = encoding
        # Sent as the npm client sends it: `x-rivet-token` on HTTP, `rivet_token.` on a WebSocket.
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def gateway_url(self, name: str, key: str, path: str) -> str:
        query = f"rvt-namespace=default&rvt-method=getOrCreate&rvt-key={quote(key, safe='')}"
        return f"{self.url}/gateway/{quote(name, safe='')}/{path}?{query}"

    async def action(self, name: str, key: str, action: str, *args: Any) -> Any:
        """Call one action over plain HTTP (no connection, no events)."""
        url = self.gateway_url(name, key, f"action/{quote(action, safe='')}")
        body = encode_http_action_request(list(args), self.encoding)
        headers = {"x-rivet-encoding": self.encoding.value,
                   "content-type": content_type(self.encoding)}
        if self.token:
            headers["x-rivet-token"] = self.token
        async with self.session.post(url, data=body, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise decode_http_error(raw, self.encoding)
            return decode_http_action_response(raw, self.encoding)

    async def connect(self, name: str, key: str, *, reconnect: bool = True) -> Connection:
        """Open a connection whose subscriptions start at the actor's current event.

        The actor's head `seq` is read first, and every subscription without a cursor of
        its own starts there, even one re-sent after a reconnect that came before any
        event: nothing emitted after `connect()` is missed, and nothing is repeated.
        """
        health = await self.action(name, key, "getRuntimeHealth")
        conn = Connection(self, name, key, reconnect=reconnect, head=health["eventsSeq"])
        await conn.open()
        return conn


class Connection:
    """One WebSocket connection to an actor: subscriptions, actions, cursors."""

    def __init__(self, client: Client, name: str, key: str, *, reconnect: bool,
                 head: int | None = None) -> None:
        self._client = client
        self.head = head
        self.name = name
        self.key = key
        self.reconnect = reconnect
        self.actor_id: str | None = None
        self.connection_id: str | None = None
        self.cursors: dict[str, int] = {}
        self.epoch: str | None = None
        self._handlers: dict[str, list[Handler]] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[bytes | str] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._closed = False
        self.errors: list[ActorvisorError] = []
        self.reconnects = 0
        self.repeats = 0  # events dropped because their seq was already seen
        self._close_reason = ""

    async def open(self) -> None:
        url = self._client.gateway_url(self.name, self.key, "connect")
        protocols: tuple[str, ...] = ("rivet", f"rivet_encoding.{self._client.encoding.value}")
        if self._client.token:
            protocols += (f"rivet_token.{self._client.token}",)
        ws = await self._client.session.ws_connect(url, protocols=protocols, max_msg_size=64 << 20)
        self._ws = ws
        self._ready.clear()
        self._outbox = asyncio.Queue()
        reader = self._reader = asyncio.create_task(self._read_loop(ws), name="actorvisor-client-reader")
        self._writer = asyncio.create_task(self._write_loop(ws, self._outbox),
                                           name="actorvisor-client-writer")
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, reader}, timeout=30.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set() or ws is not self._ws:
            await ws.close()
            refused = ErrorCode.parse(*self._close_reason.split(".", 1)) if "." in self._close_reason else None
            if refused is not None:
                raise ActorvisorError(refused, f"the server closed the connection: {self._close_reason}")
            raise ConnectionError("the connection closed before the server's Init")
        for event_name in self._handlers:
            self._send_subscription(event_name, True)

    def on(self, event: str, handler: Handler) -> None:
        """Call `handler(*args)` for each `event`; the first handler subscribes."""
        self.subscribe(event, handler)

    def off(self, event: str, handler: Handler) -> None:
        """Stop calling `handler`; the subscription itself stays (its cursor with it)."""
        handlers = self._handlers.get(event, [])
        if handler in handlers:
            handlers.remove(handler)

    def subscribe(self, event: str, handler: Handler, *, after: int | None = None) -> None:
        """Like `on`, optionally from an explicit cursor (the `seq` last seen)."""
        if after is not None:
            self.cursors[event] = after
        first = event not in self._handlers
        self._handlers.setdefault(event, []).append(handler)
        if first and self._ws is not None and self._ready.is_set():
            self._send_subscription(event, True)

    async def stream(self, event: str, *, after: int | None = None) -> AsyncIterator[Any]:
        """Iterate the first handler argument of each `event` (the payload)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.subscribe(event, lambda payload, *rest: queue.put_nowait(payload), after=after)
        while True:
            yield await queue.get()

    def _send_subscription(self, event: str, subscribe: bool) -> None:
        after = self.cursors.get(event, self.head)
        msg = SubscriptionRequest(event, subscribe, after=after, epoch=self.epoch if after is not None else None)
        self._send(encode_to_server(msg, self._client.encoding))

    def _send(self, frame: bytes | str) -> None:
        """Queue a frame; one writer sends them in the order they were queued."""
        if self._ws is None:
            raise ActorvisorError(ErrorCode.STOPPED, "connection is closed")
        self._outbox.put_nowait(frame)

    @staticmethod
    async def _write_loop(ws: aiohttp.ClientWebSocketResponse, outbox: asyncio.Queue[bytes | str]) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            while True:
                frame = await outbox.get()
                if isinstance(frame, str):
                    await ws.send_str(frame)
                else:
                    await ws.send_bytes(frame)

    async def call(self, action: str, *args: Any) -> Any:
        action_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = fut
        try:
            self._send(encode_to_server(ActionRequest(action_id, action, list(args)),
                                        self._client.encoding))
            return await fut
        finally:
            self._pending.pop(action_id, None)

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._close_reason = ""
        while True:
            frame = await ws.receive()
            if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                if frame.type is aiohttp.WSMsgType.CLOSE and isinstance(frame.extra, str):
                    self._close_reason = frame.extra
                break
            msg = decode_to_client(frame.data, self._client.encoding)
            await self._dispatch(msg)
        self._on_disconnect(ws)

    async def _dispatch(self, msg: Init | ErrorMsg | ActionResponse | Event) -> None:
        match msg:
            case Init():
                self.actor_id, self.connection_id = msg.actor_id, msg.connection_id
                self._ready.set()
            case ActionResponse():
                fut = self._pending.get(msg.id)
                if fut is not None and not fut.done():
                    fut.set_result(msg.output)
            case ErrorMsg():
                err = error_from_msg(msg)
                fut = self._pending.get(msg.action_id) if msg.action_id is not None else None
                if fut is not None and not fut.done():
                    fut.set_exception(err)
                else:
                    self.errors.append(err)
                    if err.code is ErrorCode.EPOCH_CHANGED and isinstance(err.metadata, dict):
                        # A new log: its seqs start again at 1, so the old cursor means nothing.
                        self.cursors.pop(str(err.metadata.get("eventName")), None)
                        epoch = err.metadata.get("epoch")
                        self.epoch = epoch if isinstance(epoch, str) else None
            case Event():
                payload = msg.args[0] if msg.args else None
                seq = payload.get("seq") if isinstance(payload, dict) else None
                if isinstance(seq, int):
                    if seq <= self.cursors.get(msg.name, 0):
                        self.repeats += 1
                        return
                    self.cursors[msg.name] = seq
                    epoch = payload.get("epoch") if isinstance(payload, dict) else None
                    if isinstance(epoch, str):
                        self.epoch = epoch
                for handler in list(self._handlers.get(msg.name, ())):
                    result = handler(*msg.args)
                    if inspect.isawaitable(result):
                        await result

    def _on_disconnect(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if ws is not self._ws:
            return
        self._ws = None
        if self._writer is not None:
            self._writer.cancel()
        lost = ActorvisorError(ErrorCode.STOPPED, f"connection lost (close code {ws.close_code})")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(lost)
        # One reconnect loop at a time: a drop while it is still opening is its to retry.
        if self.reconnect and not self._closed and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.create_task(self._reconnect(), name="actorvisor-client-reconnect")

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                await self.open()
                self.reconnects += 1
                return
            except ActorvisorError as err:
                self.errors.append(err)  # refused for good (e.g. the actor was destroyed)
                return
            except (aiohttp.ClientError, OSError, TimeoutError, ConnectionError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        for task in (self._reconnector, self._reader, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
