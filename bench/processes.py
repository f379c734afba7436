"""Benchmark: process output and shell keystrokes through the full path, against local baselines.

Starts one real supervisor; in one run:
  throughput — `head -c N /dev/zero` spawned in a VM, every byte received by a subscriber
               (VM pipe → worker → SQLite log → ZeroMQ → supervisor → WebSocket → client),
               next to the same command piped through `cat` into a local pipe;
  echo       — a keystroke written to a shell in the VM until its echo arrives back
               (p50/p99), next to a keystroke into a local PTY running the same shell.

    .venv/bin/python bench/processes.py [--mb 64] [--keys 200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.aio import Client  # noqa: E402
from protocol.processes import Processes  # noqa: E402
from tests.support import SupervisorProc, free_port  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def local_throughput(size: int) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", f"head -c {size} /dev/zero | cat"], stdout=subprocess.PIPE)
    stdout = cast(io.BufferedReader, proc.stdout)
    got = 0
    while chunk := stdout.read1(1 << 16):
        got += len(chunk)
    proc.wait()
    assert got == size
    return size / (time.perf_counter() - started) / 1e6


async def vm_throughput(procs: Processes, size: int) -> float:
    started = time.perf_counter()
    proc = await procs.spawn("head", ["-c", str(size), "/dev/zero"])
    got = 0
    async for chunk in proc.output():
        got += len(chunk.data)
    assert got == size, (got, size)
    return size / (time.perf_counter() - started) / 1e6


def local_echo(keys: int) -> list[float]:
    pid, master = pty.fork()
    if pid == 0:
        os.execvp("/bin/sh", ["/bin/sh"])
    samples = []
    try:
        time.sleep(0.3)
        os.read(master, 4096)  # the prompt
        for i in range(keys):
            key = b"abcdefghij"[i % 10:i % 10 + 1]
            started = time.perf_counter()
            os.write(master, key)
            while key not in os.read(master, 4096):
                pass
            samples.append((time.perf_counter() - started) * 1000)
        os.write(master, b"\x15exit\n")  # Ctrl-U drops the typed line
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(master)
    return samples


async def vm_echo(procs: Processes, keys: int) -> list[float]:
    shell = await procs.open_shell(command="/bin/sh")
    output = shell.output()
    await output.__anext__()  # the prompt
    samples = []
    for i in range(keys):
        key = b"abcdefghij"[i % 10:i % 10 + 1]
        started = time.perf_counter()
        await shell.write(key)
        while key not in (await output.__anext__()).data:
            pass
        samples.append((time.perf_counter() - started) * 1000)
    await shell.write(b"\x15exit\n")
    await shell.wait()
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="output size for the throughput case")
    parser.add_argument("--keys", type=int, default=200, help="keystrokes for the echo case")
    args = parser.parse_args()
    size = args.mb << 20

    with tempfile.TemporaryDirectory(prefix="actorvisor-bench-") as tmp:
        sup = SupervisorProc(Path(tmp) / "state", free_port(), ["--log-level", "warning"], dict(os.environ))
        sup.start()
        try:
            async with Client(sup.url) as client:
                conn = await client.connect("vm", "bench-procs", reconnect=False)
                procs = Processes(conn)
                await vm_throughput(procs, 1 << 20)  # warm-up: the VM is booted, the path is hot
                vm_rate = await vm_throughput(procs, size)
                local_rate = local_throughput(size)
                vm_keys = await vm_echo(procs, args.keys)
                local_keys = local_echo(args.keys)
                await conn.close()
        finally:
            sup.stop()

    print(f"process output, {args.mb} MiB from `head -c` to one subscriber (MB/s)")
    print(f"  baseline: `head | cat` into a local pipe     {local_rate:10.1f}")
    print(f"  VM process → log → relay → WebSocket client  {vm_rate:10.1f}"
          f"   ({local_rate / vm_rate:.1f}x slower)")
    print(f"keystroke echo, {args.keys} keys (ms)            {'p50':>8}{'p99':>8}{'mean':>8}")
    for label, values in (("  baseline: local PTY running /bin/sh", local_keys),
                          ("  shell in the VM, through the service", vm_keys)):
        print(f"{label:<42}{pct(values, .5):>8.2f}{pct(values, .99):>8.2f}{statistics.mean(values):>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
