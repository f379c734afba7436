"""The cgroup v2 layout, on a directory tree shaped like a delegated cgroup2 subtree.

This machine's hierarchy is v1 (the end-to-end tests cover that one for real). Under
systemd on a v2 host, the service's cgroup is delegated (`Delegate=yes`): these tests
check what `CgroupRoot` writes there — the supervisor moved into a leaf of its own, the
controllers handed down, the parent's CPU weight, the workers' shared leaf, a VM's
limits — and what it refuses. The kernel's side (that a write takes effect) is not
simulated: the files here are plain files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmworker import cgroups
from vmworker.cgroups import PARENT_CPU_WEIGHT, WORKERS, CgroupRoot, Limits, VmCgroup

SERVICE = "/system.slice/actorvisor.service"


@pytest.fixture
def v2_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cgroup2 mount at tmp_path/cg whose service cgroup has every controller delegated."""
    mount = tmp_path / "cg"
    own = mount / SERVICE.lstrip("/")
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    monkeypatch.setattr(cgroups, "_mounts", lambda: (str(mount), {}))
    monkeypatch.setattr(cgroups, "_own_paths", lambda: (SERVICE, {}))
    return own


def test_v2_parent_is_delegated_weighted_and_holds_the_workers_leaf(v2_host: Path, tmp_path: Path) -> None:
    root, why = CgroupRoot.discover(tmp_path / "state")
    assert root is not None, why
    assert root.version == 2
    ((name, parent_dir),) = root.parents
    parent = Path(parent_dir)
    assert name == "unified" and parent.parent == v2_host and parent.name.startswith("actorvisor-")
    # No internal processes: the supervisor leaves the cgroup that hands controllers down.
    assert (v2_host / "supervisor" / "cgroup.procs").read_text() == str(os.getpid())
    for d in (v2_host, parent):
        assert sorted((d / "cgroup.subtree_control").read_text().split()) == ["+cpu", "+memory", "+pids"]
    assert (parent / "cpu.weight").read_text() == str(PARENT_CPU_WEIGHT)
    assert PARENT_CPU_WEIGHT * 8 <= 100  # an eighth of the supervisor leaf's default 100

    root.enter_workers(4242)
    assert (parent / WORKERS / "cgroup.procs").read_text() == "4242"
    assert CgroupRoot.from_arg(root.to_arg()) == root


def test_v2_vm_cgroup_gets_its_limits_beside_the_workers(v2_host: Path, tmp_path: Path) -> None:
    root, _ = CgroupRoot.discover(tmp_path / "state")
    assert root is not None
    vm = VmCgroup(root, "a" * 24)
    vm.create(Limits(memory_mb=256, pids=64, cpus=0.5))
    d = Path(root.parents[0][1]) / ("a" * 24)
    assert (d / "memory.max").read_text() == str(256 * 1024 * 1024)
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "50000 100000"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "pids.events").write_text("max 7\n")
    (d / "cpu.stat").write_text("usage_usec 10\nnr_periods 40\nnr_throttled 2\n")
    assert vm.counters() == ({"memory": 1, "pids": 7, "cpu": 2}, 40)


def test_v2_without_delegated_controllers_is_refused_with_the_reason(v2_host: Path, tmp_path: Path) -> None:
    (v2_host / "cgroup.controllers").write_text("cpu io\n")
    root, why = CgroupRoot.discover(tmp_path / "state")
    assert root is None
    assert "['memory', 'pids'] not delegated" in why
    assert not (v2_host / "supervisor").exists()
