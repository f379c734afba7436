"""The unmodified npm `rivetkit@2.3.19` client against a real supervisor, in every encoding.

Each test runs one of the Node scripts in `tests/e2e/npm/` (installed by `make test` with
`npm ci` in `tests/`) and asserts on the JSON result line it prints. The scripts use
RivetKit's `ws` peer dependency as their WebSocket (`--no-experimental-websocket`): on
Node 20, Node's own WebSocket fires no close event when a connection attempt fails, so
the client would hang instead of failing. The quickstart also runs on Node's own
WebSocket, which is what RivetKit picks by default on Node 22 and later. Set
ACTORVISOR_NPM_LOG_LEVEL=debug to see the client's own log in a failure's output.

The lock file lists platform packages of other systems that the registry this project
installs from does not serve; `npm ci` wants them listed. After `npm install` in `tests/`,
put back the entries for every optional dependency that is missing from the lock.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, MakeSupervisor, SupervisorProc

NPM_DIR = ROOT / "tests" / "e2e" / "npm"
RIVETKIT = ROOT / "tests" / "node_modules" / "rivetkit" / "package.json"
RESULT_PREFIX = "ACTORVISOR_RESULT "
ENCODINGS = ["bare", "json", "cbor"]
WEBSOCKETS = {"ws": "--no-experimental-websocket", "node": "--experimental-websocket"}
STRESS_CYCLES = 300

QUICKSTART_FILE = "quickstart bytes"


@pytest.fixture(scope="module", autouse=True)
def rivetkit_installed() -> None:
    if not RIVETKIT.exists():
        pytest.fail("the npm client is not installed: run `make test`, or `npm ci` in tests/")
    assert json.loads(RIVETKIT.read_text())["version"] == "2.3.19"


def node_env(url: str) -> dict[str, str]:
    # RIVET_* and LOG_LEVEL would reconfigure the client (endpoint, token, namespace, logs).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIVET") and k != "LOG_LEVEL"}
    env.update(ACTORVISOR_URL=url, RIVET_LOG_LEVEL=os.environ.get("ACTORVISOR_NPM_LOG_LEVEL", "warn"))
    return env


def node_command(script: str, *args: str, websocket: str = "ws") -> list[str]:
    return ["node", WEBSOCKETS[websocket], str(NPM_DIR / script), *args]


def kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def parse_results(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(RESULT_PREFIX):]) for line in stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]


def check_result(result: dict[str, Any], stderr: str) -> dict[str, Any]:
    if "error" in result:
        pytest.fail(f"node script failed: {result['error']}\n{result.get('stack', '')}\n"
                    f"--- stderr ---\n{stderr[-3000:]}")
    return result


def run_node(url: str, script: str, *args: str, timeout: float, websocket: str = "ws") -> dict[str, Any]:
    """Run a script to completion; its last result line, or a failure with its stderr."""
    proc = subprocess.Popen(node_command(script, *args, websocket=websocket), cwd=NPM_DIR,
                            env=node_env(url), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} {' '.join(args)} did not finish within {timeout}s\n"
                    f"--- stdout ---\n{stdout[-2000:]}\n--- stderr ---\n{stderr[-3000:]}")
    finally:
        kill_group(proc)
    results = parse_results(stdout)
    if not results:
        pytest.fail(f"{script} printed no result (exit {proc.returncode})\n"
                    f"--- stdout ---\n{stdout[-2000:]}\n--- stderr ---\n{stderr[-3000:]}")
    return check_result(results[-1], stderr)


class Conversation:
    """A script that prints result lines and reads commands on stdin while it runs.

    A thread moves its stdout lines into a queue, so a wait for the next line has a
    timeout and nothing hides in a read buffer.
    """

    def __init__(self, proc: subprocess.Popen[str], stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.logs: list[str] = []  # the client's own stdout lines, for failure messages
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read_result(self, timeout: float) -> dict[str, Any]:
        """The next result line (a failing script's included), within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no result line from node within {timeout}s\n{self.output()}")
            if line is None:
                pytest.fail(f"node exited (status {self.proc.wait(5)}) before its result\n{self.output()}")
            if line.startswith(RESULT_PREFIX):
                return check_result(json.loads(line[len(RESULT_PREFIX):]), self.output())
            self.logs.append(line)

    def say(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def output(self) -> str:
        stderr = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"--- stdout ---\n{''.join(self.logs)[-4000:]}\n--- stderr ---\n{stderr[-3000:]}"

    def close(self) -> None:
        kill_group(self.proc)
        self._reader.join(10)


@contextmanager
def conversation(url: str, stderr: Path, script: str, *args: str) -> Iterator[Conversation]:
    with stderr.open("w") as err:
        proc = subprocess.Popen(node_command(script, *args), cwd=NPM_DIR, env=node_env(url),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
    talk = Conversation(proc, stderr)
    try:
        yield talk
    finally:
        talk.close()


def update_kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"]["params"]["update"]["sessionUpdate"] for e in events]


def assert_complete(comparison: dict[str, Any]) -> None:
    assert comparison["missing"] == []
    assert comparison["unexpected"] == 0
    assert comparison["mismatched"] == 0
    assert comparison["inOrder"]
    assert comparison["logged"] > 0


# ---- quickstart on one connection ----------------------------------------------------


@pytest.mark.parametrize("websocket", list(WEBSOCKETS))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_quickstart_on_a_connection(supervisor: SupervisorProc, encoding: str, websocket: str) -> None:
    result = run_node(supervisor.url, "quickstart.mjs", encoding, timeout=60, websocket=websocket)
    received, logged = result["received"], result["logged"]

    assert result["reply"]["stopReason"] == "end_turn"
    assert result["reply"]["text"].startswith("You said: hello there\nchunk 1 of 5\n")
    assert "Ran `echo from-the-vm`: exit code 0." in result["reply"]["text"]
    # Every event of the turn arrived once, in order, identical to the session's log.
    assert [e["seq"] for e in received] == [e["seq"] for e in logged]
    assert [e["event"] for e in received] == [e["event"] for e in logged]
    assert_complete(result["comparison"])
    assert result["comparison"]["duplicated"] == 0
    session_id = logged[0]["sessionId"]
    assert all(e["sessionId"] == session_id and isinstance(e["seq"], int) for e in received)
    kinds = update_kinds(received)
    assert kinds[0] == "user_message_chunk"
    assert kinds.count("agent_message_chunk") >= 5
    assert {"agent_thought_chunk", "tool_call", "tool_call_update"} <= set(kinds)
    completed = [e["event"]["params"]["update"] for e in received
                 if e["event"]["params"]["update"].get("status") == "completed"]
    assert len(completed) == 2  # the command and the write
    # Joining the turn's message chunks gives the reply text.
    chunks = [e["event"]["params"]["update"]["content"]["text"] for e in received
              if e["event"]["params"]["update"]["sessionUpdate"] == "agent_message_chunk"]
    assert "".join(chunks) == result["reply"]["text"]
    assert result["file"] == {"isUint8Array": True, "text": QUICKSTART_FILE,
                              "length": len(QUICKSTART_FILE)}


# ---- stateless HTTP handles ----------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_http_handle_actions_and_manager_api(supervisor: SupervisorProc, encoding: str) -> None:
    result = run_node(supervisor.url, "handle.mjs", encoding, timeout=60)

    assert result["reply"]["response"]["result"] == {"stopReason": "end_turn"}  # agentOS's
    assert {k: v for k, v in result["reply"].items() if k != "response"} == {
        "text": "You said: hello handle\nWrote 8 bytes to h.txt.\n", "stopReason": "end_turn"}
    assert result["sessions"] == [{"sessionId": result["sessionId"], "agentType": "local"}]
    seqs = result["eventSeqs"]
    assert seqs and seqs == sorted(set(seqs))
    assert result["files"] == {"binary": {"isUint8Array": True, "bytes": [0, 1, 2, 253, 254, 255]},
                               "written": "via http"}
    assert result["exec"] == {"exitCode": 0, "stdout": "hi from exec", "stderr": ""}
    assert result["health"] == {"phase": "ready", "booted": True, "pidIsNumber": True}
    assert result["exists"] == [True, False]
    ids = result["ids"]
    # resolve() by key, get(), getForId(): one actor.
    assert ids["byGet"] == ids["actorId"] and ids["byIdSessions"] == 1
    # create() with a multi-part key names the same actor as getOrCreate()/get() with it.
    assert ids["viaGet"] == ids["createdId"] and result["viaQuery"] == "created"
    assert ids["emptyKeyGet"] == ids["emptyKeyId"]
    assert len({ids["actorId"], ids["createdId"], ids["emptyKeyId"]}) == 3


# ---- the agentOS quickstart race -----------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_quickstart_race_actions_over_http(supervisor: SupervisorProc, encoding: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """connect() + on("sessionEvent"), then createSession/sendPrompt on the HTTP handle at once."""
    result = run_node(supervisor.url, "race.mjs", encoding, timeout=60)
    comparison = result["comparison"]

    assert result["reply"]["stopReason"] == "end_turn"
    assert_complete(comparison)
    assert comparison["lateAtBarrier"] == 0
    received = {e["seq"]: e for e in result["received"]}
    assert [received[e["seq"]]["event"] for e in result["logged"]] == [e["event"] for e in result["logged"]]
    # A repeat may happen (payloads carry seq, so a client can drop it): count, don't fail.
    with capsys.disabled():
        print(f"\nnpm race [{encoding}]: {comparison['logged']} events logged, "
              f"{comparison['received']} received, {len(comparison['missing'])} missing, "
              f"{comparison['duplicated']} duplicated")


# ---- errors --------------------------------------------------------------------------


def assert_actor_error(outcome: dict[str, Any], group: str, code: str) -> None:
    assert outcome["ok"] is False, outcome
    assert outcome["isActorError"] and outcome["name"] == "RivetError", outcome
    assert (outcome["group"], outcome["code"]) == (group, code), outcome
    assert outcome["message"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_errors_reach_the_client_as_actor_errors(supervisor: SupervisorProc, encoding: str) -> None:
    results = run_node(supervisor.url, "errors.mjs", encoding, timeout=90)["results"]

    for via in ("conn", "http"):
        assert_actor_error(results[f"{via}UnknownAction"], "actor", "unknown_action")
        assert_actor_error(results[f"{via}InvalidArgs"], "actor", "invalid_args")
        assert_actor_error(results[f"{via}MissingSession"], "actor", "session_not_found")
    assert_actor_error(results["httpMissingActorKey"], "actor", "not_found")
    assert_actor_error(results["httpMissingActorId"], "actor", "not_found")
    # Errors never spoil the connection they came on.
    assert results["connStillWorks"] == {"ok": True, "value": []}
    assert results["connStillConnected"] == "connected"
    # A connection to an actor id that does not exist: the upgrade is accepted and closed
    # with reason `actor.not_found`, so the client reports that (not a bare 1006) and stops.
    missing = results["connMissingActorId"]
    assert_actor_error(missing["action"], "actor", "not_found")
    assert missing["status"] == "idle"
    assert {(e["group"], e["code"]) for e in missing["onError"]} == {("actor", "not_found")}
    # An actor kind this service does not host fails at once, over HTTP and a connection.
    assert_actor_error(results["httpUnknownKind"], "actor", "unknown_kind")
    assert_actor_error(results["connUnknownKind"], "actor", "unknown_kind")


# ---- graceful restart ----------------------------------------------------------------

@pytest.mark.parametrize("encoding", ENCODINGS)
def test_graceful_restart_connection_reconnects(make_supervisor: MakeSupervisor,
                                                tmp_state: Path, encoding: str) -> None:
    """A restart as systemd does it with deploy/actorvisor.socket: the listening socket
    outlives the supervisor, so the client's reconnect waits in its backlog instead of
    being refused (the RivetKit client gives up on a refused reconnect: 1006, no reason)."""
    sup = make_supervisor(start=False)
    sup.hold_socket()
    sup.start()
    with conversation(sup.url, tmp_state / "node.stderr", "restart.mjs", encoding) as node:
        ready = node.read_result(timeout=60)
        assert ready["phase"] == "ready" and ready["received"] > 0
        assert sup.stop() == 0, sup.logs()
        sup.start()
        node.say("restarted")
        result = node.read_result(timeout=60)

    # Our graceful shutdown closes with 1001 "ws.going_away": the client reads it as an
    # ActorError ws/going_away, a reason it reconnects on, and starts reconnecting at once.
    errors = [(e["group"], e["code"]) for e in result["errors"]]
    assert errors[0] == ("ws", "going_away")
    assert result["statuses"][:3] == ["connected", "disconnected", "connecting"]
    assert result["outcome"] == "reconnected", result
    assert result["reconnectedConnId"]
    assert result["reply"]["stopReason"] == "end_turn"
    comparison = result["comparison"]
    assert_complete(comparison)
    assert comparison["received"] > result["receivedBefore"]


# ---- stress --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_stress_back_to_back_quickstarts(supervisor: SupervisorProc, encoding: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """300 fresh connections on one warm actor, each acting over HTTP right after connect()."""
    summary = run_node(supervisor.url, "stress.mjs", encoding, str(STRESS_CYCLES), timeout=150)
    with capsys.disabled():
        print(f"\nnpm stress [{encoding}]: {summary['completed']} cycles on one key, "
              f"{summary['logged']} events logged, {summary['received']} received, "
              f"{summary['missing']} missing, {summary['duplicated']} duplicated, "
              f"{summary['lateAtBarrier']} late, {summary['foreign']} of other sessions "
              f"(grace-window backfill), {summary['elapsedMs']} ms")
    assert summary["badCycles"] == []
    assert summary["completed"] == STRESS_CYCLES
    assert summary["missing"] == 0
    assert summary["duplicated"] == 0
    assert summary["unexpected"] == 0 and summary["mismatched"] == 0 and summary["outOfOrder"] == 0
    assert summary["lateAtBarrier"] == 0
    assert summary["received"] == summary["logged"] > 0
