"""The one place that starts worker processes.

`Spawner` is an interface so that a zygote (fork from a warm process) or a remote
placement engine can replace the plain subprocess spawner without the actor state
machine noticing. A spawner starts a process and hands back a handle; it never talks
ZeroMQ and never decides *when* a worker should run — `actors.py` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class WorkerSpec:
    actor_id: str
    actor_name: str
    actor_key: str
    endpoint: str
    state_dir: Path
    boot_delay: float
    generation: int
    heartbeat_interval: float
    log_level: str

    def argv(self, python: str) -> list[str]:
        return [
            python, "-m", "vmworker",
            "--actor-id", self.actor_id,
            "--actor-name", self.actor_name,
            "--actor-key", self.actor_key,
            "--endpoint", self.endpoint,
            "--state-dir", str(self.state_dir),
            "--boot-delay", repr(self.boot_delay),
            "--generation", str(self.generation),
            "--heartbeat-interval", repr(self.heartbeat_interval),
            "--log-level", self.log_level,
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


class SubprocessSpawner:
    """Starts each worker as `python -m vmworker`, leader of its own process group."""

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable

    async def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv(self._python),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        return _SubprocessWorker(proc)

    async def close(self) -> None:
        return None
