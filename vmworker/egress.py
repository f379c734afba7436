"""The worker's egress proxy: the VM's only way out (HTTP CONNECT, plain HTTP, SOCKS5).

Owns one listening socket (a Unix socket, to be bound into the VM and bridged to a
loopback port there), the policy check of every connection, name resolution done here
(never by the VM) with the refusal of internal addresses after it, and the byte pumps.
Every decision is reported through `on_decision`, coalesced: the first decision for a
`(host, port, allowed)` is reported at once, repeats within REPORT_EVERY_S are counted
and folded into the next report of that key, so a busy VM cannot flood the actor's log.
It never reads the policy from the VM: `policy()` is the worker's current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import psutil
import structlog

from .netpolicy import IpAddress, Policy, normalize_host

MAX_HEAD_BYTES: Final = 64 * 1024
HEAD_TIMEOUT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 15.0
REPORT_EVERY_S: Final = 10.0
HOST_ADDRESSES_TTL_S: Final = 30.0
_CHUNK: Final = 256 * 1024

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Verdict:
    host: str
    port: int
    allowed: bool
    rule: str | None
    reason: str


class Blocked(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class Reporter:
    """Coalesces decisions per (host, port, allowed) into at most one report per window."""

    def __init__(self, sink: Callable[[dict[str, object]], None], every_s: float = REPORT_EVERY_S) -> None:
        self._sink = sink
        self._every_s = every_s
        self._last: dict[tuple[str, int, bool], float] = {}
        self._held: dict[tuple[str, int, bool], int] = {}

    def __call__(self, v: Verdict) -> None:
        key = (v.host, v.port, v.allowed)
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self._every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        self._sink({"host": v.host, "port": v.port, "allowed": v.allowed, "rule": v.rule,
                    "reason": v.reason, "count": 1 + self._held.pop(key, 0)})


def interface_addresses() -> tuple[IpAddress, ...]:
    """Every address on this host's interfaces (public ones included: a VM must not reach
    the host's own services by its public address either)."""
    found: set[IpAddress] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.ip_address(a.address.split("%")[0]))
    return tuple(sorted(found, key=lambda a: (a.version, int(a))))


class HostAddresses:
    """`interface_addresses()`, re-read at most every HOST_ADDRESSES_TTL_S (an address a
    DHCP lease adds later is refused from then on, without a syscall per connection)."""

    def __init__(self) -> None:
        self._at = float("-inf")
        self._addresses: tuple[IpAddress, ...] = ()

    def __call__(self) -> tuple[IpAddress, ...]:
        if time.monotonic() - self._at >= HOST_ADDRESSES_TTL_S:
            self._addresses, self._at = interface_addresses(), time.monotonic()
        return self._addresses


class EgressProxy:
    def __init__(self, policy: Callable[[], Policy], report: Callable[[Verdict], None], *,
                 hosts: Mapping[str, str] | None = None,
                 host_addresses: Sequence[IpAddress] | None = None) -> None:
        """`host_addresses`: the host's own addresses, refused like internal ones; None
        reads them from this host's interfaces."""
        self._policy = policy
        self._report = report
        self._hosts = {normalize_host(k): v for k, v in (hosts or {}).items()}
        fixed = tuple(host_addresses) if host_addresses is not None else None
        self._host_addresses: Callable[[], Sequence[IpAddress]] = \
            HostAddresses() if fixed is None else (lambda: fixed)
        self._server: asyncio.AbstractServer | None = None

    async def start_unix(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path, limit=MAX_HEAD_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # -- the decision --------------------------------------------------------------------

    async def open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Policy check, resolution here, post-resolution check, connect; raises Blocked."""
        host = normalize_host(host)
        decision = self._policy().decide(host, port)
        if not decision.allowed:
            self._blocked(host, port, decision.rule, decision.reason)
        addrs = await self._resolve(host, port)
        policy = self._policy()
        own = self._host_addresses()
        usable = [a for a in addrs if policy.address_allowed(a, port, own)]
        if not usable:
            self._blocked(host, port, decision.rule,
                          f"{host} resolves to {', '.join(map(str, addrs)) or 'nothing'}, an internal "
                          "address no rule names as an IP literal")
        self._report(Verdict(host, port, True, decision.rule, decision.reason))
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            # Connect to the checked address itself, never to the name again.
            return await asyncio.open_connection(str(usable[0]), port, limit=_CHUNK)

    def _blocked(self, host: str, port: int, rule: str | None, reason: str) -> None:
        verdict = Verdict(host, port, False, rule, reason)
        self._report(verdict)
        raise Blocked(verdict)

    async def _resolve(self, host: str, port: int) -> list[IpAddress]:
        with contextlib.suppress(ValueError):
            return [ipaddress.ip_address(host)]
        if host in self._hosts:
            return [ipaddress.ip_address(self._hosts[host])]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return []
        return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]

    # -- the protocols -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                first = await reader.readexactly(1)
            if first == b"\x05":
                await self._socks5(reader, writer)
            else:
                await self._http(first, reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _http(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            head = first + await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        if method.upper() == "CONNECT":
            host, _, raw_port = target.rpartition(":")
            port = _port(raw_port)
            try:
                up_r, up_w = await self.open(host, port)
            except Blocked as exc:
                return await _refuse(writer, exc.verdict)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return await _pump(reader, writer, up_r, up_w)
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 38\r\n\r\n"
                         b"the proxy takes absolute http:// URLs\n")
            return None
        port = url.port or 80
        try:
            up_r, up_w = await self.open(url.hostname, port)
        except Blocked as exc:
            return await _refuse(writer, exc.verdict)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        # The upstream sees the Host of the URL that was checked, whatever the client sent,
        # and one request per connection (a second one could name another host).
        headers = [h for h in lines[1:] if h and h.split(":", 1)[0].strip().lower()
                   not in {"host", "connection", "proxy-connection", "proxy-authorization", "keep-alive"}]
        netloc = url.hostname if url.port is None else f"{url.hostname}:{port}"
        up_w.write("\r\n".join([f"{method} {path} {version}", f"Host: {netloc}", "Connection: close",
                                *headers, "", ""]).encode("latin-1"))
        await _pump(reader, writer, up_r, up_w)

    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (count,) = await reader.readexactly(1)
        methods = await reader.readexactly(count)
        if 0 not in methods:
            writer.write(b"\x05\xff")
            return
        writer.write(b"\x05\x00")
        ver, cmd, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        elif atyp == 3:
            (length,) = await reader.readexactly(1)
            host = (await reader.readexactly(length)).decode("idna")
        else:
            writer.write(b"\x05\x08\x00\x01" + bytes(6))
            return
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if ver != 5 or cmd != 1:
            writer.write(b"\x05\x07\x00\x01" + bytes(6))   # only CONNECT
            return
        try:
            up_r, up_w = await self.open(host, port)
        except Blocked:
            writer.write(b"\x05\x02\x00\x01" + bytes(6))   # connection not allowed by ruleset
            return
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))
            return
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await _pump(reader, writer, up_r, up_w)


def _port(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"bad port {raw!r:.10}")
    return int(raw)


async def _refuse(writer: asyncio.StreamWriter, v: Verdict) -> None:
    body = f"blocked by network policy: {v.host}:{v.port}: {v.reason}\n".encode()
    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                 b"X-Actorvisor-Blocked: network-policy\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()


async def _pump(c_r: asyncio.StreamReader, c_w: asyncio.StreamWriter,
                u_r: asyncio.StreamReader, u_w: asyncio.StreamWriter) -> None:
    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(_CHUNK):
                dst.write(chunk)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except OSError:
            pass

    try:
        await asyncio.gather(copy(c_r, u_w), copy(u_r, c_w))
    finally:
        u_w.close()
