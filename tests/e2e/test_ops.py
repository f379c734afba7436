"""Operations, end to end: systemd notifications, /metrics, `actorvisor top`, and the logs.

Each test starts the real supervisor (and real workers) the way an operator would, and
reads what an operator reads: datagrams on a notify socket the test owns, the Prometheus
text parsed by prometheus_client, the dashboard's JSON and its screen in tmux, stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from protocol.aio import Client
from tests.notify import NotifySocket, pings
from tests.support import ROOT, MakeSupervisor, SupervisorProc, eventually

REQUIRED_FAMILIES = {
    "actorvisor_connections", "actorvisor_actors", "actorvisor_events_relayed",
    "actorvisor_replays", "actorvisor_worker_restarts", "actorvisor_slow_consumer_disconnects",
    "actorvisor_queue_bytes", "actorvisor_action_duration_seconds",
}




async def admin(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/admin/workers") as resp:
        snapshot: dict[str, Any] = await resp.json()
    return snapshot


# ---- systemd -------------------------------------------------------------------------


async def test_notify_ready_before_a_slow_vm_then_status_watchdog_and_stopping(
        make_supervisor: MakeSupervisor, tmp_state: Path) -> None:
    notify = NotifySocket(tmp_state / "notify")
    try:
        sup = make_supervisor("--boot-delay", "8", "--stop-timeout", "5",
                              env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
        got = await notify.until(lambda got: any(m.get("READY") == "1" for m in got))
        assert got[0]["READY"] == "1", got
        assert got[0]["STATUS"].startswith("actors: none; connections: 0"), got

        async with Client(sup.url) as client:
            conn = await client.connect("vm", "slow-boot", reconnect=False)
            health = await conn.call("getRuntimeHealth")  # answered while the VM boots
            assert health["booted"] is False
            # Only the service speaks to systemd: workers do not inherit the socket.
            assert "NOTIFY_SOCKET" not in psutil.Process(health["pid"]).environ()
            await notify.until(lambda got: any("1 booting" in m.get("STATUS", "") for m in got))
            await notify.until(lambda got: any("1 ready" in m.get("STATUS", "") for m in got))
            await conn.close()

        got = notify.received
        first_ready_vm = next(i for i, m in enumerate(got) if "1 ready" in m.get("STATUS", ""))
        ready = next(i for i, m in enumerate(got) if m.get("READY") == "1")
        assert ready < first_ready_vm
        # The 8 s boot (seen booting even on a loaded machine) spans many watchdog
        # periods (0.2 s here): pings kept coming meanwhile.
        assert pings(got[ready:first_ready_vm]) >= 3
        assert any("connections: 1" in m.get("STATUS", "") for m in got)

        mark = len(notify.received)
        assert sup.stop(signal.SIGTERM) == 0, sup.logs()[-2000:]
        notify.drain()
        stopping = [m for m in notify.received[mark:] if m.get("STOPPING") == "1"]
        assert len(stopping) == 1, notify.received[mark:]
        assert stopping[0]["STATUS"].startswith("draining: ")
        assert not any(m.get("READY") for m in notify.received[mark:])
    finally:
        notify.close()


# ---- /metrics ------------------------------------------------------------------------


async def scrape(url: str) -> tuple[set[str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


PROMPT = "hello there\nchunks: 20\nrun: echo metered"


async def test_metrics_parse_and_move_with_traffic(make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--ring-size", "8", "--conn-queue-bytes", "65536")
    families, before = await scrape(sup.url)
    assert REQUIRED_FAMILIES <= families, REQUIRED_FAMILIES - families
    assert value(before, "actorvisor_connections") == 0

    async with Client(sup.url) as client:
        conn = await client.connect("vm", "metered", reconnect=False)
        live: list[dict[str, Any]] = []
        conn.on("sessionEvent", live.append)
        sid = (await conn.call("createSession", "local", {}))["sessionId"]
        assert (await conn.call("sendPrompt", sid, PROMPT))["stopReason"] == "end_turn"
        _, during = await scrape(sup.url)
        assert value(during, "actorvisor_connections") == 1
        assert value(during, "actorvisor_subscriptions") >= 1
        assert value(during, "actorvisor_actors", state="ready") == 1

        # Replays: a cursor older than the 8-event ring is read from SQLite, a recent one from the ring.
        last = live[-1]["seq"]
        from_log: list[dict[str, Any]] = []
        from_ring: list[dict[str, Any]] = []
        late = await client.connect("vm", "metered", reconnect=False)
        late.subscribe("sessionEvent", from_log.append, after=0)
        late.subscribe("vmBooted", from_ring.append, after=last - 2)
        await eventually(lambda: len(from_log) == len(live))

        # A subscriber whose queue overflows (a 100 KB event over a 64 KB limit) is cut off.
        flooded = await client.connect("vm", "flooded", reconnect=False)
        flooded.on("sessionEvent", lambda _: None)
        fsid = (await flooded.call("createSession", "local", {}))["sessionId"]
        await client.action("vm", "flooded", "sendPrompt", fsid, "x" * 100_000)

        # A worker that dies counts as a restart.
        pid = (await conn.call("getRuntimeHealth"))["pid"]
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: _crashed(sup.url, "metered"))
        for c in (conn, late, flooded):
            await c.close()

    _, after = await scrape(sup.url)
    relayed = value(after, "actorvisor_events_relayed_total") - value(before, "actorvisor_events_relayed_total")
    assert relayed >= len(live) + 2  # + vmBooted and the crash's vmShutdown
    assert value(after, "actorvisor_replays_total", source="log") >= 1
    assert value(after, "actorvisor_replays_total", source="ring") >= 1
    assert value(after, "actorvisor_slow_consumer_disconnects_total") >= 1
    assert value(after, "actorvisor_worker_restarts_total", reason="crash") == 1
    assert value(after, "actorvisor_actions_total", action="sendPrompt", outcome="ok") == 2
    assert value(after, "actorvisor_action_duration_seconds_count", action="sendPrompt") == 2
    assert value(after, "actorvisor_action_duration_seconds_bucket", action="sendPrompt", le="+Inf") == 2
    assert value(after, "actorvisor_connections_opened_total") >= 3
    assert value(after, "actorvisor_connections") == 0


async def _crashed(url: str, key: str) -> bool:
    actors = (await admin(url))["actors"]
    return any(a["key"] == key and a["state"] in ("crashed", "stopped") and a["restarts"] for a in actors)


# ---- actorvisor top ------------------------------------------------------------------


async def run_top(url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisor.cli", "top", "--url", url, *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_top_once_json_agrees_with_psutil(supervisor: SupervisorProc) -> None:
    assert supervisor.proc is not None
    async with Client(supervisor.url) as client:
        await client.action("vm", "top-idle", "getRuntimeHealth")
        busy_pid = (await client.action("vm", "top-busy", "getRuntimeHealth"))["pid"]
        running = asyncio.create_task(client.action("vm", "top-busy", "exec", "sleep 60", {}))
        await eventually(lambda: any(
            p.name() == "sleep" for p in psutil.Process(busy_pid).children(recursive=True)))

        snap = json.loads(await run_top(supervisor.url, "--once", "--json", "--interval", "0.5"))
        assert snap["processFigures"] is True
        sup = snap["supervisor"]
        assert sup["pid"] == supervisor.proc.pid
        zygote = psutil.Process(sup["zygotePid"])
        assert zygote.ppid() == supervisor.proc.pid and "supervisor.zygote" in zygote.cmdline()
        assert sup["process"]["createTime"] == psutil.Process(sup["pid"]).create_time()

        by_key = {a["key"]: a for a in snap["actors"]}
        assert set(by_key) == {"top-idle", "top-busy"}
        for key, actor in by_key.items():
            figures = actor["process"]
            proc = psutil.Process(actor["pid"])
            assert figures["pid"] == proc.pid and figures["createTime"] == proc.create_time()
            assert proc.ppid() == zygote.pid, key
            assert figures["vmPids"] == sorted(c.pid for c in proc.children(recursive=True)), key
            assert figures["vmProcesses"] == len(figures["vmPids"])
            assert figures["threads"] == proc.num_threads(), key
            rss = proc.memory_info().rss
            assert 0.5 * rss <= figures["rssBytes"] <= 2 * rss, key
            assert 0 < figures["ussBytes"] <= figures["rssBytes"]
            assert figures["openFiles"] > 0 and figures["cpuPercent"] >= 0
            assert actor["eventsPerSec"] is not None and actor["flags"] == []
        # An idle VM is its bwrap, its init and its egress bridge (docs/network.md); the busy
        # one also runs the command's shell and its sleep.
        assert by_key["top-idle"]["process"]["vmProcesses"] == 3
        assert by_key["top-busy"]["process"]["vmProcesses"] >= 5

        table = await run_top(supervisor.url, "--once", "--sort", "vm", "--interval", "0.2")
        rows = [line for line in table.splitlines() if "top-" in line]
        assert [r.split()[0] for r in rows] == ["top-busy", "top-idle"], table
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_top_flags_a_hung_worker(make_supervisor: MakeSupervisor) -> None:
    sup = make_supervisor("--hang-timeout", "30")
    async with Client(sup.url) as client:
        pid = (await client.action("vm", "frozen", "getRuntimeHealth"))["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            snap = json.loads(await run_top(sup.url, "--once", "--json", "--interval", "0.2"))
            frozen = next(a for a in snap["actors"] if a["key"] == "frozen")
            assert "HUNG" in frozen["flags"] and frozen["process"]["status"] == "stopped"
        finally:
            os.kill(pid, signal.SIGCONT)


async def test_top_live_screen_in_tmux(supervisor: SupervisorProc, tmp_state: Path) -> None:
    tmux = shutil.which("tmux")
    assert tmux, "tmux is needed (make test installs it)"
    sock = f"actorvisor-test-{uuid.uuid4().hex[:8]}"

    def tmux_cmd(*args: str) -> str:
        return subprocess.run([tmux, "-L", sock, *args], check=True, capture_output=True, text=True).stdout

    async with Client(supervisor.url) as client:
        await client.action("vm", "on-screen", "getRuntimeHealth")
    try:
        tmux_cmd("new-session", "-d", "-s", "top", "-x", "180", "-y", "30",
                 f"cd {ROOT} && LANG=C.UTF-8 {sys.executable} -m supervisor.cli top --url {supervisor.url}")

        async def screen_has(text: str) -> str | None:
            screen = tmux_cmd("capture-pane", "-p", "-t", "top")
            return screen if text in screen else None

        screen = await eventually(lambda: screen_has("on-screen"))
        assert "zygote" in screen and "CPU%" in screen and "sort: cpu" in screen
        tmux_cmd("send-keys", "-t", "top", ">")
        await eventually(lambda: screen_has("sort: rss"))
        tmux_cmd("send-keys", "-t", "top", "q")
        await eventually(lambda: subprocess.run(
            [tmux, "-L", sock, "has-session", "-t", "top"], capture_output=True).returncode != 0)
    finally:
        subprocess.run([tmux, "-L", sock, "kill-server"], capture_output=True)


# ---- logs ----------------------------------------------------------------------------


async def test_logs_are_json_lines_with_context_journald_levels_and_no_secrets(
        make_supervisor: MakeSupervisor, tmp_state: Path) -> None:
    secret = f"sk-ant-test-{uuid.uuid4().hex}"
    log_path = tmp_state / "supervisor-0.log"  # where the fixture sends stderr
    log_path.touch()
    st = log_path.stat()
    sup = make_supervisor(env={"ANTHROPIC_API_KEY": secret,
                               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    async with Client(sup.url) as client:
        conn = await client.connect("vm", "logged", reconnect=False)
        sid = (await conn.call("createSession", "local", {"env": {"GITHUB_TOKEN": secret}}))["sessionId"]
        await conn.call("sendPrompt", sid, "hello")
        worker_pid = (await conn.call("getRuntimeHealth"))["pid"]
        await conn.close()
    sup.stop()
    text = sup.logs()
    assert secret not in text
    records = []
    for line in text.splitlines():
        prefix = re.match(r"<(\d)>", line)
        assert prefix, line  # journald's priority prefix, stderr being the journal stream
        record = json.loads(line[prefix.end():])
        assert {"event", "level", "timestamp"} <= record.keys()
        assert int(prefix[1]) == {"debug": 7, "info": 6, "warning": 4, "error": 3}[record["level"]]
        records.append(record)
    events = {r["event"] for r in records}
    assert {"supervisor_listening", "worker_started", "connection_opened", "supervisor_stopped"} <= events
    opened = next(r for r in records if r["event"] == "connection_opened")
    assert opened["conn"] and opened["actor"]
    # The worker's lines reach the same stream, bound with its actor and pid.
    started = next(r for r in records if r["event"] == "worker_started")
    assert started["pid"] == worker_pid and started["actor"] == opened["actor"]


def test_logs_on_a_terminal_are_for_people(tmp_state: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "run", "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_state / "state")],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
        start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while b"supervisor_listening" not in out and time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                continue
            try:
                out += os.read(master, 4096)
            except OSError:  # the supervisor exited and closed the terminal
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        os.close(master)
    text = out.decode(errors="replace")
    assert "supervisor_listening" in text, text
    assert "\x1b[" in text  # colours
    assert not any(line.lstrip().startswith("{") for line in text.splitlines())


# ---- the systemd unit ----------------------------------------------------------------


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify`, silent: it exits 0 even on unknown keys, so warnings count too.

    Verified against a scratch root holding the unit, the distribution's units it refers
    to, and a stand-in for the installed executable (verify checks that it exists).
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (make test installs the systemd package)"
    unit = ROOT / "deploy" / "actorvisor.service"
    exec_start = next(line.split("=", 1)[1].split()[0] for line in unit.read_text().splitlines()
                      if line.startswith("ExecStart="))
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                        if p.is_dir())
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, tmp_path / "etc/systemd/system/actorvisor.service")
    shutil.copy(ROOT / "deploy" / "actorvisor.socket", tmp_path / "etc/systemd/system/actorvisor.socket")
    stand_in = tmp_path / exec_start.lstrip("/")
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}",
                             "/etc/systemd/system/actorvisor.service",
                             "/etc/systemd/system/actorvisor.socket"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result
    for expected in ("Type=notify", "KillMode=mixed", "Restart=on-failure", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                     "RuntimeDirectory=actorvisor", "StateDirectory=actorvisor"):
        assert expected in unit.read_text().splitlines(), expected

