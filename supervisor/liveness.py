"""What the kernel says about a suspect worker: stopped, gone, or how long it has run.

A worker is a suspect when it has not said hello within `hello_timeout` of its start, or
when its connection dropped and has not come back within `--hang-timeout`. Lateness is
not a verdict: on a machine starved by a boot storm (hundreds of VMs booting on two
cores) a healthy worker can be later than any timeout. What tells a hung process from a
late one is whether any of its threads ran at all. The scheduler counts each thread's run
time in nanoseconds (`/proc/PID/task/TID/schedstat`, first field); psutil's `cpu_times()`
counts 10 ms clock ticks, which an idle living worker does not cross in ten seconds, so
it would call it frozen. Hand-written for that reason: psutil has no per-thread
nanosecond figure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

import psutil

# A suspect that keeps running is given this many windows (hello_timeout or hang timeout)
# from the suspicion's start; one that still cannot say hello or reconnect is replaced.
MAX_SUSPECT_WINDOWS: Final = 6


@dataclass(frozen=True, slots=True)
class Probe:
    stopped: bool  # SIGSTOP or a debugger's stop: hung now, whatever it ran before
    ran_ns: int    # run time of all its threads so far


def probe(pid: int) -> Probe | None:
    """The kernel's view of a process; None if it is gone (its exit is being reaped)."""
    try:
        status = psutil.Process(pid).status()
        tids = os.listdir(f"/proc/{pid}/task")
    except (psutil.Error, OSError):
        return None
    if status == psutil.STATUS_ZOMBIE:
        return None
    ran = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                ran += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    return Probe(status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP), ran)
