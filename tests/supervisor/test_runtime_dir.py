"""A supervisor killed with `kill -9` leaves its private runtime dir behind; the next one
removes it, and never the dir of a supervisor that still lives."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from supervisor.config import RUNTIME_OWNER_FILE, make_private_runtime_dir, remove_stale_runtime_dirs


def owned_dir(parent: Path, name: str, owner: int | None) -> Path:
    path = parent / f"actorvisor-{name}"
    path.mkdir()
    (path / "workers.ipc").write_bytes(b"")
    if owner is not None:
        (path / RUNTIME_OWNER_FILE).write_text(str(owner))
    return path


def test_dirs_of_dead_owners_are_removed_living_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = owned_dir(tmp_path, "dead", gone.pid)
        alive = owned_dir(tmp_path, "alive", living.pid)
        unowned = owned_dir(tmp_path, "unowned", None)
        other = tmp_path / "unrelated"
        other.mkdir()
        (other / RUNTIME_OWNER_FILE).write_text(str(gone.pid))

        assert remove_stale_runtime_dirs(tmp_path) == [dead]
        assert not dead.exists()
        assert alive.exists() and unowned.exists() and other.exists()
    finally:
        living.kill()
        living.wait()


def test_a_private_runtime_dir_names_its_owner() -> None:
    path = make_private_runtime_dir()
    try:
        # Ours, and we live: kept.
        assert path not in remove_stale_runtime_dirs(path.parent)
        assert path.exists()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (path / RUNTIME_OWNER_FILE).write_text(str(gone.pid))
        assert path in remove_stale_runtime_dirs(path.parent)
        assert not path.exists()
    finally:
        shutil.rmtree(path, ignore_errors=True)
