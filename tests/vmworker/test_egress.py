"""The egress proxy with the in-VM bridge, run on the host against local upstreams.

"The internet" is an aiohttp server on 127.0.0.1 the test starts, reachable only when a
rule names 127.0.0.1 explicitly; clients are real ones (urllib with a proxy handler, a
SOCKS5 handshake, raw CONNECT) talking to the real bridge program over TCP.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support import free_port, serve_http
from vmworker import vminit
from vmworker.egress import EgressProxy, Reporter, Verdict
from vmworker.netpolicy import Policy

pytestmark = pytest.mark.asyncio


class Net:
    def __init__(self, upstream_port: int, echo_port: int, proxy_port: int) -> None:
        self.upstream_port = upstream_port
        self.echo_port = echo_port
        self.proxy_port = proxy_port
        self.policy = Policy()
        self.reports: list[dict[str, object]] = []


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    async def page(r: web.Request) -> web.Response:
        return web.Response(text=f"upstream {r.path} host={r.host}")
    runner, upstream_port = await serve_http(page)

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(100))
        await w.drain()
        w.close()
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    n = Net(upstream_port, echo_server.sockets[0].getsockname()[1], free_port())
    proxy = EgressProxy(lambda: n.policy, Reporter(n.reports.append),
                        hosts={"upstream.test": "127.0.0.1", "metadata.test": "169.254.169.254",
                               "other.test": "127.0.0.1"})
    sock = str(tmp_path / "egress.sock")
    await proxy.start_unix(sock)
    bridge = await asyncio.create_subprocess_exec(
        str(vminit.ensure_built(tmp_path / "bin", vminit.BRIDGE_SOURCE)), str(n.proxy_port), sock,
        stdout=asyncio.subprocess.PIPE)
    assert bridge.stdout is not None
    assert await bridge.stdout.readline() == b"ready\n"
    try:
        yield n
    finally:
        bridge.kill()
        await bridge.wait()
        await proxy.close()
        echo_server.close()
        await runner.cleanup()


def _get(n: Net, url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(
        {"http": f"http://127.0.0.1:{n.proxy_port}"}))
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_default_policy_blocks_with_403_and_reports(net: Net) -> None:
    status, body = await asyncio.to_thread(_get, net, f"http://127.0.0.1:{net.upstream_port}/x")
    assert status == 403 and "blocked by network policy" in body
    assert net.reports[-1]["allowed"] is False and net.reports[-1]["rule"] is None


async def test_allowed_upstream_through_http_proxy(net: Net) -> None:
    net.policy = Policy.parse(allow=[f"127.0.0.1:{net.upstream_port}"])
    status, body = await asyncio.to_thread(_get, net, f"http://127.0.0.1:{net.upstream_port}/a?b=1")
    assert status == 200 and body.startswith("upstream /a host=127.0.0.1")
    assert net.reports[-1]["allowed"] is True
    assert net.reports[-1]["rule"] == f"allow 127.0.0.1:{net.upstream_port}"


async def test_allowed_name_resolving_to_internal_addresses_is_refused(net: Net) -> None:
    # DNS-rebinding style: the names are allowed, what they resolve to is not.
    net.policy = Policy.parse(allow=["metadata.test", "upstream.test"])
    for name in ("metadata.test", "upstream.test"):
        status, body = await asyncio.to_thread(_get, net, f"http://{name}:{net.upstream_port}/")
        assert status == 403 and "internal address" in body, body


async def test_host_header_mismatch_reaches_only_the_checked_host(net: Net) -> None:
    net.policy = Policy.parse(allow=[f"127.0.0.1:{net.upstream_port}"])
    r, w = await asyncio.open_connection("127.0.0.1", net.proxy_port)
    w.write(f"GET http://127.0.0.1:{net.upstream_port}/h HTTP/1.1\r\nHost: metadata.test\r\n\r\n".encode())
    reply = await r.read()
    assert b"200 OK" in reply and f"host=127.0.0.1:{net.upstream_port}".encode() in reply
    w.close()
    # CONNECT to a name that is not allowed, whatever Host/SNI the tunnel would carry later.
    r, w = await asyncio.open_connection("127.0.0.1", net.proxy_port)
    w.write(f"CONNECT other.test:{net.upstream_port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert (await r.read()).startswith(b"HTTP/1.1 403")
    w.close()


async def test_connect_tunnel_and_socks5_to_allowed_echo(net: Net) -> None:
    net.policy = Policy.parse(allow=[f"127.0.0.1:{net.echo_port}"])
    r, w = await asyncio.open_connection("127.0.0.1", net.proxy_port)
    w.write(f"CONNECT 127.0.0.1:{net.echo_port} HTTP/1.1\r\n\r\n".encode())
    assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    w.write(b"ping")
    assert await r.read() == b"ping"
    w.close()

    async def socks(port: int) -> tuple[bytes, bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", net.proxy_port)
        w.write(b"\x05\x01\x00")
        assert await r.readexactly(2) == b"\x05\x00"
        w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        reply = await r.readexactly(10)
        w.write(b"raw tcp")
        data = await r.read() if reply[1] == 0 else b""
        w.close()
        return reply, data
    reply, data = await socks(net.echo_port)
    assert reply[1] == 0 and data == b"raw tcp"
    reply, _ = await socks(net.upstream_port)          # not allowed: ruleset refusal (2)
    assert reply[1] == 2


async def test_decisions_are_coalesced(net: Net) -> None:
    sink: list[dict[str, Any]] = []
    report = Reporter(sink.append, every_s=3600)
    for _ in range(500):
        report(Verdict("a.test", 80, False, None, "no rule"))
    report(Verdict("b.test", 80, False, None, "no rule"))
    assert [e["host"] for e in sink] == ["a.test", "b.test"]
    report = Reporter(sink.append, every_s=0)
    report(Verdict("a.test", 80, False, None, "no rule"))
    assert sink[-1]["count"] == 1


async def test_the_hosts_own_addresses_are_refused_unless_named(tmp_path: Path) -> None:
    import ipaddress

    import psutil

    from vmworker.egress import Blocked, interface_addresses

    every = {ipaddress.ip_address(a.address.split("%")[0]) for addrs in psutil.net_if_addrs().values()
             for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}
    assert set(interface_addresses()) == every and ipaddress.ip_address("127.0.0.1") in every
    # A public address of this host (one it is given, here) is as internal as loopback.
    own = ipaddress.ip_address("8.8.4.4")
    policy = Policy.parse(allow=["host.test"])
    proxy = EgressProxy(lambda: policy, lambda v: None, hosts={"host.test": str(own)}, host_addresses=[own])
    with pytest.raises(Blocked, match="resolves to 8.8.4.4, an internal address"):
        await proxy.open("host.test", 80)
    assert not policy.address_allowed(own, 80, [own])
    assert Policy.parse(allow=["8.8.4.4:80"]).address_allowed(own, 80, [own])
    # With no list given, the proxy refuses this host's interface addresses.
    proxy = EgressProxy(lambda: policy, lambda v: None, hosts={"host.test": "127.0.0.1"})
    assert set(proxy._host_addresses()) == every
