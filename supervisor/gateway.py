"""The gateway: HTTP routes and WebSocket connections of the RivetKit client protocol v4.

It answers connection setup inline — `Init` goes out right after the upgrade, whatever
any worker is doing — and then starts the actor's worker without waiting for it. It
never awaits a worker while opening, subscribing or closing a connection; only an HTTP
action waits, for its own reply.

An actor's key has two spellings on the wire: the gateway query joins its parts with
`,` (`rvt-key=a,b`), the manager API (`/actors`) uses RivetKit's escaped `/`-joined form
(`"a/b"`, `"/"` for no parts). The gateway stores the query form, so the same key reaches
the same actor whichever way the client names it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from protocol import client as cp
from protocol.client import Encoding, Init
from protocol.errors import ActorvisorError, ErrorCode, ProtocolError

from . import __version__
from .actors import Actor, ActorManager
from .config import Config
from .connections import CLOSE_GOING_AWAY, Connection, error_frame
from .limits import CreationRate

log = structlog.get_logger("supervisor.gateway")

_STATUS = {
    ErrorCode.ACTOR_NOT_FOUND: 404,
    ErrorCode.UNKNOWN_KIND: 404,
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.FILE_NOT_FOUND: 404,
    ErrorCode.PERMISSION_NOT_FOUND: 404,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.FAILED: 503,
    ErrorCode.STOPPED: 503,
    ErrorCode.BOOT_TIMEOUT: 503,
    ErrorCode.ACTION_TIMEOUT: 504,
    ErrorCode.WORKER_CRASHED: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.AGENT_ERROR: 500,
    ErrorCode.SESSION_BUSY: 409,
    ErrorCode.FILE_EXISTS: 409,
}


def close_reason(err: ActorvisorError) -> bytes:
    """`group.code`, the close reason form the RivetKit client parses (at most 123 bytes)."""
    return err.code.value.encode()[:123]


def http_status(code: ErrorCode) -> int:
    return _STATUS.get(code, 400)


def key_from_manager_api(serialized: str) -> str:
    """RivetKit's serialized key (`\\` escapes, `/` separates, `\\0` is an empty part) as
    the query form: parts joined by `,`."""
    if serialized == "/":
        return ""
    parts: list[str] = []
    part, escaping = "", False
    for ch in serialized:
        if escaping:
            part += "" if ch == "0" else ch
            escaping = False
        elif ch == "\\":
            escaping = True
        elif ch == "/":
            parts.append(part)
            part = ""
        else:
            part += ch
    parts.append(part + ("\\" if escaping else ""))
    return ",".join(parts)


def key_for_manager_api(key: str) -> str:
    """The query form of a key as RivetKit serializes it in `/actors` responses."""
    if key == "":
        return "/"
    return "/".join("\\0" if part == "" else part.replace("\\", "\\\\").replace("/", "\\/")
                    for part in key.split(","))


class Gateway:
    def __init__(self, manager: ActorManager, config: Config) -> None:
        self.manager = manager
        self.config = config
        self.max_message_size = config.max_message_size
        self.connections: set[Connection] = set()
        self.connections_total = 0
        self.creations = CreationRate(config.max_creations_per_minute)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/metadata", self.metadata),
            web.get("/healthz", self.healthz),
            web.get("/gateway/{target}/connect", self.connect),
            web.post("/gateway/{target}/action/{action}", self.http_action),
            web.put("/actors", self.actors_get_or_create),
            web.post("/actors", self.actors_create),
            web.get("/actors", self.actors_list),
            web.delete("/actors/{actor_id}", self.actors_destroy),
        ]

    # ---- resolution ----------------------------------------------------------------

    def resolve(self, target: str, query: Mapping[str, str], client: str = "") -> Actor:
        """`/gateway/{name}?rvt-method=...&rvt-key=...` or `/gateway/{actorId}`."""
        method = query.get("rvt-method")
        if method is None:
            return self.manager.get_by_id(target)
        if method not in ("get", "getOrCreate"):
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  f"rvt-method must be get or getOrCreate, not {method[:32]!r}")
        key = query.get("rvt-key", "")
        if not self.manager.exists(target, key) and method == "getOrCreate":
            self.admit()
            self.admit_creation(client)
        actor = self.manager.get_or_create(target, key, create=method == "getOrCreate")
        if not actor.running:
            self.admit()
        return actor

    def admit(self) -> None:
        """Refuse to start one more worker past `max_running_actors` (retryable)."""
        running = sum(1 for a in self.manager.all() if a.running)
        if running >= self.config.max_running_actors:
            raise ActorvisorError(ErrorCode.OVERLOADED,
                                  f"{running} actors are running, the most this service "
                                  "runs at once; retry later")

    def admit_creation(self, client: str) -> None:
        """Refuse a client's new actor past `max_creations_per_minute` (retryable)."""
        wait = self.creations.take(client)
        if wait > 0:
            raise ActorvisorError(ErrorCode.OVERLOADED,
                                  f"this client created {self.creations.per_minute} actors in the "
                                  f"last minute, the most it may; retry in {wait:.0f} s",
                                  metadata={"retryAfterS": round(wait, 1)})

    # ---- plain routes --------------------------------------------------------------

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response({
            "runtime": "actorvisor",
            "version": __version__,
            "actorNames": {"vm": {"metadata": {}}},
        })

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "runtime": "actorvisor", "version": __version__})

    # ---- WebSocket -----------------------------------------------------------------

    async def connect(self, request: web.Request) -> web.StreamResponse:
        opened_at = time.monotonic()
        ws = web.WebSocketResponse(protocols=("rivet",), max_msg_size=4 * self.max_message_size,
                                   heartbeat=30.0)
        try:
            protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
            encoding, _params = cp.parse_ws_subprotocols(protocols)
        except ActorvisorError as err:
            # Without an encoding we both understand, an HTTP answer is all we can give.
            return self._http_error(err, Encoding.JSON)
        try:
            if not self.manager.accepting:
                # Draining: no Init, only the close reason the RivetKit client retries on
                # (with backoff), so a reconnect never settles on a supervisor about to exit.
                await ws.prepare(request)
                await ws.close(code=WSCloseCode.GOING_AWAY, message=CLOSE_GOING_AWAY.encode())
                return ws
            actor = self.resolve(request.match_info["target"], request.query, request.remote or "")
        except ActorvisorError as err:
            # A WebSocket client sees an HTTP error only as "connection failed" (1006);
            # a close reason `group.code` reaches the RivetKit client as an ActorError.
            await ws.prepare(request)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=close_reason(err))
            return ws
        await ws.prepare(request)
        conn = Connection(ws, actor, self.manager, encoding, self.config.conn_queue_bytes,
                          opened_at=opened_at, implicit_grace=self.config.implicit_cursor_grace,
                          implicit_window=self.config.implicit_cursor_window,
                          transport=request.transport)
        conn.send(Init(actor.id, conn.id))
        conn.writer = asyncio.create_task(conn.run_writer(), name=f"writer-{conn.id}")
        self.connections.add(conn)
        self.connections_total += 1
        actor.connections.add(conn)
        conn.log.info("connection_opened", encoding=encoding.value)
        self.manager.ensure_running(actor)
        try:
            await self._read_loop(ws, conn, encoding)
        finally:
            self.connections.discard(conn)
            actor.connections.discard(conn)
            await conn.aclose()
            conn.log.info("connection_closed")
        return ws

    async def _read_loop(self, ws: web.WebSocketResponse, conn: Connection, encoding: Encoding) -> None:
        async for frame in ws:
            if frame.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                data = frame.data
                try:
                    conn.handle(cp.decode_to_server(data, encoding, self.max_message_size))
                except ActorvisorError as err:
                    conn.log.info("client_message_rejected", code=err.code.value, error=err.message)
                    conn.send(error_frame(err))
            elif frame.type is WSMsgType.ERROR:
                conn.log.info("connection_error", error=str(ws.exception()))
                if "too big" in str(ws.exception()).lower() or "size" in str(ws.exception()).lower():
                    conn.send(error_frame(ActorvisorError(ErrorCode.MESSAGE_TOO_LARGE,
                                                          f"frame exceeds {4 * self.max_message_size} bytes")))
                return

    # ---- HTTP actions --------------------------------------------------------------

    def _http_error(self, err: ActorvisorError, encoding: Encoding) -> web.Response:
        return web.Response(status=http_status(err.code), body=cp.encode_http_error(err, encoding),
                            content_type=cp.content_type(encoding).split(";")[0])

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, refused as soon as it passes the message bound."""
        body = bytearray()
        while chunk := await request.content.read(65536):
            body += chunk
            if len(body) > self.max_message_size:
                raise ProtocolError(f"request body exceeds {self.max_message_size} bytes",
                                    ErrorCode.MESSAGE_TOO_LARGE)
        return bytes(body)

    async def http_action(self, request: web.Request) -> web.Response:
        try:
            encoding = cp.parse_encoding(request.headers.get("x-rivet-encoding"))
        except ActorvisorError as err:
            return self._http_error(err, Encoding.JSON)
        try:
            if request.content_length is not None and request.content_length > self.max_message_size:
                raise ProtocolError(f"request body exceeds {self.max_message_size} bytes",
                                    ErrorCode.MESSAGE_TOO_LARGE)
            actor = self.resolve(request.match_info["target"], request.query, request.remote or "")
            body = await self._read_body(request)
            args = cp.decode_http_action_request(body, encoding, self.max_message_size)
            output = await self.manager.call(actor, request.match_info["action"], args)
        except ActorvisorError as err:
            return self._http_error(err, encoding)
        return web.Response(body=cp.encode_http_action_response(output, encoding),
                            content_type=cp.content_type(encoding).split(";")[0])

    # ---- manager API ---------------------------------------------------------------

    @staticmethod
    def _actor_json(actor: Actor) -> dict[str, Any]:
        return {
            "actor_id": actor.id,
            "name": actor.name,
            "key": key_for_manager_api(actor.key),
            "namespace_id": "default",
            "runner_name_selector": "default",
            "create_ts": int(actor.created_at * 1000),
            "crash_policy": "sleep",
        }

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await self._read_body(request)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ProtocolError(f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError("request body must be a JSON object")
        return body

    @staticmethod
    def _name_key(body: Mapping[str, Any]) -> tuple[str, str]:
        name, key = body.get("name"), body.get("key")
        if not isinstance(name, str):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, "field 'name' must be a string")
        if key is None:
            key = "/"
        if not isinstance(key, str):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, "field 'key' must be a string")
        return name, key_from_manager_api(key)

    async def actors_get_or_create(self, request: web.Request) -> web.Response:
        try:
            name, key = self._name_key(await self._json_body(request))
            existed = self.manager.exists(name, key)
            if not existed:
                self.admit_creation(request.remote or "")
            actor = self.manager.get_or_create(name, key)
        except ActorvisorError as err:
            return self._http_error(err, Encoding.JSON)
        return web.json_response({"actor": self._actor_json(actor), "created": not existed})

    async def actors_create(self, request: web.Request) -> web.Response:
        try:
            name, key = self._name_key(await self._json_body(request))
            if self.manager.exists(name, key):
                raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                      f"a {name} actor with key {key[:64]!r} already exists")
            self.admit_creation(request.remote or "")
            actor = self.manager.get_or_create(name, key)
        except ActorvisorError as err:
            return self._http_error(err, Encoding.JSON)
        return web.json_response({"actor": self._actor_json(actor)})

    async def actors_list(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            if ids := query.get("actor_ids"):
                actors = []
                for actor_id in ids.split(","):
                    try:
                        actors.append(self.manager.get_by_id(actor_id))
                    except ActorvisorError:
                        continue
            elif (name := query.get("name")) is not None and "key" in query:
                key = key_from_manager_api(query["key"])
                actors = [self.manager.get_or_create(name, key, create=False)] \
                    if self.manager.exists(name, key) else []
            else:
                name = query.get("name")
                actors = [a for a in self.manager.all() if name is None or a.name == name]
        except ActorvisorError as err:
            return self._http_error(err, Encoding.JSON)
        return web.json_response({"actors": [self._actor_json(a) for a in actors],
                                  "pagination": {"cursor": None}})

    async def actors_destroy(self, request: web.Request) -> web.Response:
        try:
            actor = self.manager.get_by_id(request.match_info["actor_id"])
        except ActorvisorError as err:
            return self._http_error(err, Encoding.JSON)
        await self.manager.destroy(actor)
        return web.json_response({})
