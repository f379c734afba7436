"""The supervisor process: wires the gateway, the actor manager and the worker hub.

`Supervisor.run()` serves until SIGTERM/SIGINT, then drains: stop accepting, close every
client with a retryable reason, sleep every worker in parallel, kill stragglers' process
groups, remove the ipc socket. It owns every task it starts and awaits each one at stop.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any

import structlog
from aiohttp import WSCloseCode, web

from protocol import worker as wire
from protocol.errors import ActorvisorError

from .actors import ActorManager
from .config import Config
from .connections import CLOSE_GOING_AWAY
from .gateway import Gateway
from .hub import WorkerHub
from .spawner import Spawner, SubprocessSpawner
from .zygote import ZygoteSpawner

log = structlog.get_logger("supervisor")


class Supervisor:
    def __init__(self, config: Config, spawner: Spawner | None = None) -> None:
        self.config = config
        self._owns_runtime_dir = config.runtime_dir is None
        self.runtime_dir: Path = config.resolved_runtime_dir()
        self.hub = WorkerHub(self.runtime_dir, self._on_worker_message)
        self.spawner = spawner or (ZygoteSpawner() if config.spawner == "zygote" else SubprocessSpawner())
        self.manager = ActorManager(config, self.spawner, self.hub.endpoint, self.hub.send)
        self.gateway = Gateway(self.manager, config)
        self.app = web.Application(client_max_size=config.max_message_size + 1024)
        self.app.add_routes(self.gateway.routes())
        self.app.add_routes([web.get("/admin/workers", self.admin_workers),
                             web.post("/admin/actors/{actor_id}/reset", self.admin_reset)])
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.port: int = config.port

    def _on_worker_message(self, actor_id: str, msg: wire.WorkerToSupervisor) -> None:
        self.manager.on_worker_message(actor_id, msg)

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.hub.start()
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and self.config.port == 0:
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick(), name="supervisor-tick")
        log.info("supervisor_listening", listen=f"{self.config.host}:{self.port}",
                 state_dir=str(self.config.state_dir), ipc=self.hub.endpoint)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            self.manager.tick()

    async def stop(self, timeout: float | None = None) -> None:
        log.info("supervisor_draining", connections=len(self.gateway.connections))
        self.manager.accepting = False
        for conn in list(self.gateway.connections):
            conn.close_soon(WSCloseCode.GOING_AWAY, CLOSE_GOING_AWAY)
        await self.manager.stop_all(self.config.stop_timeout if timeout is None else timeout)
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.hub.close()
        await self.spawner.close()
        if self._owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("supervisor_stopped")

    def request_stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def admin_workers(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "supervisor": {"connections": len(self.gateway.connections),
                           "connectionsTotal": self.gateway.connections_total,
                           "actionsTotal": self.manager.actions_total},
            "actors": [a.describe() for a in self.manager.all()],
        }
        return web.json_response(body)

    async def admin_reset(self, request: web.Request) -> web.Response:
        try:
            actor = self.manager.get_by_id(request.match_info["actor_id"])
        except ActorvisorError as err:
            return web.json_response(err.to_dict(), status=404)
        self.manager.reset(actor)
        return web.json_response(actor.describe())
