from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ActorvisorError, ErrorCode
from vmworker.vmfs import MAX_FILE_BYTES, VmFs, normalize


@pytest.fixture
def fs(tmp_path: Path) -> VmFs:
    root = tmp_path / "root"
    for name in ("workspace", "tmp", "home"):
        (root / name).mkdir(parents=True)
    (tmp_path / "secret").write_text("host secret")
    return VmFs(root)


def code_of(fn: Callable[..., object], *args: Any, **kwargs: Any) -> ErrorCode:
    with pytest.raises(ActorvisorError) as info:
        fn(*args, **kwargs)
    return info.value.code


@pytest.mark.parametrize(("path", "expected"), [
    ("/workspace/a/b", "/workspace/a/b"),
    ("a/b", "/workspace/a/b"),
    ("./a//b/", "/workspace/a/b"),
    ("/workspace/a/../b", "/workspace/b"),
    ("/workspace/../tmp/x", "/tmp/x"),
    ("../tmp/x", "/tmp/x"),
    ("/home", "/home"),
])
def test_normalize(path: str, expected: str) -> None:
    assert str(normalize(path)) == expected


@pytest.mark.parametrize(("path", "code"), [
    ("/../etc/passwd", ErrorCode.INVALID_PATH),
    ("../../etc", ErrorCode.INVALID_PATH),
    ("/workspace/../../root", ErrorCode.INVALID_PATH),
    ("/etc/shadow", ErrorCode.INVALID_PATH),
    ("/usr/bin/sh", ErrorCode.INVALID_PATH),
    ("/proc/1/environ", ErrorCode.INVALID_PATH),
    ("/lib64", ErrorCode.INVALID_PATH),
    ("/root/.ssh/id_rsa", ErrorCode.INVALID_PATH),
    ("/", ErrorCode.INVALID_PATH),
    ("", ErrorCode.INVALID_PATH),
    ("/workspace/a\0b", ErrorCode.INVALID_PATH),
    ("/workspace/" + "x" * 256, ErrorCode.INVALID_PATH),
    ("/workspace/" + "a/" * 2100, ErrorCode.INVALID_PATH),
    ("/workspace/\ud800", ErrorCode.INVALID_PATH),
    (42, ErrorCode.INVALID_ARGS),
])
def test_normalize_rejects(path: object, code: ErrorCode) -> None:
    assert code_of(normalize, path) is code


def test_absolute_host_path_is_a_vm_path_not_a_host_path(fs: VmFs, tmp_path: Path) -> None:
    # The host path of the secret (under the host's /tmp), given as a VM path, names a
    # file under the VM's own /tmp, which does not exist.
    vm_path = normalize(str(tmp_path / "secret"))
    assert fs.host_path(vm_path).is_relative_to(fs.root / "tmp")
    assert code_of(fs.read_file, vm_path) is ErrorCode.FILE_NOT_FOUND


def test_write_read_stat_readdir_delete(fs: VmFs) -> None:
    fs.write_file(normalize("/workspace/d/e/f.txt"), b"hello")
    assert fs.read_file(normalize("d/e/f.txt")) == b"hello"
    assert (fs.root / "workspace/d/e/f.txt").read_bytes() == b"hello"
    fs.write_file(normalize("d/e/f.txt"), b"hi")  # overwrite truncates
    assert fs.read_file(normalize("d/e/f.txt")) == b"hi"
    info = fs.stat(normalize("d/e/f.txt"))
    assert info["size"] == 2 and info["isFile"] and not info["isDirectory"]
    assert fs.stat(normalize("d"))["isDirectory"]
    assert fs.readdir(normalize("d/e")) == ["f.txt"]
    assert fs.exists(normalize("d/e/f.txt")) and not fs.exists(normalize("d/nope"))
    assert not fs.exists(normalize("d/e/f.txt/below"))  # through a file
    assert code_of(fs.delete, normalize("d"), recursive=False) is ErrorCode.IS_A_DIRECTORY
    fs.delete(normalize("d"), recursive=True)
    assert fs.readdir(normalize("/workspace")) == []


def test_error_codes(fs: VmFs) -> None:
    fs.write_file(normalize("f"), b"x")
    fs.mkdir(normalize("dir"), recursive=False)
    assert code_of(fs.read_file, normalize("missing")) is ErrorCode.FILE_NOT_FOUND
    assert code_of(fs.read_file, normalize("no/such/dir/f")) is ErrorCode.FILE_NOT_FOUND
    assert code_of(fs.read_file, normalize("dir")) is ErrorCode.IS_A_DIRECTORY
    assert code_of(fs.write_file, normalize("dir"), b"") is ErrorCode.IS_A_DIRECTORY
    assert code_of(fs.readdir, normalize("f")) is ErrorCode.NOT_A_DIRECTORY
    assert code_of(fs.read_file, normalize("f/x")) is ErrorCode.NOT_A_DIRECTORY
    assert code_of(fs.mkdir, normalize("dir"), recursive=False) is ErrorCode.FILE_EXISTS
    assert code_of(fs.mkdir, normalize("f"), recursive=True) is ErrorCode.FILE_EXISTS
    assert code_of(fs.mkdir, normalize("a/b"), recursive=False) is ErrorCode.FILE_NOT_FOUND
    fs.mkdir(normalize("a/b/c"), recursive=True)
    fs.mkdir(normalize("a/b/c"), recursive=True)
    assert code_of(fs.delete, normalize("/workspace"), recursive=True) is ErrorCode.INVALID_PATH
    assert code_of(fs.delete, normalize("missing"), recursive=False) is ErrorCode.FILE_NOT_FOUND


def test_size_limits(fs: VmFs) -> None:
    assert code_of(fs.write_file, normalize("big"), b"\0" * (MAX_FILE_BYTES + 1)) is ErrorCode.INVALID_ARGS
    with open(fs.root / "workspace/big", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    assert code_of(fs.read_file, normalize("big")) is ErrorCode.INVALID_ARGS


def test_symlink_planted_in_the_middle_is_refused(fs: VmFs, tmp_path: Path) -> None:
    # What the VM would do: point a directory of its own at a host directory.
    os.symlink(tmp_path, fs.root / "workspace/escape")
    for op in (lambda p: fs.read_file(p), lambda p: fs.write_file(p, b"pwn"), fs.readdir,
               fs.stat, fs.exists, lambda p: fs.delete(p, recursive=True),
               lambda p: fs.mkdir(p, recursive=True)):
        with pytest.raises(ActorvisorError) as info:
            op(normalize("/workspace/escape/secret"))
        assert info.value.code is ErrorCode.INVALID_PATH
        assert "symlinks are not followed" in info.value.message
    assert (tmp_path / "secret").read_text() == "host secret"


def test_symlink_at_the_end_is_refused_for_content_and_reported_by_stat(fs: VmFs, tmp_path: Path) -> None:
    os.symlink(tmp_path / "secret", fs.root / "workspace/link")
    os.symlink(tmp_path, fs.root / "workspace/dirlink")
    assert code_of(fs.read_file, normalize("link")) is ErrorCode.INVALID_PATH
    assert code_of(fs.write_file, normalize("link"), b"pwn") is ErrorCode.INVALID_PATH
    assert code_of(fs.readdir, normalize("dirlink")) is ErrorCode.INVALID_PATH
    assert fs.stat(normalize("link"))["isSymbolicLink"]
    assert fs.exists(normalize("link"))
    fs.delete(normalize("dirlink"), recursive=True)  # removes the link, not the target
    assert (tmp_path / "secret").read_text() == "host secret"
    assert tmp_path.exists()


def test_persistent_dir_replaced_by_symlink_is_refused(fs: VmFs, tmp_path: Path) -> None:
    (fs.root / "home").rmdir()
    os.symlink(tmp_path, fs.root / "home")
    assert code_of(fs.read_file, normalize("/home/secret")) is ErrorCode.INVALID_PATH


def test_fifo_does_not_hang(fs: VmFs) -> None:
    os.mkfifo(fs.root / "workspace/fifo")
    assert code_of(fs.read_file, normalize("fifo")) is ErrorCode.INVALID_PATH
    assert code_of(fs.write_file, normalize("fifo"), b"x") is ErrorCode.INVALID_PATH


def test_non_utf8_names_are_listed_readably(fs: VmFs) -> None:
    os.mkdir(os.path.join(os.fsencode(fs.root / "workspace"), b"bad\xff"))
    assert fs.readdir(normalize("/workspace")) == ["bad\ufffd"]


_segments = st.one_of(
    st.sampled_from(["..", ".", "", "workspace", "tmp", "home", "etc", "usr", "link", "a",
                     "secret", "proc"]),
    st.text(min_size=1, max_size=12),
)
_paths = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["/", "", "//", "./", "../"]),
    st.lists(_segments, max_size=10),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.one_of(_paths, st.text(max_size=60)))
def test_random_paths_stay_inside_the_root_or_fail_cleanly(fs: VmFs, tmp_path: Path, path: str) -> None:
    (fs.root / "workspace/a").mkdir(exist_ok=True)
    if not (fs.root / "workspace/link").is_symlink():
        os.symlink(tmp_path, fs.root / "workspace/link")
    root = os.path.realpath(fs.root)
    try:
        vm_path = normalize(path)
    except ActorvisorError:
        return
    # The final component is never followed, so what an operation touches is the
    # entry named by it in the real parent directory.
    host = os.path.join(os.path.realpath(fs.host_path(vm_path).parent), vm_path.parts[-1])
    # The lexical mapping never leaves the root...
    assert os.path.commonpath([root, os.path.abspath(fs.host_path(vm_path))]) == root
    for op in (fs.stat, fs.readdir, fs.read_file, lambda p: fs.write_file(p, b"w"),
               lambda p: fs.mkdir(p, recursive=True)):
        try:
            op(vm_path)
        except ActorvisorError:
            continue
        # ...and whatever succeeded touched a path whose real location is inside it.
        assert os.path.commonpath([root, host]) == root, (path, host)
    assert (tmp_path / "secret").read_text() == "host secret"
    assert sorted(os.listdir(tmp_path)) == ["root", "secret"]
