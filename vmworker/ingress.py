"""The way into a VM's ports: a Unix socket the worker owns, one in-VM bridge per connection.

The VM's loopback is reachable only from inside its network namespace, so a connection to
one of its ports is made in the VM: for each connection accepted on the ingress socket the
worker reads a fixed 6-byte header (`%05d\\n`, the port), starts `netbridge --connect PORT`
in the VM with that very connection as its stdin/stdout, and lets go of it. The bridge
answers `+` (connected) or `-` (nothing listens) and then copies bytes; the worker is not in
the data path. The socket lives in the supervisor's private runtime dir (0600), never in
anything the VM can reach: holding it is holding every port of the VM, so only the
supervisor's preview route (supervisor/previewproxy.py, which checks a signed token first)
connects to it. It decides nothing about who may connect; it never logs payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from protocol.errors import ActorvisorError

from .sandbox import BRIDGE_PATH, Machine

HEADER_BYTES: Final = 6
HEADER_TIMEOUT_S: Final = 5.0

log = structlog.get_logger()


def ingress_path(ingress_dir: Path, actor_id: str) -> Path:
    """Where an actor's worker listens; the supervisor connects here (one rule for both)."""
    return ingress_dir / f"{actor_id}.sock"


def header(port: int) -> bytes:
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer from 1 to 65535, got {port}")
    return b"%05d\n" % port


class Ingress:
    """Listens on the actor's ingress socket while its VM runs; `close()` stops it."""

    def __init__(self, path: Path, machine: Callable[[], Machine | None]) -> None:
        self._path = path
        self._machine = machine
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self._path))
        os.chmod(self._path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener), name="vm-ingress")

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._serving) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            try:
                async with asyncio.timeout(HEADER_TIMEOUT_S):
                    raw = b""
                    while len(raw) < HEADER_BYTES:  # never more: what follows is the bridge's
                        chunk = await loop.sock_recv(conn, HEADER_BYTES - len(raw))
                        if not chunk:
                            return
                        raw += chunk
                port = int(raw[:5]) if raw[:5].isdigit() and raw[5:] == b"\n" else 0
                machine = self._machine()
                if not 1 <= port <= 65535 or machine is None:
                    await loop.sock_sendall(conn, b"-")
                    return
                await self._bridge(machine, conn, port)
            except (OSError, TimeoutError, ActorvisorError) as exc:  # the VM went, or its pids ran out
                log.info("vm_ingress_failed", error=str(exc))
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, b"-")

    @staticmethod
    async def _bridge(machine: Machine, conn: socket.socket, port: int) -> None:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            proc = await machine.spawn([BRIDGE_PATH, "--connect", str(port)],
                                       env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                       stdio=(conn.fileno(), conn.fileno(), devnull))
        finally:
            os.close(devnull)
        # Its end is nobody's business here; a VM that goes away ends it (retrieved, not raised).
        proc.exited.add_done_callback(lambda f: f.cancelled() or f.exception())
