"""systemd's readiness protocol (sd_notify(3)): datagrams of `KEY=VALUE` lines to $NOTIFY_SOCKET.

A few lines rather than a library: the protocol is one `sendto()` of newline-separated
assignments on an AF_UNIX datagram socket, whose address is a path or, with a leading
`@`, a name in the abstract namespace. The C library (python-systemd) needs libsystemd's
headers to build, and the small PyPI clients add nothing but a dependency.

`Notifier` owns that socket and the watchdog settings systemd passed in the environment,
which it removes so that workers (and the VMs they start) do not inherit them: only the
main process may speak for the service. It never blocks: a datagram the manager cannot
take right now is dropped and logged, and the next one says the same thing anyway.
Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import structlog

log = structlog.get_logger("supervisor.sdnotify")

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        # sd_watchdog_enabled(3) recommends pinging at half the timeout.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None
        if address:
            if address.startswith("@"):
                self._target: str | bytes = "\0" + address[1:]
            elif address.startswith("/"):
                self._target = address
            else:
                log.warning("notify_socket_unsupported", address=address)
                self.address = None
                return
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read (and remove) $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID."""
        env = os.environ if environ is None else environ
        address, usec, pid = (env.pop(name, None) for name in _ENV)
        watchdog_usec: int | None = None
        if usec and usec.isdigit() and int(usec) > 0:
            # WATCHDOG_PID names the process the watchdog is for; another one's is not ours.
            if pid is None or (pid.isdigit() and int(pid) == os.getpid()):
                watchdog_usec = int(usec)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification, e.g. `send(READY=1, STATUS="...")`; False if it was not sent."""
        if self._sock is None:
            return False
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._target)
        except OSError as exc:
            log.warning("notify_failed", error=str(exc), message=message[:80])
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    # A newline would start a new assignment: a status text must never inject one.
    return value.replace("\n", " ")


SD_LISTEN_FDS_START = 3


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds(3)).

    With them the listening socket outlives a restart: while one supervisor drains and
    the next starts, clients queue in its backlog instead of being refused (the RivetKit
    client gives up on a refused reconnect). Reads and removes $LISTEN_PID, $LISTEN_FDS
    and $LISTEN_FDNAMES so nothing we start inherits them; fds meant for another pid
    are left alone.
    """
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if not (pid and pid.isdigit() and int(pid) == os.getpid() and count and count.isdigit()):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
