"""VM boot, command latency and idle memory: the long-lived VM next to per-command bwrap.

Baseline, measured in the same run: the first version's way of running a command, one
fresh bubblewrap sandbox per command (`bwrap --unshare-all ... sh -c CMD`, as root, no
init, no cgroup, no seccomp). Measured for actorvisor: a full VM boot (identity, disk
image — mkfs on an actor's first boot, mount after —, cgroup, bwrap with vminit as PID 1,
a first command), then commands run through the VM's init, and the memory an idle VM
holds (its bwrap monitor and init, as USS, and what its cgroup charges).

Run as root: `.venv/bin/python bench/sandbox.py [--vms 10] [--commands 300]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmworker import vmroot  # noqa: E402

OLD_ARGV = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin"]


def pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100)[q - 1] if len(samples) > 1 else samples[0]


def row(name: str, samples: list[float]) -> str:
    return (f"  {name:<44} p50 {statistics.median(samples):7.2f} ms   p99 {pct(samples, 99):7.2f} ms"
            f"   (n={len(samples)})")


async def old_command(workspace: Path) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *OLD_ARGV, "--bind", str(workspace), "/workspace", "--", "/bin/sh", "-c", "true",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await proc.communicate()
    return (time.perf_counter() - started) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--commands", type=int, default=300)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/sandbox.py runs VMs as the service does: as root")
    from tests.support import vm_settings
    from vmworker.vm import Vm

    tmp = Path(tempfile.mkdtemp(prefix="avbench-"))
    state = tmp / "state"
    settings = vm_settings(state, disk_mb=1024)
    try:
        (tmp / "ws").mkdir()
        old = [await old_command(tmp / "ws") for _ in range(args.commands)]

        boots, reboots, firsts, vms = [], [], [], []
        for i in range(args.vms):
            actor_dir = state / "actors" / f"b{i}"
            actor_dir.mkdir(parents=True)
            vm = Vm(actor_dir, f"b{i}", state, 0.0, settings, lambda *_: None)
            started = time.perf_counter()
            await vm.boot()
            boots.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await vm.exec("true")
            firsts.append((time.perf_counter() - started) * 1000)
            vms.append(vm)
        warm = []
        for _ in range(args.commands):
            started = time.perf_counter()
            await vms[0].exec("true")
            warm.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(1.0)
        uss, charged = [], []
        for vm in vms:
            assert vm.machine is not None
            procs = [psutil.Process(vm.machine.bwrap.pid), psutil.Process(vm.machine.init_pid)]
            uss.append(sum(p.memory_full_info().uss for p in procs) / 2**20)
            charged.append(vm.memory_bytes() / 2**20)
        for i, vm in enumerate(vms):
            await vm.stop()
            vm = Vm(state / "actors" / f"b{i}", f"b{i}", state, 0.0, settings, lambda *_: None)
            started = time.perf_counter()
            await vm.boot()
            reboots.append((time.perf_counter() - started) * 1000)
            await vm.stop()
        image = state / "actors" / "b0" / "disk.img"
        print(f"bench/sandbox.py: {args.vms} VMs, {args.commands} commands, "
              f"{os.cpu_count()} cores")
        print("baseline: one bwrap sandbox per command (the first version)")
        print(row("command `true` (sandbox start included)", old))
        print("actorvisor: one long-lived VM per actor, commands through its init")
        print(row("VM boot, first ever (mkfs of the disk image)", boots))
        print(row("VM boot, later (mount, cgroup, bwrap, init)", reboots))
        print(row("first command after boot", firsts))
        print(row("warm command `true`", warm))
        print(f"  idle VM memory: bwrap + init USS {statistics.median(uss):.2f} MiB, "
              f"cgroup-charged {statistics.median(charged):.2f} MiB; disk image on the host "
              f"{image.stat().st_blocks * 512 / 2**20:.1f} MiB of {settings.disk_mb} MiB")
        print(f"  warm command speed-up over the baseline: "
              f"{statistics.median(old) / statistics.median(warm):.1f}x (p50)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() == 0:
        vmroot.enter_private_mount_namespace()
    asyncio.run(main())
