"""The worker process: one actor, one VM, one DEALER socket to the supervisor.

Owns the process lifecycle — say hello before booting, boot in the background, serve
actions concurrently, and shut down cleanly on `sleep`, `shutdown`, SIGTERM or the death
of its supervisor — and every task it starts: each one is cancelled and
awaited on the way out, and every sandboxed command is killed. Everything it sends goes
through the outbox, in order. It never blocks the event loop on the disk, never crashes
on a bad frame, and never exits with a child process still running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
import zmq
import zmq.asyncio

from protocol.errors import ActorvisorError, ErrorCode, ProtocolError
from protocol.names import EventName, ShutdownReason, WorkerPhase
from protocol.worker import Action, ExitCode, Hello, Phase, Reply, Shutdown, Sleep, decode

from . import actorlock, credentials, logs, vmroot
from .actions import Actions
from .agents.base import PermissionPolicy
from .eventlog import EventLog, EventReader, log_path
from .outbox import Outbox
from .processes import ProcessLimits, ProcessTable
from .sessions import SessionLog, SessionManager
from .vm import Vm, VmSettings

PR_SET_PDEATHSIG: Final = 1
ACTION_GRACE_S: Final = 2.0    # for in-flight actions to reply before they are cancelled
FLUSH_TIMEOUT_S: Final = 5.0   # for the last frames to reach the socket
LINGER_MS: Final = 2000        # for zmq to hand them to the supervisor after close
HARD_DEADLINE_S: Final = 20.0  # past this, a wedged shutdown exits anyway

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Config:
    actor_id: str
    actor_name: str
    actor_key: str
    endpoint: str
    state_dir: Path
    boot_delay_s: float
    generation: int
    supervisor_pid: int | None
    log_level: str
    vm: VmSettings
    permission_policy: PermissionPolicy = PermissionPolicy.ASK
    lock_timeout_s: float = actorlock.WAIT_S

    @property
    def actor_dir(self) -> Path:
        return self.state_dir / "actors" / self.actor_id


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m vmworker",
                                     description="actorvisor worker: one actor's VM")
    parser.add_argument("--actor-id", required=True)
    parser.add_argument("--actor-name", required=True)
    parser.add_argument("--actor-key", required=True)
    parser.add_argument("--endpoint", required=True, help="supervisor ROUTER, e.g. ipc:///run/x.ipc")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--boot-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--lock-timeout", type=float, default=actorlock.WAIT_S, metavar="SECONDS",
                        help="how long to wait for a previous worker of this actor to end")
    parser.add_argument("--supervisor-pid", type=int, metavar="PID",
                        help="leave when this process is gone (its lateness is never a reason)")
    parser.add_argument("--log-level", default="info", choices=logs.LEVELS)
    parser.add_argument("--vm-settings", type=VmSettings.from_arg, default=VmSettings(),
                        help="the VM's limits and identity range, as JSON (vm.VmSettings)")
    parser.add_argument("--permission-policy", type=PermissionPolicy, default=PermissionPolicy.ASK,
                        choices=list(PermissionPolicy),
                        help="what sessions that set no permissionPolicy get")
    ns = parser.parse_args(argv)
    # The id names a directory: it must be one plain path component.
    if not ns.actor_id or "/" in ns.actor_id or "\0" in ns.actor_id or ns.actor_id in (".", ".."):
        parser.error(f"--actor-id {ns.actor_id!r} is not usable as a directory name")
    if not ns.boot_delay >= 0:
        parser.error("--boot-delay must not be negative")
    if ns.supervisor_pid is not None and ns.supervisor_pid <= 0:
        parser.error("--supervisor-pid must be positive")
    return Config(ns.actor_id, ns.actor_name, ns.actor_key, ns.endpoint, ns.state_dir,
                  ns.boot_delay, ns.generation, ns.supervisor_pid,
                  ns.log_level, ns.vm_settings, ns.permission_policy, ns.lock_timeout)


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent dies, so we take the normal exit path."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = log
        self._stop = asyncio.Event()
        self._stop_reason = ShutdownReason.SLEEP
        self._exit_code = ExitCode.OK
        self._stopping = False
        self._actions_running: set[asyncio.Task[None]] = set()
        # Our supervisor (or its zygote): when it dies, the kernel sends us SIGTERM
        # (die_with_parent) and we are reparented, so getppid() stops naming it.
        self._parent = os.getppid()
        self._orphaned = asyncio.Event()

    def request_stop(self, reason: ShutdownReason, code: ExitCode = ExitCode.OK) -> None:
        """Ask for shutdown; the first request wins."""
        if not self._stop.is_set():
            self._stop_reason, self._exit_code = reason, code
            self._stop.set()

    async def run(self) -> int:
        cfg = self.config
        cfg.actor_dir.mkdir(parents=True, exist_ok=True)
        # One worker per actor, ever: wait out a previous one (e.g. orphaned by a supervisor
        # restart, still draining) before touching its log; the lock lives as long as we do.
        self._lock_fd = await asyncio.to_thread(actorlock.acquire, cfg.actor_dir, cfg.lock_timeout_s)
        if self._lock_fd is None:
            self.log.error("actor_locked_by_another_worker", waited_s=cfg.lock_timeout_s)
            return int(ExitCode.ACTOR_BUSY)
        writer = ThreadPoolExecutor(1, thread_name_prefix="eventlog-writer")
        reader_pool = ThreadPoolExecutor(1, thread_name_prefix="eventlog-reader")
        event_log = EventLog.open(log_path(cfg.actor_dir))
        loop = asyncio.get_running_loop()
        # A previous run that ended unrecorded (killed along with its supervisor, say) gets
        # its vmShutdown now, before this run's first event.
        closed = await loop.run_in_executor(writer, event_log.close_unended_run,
                                            ShutdownReason.CRASH.value)
        if closed is not None:
            self.log.warning("previous_run_closed", seq=closed.seq)
        reader = EventReader(event_log.path)
        ctx = zmq.asyncio.Context()
        sock = self._sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, cfg.actor_id.encode())
        # No HEARTBEAT_TIMEOUT here, on purpose: our libzmq answers the supervisor's ZMTP
        # pings in its I/O thread, and a supervisor too busy or stopped to ping us is no
        # reason to drop a connection (and the frames queued on it).
        sock.connect(cfg.endpoint)

        self.outbox = Outbox(event_log, self._send_frame, writer)
        self.outbox.send(Hello(cfg.actor_id, os.getpid(), event_log.epoch, event_log.last_seq))
        self.outbox.send(Phase(WorkerPhase.BOOTING.value))
        self.vm = Vm(cfg.actor_dir, cfg.actor_id, cfg.state_dir, cfg.boot_delay_s, cfg.vm,
                     self._on_limit, self._on_network)
        self.sessions = SessionManager(self.outbox, self.vm, event_log.load_sessions(),
                                       SessionLog(self.outbox, reader, reader_pool),
                                       cfg.permission_policy)
        self.processes = ProcessTable(self.outbox, cfg.actor_dir, ProcessLimits(
            cfg.vm.max_processes, cfg.vm.max_shells, cfg.vm.output_log_mb << 20))
        self.actions = Actions(self.vm, self.sessions, self.outbox, reader, reader_pool,
                               cfg.generation, self.processes)
        self.log.info("worker_started", name=cfg.actor_name, key=cfg.actor_key,
                      epoch=event_log.epoch, last_seq=event_log.last_seq,
                      generation=cfg.generation)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        supervisor = self._watch_supervisor(loop)
        writer_task = asyncio.create_task(self.outbox.run(), name="outbox")
        background = [
            asyncio.create_task(self._receive(sock), name="receive"),
            asyncio.create_task(self._watch_vm(), name="watch-vm"),
        ]
        boot_task = asyncio.create_task(self._boot(), name="boot")
        stop_task = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            await asyncio.wait({writer_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if writer_task.done():
                self.log.error("event_log_failed", exc_info=writer_task.exception())
                self._exit_code = ExitCode.FATAL
                await self._stop_work(boot_task)
            else:
                await self._shutdown(boot_task, writer_task)
        finally:
            # Hard stop for a shutdown wedged in C code (a hung disk, a stuck send).
            deadline = threading.Timer(HARD_DEADLINE_S, os._exit, (int(ExitCode.FATAL),))
            deadline.daemon = True
            deadline.start()
            if supervisor is not None:
                loop.remove_reader(supervisor)
                os.close(supervisor)
            for task in (*background, writer_task, boot_task, stop_task):
                task.cancel()
            await asyncio.gather(*background, writer_task, boot_task, stop_task,
                                 return_exceptions=True)
            await self.vm.stop()
            sock.close(linger=LINGER_MS)
            ctx.term()
            await loop.run_in_executor(reader_pool, reader.close)
            await loop.run_in_executor(writer, event_log.close)
            reader_pool.shutdown()
            writer.shutdown()
            deadline.cancel()
        self.log.info("worker_stopped", reason=self._stop_reason.value, exit_code=int(self._exit_code))
        return int(self._exit_code)

    def _on_stop_signal(self) -> None:
        if os.getppid() != self._parent and not self._orphaned.is_set():
            self._orphan()
        self.request_stop(ShutdownReason.SLEEP)

    def _orphan(self) -> None:
        """Our supervisor died (a SIGTERM through the parent-death signal): speak to no one.

        Nobody reads our frames any more, and a supervisor started anew on the same socket
        path would take them for a stranger's; a send blocked on the dead peer would hold
        back the commit of everything queued behind it, our vmShutdown included. So drop
        the connection and every frame queued on it; the log gets all that is queued, and
        the next worker of this actor (which waits for our lock) relays it from there.
        """
        self.log.warning("supervisor_gone", parent=self._parent)
        self._orphaned.set()
        self._sock.setsockopt(zmq.LINGER, 0)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disconnect(self.config.endpoint)
        self.request_stop(ShutdownReason.ERROR, ExitCode.SUPERVISOR_LOST)

    async def _send_frame(self, frame: bytes) -> None:
        """The outbox's send: now if the pipe has room, else once it has, unless we are
        orphaned meanwhile (then the frame is dropped: see `_orphan`)."""
        if self._orphaned.is_set():
            return
        try:
            await self._sock.send(frame, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        send = asyncio.ensure_future(self._sock.send(frame))
        orphaned = asyncio.create_task(self._orphaned.wait())
        try:
            await asyncio.wait({send, orphaned}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (send, orphaned):
                pending.cancel()
            await asyncio.gather(send, orphaned, return_exceptions=True)

    async def _shutdown(self, boot_task: asyncio.Task[None], writer_task: asyncio.Task[None]) -> None:
        reason = self._stop_reason
        self.log.info("worker_stopping", reason=reason.value)
        self.outbox.send(Phase(WorkerPhase.STOPPING.value, {"reason": reason.value}))
        await self._stop_work(boot_task)
        self.outbox.append_nowait(EventName.VM_SHUTDOWN.value, {"reason": reason.value})
        flush = asyncio.create_task(self.outbox.flush())
        done, _ = await asyncio.wait({flush, writer_task}, timeout=FLUSH_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if flush not in done:
            flush.cancel()
            self.log.warning("flush_incomplete", last_seq=self.outbox.last_seq)

    async def _stop_work(self, boot_task: asyncio.Task[None]) -> None:
        """Stop booting, cancel turns, let in-flight actions reply, then cancel the rest."""
        self._stopping = True
        boot_task.cancel()
        await asyncio.gather(boot_task, return_exceptions=True)
        self.vm.phase = WorkerPhase.STOPPING
        self.sessions.cancel_all()
        if self._actions_running:
            await asyncio.wait(self._actions_running, timeout=ACTION_GRACE_S)
        for task in self._actions_running:
            task.cancel()
        await asyncio.gather(*self._actions_running, return_exceptions=True)
        self.processes.stopping()
        await self.vm.stop()
        # Every process and shell the VM took with it gets its exit in the log, before
        # the VM's own vmShutdown.
        await self.processes.close()

    async def _boot(self) -> None:
        self.log.info("vm_booting", boot_delay_s=self.config.boot_delay_s)
        await self.processes.close_leftovers()
        try:
            boot_ms = await self.vm.boot()
        except Exception as exc:
            self.log.error("vm_boot_failed", error=self.vm.boot_error, exc_info=exc)
            self.outbox.send(Phase(WorkerPhase.FAILED.value, {"error": self.vm.boot_error}))
            return
        assert self.vm.machine is not None
        self.processes.attach(self.vm.machine)
        await self.outbox.append(EventName.VM_BOOTED.value, {"bootMs": boot_ms})
        self.outbox.send(Phase(WorkerPhase.READY.value, {"bootMs": boot_ms}))
        self.log.info("vm_ready", boot_ms=boot_ms)

    def _on_limit(self, kind: str, payload: dict[str, object]) -> None:
        self.log.warning("vm_limit", **payload)
        self.outbox.append_nowait(EventName.VM_LIMIT.value, payload)

    def _on_network(self, payload: dict[str, object]) -> None:
        # Already coalesced by the proxy's Reporter (at most one per host/port/verdict
        # per 10 s, with the count of the decisions folded into it).
        self.outbox.append_nowait(EventName.NETWORK_REQUEST.value, payload)

    async def _watch_vm(self) -> None:
        await self.vm.lost
        if not self._stopping:
            self.log.error("vm_lost", init_pid=self.vm.machine.init_pid if self.vm.machine else None)
            self.request_stop(ShutdownReason.ERROR, ExitCode.VM_LOST)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                # The ROUTER strips our identity; the message is the last frame even if
                # a peer adds an empty delimiter in front of it.
                msg = decode(frames[-1])
            except ProtocolError as exc:
                self.log.warning("bad_frame", error=exc.message, size=len(frames[-1]))
                continue
            match msg:
                case Action():
                    self._start_action(msg)
                case Sleep():
                    self.request_stop(ShutdownReason.SLEEP)
                case Shutdown():
                    self.request_stop(ShutdownReason.DESTROY)
                case _:
                    self.log.warning("unexpected_message", type=type(msg).__name__)

    def _start_action(self, action: Action) -> None:
        if self._stopping:
            self.outbox.send(Reply(action.id, False, error=ActorvisorError(
                ErrorCode.STOPPED, f"the actor is stopping; {action.name} was not run")))
            return
        task = asyncio.create_task(self._run_action(action), name=f"action-{action.id}")
        self._actions_running.add(task)
        task.add_done_callback(self._actions_running.discard)

    async def _run_action(self, action: Action) -> None:
        started = time.monotonic()
        try:
            value = await self.actions.dispatch(action.name, action.args)
            self.outbox.send(Reply(action.id, True, value))
        except ActorvisorError as exc:
            self.outbox.send(Reply(action.id, False, error=exc))
        except asyncio.CancelledError:
            self.outbox.send(Reply(action.id, False, error=ActorvisorError(
                ErrorCode.STOPPED, f"the actor stopped while {action.name} was running")))
            raise
        except Exception as exc:
            self.log.error("action_crashed", action=action.name, id=action.id, exc_info=exc)
            self.outbox.send(Reply(action.id, False, error=ActorvisorError(
                ErrorCode.INTERNAL, f"{action.name} failed: {type(exc).__name__}: {exc}")))
        self.log.debug("action_done", action=action.name, id=action.id,
                       ms=round((time.monotonic() - started) * 1000, 1))

    def _watch_supervisor(self, loop: asyncio.AbstractEventLoop) -> int | None:
        """Leave when the supervisor process is gone, and only then.

        A late supervisor is no evidence of anything (a stopped or overloaded one comes
        back, and finds us): its exit is. The parent-death signal (SIGTERM, via the
        zygote) usually tells us first; a pidfd on the supervisor also covers a parent that
        died before that signal was asked for. Returns the pidfd, for `run` to close.
        """
        pid = self.config.supervisor_pid
        if pid is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._supervisor_gone()
            return None
        # Readable once the process has exited; one report is enough.
        def exited() -> None:
            loop.remove_reader(pidfd)
            self._supervisor_gone()
        loop.add_reader(pidfd, exited)
        return pidfd

    def _supervisor_gone(self) -> None:
        """Evidence of the same death as an orphaning SIGTERM, whichever comes first."""
        self.log.warning("supervisor_lost", supervisor_pid=self.config.supervisor_pid)
        if not self._orphaned.is_set():
            self._orphan()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logs.configure(config.log_level)
    credentials.take_from_environment()
    # Before any thread exists (zmq's, asyncio's executors): the VM's disk is mounted in
    # a mount namespace of this worker's own.
    if os.geteuid() == 0 and not vmroot.enter_private_mount_namespace():
        log.warning("private_mount_namespace_unavailable")
    die_with_parent()
    structlog.contextvars.bind_contextvars(actor=config.actor_id, pid=os.getpid())
    try:
        return asyncio.run(Worker(config).run())
    except Exception:
        log.exception("worker_crashed")
        return int(ExitCode.FATAL)


if __name__ == "__main__":
    sys.exit(main())
