"""One actor's VM as the rest of the worker sees it: boot state plus async access.

Owns the VM's phase (booting → ready | failed), the boot itself, and the async facade
over `vmfs` (run in threads) and `sandbox` (subprocesses) that actions and agents share,
so both apply the same path rules, limits and defaults. It never decides what is sent to
the supervisor: the caller turns a finished boot into `vmBooted` and a phase message.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import WorkerPhase

from . import sandbox
from .sandbox import ExecResult, Sandbox, SandboxPaths
from .vmfs import WORKSPACE, VmFs, VmPath, normalize

DEFAULT_EXEC_TIMEOUT_S: Final = 60.0


class Vm:
    def __init__(self, actor_dir: Path, boot_delay_s: float) -> None:
        self.paths = SandboxPaths.for_actor(actor_dir)
        self.fs = VmFs(self.paths.root)
        self.sandbox = Sandbox(self.paths)
        self.phase = WorkerPhase.BOOTING
        self.booted = False
        self.boot_error: str | None = None
        self._boot_delay_s = boot_delay_s
        self._settled = asyncio.Event()

    async def boot(self) -> int:
        """Prepare the root, wait the configured delay, prove the sandbox runs a command.

        Returns the boot time in ms; raises with a readable reason on failure, after
        which every VM action fails with `actor.failed`."""
        started = time.monotonic()
        try:
            await asyncio.to_thread(sandbox.prepare, self.paths)
            # Emulates a slow VM image; the worker answers health checks meanwhile.
            await asyncio.sleep(self._boot_delay_s)
            probe = await self.sandbox.run(["true"], timeout_s=30.0)
            if probe.exit_code != 0:
                raise RuntimeError(
                    f"sandbox self-test failed (exit {probe.exit_code}): {probe.stderr.strip()[:500]}"
                )
        except Exception as exc:
            self.boot_error = str(exc) or type(exc).__name__
            self.phase = WorkerPhase.FAILED
            self._settled.set()
            raise
        self.booted = True
        self.phase = WorkerPhase.READY
        self._settled.set()
        return round((time.monotonic() - started) * 1000)

    async def wait_ready(self) -> None:
        await self._settled.wait()
        if self.boot_error is not None:
            raise ActorvisorError(ErrorCode.FAILED, f"the VM failed to boot: {self.boot_error}")

    async def read_file(self, path: VmPath) -> bytes:
        return await asyncio.to_thread(self.fs.read_file, path)

    async def write_file(self, path: VmPath, data: bytes) -> None:
        await asyncio.to_thread(self.fs.write_file, path, data)

    async def readdir(self, path: VmPath) -> list[str]:
        return await asyncio.to_thread(self.fs.readdir, path)

    async def stat(self, path: VmPath) -> dict[str, Any]:
        return await asyncio.to_thread(self.fs.stat, path)

    async def exists(self, path: VmPath) -> bool:
        return await asyncio.to_thread(self.fs.exists, path)

    async def mkdir(self, path: VmPath, *, recursive: bool) -> None:
        await asyncio.to_thread(self.fs.mkdir, path, recursive=recursive)

    async def delete(self, path: VmPath, *, recursive: bool) -> None:
        await asyncio.to_thread(self.fs.delete, path, recursive=recursive)

    async def exec(
        self,
        command: str,
        *,
        cwd: VmPath | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = DEFAULT_EXEC_TIMEOUT_S,
    ) -> ExecResult:
        """`/bin/sh -c command` in the VM; cwd defaults to /workspace and must exist."""
        target = cwd or normalize(WORKSPACE)
        await self._require_dir(target)
        return await self.sandbox.run(
            ["/bin/sh", "-c", command], cwd=str(target), env=env, timeout_s=timeout_s
        )

    async def _require_dir(self, path: VmPath) -> None:
        info = await asyncio.to_thread(self.fs.stat, path)
        if not info["isDirectory"]:
            raise ActorvisorError(ErrorCode.NOT_A_DIRECTORY, f"cwd {path}: not a directory")
