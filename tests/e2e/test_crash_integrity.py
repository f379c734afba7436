"""Crash integrity: `kill -9` in the middle of a burst skips nothing, doubles nothing, and
never leaves two workers on one actor or a worker run without its `vmShutdown`.

Smaller than the issue's figures to stay bounded in `make test`: bursts of 1,000 events
at 2,000 events/s (half a second each; the kill lands in the middle), five rounds each.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from protocol.aio import Client
from protocol.errors import ActorvisorError, ErrorCode
from supervisor.actors import actor_id_for
from tests.e2e.test_npm_client import conversation
from tests.support import MakeSupervisor, SupervisorProc, eventually
from vmworker.actorlock import LOCK_NAME

ROUNDS = 5
# Long enough that the kill, once a subscriber has 300 of its events, lands inside it
# even when that subscriber lags behind a loaded machine.
BURST = "chunks: 3000 at 2000/s"


async def live_pid(client: Client, key: str) -> int:
    """The actor's worker pid, once a worker answers: an action sent between a kill -9
    and the supervisor reaping that worker fails with actor.worker_crashed, as documented
    ("the next action starts it again")."""
    for _ in range(100):
        try:
            return int((await client.action("vm", key, "getRuntimeHealth"))["pid"])
        except ActorvisorError as err:
            if err.code is not ErrorCode.WORKER_CRASHED:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("no worker answered after 100 tries")


def logged(db: Path) -> list[tuple[int, str]]:
    """(seq, name) of every event in an actor's log, read-only."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        return list(conn.execute("SELECT seq, name FROM events ORDER BY seq"))
    finally:
        conn.close()


async def session_seqs(client: Client, key: str, session_id: str) -> list[int]:
    seqs: list[int] = []
    after = 0
    while page := await client.action("vm", key, "getSessionEvents", session_id,
                                      {"after": after, "limit": 10000}):
        seqs.extend(e["seq"] for e in page)
        after = page[-1]["seq"]
    return seqs


def exactly_once(received: list[int], logged: list[int]) -> list[int]:
    """What is wrong with a live subscriber's seqs: every logged seq between the first
    and the last it received must be there exactly once, in order (empty: nothing)."""
    assert received, "nothing received"
    span = [seq for seq in logged if received[0] <= seq <= received[-1]]
    return [] if received == span else sorted(set(span) ^ set(received)) or received


async def test_worker_kill_9_during_bursts_skips_and_doubles_nothing(
        supervisor: SupervisorProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "worker-kill-9"
    async with Client(supervisor.url) as client:
        sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
        await client.action("vm", key, "sendPrompt", sid, "chunks: 20")
        monkeypatch.setenv("ACTORVISOR_KEY", key)
        monkeypatch.setenv("ACTORVISOR_CURSOR", "5")  # resumes from an early cursor
        with conversation(supervisor.url, tmp_path / "node.err", "crash.mjs", "cbor") as node:
            assert node.read_result(60)["phase"] == "ready"
            conn = await client.connect("vm", key)
            python: list[int] = []
            conn.on("sessionEvent", lambda p: python.append(p["seq"]))
            for _ in range(ROUNDS):
                worker = await live_pid(client, key)
                start = len(python)
                turn = asyncio.create_task(client.action("vm", key, "sendPrompt", sid, BURST))
                await eventually(lambda start=start: len(python) > start + 300, 30)  # type: ignore[misc]
                os.kill(worker, signal.SIGKILL)
                try:
                    await turn
                except Exception:
                    pass  # the turn dies with its worker; what it committed must reach everyone
            # Live again after the last crash, and a barrier for the Python connection.
            await client.action("vm", key, "sendPrompt", sid, "chunks: 10")
            logged = await session_seqs(client, key, sid)
            await eventually(lambda: python and python[-1] >= logged[-1], 30)
            await conn.close()
            node.say("done")
            result = node.read_result(60)
    print(f"\n{len(logged)} logged; received live: python {len(python)}, npm {len(result['plain'])}, "
          f"npm with cursor {len(result['cursorLive'])}; python repeats dropped {conn.repeats}")
    assert len(logged) > ROUNDS * 300
    for name, received in (("python", python), ("npm", result["plain"]),
                           ("npm with cursor", result["cursorLive"])):
        assert exactly_once(received, logged) == [], name
    # Resumed from its cursor: the log from there on, whole (its live stream may also have
    # brought a few earlier events, through the implicit cursor).
    assert [seq for seq in result["cursorMerged"] if seq > 5] == [seq for seq in logged if seq > 5]
    assert conn.repeats == 0


def ends_in_logs(sup: SupervisorProc) -> str:
    """The lines of every supervisor's log (its workers' included) about a worker's end."""
    words = ("worker_exited", "worker_stopping", "supervisor_lost", "supervisor_gone",
             "actor_locked_by_another_worker", "previous_run_closed")
    return "\n".join(line for path in sorted(sup.state_dir.parent.glob("supervisor-*.log"))
                     for line in path.read_text(errors="replace").splitlines()
                     if any(word in line for word in words))


def runs(names: list[str]) -> list[str]:
    return [n for n in names if n in ("vmBooted", "vmShutdown")]


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit


class Holders:
    """Samples, in a thread, who holds an actor's worker lock (/proc/locks) and which
    process groups other than our supervisors' have its event log open; records the most of
    each ever seen at once."""

    def __init__(self, actor_dir: Path, supervisors: set[int]) -> None:
        self.lock = actor_dir / LOCK_NAME
        self.db = actor_dir / "events.db"
        self.supervisors = supervisors
        self.max_lock_holders = 0
        self.lock_holders_seen: set[int] = set()
        self.max_writers: dict[int, list[str]] = {}
        self.writers_seen: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _lock_holders(self) -> set[int]:
        try:
            st = os.stat(self.lock)
        except FileNotFoundError:
            return set()
        file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        holders = set()
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                # "N: FLOCK ADVISORY WRITE pid maj:min:inode start end"; a waiter has "->".
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
                    holders.add(int(fields[4]))
        return holders

    def _has_open(self, pid: str) -> bool:
        """The process runs user code and has the log open. A process in its exit (the
        kernel's PF_EXITING flag, /proc/PID/stat field 9) runs none: its fds close one by
        one in fd order, the worker lock's (opened first) before the log's, so under load
        its successor can take the lock and open the log while the dying one's table
        still lists it. It can write nothing more, so it is no second writer."""
        target = str(self.db)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                flags = int(fh.read().rsplit(")", 1)[1].split()[6])
            if flags & PF_EXITING:
                return False
            with os.scandir(f"/proc/{pid}/fd") as fds:
                return any(os.readlink(fd.path) == target for fd in fds)
        except OSError:
            return False

    def _openers(self) -> dict[int, list[str]]:
        """The process groups with the log open at once: a worker leads its own (a child
        it forks shares its fds until it execs, and counts as its parent's even when it
        starts a session of its own).

        One walk of /proc is not a snapshot: a worker that exits early in it and its
        successor found later were never open together. So the pids found are looked at
        again: one seen open in both walks was open all the time between (a worker opens
        its log once), and two such were open together."""
        found = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()
                 and int(entry.name) not in (*self.supervisors, os.getpid()) and self._has_open(entry.name)]
        groups: dict[int, list[str]] = {}
        for pid in found:
            if self._has_open(pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")[:80]
                    with open(f"/proc/{pid}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    # A child the worker forks into a new session (the sandbox's bwrap:
                    # start_new_session) shares its fds until it execs: its parent's.
                    leader = int(pid) if str(ppid) not in found else ppid
                    groups.setdefault(os.getpgid(leader), []).append(f"{pid} (parent {ppid}): {cmdline}")
                except OSError:
                    continue
        return groups

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            holders = self._lock_holders()
            self.lock_holders_seen |= holders
            self.max_lock_holders = max(self.max_lock_holders, len(holders))
            writers = self._openers()
            self.writers_seen |= set(writers)
            if len(writers) > len(self.max_writers):
                self.max_writers = writers
            self.samples += 1

    @contextmanager
    def sampling(self) -> Iterator[Holders]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


async def test_supervisor_kill_9_and_quick_restart_during_bursts(
        make_supervisor: MakeSupervisor) -> None:
    sup: SupervisorProc = make_supervisor()
    key = "supervisor-kill-9"
    actor_dir = sup.state_dir / "actors" / actor_id_for("vm", key)
    db = actor_dir / "events.db"
    workers: set[int] = set()
    try:
        async with Client(sup.url) as client:
            sid = (await client.action("vm", key, "createSession", "local", {}))["sessionId"]
            holders = Holders(actor_dir, sup.seen_pids)
            with holders.sampling():
                for _ in range(ROUNDS):
                    worker = (await client.action("vm", key, "getRuntimeHealth"))["pid"]
                    workers.add(worker)
                    before = len(logged(db))
                    turn = asyncio.create_task(client.action("vm", key, "sendPrompt", sid, BURST))
                    await eventually(lambda before=before: len(logged(db)) > before + 300, 30)  # type: ignore[misc]
                    assert sup.proc is not None
                    sup.proc.send_signal(signal.SIGKILL)
                    sup.proc.wait(5)
                    sup.proc = None
                    sup.start()  # its process is started at once; start() waits for it to serve
                    try:
                        await turn
                    except Exception:
                        pass  # the turn died with its worker's supervisor
                # The last restart's worker, booted, so the previous run is closed; then a clean stop.
                await client.action("vm", key, "exists", "/workspace")
        sup.stop()
    except ActorvisorError as exc:
        raise AssertionError(f"{exc}; workers' ends:\n{ends_in_logs(sup)}") from exc
    finally:
        for pid in workers:  # each led its process group; none may outlive the test
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    logs = "".join(path.read_text(errors="replace")
                   for path in sorted(sup.state_dir.parent.glob("supervisor-*.log")))
    names = [name for _, name in logged(db)]
    print(f"\n{holders.samples} samples, lock holders at once <= {holders.max_lock_holders}, "
          f"log writers at once {sorted(holders.max_writers)}, writers seen {len(holders.writers_seen)}, "
          f"{len(names)} events, runs {runs(names).count('vmBooted')}")
    assert "worker_message_from_unknown" not in logs
    # The sampler saw workers come and go (a short-lived one may fall between samples).
    assert holders.samples > 50 and len(holders.writers_seen) >= 2 and len(holders.lock_holders_seen) >= 2
    assert holders.max_lock_holders <= 1
    assert len(holders.max_writers) <= 1, f"two workers had the log open at once: {holders.max_writers}"
    # Every worker run that ended has its vmShutdown, exactly one.
    assert runs(names) == ["vmBooted", "vmShutdown"] * (ROUNDS + 1), runs(names)
