"""Safe defaults with no configuration, on loopback: a web page the developer visits
cannot drive the service (Origin, content type), DNS rebinding gets nowhere (Host), the
npm client still works, and a non-loopback listen without a token refuses to start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from supervisor.app import LISTEN_BACKLOG
from tests.e2e.test_auth import run_auth
from tests.support import ROOT, SupervisorProc

ACTION = "/gateway/vm/action/getRuntimeHealth?rvt-method=getOrCreate&rvt-key=perim"
CONNECT = "/gateway/vm/connect?rvt-method=getOrCreate&rvt-key=perim"
PROTOCOLS = ["rivet", "rivet_encoding.json"]


async def _post(url: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, data=b'{"args":[]}', headers=headers) as r:
        return r.status


async def _ws_close_reason(url: str, **headers: str) -> str | None:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, protocols=PROTOCOLS, headers=headers) as ws:
            msg = await ws.receive(timeout=10)
            return ws.close_code and msg.extra  # type: ignore[return-value]


def test_browser_and_rebinding_refused(supervisor: SupervisorProc) -> None:
    url = supervisor.url
    evil = {"Origin": "http://evil.example"}
    assert asyncio.run(_post(url + ACTION, **evil, **{"Content-Type": "application/json"})) == 403
    assert asyncio.run(_post(url + ACTION, **{"Content-Type": "text/plain"})) == 415
    assert asyncio.run(_post(url + ACTION, Host="attacker.example",
                             **{"Content-Type": "application/json"})) == 421
    assert asyncio.run(_ws_close_reason(url + CONNECT, **evil)) == "auth.forbidden"
    # None of those reached an actor.
    async def actors() -> list[object]:
        async with aiohttp.ClientSession() as s, s.get(url + "/actors") as r:
            return list((await r.json())["actors"])
    assert asyncio.run(actors()) == []
    # The same action, as a non-browser client sends it, works.
    assert asyncio.run(_post(url + ACTION, **{"Content-Type": "application/json"})) == 200


@pytest.mark.parametrize("encoding", ["bare", "json", "cbor"])
def test_npm_client_works_with_no_configuration(supervisor: SupervisorProc, encoding: str) -> None:
    result = run_auth(supervisor.url, encoding, f"plain-{encoding}", None)
    assert result["http"]["ok"] and result["connected"]["ok"], result


def test_public_listen_without_token_refuses_to_start(tmp_state: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--listen", "0.0.0.0:0",
                           "--state-dir", str(tmp_state / "s")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "ACTORVISOR_AUTH_TOKEN" in proc.stderr and "actorvisor token" in proc.stderr
    assert "--insecure-no-auth" in proc.stderr


def test_the_listen_backlog_holds_a_reconnect_storm(supervisor: SupervisorProc) -> None:
    """5,000 clients cut as slow consumers resumed at once; at aiohttp's default backlog of
    128, 270 were dropped after their handshake and saw the server disconnect. The kernel
    reports a listening socket's backlog as its send queue."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{supervisor.port}"], capture_output=True,
                         text=True, check=True).stdout
    cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(out.split()[2]) == min(LISTEN_BACKLOG, cap)
