"""Tokens against the real supervisor and the unmodified npm client: refused before any
worker starts, `auth.forbidden` as the client surfaces it, roles and key prefixes."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from supervisor.auth import new_token
from tests.e2e.test_npm_client import ENCODINGS, NPM_DIR, kill_group, node_command, node_env, parse_results
from tests.support import MakeSupervisor, SupervisorProc

ADMIN, ADMIN_HASH = new_token()
CLIENT = "client-token-plain"
SCOPED = "scoped-token"


def run_auth(url: str, encoding: str, key: str, token: str | None) -> dict[str, Any]:
    env = node_env(url)
    if token:
        env["ACTORVISOR_TOKEN"] = token
    proc = subprocess.Popen(node_command("auth.mjs", encoding, key), cwd=NPM_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    results = parse_results(stdout)
    assert results and "error" not in results[-1], (stdout[-2000:], stderr[-2000:])
    return results[-1]


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def guarded(make_supervisor: MakeSupervisor, tmp_state: Path) -> SupervisorProc:
    config = tmp_state / "auth.toml"
    config.write_text(f'''
[[tokens]]
hash = "{ADMIN_HASH}"
role = "admin"
[[tokens]]
token = "{CLIENT}"
role = "client"
[[tokens]]
token = "{SCOPED}"
role = "client"
prefixes = ["team-a"]
''')
    return make_supervisor("--config", str(config))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_npm_client_without_token_is_forbidden_and_starts_no_worker(guarded: SupervisorProc,
                                                                    encoding: str) -> None:
    result = run_auth(guarded.url, encoding, f"nope-{encoding}", None)
    for part in ("http", "connected"):
        assert result[part]["ok"] is False, result
        assert result[part]["isActorError"] is True, result
        assert (result[part]["group"], result[part]["code"]) == ("auth", "forbidden"), result
    # Refused before resolving: no actor record, so no worker either.
    status, body = http(f"{guarded.url}/admin/workers", token=ADMIN)
    assert status == 200 and json.loads(body)["actors"] == []
    assert ADMIN not in guarded.logs() and CLIENT not in guarded.logs()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_npm_client_with_token_works(guarded: SupervisorProc, encoding: str) -> None:
    result = run_auth(guarded.url, encoding, f"ok-{encoding}", CLIENT)
    assert result["http"]["ok"] and result["connected"]["ok"], result


def test_roles_and_prefixes(guarded: SupervisorProc) -> None:
    assert http(f"{guarded.url}/admin/workers", token=CLIENT)[0] == 403
    assert http(f"{guarded.url}/admin/workers")[0] == 403
    assert http(f"{guarded.url}/actors/some-id", "DELETE", token=CLIENT)[0] == 403
    assert http(f"{guarded.url}/metrics", token=CLIENT)[0] == 403
    assert http(f"{guarded.url}/metrics", token=ADMIN)[0] == 200
    assert http(f"{guarded.url}/healthz")[0] == 200 and http(f"{guarded.url}/metadata")[0] == 200
    assert http(f"{guarded.url}/actors")[0] == 403
    other = run_auth(guarded.url, "json", "team-b-x", SCOPED)
    assert other["http"]["code"] == "forbidden" and other["connected"]["code"] == "forbidden"
    own = run_auth(guarded.url, "json", "team-a-x", SCOPED)
    assert own["http"]["ok"] and own["connected"]["ok"], own


def test_public_metrics(make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--metrics-public", env={"ACTORVISOR_AUTH_TOKEN": "t0ken-env"})
    assert http(f"{sup.url}/metrics")[0] == 200
    assert http(f"{sup.url}/admin/workers")[0] == 403
    assert http(f"{sup.url}/admin/workers", token="t0ken-env")[0] == 200
