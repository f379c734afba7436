"""The `actorvisor` command line against a running service."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT


def cli(sup, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACTORVISOR_LISTEN": f"127.0.0.1:{sup.port}"}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_call_demo_and_events(supervisor):
    out = cli(supervisor, "call", "cli-actor", "exec", '"echo hi from the vm"')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stdout"] == "hi from the vm\n"

    out = cli(supervisor, "call", "cli-actor", "noSuchAction")
    assert out.returncode == 1
    assert "actor.unknown_action" in out.stderr

    out = cli(supervisor, "demo", "--actor", "cli-actor")
    assert out.returncode == 0, out.stderr
    assert "hello from the VM" in out.stdout  # readFile of what the agent wrote
    assert "[turn ended: end_turn]" in out.stdout

    out = cli(supervisor, "events", "cli-actor")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {"vmBooted", "sessionEvent"} <= {e["name"] for e in events}
    out = cli(supervisor, "events", "cli-actor", "--after", str(seqs[-3]))
    assert [json.loads(line)["seq"] for line in out.stdout.splitlines()] == seqs[-2:]
