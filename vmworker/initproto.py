"""The worker ⇄ VM-init wire format (sans-I/O): the Python side of `vminit/vminit.c`.

Every message is one SOCK_SEQPACKET datagram: a 32-byte little-endian header, then for
SPAWN the NUL-terminated strings cwd, argv..., env... ("NAME=value"). File descriptors
travel beside it as SCM_RIGHTS. The C struct `struct msg` is the other half of HEADER;
change both together. This module only builds and parses bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

HEADER: Final = struct.Struct("<IIiiIIHHI")
MAX_MESSAGE: Final = 256 * 1024
MAX_STRINGS: Final = 4096


class Op(IntEnum):
    SPAWN = 1
    KILL = 2
    SHUTDOWN = 3
    SPAWNED = 10
    ERROR = 11
    EXIT = 12
    KILLED = 13


class Flag(IntFlag):
    NONE = 0
    PTY = 1
    GROUP = 2


@dataclass(frozen=True, slots=True)
class Message:
    """A message from the init: `status` is an errno (ERROR, KILLED) or a wait status (EXIT)."""

    op: Op
    id: int
    pid: int
    status: int


def _strings(values: list[str]) -> bytes:
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise ValueError(f"{value[:40]!r}: NUL byte in a command, argument or variable")
        out += raw + b"\0"
    return bytes(out)


def spawn(request_id: int, argv: list[str], env: dict[str, str], cwd: str,
          pty: tuple[int, int] | None = None) -> bytes:
    """SPAWN: with `pty=(rows, cols)` the init makes a terminal and returns its master;
    without, the caller sends stdin, stdout and stderr fds with the message."""
    if not argv:
        raise ValueError("an empty command")
    env_strings = [f"{k}={v}" for k, v in env.items()]
    if 1 + len(argv) + len(env_strings) > MAX_STRINGS:
        raise ValueError(f"too many arguments and variables (limit {MAX_STRINGS})")
    rows, cols = pty or (0, 0)
    body = _strings([cwd, *argv, *env_strings])
    if HEADER.size + len(body) > MAX_MESSAGE:
        raise ValueError(f"command, arguments and environment exceed {MAX_MESSAGE} bytes")
    flags = Flag.PTY if pty else Flag.NONE
    return HEADER.pack(Op.SPAWN, request_id, 0, 0, len(argv), len(env_strings), rows, cols, flags) + body


def kill(request_id: int, pid: int, sig: int, *, group: bool) -> bytes:
    return HEADER.pack(Op.KILL, request_id, pid, sig, 0, 0, 0, 0, Flag.GROUP if group else Flag.NONE)


def shutdown(grace_ms: int) -> bytes:
    return HEADER.pack(Op.SHUTDOWN, 0, 0, grace_ms, 0, 0, 0, 0, 0)


def decode(data: bytes) -> Message:
    if len(data) < HEADER.size:
        raise ValueError(f"short message from the VM init ({len(data)} bytes)")
    op, request_id, pid, status, *_ = HEADER.unpack_from(data)
    return Message(Op(op), request_id, pid, status)
