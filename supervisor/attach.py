"""`actorvisor shell ACTOR`: your terminal attached to a new shell in the actor's VM.

As `docker exec -it` feels: the local terminal goes raw (every key, Ctrl-C included, goes
to the VM's terminal, whose line discipline does what a terminal does with it), a SIGWINCH
resizes the VM's terminal, and Ctrl-D or `exit` ends the shell and this command with the
shell's exit status. With a stdin that is not a terminal, its bytes are typed into the
shell and its end is a Ctrl-D.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator

from protocol.aio import Client
from protocol.names import ACTOR_KIND_VM
from protocol.processes import Processes, Shell

EOT = b"\x04"


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return max(size.columns, 1), max(size.lines, 1)
    except OSError:
        return 80, 24


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Raw mode for the life of the shell; the terminal is restored however it ends."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # keep what was typed ahead (TCSAFLUSH would drop it)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _type_stdin(shell: Shell, fd: int) -> None:
    """Forward stdin's bytes in order, one write at a time; its end is a Ctrl-D."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            chunks.put_nowait(os.read(fd, 65536))
        except OSError:  # the terminal hung up: as good as its end
            chunks.put_nowait(b"")

    loop.add_reader(fd, readable)
    try:
        while data := await chunks.get():
            await shell.write(data)
        loop.remove_reader(fd)
        await shell.write(EOT)
    finally:
        loop.remove_reader(fd)


async def attach(url: str, actor: str, command: str | None, args: list[str] | None) -> int:
    stdin, stdout = sys.stdin.fileno(), sys.stdout.buffer
    loop = asyncio.get_running_loop()
    async with Client(url) as client:
        conn = await client.connect(ACTOR_KIND_VM, actor, reconnect=False)
        cols, rows = _size(stdin if os.isatty(stdin) else sys.stdout.fileno())
        shell = await Processes(conn).open_shell(command=command, args=args, cols=cols, rows=rows,
                                                 env={"TERM": os.environ.get("TERM", "xterm-256color")})

        def resized() -> None:
            loop.create_task(shell.resize(*_size(stdin)))

        with _raw(stdin):
            loop.add_signal_handler(signal.SIGWINCH, resized)
            typing = asyncio.create_task(_type_stdin(shell, stdin))
            try:
                async for chunk in shell.output():
                    stdout.write(chunk.data)
                    stdout.flush()
            finally:
                loop.remove_signal_handler(signal.SIGWINCH)
                typing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await typing
        end = await shell.wait()
        await conn.close()
    if end.signal is not None:
        return 128 + signal.Signals[end.signal].value if end.signal in signal.Signals.__members__ else 1
    return end.exit_code or 0
