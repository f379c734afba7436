"""The VM: bubblewrap namespaces over the actor's own directories.

Owns the bwrap command line (`bwrap_argv`, the one place it is built), the layout of the
actor's root on the host, and running commands in the VM as asyncio subprocesses in their
own process group, with a timeout and capped output.

Layout. The sandbox's `/` is a fresh read-only tmpfs that bwrap builds for every command;
the actor's persistent directories are bind-mounted read-write onto it:
`<root>/workspace → /workspace`, `<root>/tmp → /tmp`, `<root>/home → /home`. System files
come read-only from the host: `/usr` plus the merged-usr symlinks, a handful of `/etc`
files (ld.so.cache, alternatives, and a generated minimal passwd/group/hosts — never
`/etc/shadow`). Nothing else of the host is mounted: no `/root`, no `/home` of the host,
no other actor. Why not bind `<root>` itself as `/`: bwrap would then create its mount
points (`/usr`, `/etc/passwd`, `/bin`, ...) *inside a directory the VM can write*, so a
VM process could replace one of them with a symlink between two commands and make bwrap
(running as host root) create or mount things at host paths; bwrap 0.8 also refuses to
start a second time because the symlinks it left behind already exist. With a tmpfs `/`
every mount point is bwrap's own.

Isolation: all namespaces unshared (so no network but `lo`), no nested user namespaces,
all capabilities dropped, a new session (no TTY injection), `--die-with-parent`. The environment is cleared and
rebuilt. This module never runs anything on the host outside bwrap and never leaves a
process behind: every command's process group is killed when it ends, times out, or its
caller is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from protocol.errors import ActorvisorError, ErrorCode

from .vmfs import PERSISTENT_DIRS, WORKSPACE

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_OUTPUT_BYTES: Final = 1024 * 1024
MERGED_USR_LINKS: Final = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Host /etc entries programs in the VM need (dynamic linker cache, Debian alternatives
# such as awk/editor, time zone). Only these: the rest of /etc stays invisible.
HOST_ETC: Final = ("ld.so.cache", "alternatives", "localtime", "nsswitch.conf")
GENERATED_ETC: Final = {
    "passwd": "root:x:0:0:root:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost vm\n::1\tlocalhost ip6-localhost ip6-loopback\n",
}
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KILL_GRACE_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str

    def to_wire(self) -> dict[str, object]:
        return {"exitCode": self.exit_code, "stdout": self.stdout, "stderr": self.stderr}


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """Host paths of one actor's VM."""

    root: Path  # <actor dir>/root: holds workspace/, tmp/, home/
    etc: Path   # <actor dir>/sandbox-etc: generated /etc files, never writable by the VM

    @classmethod
    def for_actor(cls, actor_dir: Path) -> SandboxPaths:
        return cls(actor_dir / "root", actor_dir / "sandbox-etc")


def bwrap_argv(
    paths: SandboxPaths,
    command: Sequence[str],
    *,
    cwd: str = WORKSPACE,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The complete bwrap command line for running `command` in the VM."""
    argv = [
        "bwrap",
        "--unshare-all",
        # Explicit (not "try") so a host where it fails refuses to boot rather than
        # silently running the VM without its own user namespace; and no nested user
        # namespaces, which would hand VM processes fresh capabilities to probe the kernel.
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--hostname", "vm",
        "--ro-bind", "/usr", "/usr",
    ]
    for link in MERGED_USR_LINKS:
        if (Path("/") / link).is_symlink():
            argv += ["--symlink", os.readlink(Path("/") / link), f"/{link}"]
        elif (Path("/") / link).is_dir():
            argv += ["--ro-bind", f"/{link}", f"/{link}"]
    for name in HOST_ETC:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in GENERATED_ETC:
        argv += ["--ro-bind", str(paths.etc / name), f"/etc/{name}"]
    for name in PERSISTENT_DIRS:
        argv += ["--bind", str(paths.root / name), f"/{name}"]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        # Last mount step: `/` itself is bwrap's tmpfs; read-only so the VM cannot make
        # files that silently vanish after each command.
        "--remount-ro", "/",
        "--clearenv",
        "--setenv", "PATH", DEFAULT_PATH,
        "--setenv", "HOME", WORKSPACE,
        "--setenv", "LANG", "C.UTF-8",
    ]
    for key, value in (env or {}).items():
        argv += ["--setenv", key, value]
    argv += ["--chdir", cwd, "--", *command]
    return argv


def prepare(paths: SandboxPaths) -> None:
    """Create the actor's VM directories and generated /etc files (idempotent)."""
    if shutil.which("bwrap") is None:
        raise RuntimeError("bubblewrap (bwrap) is not installed; run `make sandbox-deps`")
    paths.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name in PERSISTENT_DIRS:
        target = paths.root / name
        # The VM cannot reach <root> itself, so these entries are ours; still refuse to
        # mount anything that is not a plain directory.
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise RuntimeError(f"{target} is not a directory")
        target.mkdir(mode=0o755, exist_ok=True)
    (paths.root / "tmp").chmod(0o1777)
    paths.etc.mkdir(mode=0o755, exist_ok=True)
    for name, content in GENERATED_ETC.items():
        (paths.etc / name).write_text(content)


def validate_env(env: object, *, what: str) -> dict[str, str]:
    if not isinstance(env, dict):
        raise ActorvisorError(ErrorCode.INVALID_ARGS, f"{what} must be an object of strings")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  f"{what}: {key!r:.80} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise ActorvisorError(ErrorCode.INVALID_ARGS,
                                  f"{what}.{key} must be a string without NUL bytes")
    return dict(env)


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> str:
    kept = bytearray()
    dropped = 0
    # Keep draining past the cap: a child blocked on a full pipe would never exit.
    while chunk := await stream.read(65536):
        room = limit - len(kept)
        kept += chunk[:room]
        dropped += max(0, len(chunk) - room)
    text = kept.decode("utf-8", "replace")
    if dropped:
        text += f"\n[output truncated: {dropped} more bytes not shown]"
    return text


class Sandbox:
    """Runs commands in one actor's VM and tracks them so none outlives the worker."""

    def __init__(self, paths: SandboxPaths) -> None:
        self.paths = paths
        self._running: set[asyncio.subprocess.Process] = set()

    async def run(
        self,
        command: Sequence[str],
        *,
        cwd: str = WORKSPACE,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        output_limit: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
            *bwrap_argv(self.paths, command, cwd=cwd, env=env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Own session and process group: killpg reaches bwrap and everything it
            # started, and a signal meant for the worker's group never reaches the VM.
            start_new_session=True,
        ))
        try:
            # asyncio's own clean-up of a spawn cancelled half-way only kills bwrap,
            # which can orphan the sandbox it is cloning (and can hang): finish the
            # spawn, then kill it our way.
            proc = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            proc = await spawn
            self._kill(proc)
            await self._reap(proc)
            raise
        self._running.add(proc)
        assert proc.stdout is not None and proc.stderr is not None
        reading = asyncio.gather(
            _read_capped(proc.stdout, output_limit), _read_capped(proc.stderr, output_limit)
        )
        # Cancelled on the error paths below; nobody needs its exception then.
        reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    # shield: on timeout we still want the output read so far.
                    stdout, stderr = await asyncio.shield(reading)
                    code = await proc.wait()
            except TimeoutError:
                self._kill(proc)
                stdout, stderr = await reading
                raise ActorvisorError(
                    ErrorCode.ACTION_TIMEOUT,
                    f"command timed out after {timeout_s:g} s; it and every process it "
                    "started were killed",
                    {"stdout": stdout, "stderr": stderr},
                ) from None
        finally:
            if proc.returncode is None:
                self._kill(proc)
                reading.cancel()
                await asyncio.shield(self._reap(proc))
            self._running.discard(proc)
        # A negative code means bwrap itself died from a signal: report it the shell way.
        return ExecResult(code if code >= 0 else 128 - code, stdout, stderr)

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        """Kill bwrap and the sandbox it made, however early in its start-up.

        bwrap leads our process group, but the sandbox's init runs in a session of its
        own and is only tied to bwrap by --die-with-parent, which it sets a moment after
        it is cloned. So: freeze bwrap (it can clone nothing more), kill every
        descendant it has (killing the namespace's init makes the kernel kill the rest
        of the namespace), then bwrap itself.
        """
        try:
            os.killpg(proc.pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    @staticmethod
    async def _reap(proc: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(proc.wait(), _KILL_GRACE_S)
        except TimeoutError:
            pass

    async def kill_all(self) -> None:
        """Kill every running command and wait for it (shutdown path)."""
        procs = list(self._running)
        for proc in procs:
            self._kill(proc)
        await asyncio.gather(*(self._reap(p) for p in procs))
