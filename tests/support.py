"""What the tests (and the benchmarks) use to run real actorvisor processes.

`SupervisorProc` starts `actorvisor run` in a temp state dir on a free loopback port, as
a process-group leader, and stops it so that nothing of ours is left: the supervisor
leads its own process group and each worker leads another, so teardown kills them by
group, and then removes the cgroups a killed supervisor could not. `eventually` waits for
a condition without a fixed sleep.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from vmworker.cgroups import CgroupRoot
from vmworker.vm import VmSettings

ROOT = Path(__file__).resolve().parent.parent

# `python -c SOCKET_ACTIVATE FD python-args...`: put FD at 3 and exec the supervisor with
# LISTEN_PID/LISTEN_FDS set for itself, as systemd does for a socket-activated service.
SOCKET_ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _die_with_this_process() -> None:
    """In the child: SIGTERM when the test process dies, even if it never reaches teardown
    (killed by a timeout, say); the supervisor then drains and takes its workers along."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


# The parent cgroups made for this process's in-process VMs and harness workers
# (`vm_settings`): removed when the test session ends (tests/conftest.py), once no VM of
# it is left, since nothing in between knows when a state dir is done with.
SESSION_CGROUPS: set[str] = set()


def vm_settings(state_dir: Path, **limits: int | float) -> VmSettings:
    """VM settings completed for this host as the supervisor does, for a worker or an
    in-process VM a test starts. Small disks: each VM made here gets one."""
    settings, missing = VmSettings(**{"disk_mb": 64, **limits}).for_host(state_dir)  # type: ignore[arg-type]
    assert not missing, missing
    if settings.cgroup_root is not None:
        SESSION_CGROUPS.add(settings.cgroup_root)
    return settings


def remove_cgroups(root: CgroupRoot, timeout: float = 5.0) -> None:
    """Remove the VM cgroups left empty under `root`, then its parents. Only rmdir: a
    cgroup that still holds a process (one dying of a kill just sent, for a moment) is
    retried until `timeout`, then left."""
    deadline = time.monotonic() + timeout
    root.remove()
    while any(Path(parent).exists() for _, parent in root.parents) and time.monotonic() < deadline:
        time.sleep(0.05)
        root.remove()


def remove_session_cgroups(roots: set[str] = SESSION_CGROUPS) -> None:
    while roots:
        remove_cgroups(CgroupRoot.from_arg(roots.pop()))


def file_contains(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether `needle` is in the file, reading only its data regions (a VM's disk image
    is a sparse file of gigabytes that holds megabytes)."""
    with open(path, "rb") as f:
        fd, end, offset, tail = f.fileno(), os.fstat(f.fileno()).st_size, 0, b""
        while offset < end:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                return False
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < hole:
                data = os.pread(fd, min(chunk, hole - offset), offset)
                if needle in tail + data:
                    return True
                tail, offset = data[-len(needle):], offset + len(data)
    return False


async def serve_http(handler: Any, path: str = "/{tail:.*}") -> tuple[Any, int]:
    """An aiohttp server on 127.0.0.1 answering GET `path`: (its runner, to clean up; its port)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


# A duration no other process on the machine sleeps for. Commands started inside a VM
# leave the worker's process tree (bwrap forks them in their own PID namespace), so a
# test that checks "nothing was left behind" has to scan the whole process table; this
# token keeps that scan to the sleeps the tests themselves started.
LONG_SLEEP = f"300.{os.getpid()}{int(time.time() * 1000) % 10**6:06d}"


def leftover_sleeps() -> list[psutil.Process]:
    """Processes still running `sleep LONG_SLEEP`, wherever they ended up."""
    return [proc for proc in psutil.process_iter(["cmdline"])
            if (proc.info["cmdline"] or [])[:2] == ["sleep", LONG_SLEEP]]


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
    listen_socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.log_path = self.state_dir.parent / f"supervisor-{len(self.seen_pids)}.log"
        log = self.log_path.open("ab")
        argv = ["-m", "supervisor.cli", "run", "--listen", f"127.0.0.1:{self.port}",
                "--state-dir", str(self.state_dir), "--runtime-dir", str(self.state_dir.parent / "run"),
                *self.args]
        pass_fds: tuple[int, ...] = ()
        if self.listen_socket is not None:
            # systemd socket activation, as the unit's actorvisor.socket does it: the
            # listening socket is ours and outlives each supervisor process.
            fd = self.listen_socket.fileno()
            pass_fds = (fd,)
            argv = ["-c", SOCKET_ACTIVATE, str(fd), *argv]
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=pass_fds, preexec_fn=_die_with_this_process,
        )
        log.close()
        self.seen_pids.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited early:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=0.5) as resp:
                    # Ours, not another test's supervisor that took the same free port.
                    if resp.status == 200 and self._listening():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"supervisor did not serve within {timeout}s:\n{self.logs()}")

    def _listening(self) -> bool:
        assert self.proc is not None
        try:
            return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                       for c in psutil.Process(self.proc.pid).net_connections(kind="tcp"))
        except psutil.Error:
            return False

    def hold_socket(self) -> None:
        """Listen on our port ourselves and hand the socket to every supervisor we start."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.listen_socket = sock

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
                self.proc.wait(30)  # a killed process starved by thousands of exiting ones
        rc = self.proc.returncode
        for pid in tree:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None
        return rc

    def close(self) -> None:
        """The test is done with this state dir: stop the supervisor, let go of the socket,
        and remove its cgroups (the VM cgroups left empty, then the parents), which a
        supervisor killed or timed out never removes itself."""
        self.stop()
        if self.listen_socket is not None:
            self.listen_socket.close()
            self.listen_socket = None
        root = CgroupRoot.locate(self.state_dir)
        if root is not None:
            remove_cgroups(root)


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll `check` (sync, or returning an awaitable) until it gives a truthy value; a
    process that vanishes under a psutil walk only means "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except psutil.NoSuchProcess:  # a process left while the check walked the tree: not yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(interval)


class MakeSupervisor(Protocol):
    """The `make_supervisor` fixture (tests/conftest.py): a supervisor in this test's
    state dir, started unless `start=False`, stopped when the test ends."""

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 start: bool = True) -> SupervisorProc: ...
