"""A test-owned `$NOTIFY_SOCKET`: the datagram socket systemd would listen on."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        """Every message waiting now (never blocks), also appended to `received`."""
        messages = []
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            messages.append(dict(line.split("=", 1) for line in data.decode().split("\n") if line))
        self.received.extend(messages)
        return messages

    async def until(self, predicate: Callable[[list[dict[str, str]]], bool],
                    timeout: float = 30.0) -> list[dict[str, str]]:
        """Keep receiving until `predicate(everything received so far)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if predicate(self.received):
                return self.received
            if time.monotonic() > deadline:
                raise AssertionError(f"notification not received; got {self.received}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def pings(messages: list[dict[str, str]]) -> int:
    return sum(m.get("WATCHDOG") == "1" for m in messages)
