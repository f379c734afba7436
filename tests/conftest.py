"""Shared fixtures: a real supervisor process (with real workers) on loopback.

Every process a test starts is reaped and every temp dir removed, even when the test
fails (see `tests/support.py`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MakeSupervisor, SupervisorProc, free_port, remove_session_cgroups
from vmworker import vmroot


def pytest_configure(config: pytest.Config) -> None:
    # In-process VMs (tests/vmworker) mount their disks as a worker does: in a mount
    # namespace of this process's own, entered before any thread exists.
    if os.geteuid() == 0:
        vmroot.enter_private_mount_namespace()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The in-process VMs' cgroups (tests/support.py vm_settings): every VM has ended.
    remove_session_cgroups()


@pytest.fixture
def tmp_state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="actorvisor-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_supervisor(tmp_state: Path) -> Iterator[MakeSupervisor]:
    started: list[SupervisorProc] = []

    def make(*args: str, env: dict[str, str] | None = None, start: bool = True) -> SupervisorProc:
        full_env = {**os.environ, "ACTORVISOR_LOG_LEVEL": "info", **(env or {})}
        sup = SupervisorProc(tmp_state / "state", free_port(), list(args), full_env)
        started.append(sup)
        if start:
            sup.start()
        return sup

    try:
        yield make
    finally:
        for sup in started:
            sup.close()


@pytest.fixture
def supervisor(make_supervisor: MakeSupervisor) -> SupervisorProc:
    return make_supervisor()
