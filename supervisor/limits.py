"""Limits that hold under abuse: connection caps, the header-read timeout, actor creations
per client, and accept errors logged once per interval (the fd limit: supervisor.fdlimit).

`ConnectionLimiter` wraps the aiohttp server's connection bookkeeping: a connection over
the total or per-address cap is answered `503` with `Retry-After` and closed before any
request is parsed; a connection that has not sent a whole request head within
`header_timeout` is closed. It never reads a byte itself and never awaits.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("supervisor.limits")

REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nContent-Length: 72\r\n\r\n"
           b'{"group":"actor","code":"overloaded","message":"too many connections"} \n')


class ConnectionLimiter:
    def __init__(self, max_connections: int, max_per_address: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.header_timeout = header_timeout
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refused = 0
        self.timed_out = 0
        # Each open connection's address and its header-timeout timer, cancelled when it
        # closes: a pending timer would keep a closed connection's handler, transport and
        # buffers alive for the whole timeout (thousands of them under connection churn,
        # each one walked by every full garbage collection).
        self._admitted: dict[Any, tuple[str, asyncio.TimerHandle]] = {}

    def install(self, server: web.Server) -> None:
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else ""
            if self.open >= self.max_connections or \
                    self.by_address.get(address, 0) >= self.max_per_address:
                self.refused += 1
                transport.write(REFUSAL)
                made(handler, transport)
                # Closed once aiohttp's handler is set up (its start task is scheduled
                # next), so it winds down as after any closed connection, quietly.
                asyncio.get_running_loop().call_soon(handler.force_close)
                return
            self.open += 1
            self.by_address[address] = self.by_address.get(address, 0) + 1
            self._admitted[handler] = (address, asyncio.get_running_loop().call_later(
                self.header_timeout, self._check_head, handler, transport))
            made(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            admitted = self._admitted.pop(handler, None)
            if admitted is not None:
                address, timer = admitted
                timer.cancel()
                self.open -= 1
                left = self.by_address[address] - 1
                if left:
                    self.by_address[address] = left
                else:
                    del self.by_address[address]
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]

    def _check_head(self, handler: Any, transport: asyncio.Transport) -> None:
        # A whole request head counts a request as soon as it is parsed (`data_received`
        # counts it; the current request is set only when the handler's task runs, a pass
        # later). The loop runs I/O callbacks before due timers, so a head that arrived
        # while the loop stalled past the deadline is counted here, not timed out
        # (tests/supervisor/test_limits.py).
        if handler in self._admitted and handler._current_request is None \
                and handler._request_count == 0 and not transport.is_closing():
            self.timed_out += 1
            transport.close()


class CreationRate:
    """Actor creations per client address in a sliding minute: each address may create
    `per_minute` new actors, then is refused until its oldest creation is a minute old.

    Memory is bounded: at most `max_addresses` addresses are tracked, the least recently
    seen forgotten first (a forgotten address starts afresh, which only errs on allowing)."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, max_addresses: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self._seen: dict[str, deque[float]] = {}

    def take(self, address: str, now: float | None = None) -> float:
        """Count one creation for `address`; 0.0 if allowed, else seconds until it would be."""
        now = time.monotonic() if now is None else now
        times = self._seen.pop(address, None) or deque()
        while times and now - times[0] >= self.WINDOW_S:
            times.popleft()
        self._seen[address] = times  # most recently seen last
        if len(times) >= self.per_minute:
            return self.WINDOW_S - (now - times[0])
        times.append(now)
        while len(self._seen) > self.max_addresses:
            del self._seen[next(iter(self._seen))]
        return 0.0


class AcceptErrorLog:
    """An event-loop exception handler that logs a flood (EMFILE on accept) once per
    interval with a count, and everything else as before."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.count = 0
        self.total = 0
        self._last = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            log.error("accept_failed", error=str(context.get("exception")), count=self.count,
                      interval_s=self.interval)
            self.count = 0
            self._last = now
