"""The one place that starts worker processes.

`Spawner` is an interface so that a zygote (fork from a warm process) or a remote
placement engine can replace the plain subprocess spawner without the actor state
machine noticing. A spawner starts a process and hands back a handle; it never talks
ZeroMQ and never decides *when* a worker should run — `actors.py` does.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

ROOT = Path(__file__).resolve().parent.parent

_LIMITS = {
    "memory_mb": (resource.RLIMIT_AS, 1024 * 1024),
    "open_files": (resource.RLIMIT_NOFILE, 1),
}


def apply_limits(limits: dict[str, int]) -> None:
    """Set a worker's own resource limits; runs in the worker before its main starts.

    The VM's processes inherit them, so a runaway command fails inside its own actor.
    """
    for name, value in limits.items():
        which, unit = _LIMITS[name]
        soft = value * unit
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))


@dataclass(frozen=True)
class WorkerSpec:
    actor_id: str
    actor_name: str
    actor_key: str
    endpoint: str
    state_dir: Path
    boot_delay: float
    generation: int
    log_level: str
    limits: dict[str, int] = field(default_factory=dict)
    vm_settings: str = ""   # vmworker.vm.VmSettings.to_arg()
    permission_policy: str = "ask"
    supervisor_pid: int | None = None   # the worker leaves when this process is gone

    def worker_args(self) -> list[str]:
        """Arguments of `python -m vmworker`, whichever way the process is made."""
        return [
            "--actor-id", self.actor_id,
            "--actor-name", self.actor_name,
            "--actor-key", self.actor_key,
            "--endpoint", self.endpoint,
            "--state-dir", str(self.state_dir),
            "--boot-delay", repr(self.boot_delay),
            "--generation", str(self.generation),
            "--log-level", self.log_level,
            *(["--supervisor-pid", str(self.supervisor_pid)] if self.supervisor_pid else []),
            *(["--vm-settings", self.vm_settings] if self.vm_settings else []),
            "--permission-policy", self.permission_policy,
        ]


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int: ...

    async def wait(self) -> int:
        """Wait for the process to exit; returns its exit status (negative: signal)."""
        ...

    def signal_group(self, sig: signal.Signals) -> None:
        """Send a signal to the worker's whole process group (it leads its own)."""
        ...


class Spawner(Protocol):
    async def spawn(self, spec: WorkerSpec) -> WorkerProcess: ...

    async def close(self) -> None: ...


class _SubprocessWorker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def wait(self) -> int:
        return await self._proc.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        if self._proc.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass


# Called with the pid of each process a spawner starts that will run workers, before it
# runs any: the supervisor moves it into the workers' cgroup (vmworker/cgroups.py).
Place = Callable[[int], None]

log = structlog.get_logger("supervisor.spawner")


async def place_process(place: Place | None, pid: int) -> None:
    """Run `place` off the event loop (a cgroup move can wait for the kernel's cgroup
    locks); a process it could not move still runs, only without its CPU weight."""
    if place is None:
        return
    try:
        await asyncio.to_thread(place, pid)
    except OSError as exc:
        log.warning("worker_cgroup_move_failed", pid=pid, error=str(exc))


class SubprocessSpawner:
    """Starts each worker as `python -m vmworker`, leader of its own process group."""

    def __init__(self, python: str | None = None, place: Place | None = None) -> None:
        self._python = python or sys.executable
        self._place = place

    async def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        limits = dict(spec.limits)
        proc = await asyncio.create_subprocess_exec(
            self._python, "-m", "vmworker", *spec.worker_args(),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(ROOT),
            preexec_fn=(lambda: apply_limits(limits)) if limits else None,
        )
        await place_process(self._place, proc.pid)
        return _SubprocessWorker(proc)

    async def close(self) -> None:
        return None
