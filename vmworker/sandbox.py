"""The VM machine: one long-lived bubblewrap sandbox per actor, with `vminit` as its PID 1.

Owns the bwrap command line (`bwrap_argv`, the one place it is built), starting the
sandbox, the control channel to its init, and running commands in it. Every command,
tool and process of the VM is started by that init — inside the VM's namespaces, cgroup
and seccomp filter, which it inherits — never by a second sandbox: one `exec` sees and
reaches what an earlier one left running, and everything dies with the VM.

How the sandbox is built. bwrap runs as the VM's unprivileged host identity (never as
host root), unshares every namespace, maps that identity to uid 0 inside, drops every
capability, forbids further user namespaces, loads the seccomp filter and execs the
init as PID 1 (`--as-pid-1`: bwrap itself stays outside, so nothing of it — its argv,
its environment — is visible from the VM). The VM's `/` is a read-only tmpfs of bwrap's;
system files come read-only from the host (`/usr`, the merged-usr links, a few `/etc`
files; generated `/etc/passwd`, `group`, `hosts`; never `/etc/shadow`); `/workspace`,
`/tmp` and `/home` are bound from the actor's disk by open directory fds, so no host path
appears in the VM's mount table. `/proc` is the VM's own (its `/proc/sys` read-only),
`/sys` is absent, `/dev` holds the basic devices and a small `/dev/shm`. bwrap waits on
`--block-fd` until the worker has moved the init into the VM's cgroup. The init and
every command start from an empty environment plus what the VM is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import os
import re
import signal
import socket
import struct
import termios
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from protocol.errors import ActorvisorError, ErrorCode

from . import initproto, syscall_filter
from .initproto import Op
from .vmfs import PERSISTENT_DIRS, WORKSPACE

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The VM's way out: the worker's egress proxy (egress.py) through the in-VM bridge
# (vminit/netbridge.c) on this loopback port; one port serves HTTP, CONNECT and SOCKS5.
PROXY_PORT: Final = 3128
EGRESS_DIR: Final = "/run/egress"            # the worker's proxy socket, bound in
EGRESS_SOCKET: Final = f"{EGRESS_DIR}/egress.sock"
BRIDGE_PATH: Final = "/run/netbridge"
_PROXY_URL: Final = f"http://127.0.0.1:{PROXY_PORT}"
PROXY_ENV: Final = {
    key: value
    for name, value in (("HTTP_PROXY", _PROXY_URL), ("HTTPS_PROXY", _PROXY_URL),
                        ("ALL_PROXY", f"socks5h://127.0.0.1:{PROXY_PORT}"),
                        ("NO_PROXY", "localhost,127.0.0.1,::1"))
    for key in (name, name.lower())
}
BASE_ENV: Final = {"PATH": DEFAULT_PATH, "HOME": WORKSPACE, "LANG": "C.UTF-8", **PROXY_ENV}
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
INIT_PATH: Final = "/init"
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
START_TIMEOUT_S: Final = 30.0
EXIT_DRAIN_S: Final = 0.1   # after a command exits, wait this long for its pipes to close
_READ_CHUNK: Final = 65536

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str

    def to_wire(self) -> dict[str, object]:
        return {"exitCode": self.exit_code, "stdout": self.stdout, "stderr": self.stderr}


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """What a VM is made of; every field is decided by `vm.py`."""

    root: Path              # holds workspace/, tmp/, home/ (the mounted disk)
    init_binary: Path
    uid: int | None         # run bwrap as this host uid/gid (None: as ourselves)
    gid: int | None
    shm_mb: int
    egress_dir: Path | None = None   # holds the worker's proxy socket; None: no way out
    bridge_binary: Path | None = None  # vminit/netbridge.c built; needed with egress_dir


class VmGone(ActorvisorError):
    def __init__(self, detail: str = "the VM has stopped") -> None:
        super().__init__(ErrorCode.STOPPED, detail)


def exit_code(wait_status: int) -> int:
    """A wait status the shell way: the exit code, or 128 + the signal that ended it."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def bwrap_argv(spec: MachineSpec, fds: Mapping[str, int]) -> list[str]:
    """The complete bwrap command line of a VM; `fds` names the inherited descriptors."""
    argv = [
        "bwrap",
        "--unshare-all",
        # Explicit (not "try") so a host where it fails refuses to boot rather than
        # silently running the VM without its own user namespace. Nested user namespaces
        # are refused by the seccomp filter (bwrap's --disable-userns would add a second
        # user namespace, hiding the real uid mapping from the VM's own uid_map).
        "--unshare-user",
        "--uid", "0", "--gid", "0",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--hostname", "vm",
        "--as-pid-1",
        "--info-fd", str(fds["info"]),
        "--block-fd", str(fds["block"]),
        "--seccomp", str(fds["seccomp"]),
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
        argv += ["--perms", "0644", "--ro-bind-data", str(fds[f"etc/{name}"]), f"/etc/{name}"]
    for name in PERSISTENT_DIRS:
        argv += ["--bind-fd", str(fds[f"dir/{name}"]), f"/{name}"]
    if "dir/egress" in fds:
        argv += ["--bind-fd", str(fds["dir/egress"]), EGRESS_DIR,
                 "--perms", "0555", "--ro-bind-data", str(fds["bridge"]), BRIDGE_PATH]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", str(spec.shm_mb * 1024 * 1024), "--tmpfs", "/dev/shm",
        "--perms", "0555", "--ro-bind-data", str(fds["init"]), INIT_PATH,
        # Last mount step: `/` itself is bwrap's tmpfs, read-only.
        "--remount-ro", "/",
        "--clearenv",
    ]
    for key, value in BASE_ENV.items():
        argv += ["--setenv", key, value]
    argv += ["--chdir", "/", "--", INIT_PATH, str(fds["control"])]
    return argv


def _data_fd(data: bytes) -> int:
    fd = os.memfd_create("vm-data", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class PipeReader:
    """Reads one pipe without blocking the loop, handing each chunk to `sink`.

    `drain()` reads everything the pipe holds right now, so after a process has exited
    the caller can take all it wrote without waiting for EOF (a background child may
    keep the pipe open). `pause()`/`resume()` stop and restart reading, so a writer
    faster than its consumer blocks on a full pipe instead of growing a buffer here."""

    def __init__(self, fd: int, sink: Callable[[bytes], None]) -> None:
        self.fd = fd
        self.sink = sink
        self.eof = asyncio.get_running_loop().create_future()
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self.resume()

    def resume(self) -> None:
        if not self._reading and not self.eof.done():
            self._loop.add_reader(self.fd, self.drain)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def drain(self) -> None:
        while not self.eof.done():
            try:
                chunk = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self.sink(chunk)

    def close(self) -> None:
        self.pause()
        if not self.eof.done():
            self.eof.set_result(None)
            os.close(self.fd)


class _Capped:
    """Keeps the first `limit` bytes written to it and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def __call__(self, chunk: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        text = self.kept.decode("utf-8", "replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} more bytes not shown]"
        return text


@dataclass(slots=True)
class Process:
    """A process the init started: its VM pid, its end, and its pty master if any."""

    pid: int
    exited: asyncio.Future[int]   # the wait status
    master_fd: int | None = None


class Machine:
    """A running VM: the bwrap process, its init's control channel, and what it started."""

    def __init__(self, bwrap: asyncio.subprocess.Process, control: socket.socket, init_pid: int) -> None:
        self.bwrap = bwrap
        self.init_pid = init_pid    # host pid of the VM's PID 1
        self._control = control
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._requests: dict[int, asyncio.Future[initproto.Message]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._spawned: dict[int, Process] = {}  # by request id, until the caller takes it
        self.gone: asyncio.Future[None] = self._loop.create_future()
        # Readers of commands that exited while a background child kept their pipes:
        # drained (and discarded) so that child never dies of SIGPIPE, closed with the VM.
        self._detached: set[PipeReader] = set()
        control.setblocking(False)
        self._loop.add_reader(control.fileno(), self._readable)

    @classmethod
    async def start(cls, spec: MachineSpec, before_run: Callable[[int], None]) -> Machine:
        """Start the sandbox; `before_run(init_host_pid)` runs before the init does
        (the caller moves it into the VM's cgroup there)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        fds: dict[str, int] = {
            "control": theirs.fileno(), "info": info_w, "block": block_r,
            "seccomp": syscall_filter.compiled_fd(),
            "init": os.open(spec.init_binary, os.O_RDONLY | os.O_CLOEXEC),
        }
        for name, content in GENERATED_ETC.items():
            fds[f"etc/{name}"] = _data_fd(content.encode())
        for name in PERSISTENT_DIRS:
            fds[f"dir/{name}"] = os.open(spec.root / name, os.O_PATH | os.O_DIRECTORY
                                         | os.O_NOFOLLOW | os.O_CLOEXEC)
        if spec.egress_dir is not None and spec.bridge_binary is not None:
            fds["dir/egress"] = os.open(spec.egress_dir, os.O_PATH | os.O_DIRECTORY
                                        | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds["bridge"] = os.open(spec.bridge_binary, os.O_RDONLY | os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        try:
            bwrap = await asyncio.create_subprocess_exec(
                *bwrap_argv(spec, fds),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr_w,
                pass_fds=tuple(fds.values()),
                env={"PATH": DEFAULT_PATH},
                user=spec.uid, group=spec.gid, extra_groups=[] if spec.uid is not None else None,
                umask=0o022, start_new_session=True,
            )
        finally:
            theirs.close()
            for name, fd in fds.items():
                if name != "control":
                    os.close(fd)
            os.close(stderr_w)
        errors = bytearray()
        stderr = PipeReader(stderr_r, errors.extend)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                init_pid = await _read_child_pid(info_r, bwrap)
            before_run(init_pid)
            os.write(block_w, b"x")
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bwrap.pid, signal.SIGKILL)
            await bwrap.wait()
            await asyncio.wait([stderr.eof], timeout=1.0)
            stderr.close()
            ours.close()
            if not isinstance(exc, Exception):
                raise
            detail = errors.decode(errors="replace").strip()[:500]
            raise RuntimeError(f"the VM sandbox did not start: {detail or exc}") from exc
        finally:
            os.close(info_r)
            os.close(block_w)
        stderr.sink = _log_stderr
        return cls(bwrap, ours, init_pid)

    # -- the control channel ------------------------------------------------------------

    def _readable(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._control, initproto.MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lost()
                return
            try:
                msg = initproto.decode(data)
            except ValueError as exc:
                log.error("vminit_bad_message", error=str(exc))
                for fd in fds:
                    os.close(fd)
                continue
            if msg.op is Op.EXIT:
                future = self._exits.pop(msg.pid, None)
                if future is not None and not future.done():
                    future.set_result(msg.status)
                continue
            if msg.op is Op.SPAWNED:
                # Made here, not by the waiting caller: its EXIT may be in this very batch.
                exited = self._loop.create_future()
                self._exits[msg.pid] = exited
                self._spawned[msg.id] = Process(msg.pid, exited, fds[0] if fds else None)
                fds = []
            request = self._requests.pop(msg.id, None)
            if request is not None and not request.done():
                request.set_result(msg)
            for fd in fds:
                os.close(fd)

    def _lost(self) -> None:
        if self.gone.done():
            return
        self._loop.remove_reader(self._control.fileno())
        self._control.close()
        futures: list[asyncio.Future[Any]] = [*self._requests.values(), *self._exits.values()]
        for future in futures:
            if not future.done():
                future.set_exception(VmGone())
        self._requests.clear()
        self._exits.clear()
        for reader in list(self._detached):
            reader.close()
        self.gone.set_result(None)

    async def _request(self, payload: bytes, fds: Sequence[int] = ()) -> initproto.Message:
        if self.gone.done():
            raise VmGone()
        request_id = initproto.decode(payload).id
        future: asyncio.Future[initproto.Message] = self._loop.create_future()
        self._requests[request_id] = future
        while True:
            try:
                socket.send_fds(self._control, [payload], list(fds))
                break
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(self._control.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(self._control.fileno())
            except OSError as exc:
                self._requests.pop(request_id, None)
                raise VmGone(f"the VM's init is unreachable: {exc.strerror}") from None
        return await future

    async def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str,
                    stdio: tuple[int, int, int] | None = None,
                    pty: tuple[int, int] | None = None) -> Process:
        """Start `argv` in the VM, with the caller's stdin/stdout/stderr fds (which stay
        the caller's to close) or on a new pseudo-terminal of `pty=(rows, cols)`."""
        request_id = next(self._ids)
        try:
            payload = initproto.spawn(request_id, list(argv), dict(env), cwd, pty)
        except ValueError as exc:
            raise ActorvisorError(ErrorCode.INVALID_ARGS, str(exc)) from None
        request = asyncio.ensure_future(self._request(payload, stdio or ()))
        try:
            reply = await asyncio.shield(request)
        except asyncio.CancelledError:
            # The init starts it all the same: let the start finish, then end it.
            await asyncio.shield(self._abandon(request, request_id))
            raise
        if reply.op is Op.ERROR:
            raise _spawn_error(argv[0], cwd, reply.status)
        return self._spawned.pop(request_id)

    async def _abandon(self, request: asyncio.Future[initproto.Message], request_id: int) -> None:
        with contextlib.suppress(Exception):
            await request
        proc = self._spawned.pop(request_id, None)
        if proc is not None:
            if proc.master_fd is not None:
                os.close(proc.master_fd)
            await self._end(proc)

    async def kill(self, pid: int, sig: int, *, group: bool = True) -> bool:
        """Signal a process the VM runs (and its process group); False if it is gone."""
        reply = await self._request(initproto.kill(next(self._ids), pid, sig, group=group))
        return reply.status == 0

    async def shutdown(self, grace_s: float) -> None:
        """TERM every process of the VM, KILL what is left after `grace_s`, wait for the end."""
        if not self.gone.done():
            with contextlib.suppress(OSError):
                self._control.send(initproto.shutdown(int(grace_s * 1000)))
            await asyncio.wait([self.gone], timeout=grace_s + 2.0)
        # bwrap reaps the init and exits on its own; killing it first would leave the
        # init a zombie for someone else to reap.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.bwrap.wait()), 2.0)
        if self.bwrap.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.bwrap.pid, signal.SIGKILL)
        await self.bwrap.wait()
        self._lost()

    # -- running a command to its end ---------------------------------------------------

    async def run(self, command: Sequence[str], *, cwd: str = WORKSPACE,
                  env: Mapping[str, str] | None = None, timeout_s: float = 60.0,
                  output_limit: int = MAX_OUTPUT_BYTES) -> ExecResult:
        """Run a command to its end; background processes it starts live on in the VM."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        stdout, stderr = _Capped(output_limit), _Capped(output_limit)
        readers = [PipeReader(out_r, stdout), PipeReader(err_r, stderr)]
        try:
            proc = await self.spawn(command, env={**BASE_ENV, **(env or {})}, cwd=cwd,
                                    stdio=(devnull, out_w, err_w))
        except BaseException:
            for reader in readers:
                reader.close()
            raise
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)
        try:
            async with asyncio.timeout(timeout_s):
                status = await asyncio.shield(proc.exited)
        except TimeoutError:
            await self._end(proc)
            self._collect(readers)
            raise ActorvisorError(
                ErrorCode.ACTION_TIMEOUT,
                f"command timed out after {timeout_s:g} s; it and every process of its "
                "group were killed",
                {"stdout": stdout.text(), "stderr": stderr.text()},
            ) from None
        except BaseException:
            await asyncio.shield(self._end(proc))
            self._collect(readers)
            raise
        await asyncio.wait([r.eof for r in readers], timeout=EXIT_DRAIN_S)
        self._collect(readers)
        return ExecResult(exit_code(status), stdout.text(), stderr.text())

    async def _end(self, proc: Process) -> None:
        """Kill a command's whole process group and wait for it (cancellation-safe)."""
        with contextlib.suppress(VmGone):
            await self.kill(proc.pid, signal.SIGKILL, group=True)
            await proc.exited

    def _collect(self, readers: list[PipeReader]) -> None:
        """Take what the pipes hold now; readers still open keep draining, discarded."""
        for reader in readers:
            reader.drain()
            if not reader.eof.done():
                reader.sink = _discard
                self._detached.add(reader)
                reader.eof.add_done_callback(functools.partial(self._forget_detached, reader))

    def _forget_detached(self, reader: PipeReader, _eof: asyncio.Future[Any]) -> None:
        self._detached.discard(reader)


def _discard(_chunk: bytes) -> None:
    return None


def set_done(future: asyncio.Future[None]) -> None:
    """Resolve a wake-up future, once (a reader or writer callback may fire again)."""
    if not future.done():
        future.set_result(None)


def _log_stderr(chunk: bytes) -> None:
    log.warning("vm_sandbox_stderr", text=chunk.decode(errors="replace").strip()[:500])


def _spawn_error(command: str, cwd: str, err: int) -> ActorvisorError:
    if err == errno.ENOENT:
        return ActorvisorError(ErrorCode.INVALID_ARGS, f"{command}: command not found (or no such cwd {cwd})")
    if err == errno.EAGAIN:
        return ActorvisorError(ErrorCode.VM_LIMIT, "the VM is at its process limit; no process was started")
    return ActorvisorError(ErrorCode.INVALID_ARGS, f"{command}: cannot start: {os.strerror(err)}")


async def _read_child_pid(fd: int, bwrap: asyncio.subprocess.Process) -> int:
    """bwrap writes `{"child-pid": N}` on --info-fd once the sandbox's first process exists."""
    loop = asyncio.get_running_loop()
    buf = b""
    decoder = json.JSONDecoder()
    readable: asyncio.Future[None] = loop.create_future()
    os.set_blocking(fd, False)
    exited = asyncio.ensure_future(bwrap.wait())
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(fd, set_done, readable)
                try:
                    waits: list[asyncio.Future[Any]] = [readable, exited]
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_reader(fd)
                if exited.done() and not readable.done():
                    raise RuntimeError(f"bwrap exited with status {exited.result()}")
                continue
            if not chunk:
                raise RuntimeError("bwrap closed its info fd without the child's pid")
            buf += chunk
            with contextlib.suppress(ValueError):
                info, _ = decoder.raw_decode(buf.decode())
                return int(info["child-pid"])
    finally:
        exited.cancel()


def set_window_size(master_fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


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
