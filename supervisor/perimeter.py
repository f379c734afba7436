"""The perimeter: what every request must pass before any route runs.

One aiohttp middleware checks, in order: the `Host` header names this service (no DNS
rebinding), a browser's `Origin` is allowlisted on actions and WebSocket upgrades, an
HTTP action has a JSON/CBOR/octet-stream body (no CORS-simple `text/plain`), and, with
tokens configured, the caller's token, role and key prefixes. `/preview/` passes after the
`Host` check alone: its signed token is its credential (supervisor/previewproxy.py). A
refusal happens here, before any actor is resolved or worker started; it never logs the token.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import structlog
from aiohttp import WSCloseCode, web

from protocol import client as cp
from protocol.client import Encoding
from protocol.errors import ActorvisorError, ErrorCode

from .auth import Auth, Grant, Role
from .config import Config

log = structlog.get_logger("supervisor.perimeter")

OPEN_PATHS = frozenset({"/healthz", "/metadata"})
PREVIEW_PREFIX = "/preview/"   # authenticated by its own token (supervisor/previewproxy.py)
ACTION_TYPES = frozenset({"application/json", "application/cbor", "application/octet-stream"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def presented_token(request: web.Request) -> str | None:
    """The token as the RivetKit client sends it, wherever it put it."""
    if token := request.headers.get("x-rivet-token"):
        return token
    if token := request.query.get("rvt-token"):
        return token
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(cp.WS_PROTOCOL_TOKEN):
            return unquote(proto[len(cp.WS_PROTOCOL_TOKEN):])
    return None


def _params(request: web.Request) -> Any:
    if raw := request.headers.get("x-rivet-conn-params"):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    try:
        return cp.parse_ws_subprotocols([p for p in protocols if p])[1]
    except ActorvisorError:
        return None


def host_name(host: str) -> str:
    """`Host` without its port: `example.com:80` → `example.com`, `[::1]:80` → `[::1]`."""
    if host.startswith("["):
        return host[:host.find("]") + 1].lower() if "]" in host else host.lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class Perimeter:
    def __init__(self, config: Config, auth: Auth) -> None:
        self.config = config
        self.auth = auth
        self.refused: dict[str, int] = {}

    def allowed_hosts(self) -> set[str]:
        """Names a request's `Host` may carry. The port is not compared: DNS rebinding
        is a foreign *name* resolving here, and a port-forward or local proxy in front
        of the service (another port, the same loopback name) is still this service."""
        names = {self.config.host, "localhost", "127.0.0.1", "[::1]", *self.config.allowed_hosts}
        if self.config.host in ("0.0.0.0", "::"):
            names.discard(self.config.host)
        return {n.lower() for n in names}

    def _refuse(self, request: web.Request, code: ErrorCode, message: str,
                status: int) -> web.StreamResponse:
        self.refused[code.value] = self.refused.get(code.value, 0) + 1
        err = ActorvisorError(code, message)
        encoding = Encoding.JSON
        try:
            encoding = cp.parse_encoding(request.headers.get("x-rivet-encoding"))
        except ActorvisorError:
            pass
        return web.Response(status=status, body=cp.encode_http_error(err, encoding),
                            content_type=cp.content_type(encoding).split(";")[0])

    async def _refuse_ws(self, request: web.Request, code: ErrorCode) -> web.StreamResponse:
        # The RivetKit client reads a refusal only from a close reason (`group.code`).
        self.refused[code.value] = self.refused.get(code.value, 0) + 1
        ws = web.WebSocketResponse(protocols=("rivet",))
        await ws.prepare(request)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=code.value.encode())
        return ws

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        is_ws = path.startswith("/gateway/") and path.endswith("/connect")
        is_action = path.startswith("/gateway/") and "/action/" in path
        host = request.headers.get("Host", "")
        if host_name(host) not in self.allowed_hosts():
            return self._refuse(request, ErrorCode.FORBIDDEN,
                                f"Host {host[:64]!r} is not this service's name; add it to "
                                "allowed_hosts", 421)
        if path.startswith(PREVIEW_PREFIX):
            # A preview URL is a bearer capability: its signed token is the credential and
            # the page it serves may call itself from its own origin (docs/network.md).
            return await handler(request)
        origin = request.headers.get("Origin")
        if origin is not None and (is_ws or is_action or request.method != "GET") \
                and origin not in self.config.allowed_origins:
            if is_ws:
                return await self._refuse_ws(request, ErrorCode.FORBIDDEN)
            return self._refuse(request, ErrorCode.FORBIDDEN,
                                f"Origin {origin[:64]!r} is not in allowed_origins", 403)
        if is_action:
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype not in ACTION_TYPES:
                return self._refuse(request, ErrorCode.INVALID_ARGS,
                                    "an action needs Content-Type application/json, "
                                    "application/cbor or application/octet-stream", 415)
        if path in OPEN_PATHS or (path == "/metrics" and self.config.metrics_public):
            return await handler(request)
        if not self.auth.enabled:
            return await handler(request)
        grant = self.auth.check(presented_token(request))
        if grant is None or not self._permits(grant, request, path):
            if is_ws:
                return await self._refuse_ws(request, ErrorCode.FORBIDDEN)
            return self._refuse(request, ErrorCode.FORBIDDEN,
                                "a valid token with access to this is required", 403)
        return await handler(request)

    def _permits(self, grant: Grant, request: web.Request, path: str) -> bool:
        if path.startswith("/admin/") or path == "/metrics" or request.method == "DELETE":
            return grant.role is Role.ADMIN
        if path.startswith("/gateway/"):
            if grant.prefixes:
                if request.query.get("rvt-method") is None:
                    return False  # by actor id: its key is unknown before resolving
                if not grant.reaches(request.query.get("rvt-key", "")):
                    return False
            if self.auth.on_before_connect is not None:
                try:
                    return bool(self.auth.on_before_connect(grant, _params(request)))
                except Exception:  # a hook that raises refuses; its error is not the caller's
                    log.warning("auth_hook_failed", exc_info=True)
                    return False
            return True
        if path == "/actors" and grant.prefixes:
            return grant.role is Role.ADMIN
        return True
