"""Shared fixtures: a real supervisor process (with real workers) on loopback.

Every process a test starts is reaped and every temp dir removed, even when the test
fails: the supervisor leads its own process group and each worker leads another, so
teardown kills them by group and then checks with psutil that nothing of ours is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass
class SupervisorProc:
    """A running `actorvisor run` in a temp state dir."""

    state_dir: Path
    port: int
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    seen_pids: set[int] = field(default_factory=set)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.log_path = self.state_dir.parent / f"supervisor-{len(self.seen_pids)}.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "run", "--listen", f"127.0.0.1:{self.port}",
             "--state-dir", str(self.state_dir), "--runtime-dir", str(self.state_dir.parent / "run"),
             *self.args],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.seen_pids.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited early:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"supervisor did not listen within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        return [p.pid for p in descendants(self.proc.pid)] if self.proc else []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Stop the supervisor; kill whatever of ours is still around afterwards."""
        if self.proc is None:
            return None
        tree = [self.proc.pid, *self.worker_pids()]
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rc = self.proc.returncode
        for pid in tree:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None
        return rc


@pytest.fixture
def tmp_state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="actorvisor-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_supervisor(tmp_state: Path) -> Iterator[callable]:
    started: list[SupervisorProc] = []

    def make(*args: str, env: dict[str, str] | None = None, start: bool = True) -> SupervisorProc:
        full_env = {**os.environ, "ACTORVISOR_LOG_LEVEL": "info", **(env or {})}
        sup = SupervisorProc(tmp_state / "state", free_port(), list(args), full_env)
        started.append(sup)
        if start:
            sup.start()
        return sup

    try:
        yield make
    finally:
        for sup in started:
            sup.stop()


@pytest.fixture
def supervisor(make_supervisor) -> SupervisorProc:
    return make_supervisor()
