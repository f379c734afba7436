"""VM paths → files under the actor's root, resolved without ever following a symlink.

Owns path safety for every file action. The worker runs as root on the host and the VM
can plant anything in its own directories, including symlinks to `/etc` and FIFOs, at any
moment. So a VM path is first normalised lexically (no `..` may leave `/`), then walked
from the actor's root one component at a time with directory fds and `O_NOFOLLOW`: a
symlink anywhere in the path is refused, and nothing is ever resolved by the kernel from
a path string that the VM could change under us. Files are opened non-blocking and
checked with fstat before reading, so a FIFO cannot hang the worker.

The VM sees its persistent directories (`/workspace`, `/tmp`, `/home`, all kept in the
actor's root) plus read-only system mounts; only the persistent ones are reachable here.
This module never follows a symlink, never opens a path outside the root, and never
blocks on anything but the disk (callers run it in a thread).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as st
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from protocol.errors import ActorvisorError, ErrorCode

WORKSPACE: Final = "/workspace"
PERSISTENT_DIRS: Final = ("workspace", "tmp", "home")
SYSTEM_DIRS: Final = frozenset({"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
                                "etc", "proc", "dev", "sys"})
MAX_PATH_BYTES: Final = 4096
MAX_NAME_BYTES: Final = 255
MAX_FILE_BYTES: Final = 16 * 1024 * 1024

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _err(code: ErrorCode, message: str) -> ActorvisorError:
    return ActorvisorError(code, message)


@dataclass(frozen=True, slots=True)
class VmPath:
    """A normalised VM path: `parts[0]` is one of PERSISTENT_DIRS."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return "/" + "/".join(self.parts)


def normalize(path: object, *, what: str = "path") -> VmPath:
    """Validate and normalise a VM path; raises `actor.invalid_path` on anything unsafe."""
    if not isinstance(path, str):
        raise _err(ErrorCode.INVALID_ARGS, f"{what} must be a string, got {type(path).__name__}")
    if "\0" in path:
        raise _err(ErrorCode.INVALID_PATH, f"{what} contains a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise _err(ErrorCode.INVALID_PATH, f"{what} is not valid Unicode text") from None
    if not path:
        raise _err(ErrorCode.INVALID_PATH, f"{what} is empty")
    if len(encoded) > MAX_PATH_BYTES:
        raise _err(ErrorCode.INVALID_PATH, f"{what} is {len(encoded)} bytes; the limit is {MAX_PATH_BYTES}")
    if not path.startswith("/"):
        path = f"{WORKSPACE}/{path}"
    parts: list[str] = []
    # Lexical normalisation is sound here because symlinks are never followed: `a/..`
    # always means the directory that contains `a`.
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _err(ErrorCode.INVALID_PATH, f"{what} {_show(path)} escapes the VM root")
            parts.pop()
            continue
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise _err(ErrorCode.INVALID_PATH,
                       f"{what} has a component longer than {MAX_NAME_BYTES} bytes")
        parts.append(part)
    if not parts:
        raise _err(ErrorCode.INVALID_PATH,
                   f"{what} '/' is not accessible; use /workspace, /tmp or /home")
    if parts[0] in SYSTEM_DIRS:
        raise _err(ErrorCode.INVALID_PATH,
                   f"{what} /{'/'.join(parts)} is on the VM's read-only system mount /{parts[0]}")
    if parts[0] not in PERSISTENT_DIRS:
        raise _err(ErrorCode.INVALID_PATH,
                   f"{what} /{'/'.join(parts)} is outside the VM's directories "
                   "(/workspace, /tmp, /home)")
    return VmPath(tuple(parts))


def _show(path: str) -> str:
    return repr(path if len(path) <= 200 else path[:200] + "…")


def _display_name(name: str) -> str:
    # Names the VM created may not be UTF-8; os gives them back with surrogate escapes,
    # which no wire encoding can carry. Show them with replacement characters instead.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class VmFs:
    """File operations on one actor's VM root. Blocking: call from a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def host_path(self, path: VmPath) -> Path:
        """Where a VM path lives on the host, for logs and tests only: never open it."""
        return self.root.joinpath(*path.parts)

    @contextmanager
    def _parent(self, path: VmPath, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """Yield (fd of the parent directory, final name), walked component by component."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            walked = ""
            for part in path.parts[:-1]:
                walked += "/" + part
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _err(ErrorCode.FILE_NOT_FOUND, f"{walked}: no such directory") from None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass  # raced with the VM creating it; the open below decides
                    child = self._open_dir(fd, part, walked)
                except OSError as exc:
                    raise self._walk_error(fd, part, walked, exc) from None
                os.close(fd)
                fd = child
            yield fd, path.parts[-1]
        finally:
            os.close(fd)

    def _open_dir(self, fd: int, name: str, shown: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            raise self._walk_error(fd, name, shown, exc) from None

    @staticmethod
    def _walk_error(fd: int, name: str, shown: str, exc: OSError) -> ActorvisorError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # The open already refused; lstat only picks the message.
            try:
                mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            except OSError:
                mode = 0
            if st.S_ISLNK(mode):
                return _err(ErrorCode.INVALID_PATH, f"{shown} is a symlink; symlinks are not followed")
            return _err(ErrorCode.NOT_A_DIRECTORY, f"{shown}: not a directory")
        if exc.errno == errno.ENOENT:
            return _err(ErrorCode.FILE_NOT_FOUND, f"{shown}: no such file or directory")
        return _err(ErrorCode.INTERNAL, f"{shown}: {exc.strerror}")

    def read_file(self, path: VmPath) -> bytes:
        with self._parent(path) as (dfd, name):
            try:
                # O_NONBLOCK: opening a FIFO the VM planted must not hang us.
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dfd)
            except OSError as exc:
                raise self._walk_error(dfd, name, str(path), exc) from None
            try:
                info = os.fstat(fd)
                if st.S_ISDIR(info.st_mode):
                    raise _err(ErrorCode.IS_A_DIRECTORY, f"{path}: is a directory")
                if not st.S_ISREG(info.st_mode):
                    raise _err(ErrorCode.INVALID_PATH, f"{path}: not a regular file")
                if info.st_size > MAX_FILE_BYTES:
                    raise self._too_large(path, info.st_size)
                chunks: list[bytes] = []
                total = 0
                # Read to EOF, not to st_size: the VM may be growing the file right now.
                while chunk := os.read(fd, 1 << 20):
                    total += len(chunk)
                    if total > MAX_FILE_BYTES:
                        raise self._too_large(path, total)
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)

    @staticmethod
    def _too_large(path: VmPath, size: int) -> ActorvisorError:
        return _err(ErrorCode.INVALID_ARGS,
                    f"{path} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB ({size} bytes "
                    "or more); readFile returns at most 16 MiB, use exec to process it in the VM")

    def write_file(self, path: VmPath, data: bytes) -> None:
        if len(data) > MAX_FILE_BYTES:
            raise _err(ErrorCode.INVALID_ARGS,
                       f"content is {len(data)} bytes; writeFile accepts at most {MAX_FILE_BYTES}")
        if len(path.parts) == 1:
            raise _err(ErrorCode.IS_A_DIRECTORY, f"{path}: is a directory")
        with self._parent(path, create=True) as (dfd, name):
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, 0o644, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.EISDIR:
                    raise _err(ErrorCode.IS_A_DIRECTORY, f"{path}: is a directory") from None
                if exc.errno == errno.ENXIO:
                    raise _err(ErrorCode.INVALID_PATH, f"{path}: not a regular file") from None
                raise self._walk_error(dfd, name, str(path), exc) from None
            try:
                if not st.S_ISREG(os.fstat(fd).st_mode):
                    raise _err(ErrorCode.INVALID_PATH, f"{path}: not a regular file")
                # Truncate only after fstat proved it a regular file (O_TRUNC on open would
                # act before we could look).
                os.ftruncate(fd, 0)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

    def readdir(self, path: VmPath) -> list[str]:
        with self._parent(path) as (dfd, name):
            fd = self._open_dir(dfd, name, str(path))
            try:
                return sorted(_display_name(n) for n in os.listdir(fd))
            finally:
                os.close(fd)

    def stat(self, path: VmPath) -> dict[str, Any]:
        with self._parent(path) as (dfd, name):
            try:
                info = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                raise self._walk_error(dfd, name, str(path), exc) from None
        return {
            "size": info.st_size,
            "isFile": st.S_ISREG(info.st_mode),
            "isDirectory": st.S_ISDIR(info.st_mode),
            "isSymbolicLink": st.S_ISLNK(info.st_mode),
            "mtimeMs": info.st_mtime_ns // 1_000_000,
            "mode": info.st_mode,
        }

    def exists(self, path: VmPath) -> bool:
        try:
            self.stat(path)
        except ActorvisorError as exc:
            if exc.code in (ErrorCode.FILE_NOT_FOUND, ErrorCode.NOT_A_DIRECTORY):
                return False
            raise
        return True

    def mkdir(self, path: VmPath, *, recursive: bool) -> None:
        if len(path.parts) == 1:
            if recursive:
                return  # the persistent directories always exist
            raise _err(ErrorCode.FILE_EXISTS, f"{path}: already exists")
        with self._parent(path, create=recursive) as (dfd, name):
            try:
                os.mkdir(name, 0o755, dir_fd=dfd)
            except FileExistsError:
                mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
                if recursive and st.S_ISDIR(mode):
                    return
                raise _err(ErrorCode.FILE_EXISTS, f"{path}: already exists") from None
            except OSError as exc:
                raise self._walk_error(dfd, name, str(path), exc) from None

    def delete(self, path: VmPath, *, recursive: bool) -> None:
        if len(path.parts) == 1:
            raise _err(ErrorCode.INVALID_PATH, f"{path} is a VM mount point and cannot be deleted")
        with self._parent(path) as (dfd, name):
            try:
                mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
            except OSError as exc:
                raise self._walk_error(dfd, name, str(path), exc) from None
            if not st.S_ISDIR(mode):
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass  # the VM removed it first: the caller wanted it gone
                except IsADirectoryError:
                    raise _err(ErrorCode.IS_A_DIRECTORY,
                               f"{path} was replaced by a directory while deleting") from None
                return
            if not recursive:
                raise _err(ErrorCode.IS_A_DIRECTORY,
                           f"{path}: is a directory; pass {{recursive: true}} to delete it")
            # shutil.rmtree with dir_fd walks with fds and O_NOFOLLOW (its symlink-attack
            # resistant variant), so a symlink planted mid-delete is unlinked, not followed.
            shutil.rmtree(name, dir_fd=dfd)

    def move(self, source: VmPath, target: VmPath) -> None:
        """Rename within the VM's directories; both parents are walked without symlinks."""
        for path in (source, target):
            if len(path.parts) == 1:
                raise _err(ErrorCode.INVALID_PATH, f"{path} is a VM mount point and cannot be moved")
        if target.parts[:len(source.parts)] == source.parts:
            raise _err(ErrorCode.INVALID_PATH, f"cannot move {source} into itself ({target})")
        with self._parent(source) as (sfd, sname), self._parent(target) as (tfd, tname):
            try:
                os.stat(sname, dir_fd=sfd, follow_symlinks=False)
            except OSError as exc:
                raise self._walk_error(sfd, sname, str(source), exc) from None
            try:
                os.rename(sname, tname, src_dir_fd=sfd, dst_dir_fd=tfd)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise _err(ErrorCode.FILE_EXISTS,
                               f"{target}: a non-empty directory is in the way") from None
                if exc.errno == errno.EISDIR:
                    raise _err(ErrorCode.IS_A_DIRECTORY, f"{target}: is a directory") from None
                if exc.errno == errno.ENOTDIR:
                    raise _err(ErrorCode.NOT_A_DIRECTORY, f"{target}: not a directory") from None
                if exc.errno == errno.EXDEV:
                    # /workspace, /tmp and /home may be different file systems.
                    raise _err(ErrorCode.INVALID_PATH,
                               f"cannot move {source} to {target}: different VM mounts") from None
                raise self._walk_error(sfd, sname, str(source), exc) from None

    def readdir_recursive(self, path: VmPath, *, max_depth: int, exclude: frozenset[str],
                          max_entries: int) -> list[dict[str, Any]]:
        """Every entry under `path`, depth first in name order, as `{type, path, size}`.

        Symlinks are listed, never followed. Depth 1 is `path`'s own children; a name in
        `exclude` is left out together with everything below it."""
        out: list[dict[str, Any]] = []
        with self._parent(path) as (dfd, name):
            root = self._open_dir(dfd, name, str(path))
        try:
            self._walk(root, str(path), 1, max_depth, exclude, max_entries, out)
        finally:
            os.close(root)
        return out

    def _walk(self, fd: int, shown: str, depth: int, max_depth: int, exclude: frozenset[str],
              max_entries: int, out: list[dict[str, Any]]) -> None:
        for raw in sorted(os.listdir(fd)):
            name = _display_name(raw)
            if name in exclude:
                continue
            try:
                info = os.stat(raw, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # the VM removed it while we listed
            if len(out) >= max_entries:
                raise _err(ErrorCode.INVALID_ARGS,
                           f"more than {max_entries} entries under the listed directory; "
                           "narrow it with maxDepth or exclude")
            child = f"{shown.rstrip('/')}/{name}"
            kind = ("directory" if st.S_ISDIR(info.st_mode)
                    else "symlink" if st.S_ISLNK(info.st_mode) else "file")
            out.append({"type": kind, "path": child, "size": info.st_size})
            if kind == "directory" and depth < max_depth:
                try:
                    sub = os.open(raw, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # replaced by something else while we walked: not followed
                try:
                    self._walk(sub, child, depth + 1, max_depth, exclude, max_entries, out)
                finally:
                    os.close(sub)
