"""Preview URLs: the two actions that mint and expire them, and the `/preview/{token}/` route.

Owns the service's preview secret (loaded on first use from `preview_secret_file`, never
logged), the store of tokens expired early, and the proxy from a browser to a port of a
running VM: plain HTTP streamed both ways, and WebSocket upgrades relayed message by message
(so a dev server's hot reload works). The token is the route's whole authentication
(supervisor/perimeter.py exempts the path from tokens and Origin): it is checked before
anything else, and a forged, altered, expired or revoked one is answered 403 having looked
up no actor, woken no worker and opened no socket. A valid token reaches its actor's VM
only while that VM runs (it never wakes one: a server in a sleeping VM is gone anyway),
through the worker's ingress socket (vmworker/ingress.py), one in-VM bridge per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from protocol.errors import ActorvisorError, ErrorCode
from vmworker.ingress import header, ingress_path

from .actors import Actor, ActorManager, ActorState
from .auth import Auth
from .config import Config
from .preview import (
    MAX_TTL_S,
    REVOKED_FILE,
    Preview,
    PreviewDenied,
    RevokedTokens,
    check_preview_token,
    check_secret_place,
    default_secret_path,
    load_secret,
    mint,
)

log = structlog.get_logger("supervisor.preview")

PREFIX: Final = "/preview/"
DEFAULT_TTL_S: Final = 3600
CONNECT_TIMEOUT_S: Final = 10.0
MAX_WS_MESSAGE: Final = 4 << 20
# Hop-by-hop (RFC 9110 §7.6.1) and what only the service may set: never passed on.
_HOP: Final = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "host"})
_WS_HANDSHAKE: Final = frozenset({"sec-websocket-key", "sec-websocket-version",
                                  "sec-websocket-extensions", "sec-websocket-protocol"})
# A VM's page shares the service's origin: it must not widen a service worker past its path.
_RESPONSE_DROP: Final = _HOP | {"service-worker-allowed", "content-length"}


class VmPortClosed(Exception):
    """Nothing listens on that port in the VM, or the VM went away."""


def _int_arg(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ActorvisorError(ErrorCode.INVALID_ARGS,
                              f"{name} must be an integer from {low} to {high}, got {value!r:.40}")
    return value


async def open_vm_port(path: Path, port: int) -> socket.socket:
    """A connected stream to `port` in the VM whose worker listens at `path` (non-blocking)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.sock_connect(sock, str(path))
            await loop.sock_sendall(sock, header(port))
            answer = await loop.sock_recv(sock, 1)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise VmPortClosed(f"the VM's worker did not answer: {exc}") from None
    if answer != b"+":
        sock.close()
        raise VmPortClosed(f"nothing listens on port {port} in the VM")
    return sock


class _VmPortConnector(aiohttp.UnixConnector):
    """aiohttp's client over `open_vm_port`: one bridged connection per request."""

    def __init__(self, path: Path, port: int) -> None:
        super().__init__(str(path), force_close=True)
        self._port = port

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        sock = await open_vm_port(Path(self.path), self._port)
        _, proto = await self._loop.create_unix_connection(self._factory, sock=sock)
        return proto


class Previews:
    def __init__(self, config: Config, manager: ActorManager, auth: Auth, ingress_dir: Path) -> None:
        self._config = config
        self._manager = manager
        self._auth = auth
        self._ingress_dir = ingress_dir
        self._secret_path = config.preview_secret_file or default_secret_path(config.state_dir)
        check_secret_place(self._secret_path, config.state_dir)
        self._secret: bytes | None = None
        self.revoked = RevokedTokens(config.state_dir / REVOKED_FILE)

    def secret(self) -> bytes:
        if self._secret is None:
            try:
                self._secret = load_secret(self._secret_path)
            except (OSError, ValueError) as exc:
                log.error("preview_secret_unavailable", path=str(self._secret_path), error=str(exc))
                raise ActorvisorError(ErrorCode.INTERNAL, "the service's preview secret is "
                                      "unavailable (see its log; docs/network.md)") from None
        return self._secret

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", PREFIX + "{token}", self.handle),
                web.route("*", PREFIX + "{token}/{tail:.*}", self.handle)]

    # ---- the actions (answered by the supervisor, no worker involved) ---------------

    def create(self, actor: Actor, args: list[Any]) -> dict[str, Any]:
        """createSignedPreviewUrl(port, ttlSeconds?) → {path, token, port, expiresAt (ms)}."""
        if not 1 <= len(args) <= 2:
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  "createSignedPreviewUrl takes (port, ttlSeconds?)")
        port = _int_arg(args[0], "port", 1, 65535)
        ttl = _int_arg(args[1] if len(args) > 1 else DEFAULT_TTL_S, "ttlSeconds", 1, MAX_TTL_S)
        token, preview = mint(self.secret(), actor.id, port, ttl)
        log.info("preview_url_created", actor=actor.id, port=port, expires_at=preview.expires_at)
        return {"path": f"{PREFIX}{token}/", "token": token, "port": port,
                "expiresAt": preview.expires_at * 1000}

    def expire(self, actor: Actor, args: list[Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """expireSignedPreviewUrl(token): 403 for it from now on, also after a restart.
        Refused at once; answered once the revocation is on disk."""
        if len(args) != 1 or not isinstance(args[0], str):
            raise ActorvisorError(ErrorCode.INVALID_ARGS, "expireSignedPreviewUrl takes (token: string)")
        try:
            preview = check_preview_token(self.secret(), args[0])
        except PreviewDenied as exc:
            if str(exc) == "expired":
                return {"expired": True}
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  "not a preview token of this service") from None
        if preview.actor_id != actor.id:
            raise ActorvisorError(ErrorCode.INVALID_ARGS, "this preview token belongs to another actor")
        try:
            saved = self.revoked.add(preview)
        except OverflowError as exc:
            raise ActorvisorError(ErrorCode.OVERLOADED, str(exc)) from None
        return self._expired(actor, preview, saved)

    async def _expired(self, actor: Actor, preview: Preview, saved: Awaitable[None]) -> dict[str, Any]:
        try:
            await saved
        except OSError as exc:
            log.error("preview_revocation_unsaved", actor=actor.id, error=str(exc))
            raise ActorvisorError(ErrorCode.INTERNAL, "the token is refused until the service "
                                  "restarts, but its expiry could not be saved (see the "
                                  "service's log)") from None
        log.info("preview_url_expired", actor=actor.id, port=preview.port)
        return {"expired": True}

    # ---- the route -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        try:
            preview = check_preview_token(self.secret(), token, self.revoked)
        except ActorvisorError as err:
            return web.Response(status=500, text=f"{err.message}\n")
        except PreviewDenied as exc:
            log.info("preview_denied", reason=str(exc))   # never the token
            return web.Response(status=403, text=f"preview URL refused: {exc}\n")
        try:
            actor = self._manager.get_by_id(preview.actor_id)
        except ActorvisorError:
            return web.Response(status=404, text="this preview's actor no longer exists\n")
        if actor.state is not ActorState.READY:
            return web.Response(status=503, text=f"this preview's VM is not running ({actor.state.value}); "
                                "start the server in it again\n")
        actor.idle_since = None   # a preview in use keeps its actor awake, like a connection
        rest = request.raw_path[len(PREFIX) + len(token):]
        if not rest.startswith("/"):
            raise web.HTTPPermanentRedirect(f"{PREFIX}{token}/{rest}")
        url = URL(f"http://localhost:{preview.port}{rest}", encoded=True)
        connector = _VmPortConnector(ingress_path(self._ingress_dir, actor.id), preview.port)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                                         skip_auto_headers=("User-Agent", "Accept-Encoding")) as session:
            try:
                if request.headers.get("Upgrade", "").lower() == "websocket":
                    return await self._websocket(request, session, url, actor, preview)
                return await self._http(request, session, url, actor, token, preview)
            except VmPortClosed as exc:
                return web.Response(status=502, text=f"{exc}\n")
            except aiohttp.WSServerHandshakeError as exc:
                return web.Response(status=exc.status or 502, text=f"the VM's server refused the upgrade: {exc.message}\n")
            except aiohttp.ClientError as exc:
                return web.Response(status=502, text=f"the VM's server failed: {exc}\n")

    def _upstream_headers(self, request: web.Request, token: str, drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _HOP or lower in drop or lower.startswith("x-rivet-"):
                continue
            if lower == "authorization" and self._auth.check(value.partition(" ")[2].strip()):
                continue   # the service's own credential is never the VM's to see
            headers.add(name, value)
        headers["X-Forwarded-Prefix"] = f"{PREFIX}{token}"
        headers["X-Forwarded-Host"] = request.host
        return headers

    async def _http(self, request: web.Request, session: aiohttp.ClientSession, url: URL,
                    actor: Actor, token: str, preview: Preview) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        async with session.request(request.method, url, headers=self._upstream_headers(request, token),
                                   data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _RESPONSE_DROP:
                    response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                actor.idle_since = None
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _websocket(self, request: web.Request, session: aiohttp.ClientSession, url: URL,
                         actor: Actor, preview: Preview) -> web.StreamResponse:
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        token = request.match_info["token"]
        async with session.ws_connect(url, protocols=protocols, max_msg_size=MAX_WS_MESSAGE,
                                      headers=self._upstream_headers(request, token, _WS_HANDSHAKE)) as upstream:
            client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (),
                                           max_msg_size=MAX_WS_MESSAGE)
            await client.prepare(request)
            log.info("preview_websocket_opened", actor=actor.id, port=preview.port)

            async def relay(src: Any, dst: Any) -> None:
                async for msg in src:
                    actor.idle_since = None
                    if msg.type is WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)
                    else:
                        break
                await dst.close(code=src.close_code or 1000)

            tasks = [asyncio.create_task(relay(client, upstream)), asyncio.create_task(relay(upstream, client))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.gather(*tasks, return_exceptions=True)
                await client.close()
            return client
