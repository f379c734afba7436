"""Signed preview URLs: the token format, its secret, and the check of `/preview/{token}/`.

Owns the service secret (a 32-byte file, mode 0600, outside the state dir; created on
first use, never logged), minting tokens bound to (actor, port, expiry) and verifying
them. `check_preview_token` is self-contained on purpose: the preview route authenticates
by its token alone, so the gateway's other authentication can exempt it by name.
A token is `v1.<actor>.<port>.<expires>.<nonce>.<mac>`, mac = HMAC-SHA256(secret, the rest);
expiry before the TTL is a revocation list of nonces held by the supervisor, refused from
the moment it is added and written to its file off the event loop (supervisor/filewriter.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .filewriter import FileWriter

MAX_TTL_S: Final = 7 * 24 * 3600
_TOKEN: Final = re.compile(r"v1\.([A-Za-z0-9_-]{1,128})\.(\d{1,5})\.(\d{1,12})\.([A-Za-z0-9_-]{16})\.([A-Za-z0-9_-]{43})")


class PreviewDenied(Exception):
    """403: a forged, expired, revoked or malformed token (the reason is for logs only)."""


def load_secret(path: Path) -> bytes:
    """The service's preview secret, created (0600) if absent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"preview secret {path} is shorter than 32 bytes") from None
        return secret
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _mac(secret: bytes, body: str) -> str:
    digest = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Preview:
    actor_id: str
    port: int
    expires_at: int     # unix seconds
    nonce: str


def mint(secret: bytes, actor_id: str, port: int, ttl_s: int, now: float | None = None) -> tuple[str, Preview]:
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer from 1 to 65535, got {port}")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttlSeconds must be an integer from 1 to {MAX_TTL_S}, got {ttl_s}")
    preview = Preview(actor_id, port, int((now or time.time()) + ttl_s), secrets.token_urlsafe(12))
    body = f"v1.{actor_id}.{port}.{preview.expires_at}.{preview.nonce}"
    return f"{body}.{_mac(secret, body)}", preview


def check_preview_token(secret: bytes, token: str, revoked: Container[str] = frozenset(),
                        now: float | None = None) -> Preview:
    """The preview a token grants, or PreviewDenied; the only check the route needs."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        raise PreviewDenied("malformed token")
    body = token.rsplit(".", 1)[0]
    if not hmac.compare_digest(_mac(secret, body), m.group(5)):
        raise PreviewDenied("bad signature")
    preview = Preview(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))
    if (now or time.time()) >= preview.expires_at:
        raise PreviewDenied("expired")
    if preview.nonce in revoked:
        raise PreviewDenied("expired by its owner")
    return preview


MAX_REVOKED: Final = 100_000
REVOKED_FILE: Final = "preview-revoked"   # in the state dir: nonces, not secrets


def default_secret_path(state_dir: Path) -> Path:
    """Where the secret lives when the config names no place: systemd's credentials dir if
    the unit gives one, else /etc/actorvisor (root) or ~/.config/actorvisor; never the
    state dir, so a copy of the state (a backup, a bug report) cannot mint tokens."""
    if creds := os.environ.get("CREDENTIALS_DIRECTORY"):
        return Path(creds) / "preview-secret"
    if os.geteuid() == 0:
        return Path("/etc/actorvisor/preview-secret")
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "actorvisor" / "preview-secret"


def check_secret_place(path: Path, state_dir: Path) -> None:
    resolved, state = path.resolve(), state_dir.resolve()
    if resolved == state or state in resolved.parents:
        raise ValueError(f"preview_secret_file {path} is inside the state dir {state_dir}; "
                         "keep it outside (docs/network.md)")


class RevokedTokens:
    """Nonces of tokens expired before their TTL, each kept until its token would have
    expired anyway, so the set stays bounded by what is still valid. Persisted (an
    append-only file in the state dir, compacted when loaded) so a restart keeps them
    expired. At most MAX_REVOKED at once: past that, expiring one more is refused.

    Loaded (and compacted) when constructed, before the service serves; from then on every
    write goes through one FileWriter, so appends and compactions land in the order made."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer = FileWriter("preview-revoked")
        self.nonces: dict[str, int] = {}
        now = time.time()
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            nonce, _, expires = line.partition(" ")
            if expires.isdigit() and int(expires) > now:
                self.nonces[nonce] = int(expires)
        if len(self.nonces) < len(lines):
            _rewrite(path, self.nonces)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self.nonces

    def add(self, preview: Preview) -> asyncio.Future[None]:
        """Refuse the token from now on. The future is done once that is synced to disk
        (an OSError if it could not be): answer "expired" only then."""
        now = time.time()
        if preview.nonce in self.nonces:
            # Done once the write that added it (perhaps still queued) is.
            return self._writer.submit(lambda: None)
        if len(self.nonces) >= MAX_REVOKED:
            self.nonces = {n: e for n, e in self.nonces.items() if e > now}
            if len(self.nonces) >= MAX_REVOKED:
                raise OverflowError(f"{MAX_REVOKED} preview tokens are already expired early "
                                    "and not yet past their TTL")
            kept = dict(self.nonces)
            self._writer.submit(lambda: _rewrite(self._path, kept))
        self.nonces[preview.nonce] = preview.expires_at
        line = f"{preview.nonce} {preview.expires_at}\n"
        return self._writer.submit(lambda: _append_synced(self._path, line))

    async def drain(self) -> None:
        """Wait for every queued write of the file (the service is stopping)."""
        await self._writer.drain()


def _append_synced(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, nonces: Mapping[str, int]) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text("".join(f"{n} {e}\n" for n, e in nonces.items()))
    partial.replace(path)
