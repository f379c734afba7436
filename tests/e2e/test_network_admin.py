"""One actor's egress policy set by an admin, applied to its running VM, seen by pip in it.

"The internet" is a PEP 503 simple index on the host's 127.0.0.1 serving one tiny wheel
built here. pip in the VM reaches it through the proxy variables only once an admin's
policy allows it (`PUT /admin/actors/{id}/network`, no restart); a client token cannot set
a policy, and no action can.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from protocol.aio import Client
from protocol.errors import ActorvisorError
from supervisor.actors import actor_id_for
from tests.support import ROOT, serve_http

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containment needs the service's root")

ADMIN, CLIENT = "admin-token-for-tests", "client-token-for-tests"
WHEEL_NAME = "tinypkg-0.1-py3-none-any.whl"


def tiny_wheel() -> bytes:
    files = {
        "tinypkg/__init__.py": "VALUE = 1\n",
        "tinypkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "tinypkg-0.1.dist-info/RECORD,,\n"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, text in {**files, "tinypkg-0.1.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return out.getvalue()


@pytest.fixture
async def index() -> AsyncIterator[int]:
    wheel = tiny_wheel()
    digest = hashlib.sha256(wheel).hexdigest()

    async def simple(r: web.Request) -> web.StreamResponse:
        if r.path == "/simple/tinypkg/":
            return web.Response(text=f'<a href="/files/{WHEEL_NAME}#sha256={digest}">{WHEEL_NAME}</a>',
                                content_type="text/html")
        if r.path == f"/files/{WHEEL_NAME}":
            return web.Response(body=wheel, content_type="application/octet-stream")
        return web.Response(status=404)
    runner, port = await serve_http(simple)
    try:
        yield port
    finally:
        await runner.cleanup()


def pip_download(port: int) -> str:
    # NO_PROXY names loopback for servers in the VM; the host's index goes through the proxy.
    return (f"NO_PROXY= no_proxy= python3 -m pip download --no-deps --no-cache-dir --retries 0 "
            f"--timeout 10 --disable-pip-version-check -d /workspace/dl "
            f"--index-url http://127.0.0.1:{port}/simple/ tinypkg 2>&1")


async def decisions(client: Client, port: int) -> list[bool]:
    """The proxy's logged decisions about the index (coalesced: one per verdict here)."""
    page = await client.action("vm", "pip", "replayEvents", {"after": 0, "names": ["networkRequest"]})
    return [e["args"][0]["allowed"] for e in page["events"] if e["args"][0]["port"] == port]


def cli_network(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "network", *args, "--url", url],
                          cwd=ROOT, env={**os.environ, "ACTORVISOR_AUTH_TOKEN": ADMIN},
                          capture_output=True, text=True, timeout=30)


async def test_admin_sets_one_actors_policy_live_and_pip_follows(make_supervisor: Any, tmp_path: Path,
                                                                  index: int) -> None:
    conf = tmp_path / "auth.toml"
    conf.write_text(f'[[tokens]]\ntoken = "{ADMIN}"\nrole = "admin"\n\n'
                    f'[[tokens]]\ntoken = "{CLIENT}"\nrole = "client"\n')
    sup = make_supervisor("--config", str(conf))
    route = f"{sup.url}/admin/actors/{actor_id_for('vm', 'pip')}/network"
    rule = f"127.0.0.1:{index}"
    async with Client(sup.url, token=CLIENT) as client, aiohttp.ClientSession() as http:
        blocked = await client.action("vm", "pip", "exec", pip_download(index))
        assert blocked["exitCode"] != 0 and "No matching distribution" in blocked["stdout"], blocked
        assert await decisions(client, index) == [False]

        # A client cannot widen its own policy: not through the admin route, not by an action.
        for token in (CLIENT, None):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.put(route, json={"allow": [rule]}, headers=headers) as r:
                assert r.status == 403
        with pytest.raises(ActorvisorError, match="has no action 'setNetworkPolicy'"):
            await client.action("vm", "pip", "setNetworkPolicy", {"allow": [rule]})

        admin = {"Authorization": f"Bearer {ADMIN}"}
        for body, message in (
            (b"{", "network policy: Expecting property name"),
            (b'{"allow": "x.com"}', "network policy: policy.allow must be a list of rule strings"),
            (b'{"allow": ["a..b"]}', "network policy: rule 'a..b': 'a..b' is not a host name"),
            (b'{"deny": ["x.com:70000"]}', "network policy: rule 'x.com:70000': port must be an "
                                           "integer from 1 to 65535, got '70000'"),
            (b'{"allow": [], "widen": []}', "network policy: a network policy is an object"),
        ):
            async with http.put(route, data=body, headers=admin) as r:
                reply = await r.json()
                assert (r.status, reply["code"]) == (400, "invalid_args") and \
                    reply["message"].startswith(message), reply
        async with http.put(route.replace(actor_id_for("vm", "pip"), "0" * 24), json={}, headers=admin) as r:
            assert r.status == 404
        assert await client.action("vm", "pip", "getNetworkPolicy") == {"allow": [], "deny": []}

        async with http.put(route, json={"allow": [rule]}, headers=admin) as r:
            assert (r.status, await r.json()) == (200, {
                "actorId": actor_id_for("vm", "pip"), "source": "actor",
                "policy": {"allow": [rule], "deny": []}, "applies": "now"})
        assert await client.action("vm", "pip", "getNetworkPolicy") == {"allow": [rule], "deny": []}
        done = await client.action("vm", "pip", "exec", pip_download(index))
        assert done["exitCode"] == 0 and f"Saved ./dl/{WHEEL_NAME}" in done["stdout"], done
        assert await client.action("vm", "pip", "readdir", "/workspace/dl") == [WHEEL_NAME]
        assert await decisions(client, index) == [False, True]

    shown = cli_network(sup.url, "pip")
    assert shown.returncode == 0 and f'"{rule}"' in shown.stdout and '"source": "actor"' in shown.stdout
    denied = cli_network(sup.url, "pip", "--allow", rule, "--deny", "bad..rule")
    assert denied.returncode == 1 and "rule 'bad..rule'" in denied.stderr
    reset = cli_network(sup.url, "pip", "--reset")
    assert reset.returncode == 0 and '"source": "default"' in reset.stdout
    async with Client(sup.url, token=CLIENT) as client:
        assert await client.action("vm", "pip", "getNetworkPolicy") == {"allow": [], "deny": []}
