"""`actorvisor top`: a live terminal view of the supervisor and every worker.

Two sources, joined by pid. Logical figures (state, sessions, connections, subscribers,
events, queues, restarts, heartbeat age) come from the supervisor's `GET /admin/workers`;
process figures (CPU %, RSS / USS, threads, open files, the processes inside each VM)
come from psutil, sampled here, in the dashboard's own process: the supervisor's event
loop never walks /proc for it. Process figures need the dashboard on the supervisor's
host (same pid namespace); elsewhere the columns stay empty and say why.

Rates (CPU %, events/s) are differences between two samples, so `--once` samples twice,
one interval apart. This module only reads: it never changes the supervisor's state.
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

JSON = dict[str, Any]

FAILED, HUNG, SLOW = "FAILED", "HUNG", "SLOW"
STATE_ORDER = {"failed": 0, "crashed": 1, "boot_failed": 1, "spawning": 2, "booting": 3, "ready": 4,
               "stopping": 5, "stopped": 6}


def fetch_admin(url: str, timeout: float = 5.0) -> JSON:
    with urllib.request.urlopen(f"{url.rstrip('/')}/admin/workers", timeout=timeout) as resp:
        body: JSON = json.loads(resp.read())
    return body


def same_process(pid: int | None, create_time: float | None) -> bool:
    """Whether `pid` here is the supervisor's own process (same pid namespace, same host)."""
    if not pid or create_time is None:
        return False
    try:
        return bool(abs(psutil.Process(pid).create_time() - create_time) < 0.01)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class Sampler:
    """psutil figures per pid; keeps each `Process` between samples so CPU % is a real rate."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        # A reused pid is another process: identity is (pid, create time), as in psutil.
        if proc is None or not proc.is_running():
            proc = psutil.Process(pid)
            proc.cpu_percent(None)
            self._procs[pid] = proc
        return proc

    def sample(self, pid: int | None, *, with_tree: bool = False) -> JSON | None:
        if not pid:
            return None
        try:
            proc = self._process(pid)
            with proc.oneshot():
                figures: JSON = {
                    "pid": pid,
                    "createTime": proc.create_time(),
                    "status": proc.status(),
                    "cpuPercent": round(proc.cpu_percent(None), 1),
                    "threads": proc.num_threads(),
                    "rssBytes": proc.memory_info().rss,
                    # These read /proc files only the process's user (or root) may read.
                    "ussBytes": _allowed(lambda: proc.memory_full_info().uss),
                    "openFiles": _allowed(proc.num_fds),
                }
            if with_tree:
                figures.update(self._tree(proc))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return {"pid": pid, "status": "gone"}
        except psutil.AccessDenied:
            return {"pid": pid, "status": "access-denied"}
        return figures

    def _tree(self, proc: psutil.Process) -> JSON:
        """The processes inside the worker's VM: every descendant of the worker."""
        pids, cpu, rss = [], 0.0, 0
        for child in proc.children(recursive=True):
            try:
                tracked = self._process(child.pid)
                cpu += tracked.cpu_percent(None)
                rss += tracked.memory_info().rss
                pids.append(child.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return {"vmProcesses": len(pids), "vmPids": sorted(pids),
                "vmCpuPercent": round(cpu, 1), "vmRssBytes": rss}

    def forget_except(self, pids: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]


def _allowed(read: Callable[[], int]) -> int | None:
    try:
        return read()
    except psutil.AccessDenied:
        return None


def flags_of(actor: JSON, sup: JSON) -> list[str]:
    """Why a row should catch the eye: failed, hung, or slow."""
    flags = []
    process = actor.get("process") or {}
    if actor["state"] in ("failed", "crashed", "boot_failed"):
        flags.append(FAILED)
    # Liveness evidence is 0 ms old while libzmq's heartbeat holds the worker's connection;
    # any age means the connection dropped after a hang timeout without a pong.
    age = actor.get("lastHeartbeatAgeMs")
    if process.get("status") == psutil.STATUS_STOPPED or (age is not None and age > 0):
        flags.append(HUNG)
    if actor.get("maxQueuedBytes", 0) >= sup.get("connQueueBytes", 1 << 62) / 4:
        flags.append(SLOW)
    return flags


class Top:
    """Builds snapshots: admin JSON joined with psutil figures, plus rates between samples."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sampler = Sampler()
        self._previous: tuple[float, dict[str, int], int] | None = None

    def snapshot(self) -> JSON:
        admin = fetch_admin(self.url)
        now = time.monotonic()
        sup = admin["supervisor"]
        local = same_process(sup.get("pid"), sup.get("createTime"))
        seen: set[int] = set()
        if local:
            sup["process"] = self.sampler.sample(sup.get("pid"))
            sup["zygote"] = {"pid": sup.get("zygotePid"),
                             "process": self.sampler.sample(sup.get("zygotePid"))}
        relayed = {a["actorId"]: a.get("eventsRelayed", 0) for a in admin["actors"]}
        prev = self._previous
        elapsed = now - prev[0] if prev else 0.0
        for actor in admin["actors"]:
            actor["process"] = self.sampler.sample(actor.get("pid"), with_tree=True) if local else None
            if actor["process"]:
                seen.update([actor["pid"], *actor["process"].get("vmPids", [])])
            if prev and elapsed > 0 and actor["actorId"] in prev[1]:
                delta = relayed[actor["actorId"]] - prev[1][actor["actorId"]]
                actor["eventsPerSec"] = round(max(delta, 0) / elapsed, 1)
            else:
                actor["eventsPerSec"] = None
            actor["flags"] = flags_of(actor, sup)
        total = sup.get("eventsRelayed", 0)
        sup["eventsPerSec"] = round(max(total - prev[2], 0) / elapsed, 1) if prev and elapsed > 0 else None
        self._previous = (now, relayed, total)
        if local:
            seen.update(p for p in (sup.get("pid"), sup.get("zygotePid")) if p)
            self.sampler.forget_except(seen)
        return {"url": self.url, "sampledAt": time.time(), "processFigures": local, **admin}


# ---- rendering -----------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    value: Callable[[JSON], Any]
    show: Callable[[Any], str]
    numeric: bool = True


def _proc(field: str) -> Callable[[JSON], Any]:
    return lambda a: (a.get("process") or {}).get(field)


def _cpu_total(actor: JSON) -> float | None:
    process = actor.get("process") or {}
    if "cpuPercent" not in process:
        return None
    return float(process["cpuPercent"]) + float(process.get("vmCpuPercent") or 0.0)


def human_bytes(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 100 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def human_duration_ms(ms: Any) -> str:
    if ms is None:
        return "-"
    s = int(ms) // 1000
    if s < 60:
        return f"{s}s" if ms >= 1000 or ms == 0 else f"{int(ms)}ms"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


COLUMNS = [
    Column("key", "KEY", lambda a: a["key"], str, numeric=False),
    Column("state", "STATE", lambda a: STATE_ORDER.get(a["state"], 9), str, numeric=False),
    Column("pid", "PID", lambda a: a.get("pid"), _num),
    Column("up", "UP", lambda a: a.get("uptimeMs") if a.get("pid") else None, human_duration_ms),
    Column("cpu", "CPU%", _cpu_total, lambda v: "-" if v is None else f"{v:.1f}"),
    Column("rss", "RSS", _proc("rssBytes"), human_bytes),
    Column("uss", "USS", _proc("ussBytes"), human_bytes),
    Column("threads", "THR", _proc("threads"), _num),
    Column("files", "FDS", _proc("openFiles"), _num),
    Column("vm", "VMPROC", _proc("vmProcesses"), _num),
    Column("sessions", "SESS", lambda a: a.get("sessions"), _num),
    Column("conns", "CONN", lambda a: a.get("connections"), _num),
    Column("subs", "SUBS", lambda a: a.get("subscribers"), _num),
    Column("events", "EV/S", lambda a: a.get("eventsPerSec"), _num),
    Column("queue", "ACTQ", lambda a: a.get("pendingActions", 0) + a.get("inflightActions", 0), _num),
    Column("outq", "OUTQ", lambda a: a.get("queuedBytes"), human_bytes),
    Column("restarts", "RST", lambda a: a.get("restarts"), _num),
    Column("heartbeat", "HB", lambda a: a.get("lastHeartbeatAgeMs"), human_duration_ms),
]
SORT_KEYS = [c.key for c in COLUMNS]
_BY_KEY = {c.key: c for c in COLUMNS}


def sort_actors(actors: list[JSON], key: str, reverse: bool) -> list[JSON]:
    column = _BY_KEY[key]
    present = [a for a in actors if column.value(a) is not None]
    missing = [a for a in actors if column.value(a) is None]
    # Numbers read best largest first, like top; names and states in their natural order.
    descending = column.numeric != reverse
    present.sort(key=lambda a: (column.value(a), a["key"]), reverse=descending)
    return present + sorted(missing, key=lambda a: a["key"])


def row_style(actor: JSON) -> str:
    flags = actor.get("flags", [])
    if HUNG in flags:
        return "bold white on red"
    if FAILED in flags:
        return "bold red"
    if SLOW in flags:
        return "bold yellow"
    if actor["state"] == "stopped":
        return "dim"
    return ""


def _header(snap: JSON) -> Text:
    sup = snap["supervisor"]
    process = sup.get("process") or {}
    zygote = (sup.get("zygote") or {}).get("process") or {}
    states = ", ".join(f"{n} {s}" for s, n in sup.get("actorsByState", {}).items() if n) or "none"
    text = Text()
    text.append(f"actorvisor {sup.get('version', '?')}", style="bold")
    text.append(f"  {sup.get('listen', snap['url'])}  up {human_duration_ms(sup.get('uptimeMs'))}")
    if not sup.get("accepting", True):
        text.append("  DRAINING", style="bold yellow")
    text.append("\nsupervisor ")
    text.append(f"pid {sup.get('pid')}  cpu {process.get('cpuPercent', '-')}%  "
                f"rss {human_bytes(process.get('rssBytes'))}  thr {process.get('threads', '-')}  "
                f"fds {process.get('openFiles', '-')}  loop lag {sup.get('loopLagMs', '-')}ms")
    text.append("\nzygote     ")
    text.append(f"pid {sup.get('zygotePid') or '-'}  cpu {zygote.get('cpuPercent', '-')}%  "
                f"rss {human_bytes(zygote.get('rssBytes'))}  uss {human_bytes(zygote.get('ussBytes'))}")
    text.append(f"\nactors: {states}   connections: {sup.get('connections', 0)}   "
                f"events/s: {_num(sup.get('eventsPerSec'))}   "
                f"outbound queued: {human_bytes(sup.get('queuedBytes'))}")
    if not snap.get("processFigures"):
        text.append("\nprocess figures unavailable: the supervisor runs in another pid namespace "
                    "or host", style="yellow")
    return text


def render(snap: JSON, sort: str = "cpu", reverse: bool = False, *, keys_help: bool = False) -> RenderableType:
    table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, header_style="bold")
    for column in COLUMNS:
        marker = ("▲" if reverse == column.numeric else "▼") if column.key == sort else ""
        header = column.header + marker
        table.add_column(header, justify="right" if column.numeric else "left", no_wrap=True,
                         min_width=max(len(header), 12 if column.key == "key" else 0),
                         max_width=28 if column.key == "key" else None, overflow="ellipsis")
    table.add_column("FLAGS", no_wrap=True)
    for actor in sort_actors(snap["actors"], sort, reverse):
        cells = [actor["state"] if c.key == "state" else c.show(c.value(actor)) for c in COLUMNS]
        table.add_row(*cells, " ".join(actor.get("flags", [])), style=row_style(actor))
    parts: list[RenderableType] = [_header(snap), table]
    if keys_help:
        parts.append(Text(f"sort: {sort}   < > change column   r reverse   q quit", style="dim"))
    return Group(*parts)


# ---- the command ---------------------------------------------------------------------


def run_top(url: str, *, once: bool, as_json: bool, interval: float, sort: str, reverse: bool) -> int:
    top = Top(url)
    try:
        top.snapshot()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: cannot read {url}/admin/workers: {exc}", file=sys.stderr)
        return 1
    if once or as_json:
        while True:
            time.sleep(interval)
            try:
                snap = top.snapshot()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                print(f"error: cannot read {url}/admin/workers: {exc}", file=sys.stderr)
                return 1
            if as_json:
                print(json.dumps(snap), flush=True)
            else:
                # Off a terminal rich assumes 80 columns; a script's log has room for all.
                width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
                Console(width=width).print(render(snap, sort, reverse))
            if once:
                return 0
    return _live(top, interval, sort, reverse)


def _live(top: Top, interval: float, sort: str, reverse: bool) -> int:
    from rich.live import Live

    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            snap: JSON | None = None
            error: str | None = None
            next_sample = 0.0
            while True:
                if time.monotonic() >= next_sample:
                    try:
                        snap, error = top.snapshot(), None
                    except (urllib.error.URLError, OSError, ValueError) as exc:
                        error = f"cannot read {top.url}/admin/workers: {exc} (retrying)"
                    next_sample = time.monotonic() + interval
                view: list[RenderableType] = []
                if snap is not None:
                    view.append(render(snap, sort, reverse, keys_help=fd is not None))
                if error:
                    view.append(Text(error, style="bold red"))
                live.update(Group(*view), refresh=True)
                key = _read_key(fd, max(0.0, next_sample - time.monotonic()))
                if key == "q":
                    return 0
                if key in ("<", ">"):
                    step = 1 if key == ">" else -1
                    sort = SORT_KEYS[(SORT_KEYS.index(sort) + step) % len(SORT_KEYS)]
                elif key == "r":
                    reverse = not reverse
    except KeyboardInterrupt:
        return 0
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_key(fd: int | None, timeout: float) -> str | None:
    if fd is None:
        time.sleep(timeout)
        return None
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    return os.read(fd, 1).decode(errors="replace")
