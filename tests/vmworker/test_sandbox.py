"""The VM as an attacker inside it sees it: one long-lived machine, contained and bounded.

Each test boots a real VM in-process (identity, disk image, cgroup, bwrap, vminit as PID 1)
and runs commands in it the way `exec` does. The attacks are the ones a security review
of an agent host starts with; each must fail."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from protocol.errors import ActorvisorError, ErrorCode
from tests.support import LONG_SLEEP, leftover_sleeps, vm_settings
from vmworker.sandbox import MAX_OUTPUT_BYTES, PROXY_ENV, MachineSpec, bwrap_argv
from vmworker.vm import Vm
from vmworker.vmfs import normalize

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containment needs the service's root")

LIMITS: dict[str, Any] = {"memory_mb": 192, "pids": 128, "cpus": 0.5, "disk_mb": 64}


class BootedVm:
    def __init__(self, vm: Vm, limits: list[tuple[str, dict[str, Any]]]) -> None:
        self.vm = vm
        self.limits = limits

    async def sh(self, script: str, **kwargs: Any) -> tuple[int, str, str]:
        result = await self.vm.run(["/bin/bash", "-c", script], **kwargs)
        return result.exit_code, result.stdout, result.stderr

    async def py(self, code: str, **kwargs: Any) -> tuple[int, str, str]:
        result = await self.vm.run(["python3", "-c", code], **kwargs)
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[BootedVm]:
    state = tmp_path / "state"
    actor_dir = state / "actors" / f"t{secrets.token_hex(4)}"
    actor_dir.mkdir(parents=True)
    limits: list[tuple[str, dict[str, Any]]] = []
    vm = Vm(actor_dir, actor_dir.name, state, 0.0, vm_settings(state, **LIMITS),
            lambda kind, payload: limits.append((kind, payload)))
    try:
        await vm.boot()
        yield BootedVm(vm, limits)
    finally:
        await vm.stop()


@pytest.fixture
def host_listener() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_argv_isolates_by_construction(tmp_path: Path) -> None:
    fds = {name: 100 + i for i, name in enumerate(
        ["control", "info", "block", "seccomp", "init", "etc/passwd", "etc/group", "etc/hosts",
         "dir/workspace", "dir/tmp", "dir/home"])}
    argv = bwrap_argv(MachineSpec(tmp_path, tmp_path / "init", 1, 1, 64), fds)
    assert argv[0] == "bwrap"
    for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                 "--clearenv", "--as-pid-1"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--seccomp") + 1] == "103"
    assert "--share-net" not in argv
    sources = [argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind", "--ro-bind-try")]
    assert not any(s in ("/", "/etc", "/root", "/home", "/etc/shadow") for s in sources)
    assert not any(str(tmp_path) in arg for arg in argv), "no host path of the actor in the argv"
    assert argv[-3:] == ["--", "/init", "100"]


async def test_one_machine_background_processes_live_on_between_commands(box: BootedVm) -> None:
    code, out, _ = await box.sh(f"sleep {LONG_SLEEP} & echo $!")
    assert code == 0
    pid = out.strip()
    _, ps, _ = await box.sh("ps -e -o pid=,args=")
    assert any(line.split(None, 1) == [pid, f"sleep {LONG_SLEEP}"] for line in ps.splitlines()), ps
    # A server started in the background by one command answers the next over loopback.
    code, _, err = await box.sh("python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &")
    assert code == 0, err
    fetch = ("import time, urllib.request\n"
             "for _ in range(100):\n"
             "    try:\n"
             "        print(urllib.request.urlopen('http://127.0.0.1:8000/').status); break\n"
             "    except OSError: time.sleep(0.05)\n")
    code, out, err = await box.py(fetch)
    assert (code, out.strip()) == (0, "200"), err
    # PID 1 is the VM's own init, not bwrap, and every process descends from it.
    _, init, _ = await box.sh("cat /proc/1/cmdline | tr '\\0' ' '")
    assert init.split()[0] == "/init"


async def test_everything_dies_with_the_vm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    actor_dir = state / "actors" / "dies"
    actor_dir.mkdir(parents=True)
    vm = Vm(actor_dir, "dies", state, 0.0, vm_settings(state, **LIMITS), lambda *_: None)
    await vm.boot()
    try:
        await vm.exec(f"sleep {LONG_SLEEP} & (setsid sleep {LONG_SLEEP} &) ; nohup sleep {LONG_SLEEP} >/dev/null 2>&1 &")
        assert len(leftover_sleeps()) == 3
        init_pid = vm.machine.init_pid if vm.machine else 0
        uid = psutil.Process(init_pid).uids().real
    finally:
        await vm.stop()
    assert not leftover_sleeps()
    assert not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    assert not os.path.ismount(vm.root)


def find_in_vm(secret: str) -> str:
    """A VM command that prints every place the VM can read `secret` from: every process's
    environment and command line (PID 1 included), every file outside the host's
    read-only /usr, its shared memory. The secret travels base64-encoded and reaches grep
    on stdin, so the search itself puts it in no command line."""
    encoded = base64.b64encode(secret.encode()).decode()
    return (f"n=$(printf %s {encoded} | base64 -d); "
            "printf %s \"$n\" | grep -l -s -F -f - /proc/[0-9]*/environ /proc/[0-9]*/cmdline; "
            "printf %s \"$n\" | grep -r -l -s -F -f - /etc /workspace /tmp /home /dev/shm /init")


async def test_no_secret_of_the_host_reaches_the_vm(tmp_path: Path) -> None:
    key = "sk-ant-test-" + secrets.token_hex(16)
    os.environ["ANTHROPIC_API_KEY"] = key
    state = tmp_path / "state"
    actor_dir = state / "actors" / "secret"
    actor_dir.mkdir(parents=True)
    vm = Vm(actor_dir, "secret", state, 0.0, vm_settings(state, **LIMITS), lambda *_: None)
    try:
        await vm.boot()
        await vm.exec("sleep 30 &")
        result = await vm.exec(find_in_vm(key) + "; tr '\\0' '\\n' < /proc/1/environ")
    finally:
        del os.environ["ANTHROPIC_API_KEY"]
        await vm.stop()
    lines = result.stdout.split()
    assert not [line for line in lines if line.startswith("/")], lines
    assert {line.split("=", 1)[0] for line in lines} <= {"PATH", "HOME", "LANG", "PWD", *PROXY_ENV}


async def test_vm_root_is_not_host_root(box: BootedVm) -> None:
    code, out, _ = await box.sh("cat /proc/self/uid_map /proc/self/gid_map")
    inside, outside, count = (int(x) for x in out.split()[:3])
    assert (inside, count) == (0, 1) and outside >= 0x70000000
    assert "0 0" not in " ".join(out.split()[:2])
    # The host agrees: the VM's processes run as that unprivileged uid.
    assert box.vm.machine is not None
    host_uid = psutil.Process(box.vm.machine.init_pid).uids()
    assert host_uid.real == host_uid.effective == outside
    # And so do the files it writes.
    await box.sh("echo x > /workspace/mine")
    assert os.stat(box.vm.root / "workspace" / "mine").st_uid == outside


async def test_host_root_through_proc_sys_is_closed(box: BootedVm) -> None:
    # The attack: write core_pattern, crash, get a host program run as root. Write back
    # the value the host has (never change it), from inside the VM.
    current = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    code, _, err = await box.sh(f"printf '%s\\n' '{current}' > /proc/sys/kernel/core_pattern")
    assert code != 0 and ("Read-only" in err or "Permission denied" in err), err
    code, _, err = await box.sh("echo b > /proc/sysrq-trigger")
    assert code != 0
    code, _, err = await box.sh("ls /sys")
    assert code != 0 and "No such file" in err
    _, mounts, _ = await box.sh("cat /proc/self/mountinfo")
    # No host path of the actor in the mount table: its dirs come from its own disk.
    assert str(box.vm.actor_dir) not in mounts and str(box.vm.state_dir) not in mounts
    workspace = next(line for line in mounts.splitlines() if line.split()[4] == "/workspace")
    assert workspace.split(" - ")[1].split()[1].startswith("/dev/loop")


async def test_system_is_read_only_capabilities_dropped_no_new_privs(box: BootedVm) -> None:
    code, _, err = await box.sh("touch /usr/x || touch /etc/x || touch /x || mkdir /opt")
    assert code != 0 and "Read-only" in err
    _, out, _ = await box.sh("grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status")
    assert dict(line.split(":\t") for line in out.splitlines()) == {
        "CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}


SYSCALL_PROBES = """
import ctypes, errno, fcntl, json, os, sys, termios
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = getattr(libc, name)(*args)
    return errno.errorcode.get(ctypes.get_errno(), "OK") if r == -1 else "OK"
def sysc(nr, *args):
    r = libc.syscall(nr, *args)
    return errno.errorcode.get(ctypes.get_errno(), "OK") if r == -1 else "OK"
sibling = int(sys.argv[1])
out = {
  "ptrace_attach": sysc(101, 16, sibling, 0, 0),          # PTRACE_ATTACH
  "process_vm_readv": sysc(310, sibling, 0, 0, 0, 0, 0),
  "mount": call("mount", b"none", b"/tmp", b"tmpfs", 0, None),
  "unshare_user": call("unshare", 0x10000000),            # CLONE_NEWUSER
  "unshare_mount": call("unshare", 0x00020000),           # CLONE_NEWNS
  "keyctl": sysc(250, 0, 0, 0, 0, 0),                     # KEYCTL_GET_KEYRING_ID
  "add_key": sysc(248, b"user", b"x", b"y", 1, 0xfffffffd),
  "bpf": sysc(321, 0, 0, 0),
  "perf_event_open": sysc(298, 0, 0, -1, -1, 0),
  "userfaultfd": sysc(323, 0),
  "init_module": sysc(175, 0, 0, b""),
  "kexec_load": sysc(246, 0, 0, 0, 0),
  "reboot": sysc(169, 0xfee1dead, 672274793, 0x4321fedc, 0),
  "open_by_handle_at": sysc(304, 0, 0, 0),
  "io_uring_setup": sysc(425, 1, 0),
  "clone3": sysc(435, 0, 0),
}
master, slave = os.openpty()
try:
    fcntl.ioctl(slave, termios.TIOCSTI, b"x")
    out["tiocsti"] = "OK"
except OSError as e:
    out["tiocsti"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


async def test_dangerous_system_calls_are_refused(box: BootedVm) -> None:
    _, sibling, _ = await box.sh("sleep 60 >/dev/null 2>&1 & echo $!")
    result = await box.vm.run(["python3", "-c", SYSCALL_PROBES, sibling.strip()], timeout_s=30)
    assert result.exit_code == 0, result.stderr
    refused = json.loads(result.stdout)
    assert refused.pop("clone3") == "ENOSYS" and refused.pop("io_uring_setup") == "ENOSYS"
    assert all(value == "EPERM" for value in refused.values()), refused
    # Ordinary work still runs: threads, forks, pipes, sockets on loopback, a pty.
    code, out, err = await box.py(
        "import threading, subprocess, socket, os\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "print(subprocess.run(['echo', 'ok'], capture_output=True, text=True).stdout.strip())\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print('listen')\n"
        "m, s2 = os.openpty(); print('pty')\n")
    assert (code, out.split()) == (0, ["ok", "listen", "pty"]), err


async def test_vm_has_no_network(box: BootedVm, host_listener: int) -> None:
    code, _, err = await box.sh(f"exec 3<>/dev/tcp/127.0.0.1/{host_listener}")
    assert code != 0 and "refused" in err.lower()
    code, out, _ = await box.sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert (code, out.split()) == (0, ["lo"])


async def test_fork_bomb_hits_the_pids_limit_and_the_vm_survives(box: BootedVm) -> None:
    code, out, _ = await box.sh(
        f"n=0; for i in $(seq 5000); do sleep {LONG_SLEEP} 2>/dev/null & n=$((n+1)); done; "
        "ps -e --no-headers | wc -l", timeout_s=60)
    running = leftover_sleeps()
    assert 0 < len(running) < LIMITS["pids"], len(running)
    _kill(running)
    code, out, _ = await box.sh("echo alive")
    assert (code, out) == (0, "alive\n")
    await _wait_limit(box, "pids")


async def test_memory_is_bounded_for_the_whole_vm_and_the_oom_kill_stays_inside(box: BootedVm) -> None:
    # Four processes of 80 MiB each: each is under the VM's 192 MiB, together they are not.
    code, out, _ = await box.sh(
        "for i in 1 2 3 4; do python3 -c 'import time; x = bytearray(80 << 20); "
        "x[::4096] = b\"y\" * len(x[::4096]); time.sleep(5)' & done; wait; echo done")
    assert out.strip() == "done"
    code, out, err = await box.py("x = b'y' * (4 << 30); print(len(x))")
    assert code in (137, 1), (code, err)  # SIGKILL by the OOM killer, or MemoryError
    assert box.vm.machine is not None and not box.vm.machine.gone.done()
    assert (await box.sh("echo alive"))[1] == "alive\n"
    await _wait_limit(box, "memory")


async def test_disk_is_bounded_and_the_host_never_fills(box: BootedVm) -> None:
    before = os.statvfs(box.vm.state_dir)
    code, _, err = await box.sh("dd if=/dev/zero of=/workspace/fill bs=1M count=3072", timeout_s=60)
    assert code != 0 and "No space left" in err
    size = os.stat(box.vm.root / "workspace" / "fill").st_size
    assert size <= LIMITS["disk_mb"] << 20
    after = os.statvfs(box.vm.state_dir)
    assert (before.f_bavail - after.f_bavail) * after.f_frsize < 2 * (LIMITS["disk_mb"] << 20)
    code, _, err = await box.sh("head -c 128M /dev/zero > /dev/shm/x")
    assert code != 0 and "No space left" in err
    await _wait_limit(box, "disk")


async def test_cpu_is_held_to_the_quota(box: BootedVm) -> None:
    assert box.vm.machine is not None
    await box.sh("for i in $(seq 8); do (while :; do :; done) & done")
    init = psutil.Process(box.vm.machine.init_pid)
    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in init.children(recursive=True))
    first, started = cpu(), time.monotonic()
    await asyncio.sleep(2.0)
    used = (cpu() - first) / (time.monotonic() - started)
    _kill(init.children(recursive=True))
    print(f"8 busy loops used {used:.2f} cores under a quota of {LIMITS['cpus']}")
    assert used < LIMITS["cpus"] * 1.5, used  # 8 loops on this host would take every core
    await _wait_limit(box, "cpu", timeout=5.0)


async def test_an_idle_vm_s_limits_are_read_ever_less_often_until_work_comes(box: BootedVm) -> None:
    """An idle VM cannot hit a limit, so its counters are not read every second (a
    thousand idle workers would spend most of a core on it): the wait doubles while
    nothing in it runs, and an action brings the next read back within a second."""
    cgroup = box.vm.cgroup
    assert cgroup is not None
    reads: list[float] = []
    real = cgroup.counters

    def counting() -> tuple[dict[str, int], int]:
        reads.append(time.monotonic())
        return real()

    cgroup.counters = counting  # type: ignore[method-assign]
    started = time.monotonic()
    await asyncio.sleep(7.5)
    assert 1 <= len(reads) <= 4, [round(t - started, 1) for t in reads]  # every second: 7
    reads.clear()
    box.vm.note_activity()  # what every VM action does
    noted = time.monotonic()
    while not reads and time.monotonic() - noted < 30:
        await asyncio.sleep(0.1)
    assert reads, "no read after an action"
    # Backed off, the next read would come 8 s or more after the last one.
    assert reads[0] - noted < 5, reads[0] - noted


async def test_a_vm_stops_right_after_an_action(box: BootedVm) -> None:
    """The limit watcher is cancelled just as an action wakes it: the stop must not wait
    for a watcher that lost its cancel (asyncio.wait_for on 3.11 returns the result of
    an event set at that moment and drops the cancel)."""
    box.vm.note_activity()
    await asyncio.wait_for(box.vm.stop(), 15)


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


async def _wait_limit(box: BootedVm, kind: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(k == kind for k, _ in box.limits):
            payload = next(p for k, p in box.limits if k == kind)
            assert payload["limit"] and payload["count"] >= 1
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no vmLimit {kind} reported; got {box.limits}")


async def test_workspace_persists_on_the_vm_disk(box: BootedVm) -> None:
    code, _, _ = await box.sh("echo hello > /workspace/out.txt && echo t > /tmp/t && mkdir -p /home/u")
    assert code == 0
    assert await box.vm.read_file(normalize("/workspace/out.txt")) == b"hello\n"
    code, out, _ = await box.sh("cat out.txt; pwd; echo $HOME")
    assert out.split() == ["hello", "/workspace", "/workspace"]


async def test_exit_code_and_output_cap(box: BootedVm) -> None:
    code, out, err = await box.sh("echo out; echo err >&2; exit 7")
    assert (code, out, err) == (7, "out\n", "err\n")
    code, out, _ = await box.sh(f"head -c {MAX_OUTPUT_BYTES + 100} /dev/zero | tr '\\0' a")
    assert code == 0
    assert out.startswith("a" * MAX_OUTPUT_BYTES)
    assert out.endswith("[output truncated: 100 more bytes not shown]")
    code, _, _ = await box.sh("kill -9 $$")
    assert code == 137


async def test_timeout_kills_the_command_and_its_group(box: BootedVm) -> None:
    started = time.monotonic()
    with pytest.raises(ActorvisorError) as info:
        await box.sh(f"sleep {LONG_SLEEP} & sleep {LONG_SLEEP} & echo started; wait", timeout_s=0.5)
    assert info.value.code is ErrorCode.ACTION_TIMEOUT
    assert info.value.metadata["stdout"] == "started\n"
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.2)
    assert not leftover_sleeps()


async def test_cancelling_the_caller_kills_the_command(box: BootedVm) -> None:
    for step in range(10):
        task = asyncio.create_task(box.sh(f"sleep {LONG_SLEEP}"))
        await asyncio.sleep(step * 0.002)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for _ in range(50):
        if not leftover_sleeps():
            break
        await asyncio.sleep(0.1)
    assert not leftover_sleeps()
    assert (await box.sh("echo alive"))[1] == "alive\n"


async def test_a_command_that_leaves_a_child_holding_its_output_returns(box: BootedVm) -> None:
    started = time.monotonic()
    code, out, _ = await box.sh(f"sleep {LONG_SLEEP} & echo quick")
    assert (code, out) == (0, "quick\n")
    assert time.monotonic() - started < 5
