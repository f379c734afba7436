"""The supervisor process: wires the gateway, the actor manager and the worker hub.

`Supervisor.run()` serves until SIGTERM/SIGINT, then drains: stop accepting, close every
client with a retryable reason, sleep every worker in parallel, kill stragglers' process
groups, remove the ipc socket. It owns every task it starts and awaits each one at stop.

Under systemd it tells the service manager `READY=1` the moment it listens (never after a
VM), keeps `STATUS=` current, pings the watchdog only while its event loop and periodic
tick are alive, and says `STOPPING=1` when the drain begins. The operations routes
(`/metrics`, `/admin/workers`) read in-memory state; the one file read (open sessions
from each actor's log, `eventlog.session_counts`) runs in a thread.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import structlog
from aiohttp import WSCloseCode, web

from protocol import worker as wire
from protocol.errors import ActorvisorError
from protocol.names import ActionName, ShutdownReason
from vmworker.cgroups import CgroupRoot
from vmworker.eventlog import log_path, session_counts
from vmworker.netpolicy import Policy, PolicyError
from vmworker.vm import VmSettings, refusal

from . import __version__, metrics
from .actors import Actor, ActorManager
from .auth import Auth
from .config import Config, make_private_runtime_dir, remove_stale_runtime_dirs
from .connections import CLOSE_GOING_AWAY
from .fdlimit import raise_nofile_limit
from .gateway import Gateway
from .hub import WorkerHub
from .limits import AcceptErrorLog, ConnectionLimiter
from .netadmin import NetworkAdmin
from .perimeter import Perimeter
from .previewproxy import Previews
from .sdnotify import Notifier, inherited_sockets
from .spawner import Spawner, SubprocessSpawner
from .zygote import ZygoteSpawner

log = structlog.get_logger("supervisor")


class VmHostError(Exception):
    """This host cannot contain VMs as configured; the message says what to do."""


def prepare_vms(config: Config) -> VmSettings:
    """Make the state dir private and this host ready for VMs; refuse, unless configured
    `unsafe_no_limits`, when a VM could not be held to its limits here."""
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    config.state_dir.chmod(0o700)
    wanted = VmSettings(memory_mb=config.vm_memory_mb, pids=config.vm_pids, cpus=config.vm_cpus,
                        disk_mb=config.vm_disk_mb, shm_mb=config.vm_shm_mb,
                        uid_base=config.vm_uid_base, unsafe_no_limits=config.unsafe_no_limits,
                        max_processes=config.vm_max_processes, max_shells=config.vm_max_shells,
                        output_log_mb=config.vm_output_log_mb,
                        network_allow=tuple(config.network_allow),
                        network_deny=tuple(config.network_deny))
    try:
        Policy.parse(wanted.network_allow, wanted.network_deny)
    except PolicyError as exc:
        raise VmHostError(f"network policy: {exc}") from None
    try:
        settings, missing = wanted.for_host(config.state_dir)
    except (ValueError, RuntimeError) as exc:
        raise VmHostError(str(exc)) from None
    if missing and not config.unsafe_no_limits:
        raise VmHostError(refusal(missing))
    if missing:
        log.warning("vm_limits_unavailable_running_unsafe", missing=missing)
    return settings


# Connections the kernel completes for us while the loop has not accepted them yet. At
# aiohttp's 128, 5,000 clients resuming at once overflowed it: 270 of them were dropped
# after their handshake and saw the server disconnect (bench/connections.py). The kernel
# caps it at net.core.somaxconn; the socket unit in deploy/ asks for as many.
LISTEN_BACKLOG = 4096


class Supervisor:
    def __init__(self, config: Config, spawner: Spawner | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self._owns_runtime_dir = config.runtime_dir is None
        if self._owns_runtime_dir:
            for stale in remove_stale_runtime_dirs():
                log.info("stale_runtime_dir_removed", path=str(stale))
        self.runtime_dir: Path = config.runtime_dir or make_private_runtime_dir()
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        self.hub = WorkerHub(self.runtime_dir, self._on_worker_message, self._on_worker_link,
                             ping_interval=config.heartbeat_interval, ping_timeout=config.hang_timeout)
        self.vm_settings = replace(prepare_vms(config), ingress_dir=str(self.runtime_dir / "ingress"))
        # Workers share one cgroup beside the supervisor's, so that busy workers cannot
        # starve the process every connection goes through (vmworker/cgroups.py).
        place = (CgroupRoot.from_arg(self.vm_settings.cgroup_root).enter_workers
                 if self.vm_settings.cgroup_root is not None else None)
        self.spawner = spawner or (ZygoteSpawner(place=place) if config.spawner == "zygote"
                                   else SubprocessSpawner(place=place))
        self.manager = ActorManager(config, self.spawner, self.hub.endpoint, self.hub.send,
                                    self.hub.input_pending)
        self.manager.vm_settings = self.vm_settings.to_arg()
        self.gateway = Gateway(self.manager, config)
        self.perimeter = Perimeter(config, Auth.from_config(config.auth_token, config.tokens,
                                                            config.auth_hook))
        self.app = web.Application(client_max_size=config.max_message_size + 1024,
                                   middlewares=[self.perimeter.middleware])
        self.app.add_routes(self.gateway.routes())
        self.app.add_routes([web.get("/metrics", self.metrics),
                             web.get("/admin/workers", self.admin_workers),
                             web.post("/admin/actors/{actor_id}/reset", self.admin_reset),
                             web.post("/admin/actors/{actor_id}/sleep", self.admin_sleep)])
        try:
            self.previews = Previews(config, self.manager, self.perimeter.auth, self.runtime_dir / "ingress")
        except ValueError as exc:   # a preview secret inside the state dir
            raise VmHostError(str(exc)) from None
        self.app.add_routes(self.previews.routes())
        self.manager.local_actions[ActionName.CREATE_SIGNED_PREVIEW_URL] = self.previews.create
        self.manager.local_actions[ActionName.EXPIRE_SIGNED_PREVIEW_URL] = self.previews.expire
        self.app.add_routes(NetworkAdmin(self.manager, config).routes())
        self._runner: web.AppRunner | None = None
        self.limiter = ConnectionLimiter(config.max_connections,
                                         config.max_connections_per_address, config.header_timeout)
        self.fd_limit = 0
        self.accept_errors = AcceptErrorLog()
        self._site: web.BaseSite | None = None
        self.socket_activated = False
        self._ticker: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._collector: metrics.SupervisorCollector | None = None
        self._stopped = asyncio.Event()
        self._status = ""
        self.port: int = config.port
        self.started_at = time.time()
        # With the pid, names this process: a dashboard whose psutil finds the same pid with
        # the same start time shares our pid namespace, so our pids are its pids.
        self.process_created = psutil.Process().create_time()
        self.loop_lag = 0.0
        self._last_tick = time.monotonic()

    def _on_worker_message(self, actor_id: str, msg: wire.WorkerToSupervisor) -> None:
        self.manager.on_worker_message(actor_id, msg)

    def _on_worker_link(self, pid: int, up: bool) -> None:
        self.manager.on_worker_link(pid, up)

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.hub.start()
        self.fd_limit = raise_nofile_limit()
        self.accept_errors = AcceptErrorLog()
        asyncio.get_running_loop().set_exception_handler(self.accept_errors)
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0,
                                     keepalive_timeout=self.config.idle_timeout)
        await self._runner.setup()
        assert self._runner.server is not None
        self.limiter.install(self._runner.server)
        inherited = inherited_sockets()
        if inherited:
            self.port = inherited[0].getsockname()[1]
            site: web.BaseSite = web.SockSite(self._runner, inherited[0])
        else:
            site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True,
                               backlog=LISTEN_BACKLOG)
        self.socket_activated = bool(inherited)
        await site.start()
        self._site = site
        server = site._server
        if server is not None and self.config.port == 0:
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]
        self._collector = metrics.SupervisorCollector(self.levels)
        metrics.REGISTRY.register(self._collector)
        self._last_tick = time.monotonic()
        self._ticker = asyncio.create_task(self._tick(), name="supervisor-tick")
        self.manager.cron.start()
        self._ticker.add_done_callback(self._ticker_done)
        # Everything made while starting (imported modules, the app) lives as long as the
        # process: out of the collector's reach, a full collection walks only what came
        # after, so it no longer stalls every connection in flight for tens of ms.
        gc.collect()
        gc.freeze()
        log.info("supervisor_listening", listen=f"{self.config.host}:{self.port}",
                 socket_activated=self.socket_activated,
                 state_dir=str(self.config.state_dir), ipc=self.hub.endpoint)
        # Listening is all "ready" means: no worker is started, let alone waited for.
        self._status = self.status_line()
        self.notifier.ready(self._status)
        if self.notifier.watchdog_interval is not None:
            self._watchdog_task = asyncio.create_task(
                self._watchdog(self.notifier.watchdog_interval), name="supervisor-watchdog")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat_interval
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - before - interval)
            self.manager.tick()
            self._last_tick = time.monotonic()
            status = self.status_line()
            if status != self._status:
                self._status = status
                self.notifier.status(status)

    def _ticker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # The watchdog sees the tick go stale and stops vouching for us.
            log.error("supervisor_tick_crashed", exc_info=task.exception())

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog only while the loop runs, the tick keeps ticking and the
        hub still watches the workers' connections.

        This coroutine runs on the event loop it vouches for: a blocked loop sends
        nothing. A tick that stopped (it raised, or something starves it) is stale
        after a few tick intervals; a hub monitor that died leaves hangs undetected.
        Either way pings stop and systemd restarts us.
        """
        stale_after = 3 * self.config.heartbeat_interval + interval
        withheld = False
        while True:
            await asyncio.sleep(interval)
            stale = time.monotonic() - self._last_tick
            if stale > stale_after or not self.hub.watching:
                if not withheld:
                    log.error("watchdog_withheld", tick_stale_s=round(stale, 1),
                              hub_watching=self.hub.watching)
                withheld = True
                continue
            withheld = False
            self.notifier.watchdog()

    def levels(self) -> metrics.Levels:
        """What the supervisor holds right now, for the `/metrics` scrape."""
        conns = list(self.gateway.connections)
        actors = self.manager.all()
        return metrics.Levels(
            connections=len(conns), connections_opened=self.gateway.connections_total,
            fd_limit=self.fd_limit, tcp_connections=self.limiter.open,
            connections_refused=self.limiter.refused, header_timeouts=self.limiter.timed_out,
            accept_errors=self.accept_errors.total,
            actors_by_state=self.manager.count_by_state(),
            queue_bytes=sum(c.queued_bytes for c in conns),
            queue_bytes_max=max((c.queued_bytes for c in conns), default=0),
            subscriptions=sum(a.relay.subscriber_count() for a in actors),
            pending_actions=sum(len(a.pending) for a in actors),
            inflight_actions=sum(len(a.inflight) for a in actors),
            loop_lag=self.loop_lag)

    def status_line(self) -> str:
        """One line for `systemctl status`: actors by state, connections."""
        states = ", ".join(f"{n} {state}" for state, n in self.manager.count_by_state().items() if n)
        return (f"actors: {states or 'none'}; connections: {len(self.gateway.connections)}; "
                f"listening on {self.config.host}:{self.port}")

    async def stop(self, timeout: float | None = None) -> None:
        log.info("supervisor_draining", connections=len(self.gateway.connections))
        running = sum(1 for a in self.manager.all() if a.proc is not None)
        self.notifier.stopping(f"draining: {len(self.gateway.connections)} connections, "
                               f"{running} workers")
        self.manager.accepting = False
        if self.socket_activated and self._site is not None:
            # The socket outlives us: stop accepting, so that clients reconnecting from
            # here on wait in its backlog for the next supervisor instead of for us.
            await self._site.stop()
        for conn in list(self.gateway.connections):
            conn.close_soon(WSCloseCode.GOING_AWAY, CLOSE_GOING_AWAY)
        await self.manager.stop_all(self.config.stop_timeout if timeout is None else timeout)
        for task in (self._ticker, self._watchdog_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.previews.revoked.drain()
        await self.hub.close()
        await self.spawner.close()
        if self._collector is not None:
            metrics.REGISTRY.unregister(self._collector)
            self._collector = None
        if self._owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self.vm_settings.cgroup_root is not None:
            await asyncio.to_thread(CgroupRoot.from_arg(self.vm_settings.cgroup_root).remove)
        log.info("supervisor_stopped")
        self.notifier.close()

    def request_stop(self) -> None:
        self._stopped.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (1 when it could not listen)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            try:
                await self.start()
            except OSError as exc:
                log.error("listen_failed", listen=self.config.listen, error=str(exc))
                return 1
            await self._stopped.wait()
        finally:
            await self.stop()
        return 0

    # ---- operations routes ---------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def admin_workers(self, request: web.Request) -> web.Response:
        """Everything `actorvisor top` shows that is not a process figure (psutil's part)."""
        actors = self.manager.all()
        paths = [log_path(a.dir) for a in actors]
        sessions = await asyncio.to_thread(lambda: [session_counts(path) for path in paths])
        rows = []
        for actor, counted in zip(actors, sessions):
            row = actor.describe()
            queued = [c.queued_bytes for c in actor.connections]
            row.update(sessions=counted[0] if counted else None,
                       sessionsRunning=counted[1] if counted else None,
                       queuedBytes=sum(queued), maxQueuedBytes=max(queued, default=0))
            rows.append(row)
        conns = list(self.gateway.connections)
        body: dict[str, Any] = {
            "supervisor": {
                "version": __version__,
                "pid": os.getpid(),
                "zygotePid": getattr(self.spawner, "zygote_pid", None),
                "createTime": self.process_created,
                "listen": f"{self.config.host}:{self.port}",
                "startedAt": self.started_at,
                "uptimeMs": int((time.time() - self.started_at) * 1000),
                "accepting": self.manager.accepting,
                "connections": len(conns),
                "connectionsTotal": self.gateway.connections_total,
                "actionsTotal": self.manager.actions_total,
                "eventsRelayed": sum(a.relay.events_relayed for a in actors),
                "queuedBytes": sum(c.queued_bytes for c in conns),
                "actorsByState": self.manager.count_by_state(),
                "loopLagMs": round(self.loop_lag * 1000, 1),
                "heartbeatIntervalMs": int(self.config.heartbeat_interval * 1000),
                "hangTimeoutMs": int(self.config.hang_timeout * 1000),
                "connQueueBytes": self.config.conn_queue_bytes,
            },
            "actors": rows,
        }
        return web.json_response(body)

    async def admin_reset(self, request: web.Request) -> web.Response:
        """Clear a failed actor's crash history so its next action starts it again."""
        return self._admin_actor_op(request, self.manager.reset)

    async def admin_sleep(self, request: web.Request) -> web.Response:
        """Put an actor to sleep now, as idleness would (its next action wakes it)."""
        return self._admin_actor_op(request, lambda actor: self.manager.stop(actor, ShutdownReason.SLEEP))

    def _admin_actor_op(self, request: web.Request, op: Callable[[Actor], None]) -> web.Response:
        try:
            actor = self.manager.get_by_id(request.match_info["actor_id"])
        except ActorvisorError as err:
            return web.json_response(err.to_dict(), status=404)
        op(actor)
        return web.json_response(actor.describe())
