"""One actor's egress policy, set by an admin: `GET|PUT|DELETE /admin/actors/{id}/network`.

Owns the admin side of per-actor policies: checking a policy (vmworker/netpolicy.py, the
same parser the worker uses) and writing it whole to `network.json` in the actor's dir,
where its worker reads it on the next connection (live) or at its next boot. It never
talks to a worker and never wakes one. Only the admin role reaches these routes (the
perimeter's rule for `/admin/`); no action writes a policy, so a client cannot widen its own.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import structlog
from aiohttp import web

from protocol.errors import ActorvisorError, ErrorCode
from vmworker.netpolicy import Policy, PolicyError, load_actor_policy, save_actor_policy

from .actors import Actor, ActorManager
from .config import Config
from .filewriter import FileWriter

log = structlog.get_logger("supervisor.netadmin")

MAX_BODY: Final = 256 * 1024
ROUTE: Final = "/admin/actors/{actor_id}/network"


def _error(code: ErrorCode, message: str, status: int) -> web.Response:
    return web.json_response(ActorvisorError(code, message).to_dict(), status=status)


class NetworkAdmin:
    def __init__(self, manager: ActorManager, config: Config) -> None:
        self._manager = manager
        self._default = Policy.parse(config.network_allow, config.network_deny)
        # Two admins changing one actor's policy at once: their writes land in the order
        # their requests came, so the file holds the last one answered.
        self._writer = FileWriter("netpolicy")

    def routes(self) -> list[web.RouteDef]:
        return [web.get(ROUTE, self.get), web.put(ROUTE, self.put), web.delete(ROUTE, self.delete)]

    def _actor(self, request: web.Request) -> Actor:
        return self._manager.get_by_id(request.match_info["actor_id"])

    async def _describe(self, actor: Actor) -> dict[str, Any]:
        own = await asyncio.to_thread(load_actor_policy, actor.dir)
        return {"actorId": actor.id, "source": "default" if own is None else "actor",
                "policy": (self._default if own is None else own).to_wire(),
                "applies": "now" if actor.running else "at next boot"}

    async def get(self, request: web.Request) -> web.Response:
        """The actor's effective policy and where it comes from."""
        try:
            return web.json_response(await self._describe(self._actor(request)))
        except ActorvisorError as err:
            return web.json_response(err.to_dict(), status=404)
        except PolicyError as exc:
            return _error(ErrorCode.INTERNAL, str(exc), 500)

    async def put(self, request: web.Request) -> web.Response:
        """Replace the actor's policy with the body `{allow?: [rule], deny?: [rule]}`."""
        try:
            actor = self._actor(request)
        except ActorvisorError as err:
            return web.json_response(err.to_dict(), status=404)
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(ErrorCode.MESSAGE_TOO_LARGE, f"a policy is at most {MAX_BODY} bytes", 413)
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _error(ErrorCode.MESSAGE_TOO_LARGE, f"a policy is at most {MAX_BODY} bytes", 413)
        try:
            policy = Policy.from_wire(json.loads(raw))
        except ValueError as exc:   # PolicyError included: the message names the rule
            return _error(ErrorCode.INVALID_ARGS, f"network policy: {exc}", 400)
        await self._writer.submit(lambda: save_actor_policy(actor.dir, policy))
        log.info("actor_network_policy_set", actor=actor.id, allow=len(policy.allow), deny=len(policy.deny))
        return web.json_response(await self._describe(actor))

    async def delete(self, request: web.Request) -> web.Response:
        """Drop the actor's own policy: the service default applies again."""
        try:
            actor = self._actor(request)
        except ActorvisorError as err:
            return web.json_response(err.to_dict(), status=404)
        await self._writer.submit(lambda: save_actor_policy(actor.dir, None))
        log.info("actor_network_policy_cleared", actor=actor.id)
        return web.json_response(await self._describe(actor))
