"""Per-VM control groups: the memory, pids and CPU bounds of one whole VM, and their counters.

Owns the cgroup layout and every read and write of cgroup files. The supervisor calls
`CgroupRoot.discover` once at start: it finds the hierarchy this host has (cgroup v2, as
under systemd with `Delegate=yes`, or the v1 controllers `memory`, `pids` and `cpu`
mounted at `/sys/fs/cgroup/<controller>`) and makes one parent directory per controller
under the service's own cgroup, named after the state dir so that two services on one
host never share one. A worker then makes `<parent>/<actor id>`, writes the limits, and
moves the VM's init into it before the init runs anything: every process of the VM is
born inside, so the limits hold for the VM as a whole, and the kernel's OOM killer picks
its victim inside the VM.

The workers themselves (and the zygote that forks them) share one more child, `workers`,
and the parent weighs an eighth of the supervisor in the CPU scheduler: when the
supervisor wants the CPU, all workers and VMs together get a ninth of what is contended.
Left where the supervisor is, each worker weighed as much as the supervisor (each leads a
session, and sessions are scheduled as equals: autogroups, or plain tasks of one cgroup
under systemd): 100 busy workers left it 2 % of a core, a garbage collection of 0.46 s of
CPU took 20 s, and new connections waited as long (bench/connections.py). Grouped at equal
weight they still took 1.4-2.3 of the 2 cores while their agents emitted (each event
wakes a worker, and waking entities preempt a busy one): the supervisor's thread waited
on the run queue 36.5 s of 39 s. At an eighth it runs 0.65-0.8 of a core meanwhile.

This module never moves a process it did not start and never removes a cgroup that
still has processes, except the VM's own when the VM ends.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CONTROLLERS: Final = ("memory", "pids", "cpu")
# The workers' shared cgroup; never an actor's (actor ids are 24 hex digits).
WORKERS: Final = "workers"
# CPU weight of all workers and VMs together against the supervisor's, when both want
# the CPU: the supervisor is one thread (at most a core), so they still get the rest.
# v1 cpu.shares (the supervisor, a nice-0 task: 1024) and v2 cpu.weight (its leaf: 100).
PARENT_CPU_SHARES: Final = 1024 // 8
PARENT_CPU_WEIGHT: Final = 100 // 8
CPU_PERIOD_US: Final = 100_000


@dataclass(frozen=True, slots=True)
class Limits:
    memory_mb: int
    pids: int
    cpus: float


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:  # one write(2): cgroup files take a value per write
        fh.write(value)


def _read_keyed(path: Path) -> dict[str, int]:
    """`key value` lines (memory.events, pids.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _mounts() -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point, {v1 controller: mount point}) from /proc/self/mountinfo."""
    unified: str | None = None
    v1: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype, options = rfields[0], rfields[2].split(",")
        mountpoint = fields[4]
        if fstype == "cgroup2" and unified is None:
            unified = mountpoint
        elif fstype == "cgroup":
            for name in CONTROLLERS:
                if name in options:
                    v1.setdefault(name, mountpoint)
    return unified, v1


def _own_paths() -> tuple[str | None, dict[str, str]]:
    """(our v2 path, {v1 controller: our path}) from /proc/self/cgroup."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        for name in controllers.split(","):
            if name in CONTROLLERS:
                v1[name] = path
    return v2, v1


@dataclass(frozen=True, slots=True)
class CgroupRoot:
    """Where this service's VM cgroups live: one parent per controller (v1) or one (v2)."""

    version: int
    parents: tuple[tuple[str, str], ...]  # (controller or "unified", parent dir)

    def to_arg(self) -> str:
        return f"v{self.version}:" + ";".join(f"{name}={path}" for name, path in self.parents)

    @classmethod
    def from_arg(cls, value: str) -> CgroupRoot:
        version, _, rest = value.partition(":")
        parents = tuple(tuple(item.split("=", 1)) for item in rest.split(";") if item)
        return cls(int(version.removeprefix("v")), parents)  # type: ignore[arg-type]

    @classmethod
    def locate(cls, state_dir: Path) -> CgroupRoot | None:
        """Where the parent cgroups of a service on `state_dir` are, made or not, for a
        service started from this process's cgroup; None when the host has no usable
        hierarchy. Makes nothing: `discover` makes them; whoever cleans up after a
        service that could not (killed) finds them here."""
        tag = "actorvisor-" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
        unified, v1_mounts = _mounts()
        own_v2, own_v1 = _own_paths()
        if all(name in v1_mounts and name in own_v1 for name in CONTROLLERS):
            return cls(1, tuple((name, str(Path(v1_mounts[name] + own_v1[name].rstrip("/")) / tag))
                                for name in CONTROLLERS))
        if unified is not None and own_v2 is not None:
            return cls(2, (("unified", str(Path(unified + own_v2.rstrip("/")) / tag)),))
        return None

    @classmethod
    def discover(cls, state_dir: Path) -> tuple[CgroupRoot | None, str]:
        """Make this service's parent cgroups; (None, why) when the host gives us none."""
        root = cls.locate(state_dir)
        if root is None:
            return None, "no cgroup hierarchy with the memory, pids and cpu controllers"
        try:
            if root.version == 2:
                cls._delegate_v2(Path(root.parents[0][1]))
                _write(Path(root.parents[0][1]) / "cpu.weight", str(PARENT_CPU_WEIGHT))
            else:
                for _, parent in root.parents:
                    Path(parent).mkdir(exist_ok=True)
                _write(Path(dict(root.parents)["cpu"]) / "cpu.shares", str(PARENT_CPU_SHARES))
        except OSError as exc:
            return None, f"cgroups are not writable here ({exc.strerror}: {exc.filename})"
        return root, ""

    @staticmethod
    def _delegate_v2(parent: Path) -> None:
        # v2 lets a cgroup either hold processes or hand controllers to children: the
        # service moves itself into a leaf first, then enables the controllers below.
        own = parent.parent
        available = set((own / "cgroup.controllers").read_text().split())
        missing = [name for name in CONTROLLERS if name not in available]
        if missing:
            raise OSError(errno.EOPNOTSUPP, f"controllers {missing} not delegated", str(own))
        leaf = own / "supervisor"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(own / "cgroup.subtree_control", " ".join(f"+{n}" for n in CONTROLLERS))
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", " ".join(f"+{n}" for n in CONTROLLERS))

    def enter_workers(self, pid: int) -> None:
        """Move a process the supervisor started (a worker, or the zygote before it forks
        any) into the workers' shared cgroup, made on first use."""
        for _, parent in self.parents:
            path = Path(parent) / WORKERS
            path.mkdir(exist_ok=True)
            _write(path / "cgroup.procs", str(pid))

    def remove(self) -> None:
        """Remove this service's parent cgroups once no VM cgroup is left in them."""
        self.remove_stale()
        for _, parent in self.parents:
            with contextlib.suppress(OSError):
                Path(parent).rmdir()

    def remove_stale(self) -> int:
        """Remove empty VM cgroups left by workers that died; returns how many."""
        removed = 0
        for _, parent in self.parents:
            try:
                children = list(Path(parent).iterdir())
            except FileNotFoundError:  # never made, or already removed
                continue
            for child in children:
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
                        removed += 1
        return removed


class VmCgroup:
    """One VM's cgroup: made with its limits before the VM runs, removed when it ends."""

    def __init__(self, root: CgroupRoot, actor_id: str) -> None:
        self.root = root
        self.dirs = {name: Path(parent) / actor_id for name, parent in root.parents}

    def _dir(self, controller: str) -> Path:
        return self.dirs["unified"] if self.root.version == 2 else self.dirs[controller]

    def create(self, limits: Limits) -> None:
        self.destroy()  # a cgroup of a VM whose worker was killed: empty it, start afresh
        for path in self.dirs.values():
            path.mkdir()
        memory = limits.memory_mb * 1024 * 1024
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if self.root.version == 2:
            d = self.dirs["unified"]
            _write(d / "memory.max", str(memory))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids))
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(memory))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # Memory plus swap at the same bound: a VM cannot spill into host swap.
                with contextlib.suppress(OSError):
                    _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            _write(self.dirs["pids"] / "pids.max", str(limits.pids))
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))

    def add(self, pid: int) -> None:
        for path in self.dirs.values():
            _write(path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        try:
            text = (self._dir("pids") / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def counters(self) -> tuple[dict[str, int], int]:
        """How often each limit was hit so far — memory (OOM kills), pids (forks refused),
        cpu (periods throttled) — and the count of CPU-quota periods in which anything in
        the VM ran (`nr_periods`: it stands still while the VM is idle)."""
        if self.root.version == 2:
            d = self.dirs["unified"]
            memory = _read_keyed(d / "memory.events").get("oom_kill", 0)
            pids = _read_keyed(d / "pids.events").get("max", 0)
            cpu = _read_keyed(d / "cpu.stat")
        else:
            oom = _read_keyed(self.dirs["memory"] / "memory.oom_control")
            memory = oom.get("oom_kill", 0)
            pids = _read_keyed(self.dirs["pids"] / "pids.events").get("max", 0)
            cpu = _read_keyed(self.dirs["cpu"] / "cpu.stat")
        hits = {"memory": memory, "pids": pids, "cpu": cpu.get("nr_throttled", 0)}
        return hits, cpu.get("nr_periods", 0)

    def memory_bytes(self) -> int:
        name = "memory.current" if self.root.version == 2 else "memory.usage_in_bytes"
        try:
            return int((self._dir("memory") / name).read_text())
        except (OSError, ValueError):
            return 0

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the VM's cgroup until none is left (or the timeout)."""
        kill_file = self._dir("pids") / "cgroup.kill"
        if self.root.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def destroy(self) -> None:
        """Kill what is left and remove the cgroup (idempotent)."""
        if not any(path.exists() for path in self.dirs.values()):
            return
        self.kill_all()
        deadline = time.monotonic() + 5.0
        for path in self.dirs.values():
            while path.exists():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY while the last killed processes are still being torn down.
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
