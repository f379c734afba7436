"""Into the VM's ports through the real service: vmFetch, preview URLs (HTTP and WebSocket).

A server started in the VM with `spawn` is reached with `vmFetch`, and through a signed
preview URL by an aiohttp client and by the npm `ws` package (a stdlib WebSocket echo server
in the VM: python there has only the standard library). Tokens that are forged, rebound to
another actor, expired by their owner (also across a restart) or past their TTL get 403.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from protocol.aio import Client
from protocol.errors import ActorvisorError
from supervisor.actors import actor_id_for
from tests.support import ROOT, eventually

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containment needs the service's root")

WS_ECHO = r'''
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def frame(op, data):
    n = len(data)
    size = bytes([n]) if n < 126 else (b"\x7e" + struct.pack("!H", n) if n < 65536 else b"\x7f" + struct.pack("!Q", n))
    return bytes([0x80 | op]) + size + data

def serve(conn):
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        f = conn.makefile("rb")
        while True:
            two = f.read(2)
            if len(two) < 2:
                return
            op, n = two[0] & 0x0F, two[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", f.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", f.read(8))[0]
            mask = f.read(4) if two[1] & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(f.read(n)))
            if op == 8:
                conn.sendall(frame(8, data[:2]))
                return
            conn.sendall(frame(10 if op == 9 else op, data))

server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
'''

WS_CLIENT = """
const WebSocket = require('ws');
const ws = new WebSocket(process.argv.at(-1));
const say = (o) => { console.log(JSON.stringify(o)); process.exit(0); };
ws.on('open', () => ws.send('hello preview'));
ws.on('message', (data) => say({echo: data.toString()}));
ws.on('unexpected-response', (req, res) => say({status: res.statusCode}));
ws.on('error', (err) => say({error: String(err)}));
"""


async def node_ws(url: str) -> dict[str, Any]:
    """The npm `ws` package's view of a WebSocket URL: the echo, or the refusal's status."""
    proc = await asyncio.create_subprocess_exec("node", "-e", WS_CLIENT, url, cwd=ROOT / "tests",
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def secret_config(tmp_path: Path) -> str:
    conf = tmp_path / "preview.toml"
    conf.write_text(f'preview_secret_file = "{tmp_path / "keys" / "preview-secret"}"\n')
    return str(conf)


async def fetch_when_up(client: Client, key: str, port: int) -> Any:
    async def attempt() -> Any:
        try:
            return await client.action("vm", key, "vmFetch", port, "/")
        except ActorvisorError:
            return None
    return await eventually(attempt, timeout=30, interval=0.2)


async def test_preview_urls_reach_a_vm_server_and_nothing_else(make_supervisor: Any, tmp_path: Path) -> None:
    sup = make_supervisor("--config", secret_config(tmp_path))
    async with Client(sup.url) as client, aiohttp.ClientSession() as http:
        await client.action("vm", "a", "writeFile", "/workspace/hello.txt", b"hi from the vm")
        await client.action("vm", "a", "writeFile", "/workspace/ws_echo.py", WS_ECHO.encode())
        await client.action("vm", "a", "spawn", "sh", ["-c", "cd /workspace && exec python3 -m http.server 8000"])
        await client.action("vm", "a", "spawn", "python3", ["/workspace/ws_echo.py", "8001"])
        listing = await fetch_when_up(client, "a", 8000)
        assert listing["status"] == 200 and b"hello.txt" in listing["body"], listing

        made = await client.action("vm", "a", "createSignedPreviewUrl", 8000, 60)
        assert made["port"] == 8000 and made["path"] == f"/preview/{made['token']}/"
        assert made["expiresAt"] / 1000 == pytest.approx(time.time() + 60, abs=5)
        async with http.get(sup.url + made["path"]) as r:
            assert r.status == 200 and "hello.txt" in await r.text()
        async with http.get(sup.url + made["path"] + "hello.txt") as r:
            assert (r.status, await r.text()) == (200, "hi from the vm")
            assert r.headers["Server"].startswith("SimpleHTTP/")
        async with http.post(sup.url + made["path"] + "x?y=1", data=b"a body") as r:
            assert r.status == 501 and "Unsupported method ('POST')" in await r.text()

        ws = await client.action("vm", "a", "createSignedPreviewUrl", 8001, 60)
        ws_url = sup.url.replace("http://", "ws://") + ws["path"]
        assert await node_ws(ws_url) == {"echo": "hello preview"}

        # The worker's ingress socket: the supervisor's alone, and it takes a port, nothing else.
        ingress = sup.state_dir.parent / "run" / "ingress" / f"{actor_id_for('vm', 'a')}.sock"
        assert stat.S_IMODE(ingress.stat().st_mode) == 0o600
        for header, answer in ((b"99999\n", b"-"), (b"00000\n", b"-"), (b"8000 \n", b"-"),
                               (b"08001\n", b"+")):
            reader, w = await asyncio.open_unix_connection(str(ingress))
            w.write(header)
            assert await reader.read(1) == answer, header
            w.close()

        # Forged or rebound to another actor: 403, and actor b is not even looked at.
        token = made["token"]
        forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        rebound = token.replace(actor_id_for("vm", "a"), actor_id_for("vm", "b"))
        for bad in (forged, rebound, "v1.nothing", "x" * 5000):
            async with http.get(f"{sup.url}/preview/{bad}/") as r:
                assert r.status == 403, bad
        workers = await (await http.get(sup.url + "/admin/workers")).json()
        assert [a["key"] for a in workers["actors"]] == ["a"]

        # Actor b's own preview of the same port reaches b's VM, where nothing listens.
        await client.action("vm", "b", "exec", "true")
        other = await client.action("vm", "b", "createSignedPreviewUrl", 8000, 60)
        async with http.get(sup.url + other["path"]) as r:
            assert r.status == 502 and "nothing listens on port 8000" in await r.text()

        # Expired by its owner (only its own actor may), then past its TTL.
        with pytest.raises(ActorvisorError, match="belongs to another actor"):
            await client.action("vm", "b", "expireSignedPreviewUrl", token)
        assert await client.action("vm", "a", "expireSignedPreviewUrl", token) == {"expired": True}
        async with http.get(sup.url + made["path"]) as r:
            assert r.status == 403
        await client.action("vm", "a", "expireSignedPreviewUrl", ws["token"])
        assert await node_ws(ws_url) == {"status": 403}
        short = await client.action("vm", "a", "createSignedPreviewUrl", 8000, 1)
        await asyncio.sleep(max(0.0, short["expiresAt"] / 1000 - time.time()) + 0.1)
        async with http.get(sup.url + short["path"]) as r:
            assert r.status == 403
        still = await client.action("vm", "a", "createSignedPreviewUrl", 8000, 600)

    # After a restart: expired stays expired; a live token is still signed right (its VM,
    # and the server in it, are gone: 503, not 403).
    sup.stop()
    sup.start()
    async with aiohttp.ClientSession() as http:
        async with http.get(sup.url + made["path"]) as r:
            assert r.status == 403
        async with http.get(sup.url + still["path"]) as r:
            assert r.status == 503


BAD_CREATES: list[tuple[list[Any], str]] = [
    ([0, 60], "port must be an integer from 1 to 65535, got 0"),
    ([65536, 60], "port must be an integer from 1 to 65535, got 65536"),
    (["8000", 60], "port must be an integer from 1 to 65535, got '8000'"),
    ([True, 60], "port must be an integer from 1 to 65535, got True"),
    ([8000, 0], "ttlSeconds must be an integer from 1 to 604800, got 0"),
    ([8000, 1.5], "ttlSeconds must be an integer from 1 to 604800, got 1.5"),
    ([8000, 10**9], "ttlSeconds must be an integer from 1 to 604800, got 1000000000"),
    ([8000, "60"], "ttlSeconds must be an integer from 1 to 604800, got '60'"),
    ([], "createSignedPreviewUrl takes (port, ttlSeconds?)"),
    ([1, 2, 3], "createSignedPreviewUrl takes (port, ttlSeconds?)"),
]


async def test_bad_preview_requests_are_refused_precisely(make_supervisor: Any, tmp_path: Path) -> None:
    sup = make_supervisor("--config", secret_config(tmp_path))
    async with Client(sup.url) as client:
        for args, message in BAD_CREATES:
            with pytest.raises(ActorvisorError) as err:
                await client.action("vm", "bad", "createSignedPreviewUrl", *args)
            assert (err.value.code.value, err.value.message) == ("actor.invalid_args", message)
        for token, message in (("v1.junk", "not a preview token of this service"),
                               (42, "expireSignedPreviewUrl takes (token: string)")):
            with pytest.raises(ActorvisorError) as err:
                await client.action("vm", "bad", "expireSignedPreviewUrl", token)
            assert (err.value.code.value, err.value.message) == ("actor.invalid_args", message)
        made = await client.action("vm", "bad", "createSignedPreviewUrl", 8000)
        assert made["expiresAt"] / 1000 == pytest.approx(time.time() + 3600, abs=5)
        # None of it needed, or woke, the actor's worker.
        async with aiohttp.ClientSession() as http:
            workers = await (await http.get(sup.url + "/admin/workers")).json()
        assert [(a["key"], a["pid"]) for a in workers["actors"]] == [("bad", None)]
