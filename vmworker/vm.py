"""One actor's VM as the rest of the worker sees it: boot, limits, and async access.

Owns the VM's phase (booting → ready | failed), its boot — identity, disk, cgroup, then
the long-lived sandbox (`sandbox.Machine`) — its end, the watch on its limits (each hit
becomes a `vmLimit` report through the caller's `on_limit`), and the async facade over
`vmfs` and the machine that actions and agents share, so both apply the same path rules,
limits and defaults. File actions run in threads whose file-system identity is the VM's
(setfsuid), so the worker touches the VM's files exactly as the VM itself could. It never
decides what is sent to the supervisor: the caller turns a finished boot into `vmBooted`.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import structlog

from protocol.errors import ActorvisorError, ErrorCode
from protocol.names import WorkerPhase

from . import vminit, vmroot
from .cgroups import CgroupRoot, Limits, VmCgroup
from .egress import EgressProxy, Reporter
from .ingress import Ingress, ingress_path
from .netpolicy import ACTOR_POLICY_FILE, Policy, PolicyError, load_actor_policy
from .sandbox import BRIDGE_PATH, EGRESS_SOCKET, PROXY_PORT, ExecResult, Machine, MachineSpec
from .vmfs import WORKSPACE, VmFs, VmPath, normalize

DEFAULT_EXEC_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 2.0
LIMIT_POLL_S: Final = 1.0        # limit counters are read this often while the VM works
LIMIT_POLL_IDLE_S: Final = 30.0  # and back off to this while nothing in it runs
# A limit hit is reported at most this often per kind (with the count since the last).
LIMIT_REPORT_EVERY_S: Final = {"memory": 5.0, "pids": 5.0, "disk": 5.0, "cpu": 60.0}
DISK_FULL_FRACTION: Final = 0.98
SYS_SETGROUPS: Final = 116  # x86-64; the raw call changes only the calling thread

MAX_FETCH_BODY: Final = 512 * 1024     # response bodies beyond this are an error
FETCH_TIMEOUT_S: Final = 30.0
_FETCH: Final = """
import base64, http.client, json, sys
a = json.loads(base64.b64decode(sys.argv[1]))
c = http.client.HTTPConnection("127.0.0.1", a["port"], timeout=25)
c.request(a["method"], a["path"], body=base64.b64decode(a["body"]) or None, headers=a["headers"])
r = c.getresponse()
data = r.read(a["limit"] + 1)
if len(data) > a["limit"]:
    sys.exit("response body larger than %d bytes" % a["limit"])
print(json.dumps({"status": r.status, "statusText": r.reason, "headers": dict(r.getheaders()),
                  "body": base64.b64encode(data).decode()}))
"""

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class VmSettings:
    """What every VM of this service gets; decided by the supervisor, passed to workers."""

    memory_mb: int = 2048
    pids: int = 1024
    cpus: float = 1.0
    disk_mb: int = 4096
    shm_mb: int = 64
    uid_base: int = 0x70000000
    uid_count: int = 1 << 20
    cgroup_root: str | None = None   # CgroupRoot.to_arg(), None: no cgroups on this host
    init_binary: str = ""
    bridge_binary: str = ""
    unsafe_no_limits: bool = False
    # What clients may start in it (vmworker.processes.ProcessLimits).
    max_processes: int = 64
    max_shells: int = 16
    output_log_mb: int = 8
    network_allow: tuple[str, ...] = ()   # the service's default egress allow rules
    network_deny: tuple[str, ...] = ()
    ingress_dir: str = ""   # the supervisor's private dir of ingress sockets ("": no way in)

    def to_arg(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_arg(cls, value: str) -> VmSettings:
        return cls(**json.loads(value))

    @property
    def limits(self) -> Limits:
        return Limits(self.memory_mb, self.pids, self.cpus)

    def for_host(self, state_dir: Path) -> tuple[VmSettings, list[str]]:
        """These settings completed for this host (the VM init built, this service's
        cgroups made), and what of the VMs' containment this host cannot give.

        Runs once in the supervisor at start, before any worker exists."""
        for name in ("memory_mb", "pids", "disk_mb", "shm_mb", "max_processes", "max_shells", "output_log_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vm {name} must be positive, got {getattr(self, name)}")
        if not self.cpus > 0:
            raise ValueError(f"vm cpus must be positive, got {self.cpus}")
        if shutil.which("bwrap") is None:
            raise RuntimeError("bubblewrap (bwrap) is not installed; run `make sandbox-deps`")
        init = vminit.ensure_built(state_dir / "bin")
        bridge = vminit.ensure_built(state_dir / "bin", vminit.BRIDGE_SOURCE)
        root, why = CgroupRoot.discover(state_dir)
        missing = []
        if root is None:
            missing.append(f"memory, pids and cpu limits: {why}")
        else:
            root.remove_stale()
        if os.geteuid() != 0:
            missing.append("a disk of bounded size and a host uid of each VM's own: the service "
                           "is not running as root")
        done = replace(self, cgroup_root=root.to_arg() if root else None, init_binary=str(init),
                       bridge_binary=str(bridge))
        return done, missing


def refusal(missing: list[str]) -> str:
    return ("VMs cannot be contained here: no " + "; no ".join(missing) + ". Run the service "
            "as root on a host with cgroups (under systemd: the unit in deploy/), or start it "
            "with --unsafe-no-limits to run VMs without these limits")


def _ignore(_: dict[str, object]) -> None:
    return None


def _fresh_dir(path: Path, uid: int | None, gid: int | None) -> None:
    # Owned by the VM's identity so bwrap (running as it) can bind it; the VM could
    # replace the socket, but only with one of its own: it reaches nothing more.
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o755)
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)


def _as_identity(uid: int, gid: int) -> Callable[[], None]:
    def become() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(SYS_SETGROUPS, 0, None)
        libc.setfsgid(gid)
        libc.setfsuid(uid)
    return become


class Vm:
    def __init__(self, actor_dir: Path, actor_id: str, state_dir: Path, boot_delay_s: float,
                 settings: VmSettings, on_limit: Callable[[str, dict[str, Any]], None],
                 on_network: Callable[[dict[str, object]], None] | None = None) -> None:
        self.actor_dir = actor_dir
        self.actor_id = actor_id
        self.state_dir = state_dir
        self.settings = settings
        self.root = actor_dir / "root"
        self.fs = VmFs(self.root)
        self.machine: Machine | None = None
        self.cgroup: VmCgroup | None = None
        self.phase = WorkerPhase.BOOTING
        self.booted = False
        self.boot_error: str | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._boot_delay_s = boot_delay_s
        self._on_limit = on_limit
        self._settled = asyncio.Event()
        self._fs_pool: ThreadPoolExecutor | None = None
        self._watch: asyncio.Task[None] | None = None
        self._activity = asyncio.Event()
        self._disk_mounted = False
        self._default_policy = Policy.parse(settings.network_allow, settings.network_deny)
        self._actor_policy: Policy | None = None
        self._policy_stamp: tuple[int, int, int] | None = None
        self._proxy = EgressProxy(lambda: self.policy, Reporter(on_network or _ignore))
        self._ingress: Ingress | None = None
        if settings.ingress_dir:
            self._ingress = Ingress(ingress_path(Path(settings.ingress_dir), actor_id), lambda: self.machine)

    @property
    def policy(self) -> Policy:
        """The effective egress policy: the actor's own (`network.json` in its dir, set by an
        admin) if it has one, else the service default. The file is checked on every use (one
        stat) and re-read when it changed, so a new policy applies to the next connection of
        a running VM without any message to the worker."""
        try:
            st = os.stat(self.actor_dir / ACTOR_POLICY_FILE)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._policy_stamp:
            try:
                self._actor_policy = load_actor_policy(self.actor_dir)
            except PolicyError as exc:
                # The supervisor writes only checked policies. Keep the last good one, or
                # with none, deny everything: never fall back to a (perhaps wider) default.
                log.error("actor_network_policy_unreadable", error=str(exc))
                if self._actor_policy is None:
                    self._actor_policy = Policy()
            self._policy_stamp = stamp
        return self._actor_policy if self._actor_policy is not None else self._default_policy

    @policy.setter
    def policy(self, default: Policy) -> None:
        self._default_policy = default

    async def boot(self) -> int:
        """Make the VM's identity, disk and cgroup, start its sandbox, prove it runs a
        command. Returns the boot time in ms; raises with a readable reason on failure,
        after which every VM action fails with `actor.failed`."""
        started = time.monotonic()
        try:
            await self._boot()
        except Exception as exc:
            self.boot_error = str(exc) or type(exc).__name__
            self.phase = WorkerPhase.FAILED
            self._settled.set()
            raise
        self.booted = True
        self.phase = WorkerPhase.READY
        self._settled.set()
        return round((time.monotonic() - started) * 1000)

    async def _boot(self) -> None:
        s = self.settings
        ident = await asyncio.to_thread(vmroot.identity, self.state_dir, self.actor_id,
                                        s.uid_base, s.uid_count)
        missing = self._missing_limits(ident)
        if missing and not s.unsafe_no_limits:
            raise RuntimeError(refusal(missing))
        if missing:
            log.warning("vm_limits_missing", missing=missing)
        if ident.dedicated:
            self.root = await asyncio.to_thread(vmroot.mount_disk, self.actor_dir, s.disk_mb, ident)
            self.fs = VmFs(self.root)
            self._disk_mounted = True
        await asyncio.to_thread(vmroot.prepare_dirs, self.root, ident)
        self._fs_pool = ThreadPoolExecutor(
            4, thread_name_prefix="vmfs",
            initializer=_as_identity(ident.uid, ident.gid) if ident.dedicated else None)
        if s.cgroup_root is not None:
            self.cgroup = VmCgroup(CgroupRoot.from_arg(s.cgroup_root), self.actor_id)
            await asyncio.to_thread(self.cgroup.create, s.limits)
        # Emulates a slow VM image; the worker answers health checks meanwhile.
        await asyncio.sleep(self._boot_delay_s)
        # On the VM's disk (outside its bound dirs): bwrap, as the VM's identity, can reach it.
        egress_dir = self.root / "egress"
        await asyncio.to_thread(_fresh_dir, egress_dir, ident.uid if ident.dedicated else None,
                                ident.gid if ident.dedicated else None)
        await self._proxy.start_unix(str(egress_dir / "egress.sock"))
        # The VM's identity must be able to connect; nothing else of this dir is its.
        os.chmod(egress_dir / "egress.sock", 0o666)
        spec = MachineSpec(self.root, Path(s.init_binary),
                           ident.uid if ident.dedicated else None,
                           ident.gid if ident.dedicated else None, s.shm_mb, egress_dir,
                           Path(s.bridge_binary) if s.bridge_binary else None)
        self.machine = await Machine.start(spec, self._before_init_runs)
        self.machine.gone.add_done_callback(self._machine_gone)
        probe = await self.machine.run(["true"], timeout_s=30.0)
        if probe.exit_code != 0:
            raise RuntimeError(f"sandbox self-test failed (exit {probe.exit_code}): "
                               f"{probe.stderr.strip()[:500]}")
        await self._start_bridge()
        if self._ingress is not None:
            await self._ingress.start()
        self._watch = asyncio.create_task(self._watch_limits(), name="vm-limits")

    async def _start_bridge(self) -> None:
        """The loopback port in the VM that leads to the proxy; up before any command runs."""
        assert self.machine is not None
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            await self.machine.spawn([BRIDGE_PATH, str(PROXY_PORT), EGRESS_SOCKET],
                                     env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                     stdio=(devnull, out_w, devnull))
        finally:
            os.close(out_w)
            os.close(devnull)
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(os.read, out_r, 16), 30.0)
        finally:
            os.close(out_r)
        if ready != b"ready\n":
            raise RuntimeError("the VM's network bridge did not start")

    def _missing_limits(self, ident: vmroot.Identity) -> list[str]:
        missing = []
        if self.settings.cgroup_root is None:
            missing.append("memory, pids and cpu limits (no writable cgroup hierarchy)")
        if not ident.dedicated:
            missing.append("a disk of bounded size and a host uid of the VM's own (the worker "
                           "is not root)")
        return missing

    def _before_init_runs(self, init_pid: int) -> None:
        if self.cgroup is not None:
            self.cgroup.add(init_pid)
        # The init must outlive any OOM kill in its VM; the processes it starts reset
        # their own score to 0 (vminit.c), so the kill lands on the process that grew.
        try:
            Path(f"/proc/{init_pid}/oom_score_adj").write_text("-1000")
        except OSError as exc:
            # Hosts that withhold CAP_SYS_RESOURCE even from root: the init stays a
            # candidate, though a small one (its memory is a few pages).
            log.debug("vm_init_oom_protect_failed", error=str(exc))

    def _machine_gone(self, _: asyncio.Future[None]) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    async def stop(self) -> None:
        """End the VM: every process of it, its cgroup, its disk mount (idempotent)."""
        self.phase = WorkerPhase.STOPPING
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._ingress is not None:
            await self._ingress.close()
        if self.machine is not None:
            await self.machine.shutdown(STOP_GRACE_S)
        await self._proxy.close()
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.destroy)
        if self._fs_pool is not None:
            self._fs_pool.shutdown(wait=True)
            self._fs_pool = None
        if self._disk_mounted:
            await asyncio.to_thread(vmroot.unmount_disk, self.root)
            self._disk_mounted = False

    async def _watch_limits(self) -> None:
        """Turn limit hits into `vmLimit` reports: the VM keeps running, its owner learns.

        The cgroup's counters (OOM kills, refused forks, throttled CPU periods) are read
        once a second while the VM works; a disk that is full counts once each time it
        fills. Each kind is reported at most once per LIMIT_REPORT_EVERY_S, with the hits
        since its last report.

        An idle VM cannot hit a limit, and a thousand idle workers reading their counters
        every second spend most of a core on it (~1.2 ms of CPU each per second). So
        while nothing in the VM has run since the last read (its count of CPU-quota
        periods stands still) and no action came, the wait doubles up to
        LIMIT_POLL_IDLE_S; an action (`note_activity`) or the VM running again brings it
        back to once a second. The reads are a few cgroupfs files and one statvfs, all
        answered from kernel memory, so they are done on the loop."""
        s = self.settings
        bounds = {"memory": s.memory_mb * 1024 * 1024, "pids": s.pids, "cpu": s.cpus,
                  "disk": s.disk_mb * 1024 * 1024}
        seen, periods = self._counters()
        hits = dict.fromkeys(bounds, 0)
        last_report = dict.fromkeys(bounds, float("-inf"))
        disk_was_full = False
        wait = LIMIT_POLL_S
        while True:
            self._activity.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns the inner result when
            # a cancel lands just as the event is set, losing the cancel (the VM's stop then
            # waited forever for this task).
            try:
                async with asyncio.timeout(wait):
                    await self._activity.wait()
                woken = True
            except TimeoutError:
                woken = False
            if woken:
                await asyncio.sleep(LIMIT_POLL_S)  # at most one read a second however busy
            counters, now_periods = self._counters()
            for kind, value in counters.items():
                hits[kind] += max(0, value - seen.get(kind, 0))
            seen = counters
            wait = LIMIT_POLL_S if woken or now_periods != periods else min(2 * wait, LIMIT_POLL_IDLE_S)
            periods = now_periods
            disk_full = self._disk_mounted and self._disk_full()
            hits["disk"] += disk_full and not disk_was_full
            disk_was_full = disk_full
            now = time.monotonic()
            for kind, count in hits.items():
                if count and now - last_report[kind] >= LIMIT_REPORT_EVERY_S[kind]:
                    self._on_limit(kind, {"kind": kind, "limit": bounds[kind], "count": count})
                    hits[kind] = 0
                    last_report[kind] = now

    def note_activity(self) -> None:
        """Work came for the VM: its limits are watched once a second again."""
        self._activity.set()

    def _counters(self) -> tuple[dict[str, int], int]:
        return self.cgroup.counters() if self.cgroup is not None else ({}, 0)

    def _disk_full(self) -> bool:
        st = os.statvfs(self.root)
        return st.f_bavail <= (1.0 - DISK_FULL_FRACTION) * st.f_blocks

    async def wait_ready(self) -> None:
        await self._settled.wait()
        if self.boot_error is not None:
            raise ActorvisorError(ErrorCode.FAILED, f"the VM failed to boot: {self.boot_error}")

    def memory_bytes(self) -> int:
        return self.cgroup.memory_bytes() if self.cgroup is not None else 0

    async def _in_fs(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._fs_pool is None:
            raise ActorvisorError(ErrorCode.STOPPED, "the VM is not running")
        return await asyncio.get_running_loop().run_in_executor(
            self._fs_pool, lambda: fn(*args, **kwargs))

    async def read_file(self, path: VmPath) -> bytes:
        data: bytes = await self._in_fs(self.fs.read_file, path)
        return data

    async def write_file(self, path: VmPath, data: bytes) -> None:
        await self._in_fs(self.fs.write_file, path, data)

    async def readdir(self, path: VmPath) -> list[str]:
        names: list[str] = await self._in_fs(self.fs.readdir, path)
        return names

    async def stat(self, path: VmPath) -> dict[str, Any]:
        info: dict[str, Any] = await self._in_fs(self.fs.stat, path)
        return info

    async def exists(self, path: VmPath) -> bool:
        return bool(await self._in_fs(self.fs.exists, path))

    async def mkdir(self, path: VmPath, *, recursive: bool) -> None:
        await self._in_fs(self.fs.mkdir, path, recursive=recursive)

    async def delete(self, path: VmPath, *, recursive: bool) -> None:
        await self._in_fs(self.fs.delete, path, recursive=recursive)

    async def exec(
        self,
        command: str,
        *,
        cwd: VmPath | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = DEFAULT_EXEC_TIMEOUT_S,
    ) -> ExecResult:
        """`/bin/sh -c command` in the VM; cwd defaults to /workspace and must exist."""
        return await self.run(["/bin/sh", "-c", command], cwd=cwd, env=env, timeout_s=timeout_s)

    async def run(self, argv: Sequence[str], *, cwd: VmPath | None = None,
                  env: Mapping[str, str] | None = None,
                  timeout_s: float = DEFAULT_EXEC_TIMEOUT_S) -> ExecResult:
        target = cwd or normalize(WORKSPACE)
        await self._require_dir(target)
        if self.machine is None:
            raise ActorvisorError(ErrorCode.STOPPED, "the VM is not running")
        return await self.machine.run(argv, cwd=str(target), env=env, timeout_s=timeout_s)

    async def fetch(self, port: int, path: str, method: str, headers: dict[str, str],
                    body: bytes) -> dict[str, Any]:
        """One HTTP request to 127.0.0.1:port inside the VM, made by a short-lived python3
        in the VM (its loopback is reachable from nowhere else); the body is bounded."""
        request = json.dumps({"port": port, "path": path, "method": method, "headers": headers,
                              "body": base64.b64encode(body).decode(), "limit": MAX_FETCH_BODY})
        result = await self.run(["python3", "-c", _FETCH, base64.b64encode(request.encode()).decode()],
                                timeout_s=FETCH_TIMEOUT_S)
        if result.exit_code != 0:
            raise ActorvisorError(ErrorCode.INVALID_ARGS, f"vmFetch: nothing answered on port "
                                  f"{port} in the VM: {result.stderr.strip().splitlines()[-1:]}")
        reply = json.loads(result.stdout)
        reply["body"] = base64.b64decode(reply["body"])
        return dict(reply)

    async def _require_dir(self, path: VmPath) -> None:
        info = await self.stat(path)
        if not info["isDirectory"]:
            raise ActorvisorError(ErrorCode.NOT_A_DIRECTORY, f"cwd {path}: not a directory")

    async def move(self, source: VmPath, target: VmPath) -> None:
        await self._in_fs(self.fs.move, source, target)

    async def readdir_recursive(self, path: VmPath, *, max_depth: int, exclude: frozenset[str],
                                max_entries: int) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = await self._in_fs(
            self.fs.readdir_recursive, path, max_depth=max_depth, exclude=exclude,
            max_entries=max_entries)
        return entries
