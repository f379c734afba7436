"""Moving a spawned process into the workers' cgroup: off the event loop, never fatal."""

from __future__ import annotations

import threading

from supervisor.spawner import place_process


async def test_a_cgroup_move_runs_off_the_event_loop() -> None:
    moved: list[tuple[int, bool]] = []
    await place_process(lambda pid: moved.append((pid, threading.current_thread()
                                                  is threading.main_thread())), 42)
    assert moved == [(42, False)]


async def test_a_failed_cgroup_move_leaves_the_spawn_standing() -> None:
    """A process it could not move (its cgroup removed under it, a read-only hierarchy)
    still runs: the spawner must not raise with a started process it never tracked."""
    def refuse(pid: int) -> None:
        raise PermissionError(13, "Permission denied", "/sys/fs/cgroup/cpu/x/workers/cgroup.procs")

    await place_process(refuse, 42)  # returns: logged, not raised
    await place_process(None, 42)
