"""The VM's root on the host: its identity (the host uid its root maps to) and its disk.

Owns three things a VM must not share with the host or another VM:
- **An identity.** When the service runs as root, each actor gets a host uid and gid of
  its own from a range no login user has (`uid_base` .. `uid_base + uid_count`), kept for
  the actor's life in `<state>/vm-uids/<uid>` (made with O_EXCL, so two actors can never
  get one). VM uid 0 maps to it; nothing of the VM runs as host root. When the service
  itself is unprivileged, the VM maps to the service's own uid, the only one it can use.
- **A disk with a hard size.** `/workspace`, `/home` and `/tmp` live in one ext4 image
  per actor (`<actor>/disk.img`, sparse), loop-mounted inside the worker's own private
  mount namespace (entered at worker start, so the mount is the worker's alone and
  vanishes with it). A VM that fills its disk gets ENOSPC; the host's
  file system and the event logs next to the image never fill because of it. The VM sees
  `/dev/loopN` as the source of its mounts, no host path.
- **The directories**, owned by the VM's identity, so the VM can write them and the
  worker's file actions (run with the VM's fsuid, see `vmfs`) act as the VM would.

This module never runs anything inside the VM and never mounts outside the worker's
private mount namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .vmfs import PERSISTENT_DIRS

CLONE_NEWNS: Final = 0x00020000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2
IMAGE_NAME: Final = "disk.img"
# Exists on every FHS system; in the worker's private mount namespace only, a tmpfs is
# mounted over it (hiding nothing the worker uses) to hold the VM's disk mount.
MOUNT_BASE: Final = "/mnt"

_private_mounts = False


@dataclass(frozen=True, slots=True)
class Identity:
    uid: int
    gid: int
    dedicated: bool  # False: the service's own uid (an unprivileged service)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_private_mount_namespace() -> bool:
    """Give this process a mount namespace of its own whose mounts never reach the host.

    Must run before the process has threads: unshare(CLONE_NEWNS) moves only the calling
    thread. False when not permitted (an unprivileged service)."""
    global _private_mounts
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"making / private in the worker's mount namespace: {os.strerror(err)}")
    _private_mounts = True
    return True


def identity(state_dir: Path, actor_id: str, uid_base: int, uid_count: int) -> Identity:
    """The actor's host identity, allocated on first use and kept for the actor's life."""
    if os.geteuid() != 0:
        return Identity(os.getuid(), os.getgid(), False)
    registry = state_dir / "vm-uids"
    registry.mkdir(mode=0o700, exist_ok=True)
    start = int.from_bytes(hashlib.sha256(actor_id.encode()).digest()[:8], "big") % uid_count
    for step in range(uid_count):
        uid = uid_base + (start + step) % uid_count
        entry = registry / str(uid)
        try:
            fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if entry.read_text() == actor_id:
                return Identity(uid, uid, True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(actor_id)
        return Identity(uid, uid, True)
    raise RuntimeError(f"no free VM uid left in {uid_base}..{uid_base + uid_count - 1}")


def release_identity(state_dir: Path, actor_id: str) -> None:
    """Forget the uid of an actor being destroyed (its files are gone with it)."""
    registry = state_dir / "vm-uids"
    if not registry.is_dir():
        return
    for entry in registry.iterdir():
        with contextlib.suppress(OSError):
            if entry.read_text() == actor_id:
                entry.unlink()


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[:400]}")


def mount_disk(actor_dir: Path, size_mb: int, ident: Identity) -> Path:
    """Create the actor's disk image if it has none and mount it; returns the VM root.

    The image is sparse: it takes host space only as the VM writes. Inode tables are
    left to be initialised lazily and never zeroed in the background (`noinit_itable`),
    so an idle actor's image stays a few MiB. It is mounted at MOUNT_BASE/<actor> on a tmpfs
    of the worker's private mount namespace: bwrap runs as the VM's identity and needs
    a path it may traverse, while the state dir stays 0700 and no host user ever sees
    the VM's files."""
    if not _private_mounts:
        raise RuntimeError("the VM's disk is only mounted in a private mount namespace")
    image = actor_dir / IMAGE_NAME
    if not image.exists():
        partial = image.with_suffix(".partial")
        with open(partial, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.truncate(size_mb * 1024 * 1024)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-J", "size=4", "-L", "vm",
             "-E", f"root_owner={ident.uid}:{ident.gid},lazy_itable_init=1,nodiscard", str(partial))
        os.replace(partial, image)
    base = Path(MOUNT_BASE)
    if not os.path.ismount(base):
        _run("mount", "-t", "tmpfs", "-o", "mode=0755,size=1m,nosuid,nodev,noexec", "vms", str(base))
    root = base / actor_dir.name
    root.mkdir(mode=0o755, exist_ok=True)
    _run("mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime,noinit_itable", str(image), str(root))
    _migrate_plain_root(actor_dir / "root", root, ident)
    return root


def _migrate_plain_root(old: Path, root: Path, ident: Identity) -> None:
    """Move the files of an actor made before disk images into its image, once."""
    if not old.is_dir() or old.is_symlink():
        return
    for name in PERSISTENT_DIRS:
        if (old / name).is_dir() and not (old / name).is_symlink():
            _run("cp", "-a", "--no-target-directory", str(old / name), str(root / name))
            _run("chown", "-R", "--no-dereference", f"{ident.uid}:{ident.gid}", str(root / name))
    shutil.rmtree(old)


def unmount_disk(root: Path) -> None:
    if os.path.ismount(root):
        _libc().umount2(str(root).encode(), MNT_DETACH)


def prepare_dirs(root: Path, ident: Identity) -> None:
    """The VM's persistent directories, owned by its identity (idempotent)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in PERSISTENT_DIRS:
        target = root / name
        # The VM can plant anything in its own directories, never at their top level:
        # refuse to use anything that is not a plain directory.
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise RuntimeError(f"{target} is not a directory")
        target.mkdir(mode=0o755, exist_ok=True)
        if ident.dedicated:
            os.chown(target, ident.uid, ident.gid, follow_symlinks=False)
    (root / "tmp").chmod(0o1777)

