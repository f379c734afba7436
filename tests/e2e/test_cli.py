"""The `actorvisor` command line against a running service."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from tests.support import ROOT, SupervisorProc


def cli(sup: SupervisorProc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACTORVISOR_LISTEN": f"127.0.0.1:{sup.port}"}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_call_demo_and_events(supervisor: SupervisorProc) -> None:
    out = cli(supervisor, "call", "cli-actor", "exec", '"echo hi from the vm"')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stdout"] == "hi from the vm\n"

    out = cli(supervisor, "call", "cli-actor", "noSuchAction")
    assert out.returncode == 1
    assert "actor.unknown_action" in out.stderr

    out = cli(supervisor, "demo", "--actor", "cli-actor")
    assert out.returncode == 0, out.stderr
    assert "hello from the VM" in out.stdout  # readFile of what the agent wrote
    assert "[turn ended: end_turn]" in out.stdout

    out = cli(supervisor, "events", "cli-actor")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {"vmBooted", "sessionEvent"} <= {e["name"] for e in events}
    out = cli(supervisor, "events", "cli-actor", "--after", str(seqs[-3]))
    assert [json.loads(line)["seq"] for line in out.stdout.splitlines()] == seqs[-2:]


def test_call_spawn_then_wait(supervisor: SupervisorProc) -> None:
    out = cli(supervisor, "call", "cli-procs", "spawn", "sh", '["-c", "exit 7"]')
    assert out.returncode == 0, out.stderr
    pid = json.loads(out.stdout)["pid"]
    out = cli(supervisor, "call", "cli-procs", "waitProcess", str(pid))
    assert json.loads(out.stdout) == {"exitCode": 7, "signal": None}


class Terminal:
    """`actorvisor shell` on a real pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, sup: SupervisorProc, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.set_size(24, 80)
        env = {**os.environ, "ACTORVISOR_LISTEN": f"127.0.0.1:{sup.port}", "TERM": "xterm"}

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "shell", *args], cwd=ROOT,
                                     env=env, stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=controlling_terminal)
        os.close(slave)
        self.screen = b""

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} never appeared; the screen: {self.screen[-2000:]!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # the other side closed: nothing more will come
                    assert needle in self.screen, self.screen[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_shell_attaches_a_terminal_with_resize_ctrl_c_and_exit(supervisor: SupervisorProc) -> None:
    term = Terminal(supervisor, "cli-shell", "--command", "/bin/sh")
    try:
        # Markers are computed by the VM's shell, so the local echo of what is typed
        # (before the command has made the terminal raw) never matches them.
        term.type(b"stty size; echo R$((1+1))\n")
        term.expect(b"R2\r\n")
        assert b"24 80" in term.screen
        term.set_size(40, 120)  # SIGWINCH to the command, which resizes the VM's terminal
        for attempt in range(50):
            term.type(f"stty size; echo S$(({attempt}+1000))\n".encode())
            term.expect(f"S{attempt + 1000}\r\n".encode())
            if b"40 120" in term.screen:
                break
            time.sleep(0.2)
        assert b"40 120" in term.screen
        term.type(b"sleep 600\n")
        time.sleep(0.5)
        term.type(b"\x03")  # raw mode: Ctrl-C travels to the VM's terminal, which interrupts
        term.type(b"echo B$((2+2))\n")
        term.expect(b"B4\r\n")
        term.type(b"exit 5\n")
        assert term.proc.wait(timeout=30) == 5
        # The local terminal was given back as it was (raw mode undone).
        assert termios.tcgetattr(term.master)[3] & termios.ICANON
    finally:
        term.close()
