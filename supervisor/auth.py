"""Who the caller is: tokens, their roles and the actor keys they may reach.

A token is stored as the SHA-256 of its text (`sha256:<hex>`, what `actorvisor token`
prints) or as plain text; either way the presented token is hashed and compared with
`hmac.compare_digest` against every configured hash, so the time taken says nothing about
how much of a token matched. This module never logs a token and never returns one.

The unmodified RivetKit client carries its `token` as the `rvt-token` query parameter of a
gateway URL, the `x-rivet-token` header on HTTP, the `rivet_token.<token>` WebSocket
subprotocol (direct actor connections), and `Authorization: Bearer` on the manager API.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

HASH_PREFIX = "sha256:"


class Role(Enum):
    CLIENT = "client"
    ADMIN = "admin"


def hash_token(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token and the hash to put in the config file."""
    token = "avt_" + secrets.token_urlsafe(32)
    return token, hash_token(token)


@dataclass(frozen=True)
class Grant:
    role: Role
    digest: str                                   # sha256:<hex>
    prefixes: tuple[str, ...] = ()                # empty: every key
    name: str = ""

    def reaches(self, key: str) -> bool:
        return not self.prefixes or any(key.startswith(p) for p in self.prefixes)


@dataclass(frozen=True)
class Auth:
    grants: tuple[Grant, ...] = ()
    on_before_connect: Callable[[Grant, Any], bool] | None = field(default=None, compare=False)

    @property
    def enabled(self) -> bool:
        return bool(self.grants)

    def check(self, presented: str | None) -> Grant | None:
        """The grant whose hash matches `presented`, compared in constant time."""
        if not presented:
            return None
        digest = hash_token(presented).encode()
        found: Grant | None = None
        for grant in self.grants:  # every grant is compared: no early exit on a match
            if hmac.compare_digest(digest, grant.digest.encode()):
                found = grant
        return found

    @classmethod
    def from_config(cls, env_token: str, tokens: Iterable[Mapping[str, Any]],
                    hook: str = "") -> Auth:
        grants = []
        if env_token:
            grants.append(Grant(Role.ADMIN, _digest(env_token), name="env"))
        for i, entry in enumerate(tokens):
            secret = str(entry.get("hash") or entry.get("token") or "")
            if not secret:
                raise ValueError(f"tokens[{i}]: needs 'hash' (from `actorvisor token`) or 'token'")
            role = Role(str(entry.get("role", "client")))
            prefixes = tuple(str(p) for p in entry.get("prefixes", ()))
            grants.append(Grant(role, _digest(secret), prefixes, str(entry.get("name", i))))
        return cls(tuple(grants), load_hook(hook) if hook else None)


def _digest(secret: str) -> str:
    return secret if secret.startswith(HASH_PREFIX) else hash_token(secret)


def load_hook(spec: str) -> Callable[[Grant, Any], bool]:
    """`package.module:function`, called as `function(grant, params) -> bool` before a
    connection or action reaches any actor (RivetKit's onBeforeConnect)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"auth_hook wants 'module:function', got {spec!r}")
    hook = getattr(importlib.import_module(module), attr)
    if not callable(hook):
        raise ValueError(f"auth_hook {spec!r} is not callable")
    return hook  # type: ignore[no-any-return]
