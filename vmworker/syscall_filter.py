"""The VM's seccomp filter: the system calls an agent VM never needs, refused.

Owns the list and its compilation to a BPF program (libseccomp, through `pyseccomp`'s
ctypes bindings) that bubblewrap loads with `--seccomp FD` right before it starts the VM's
init, so every process of the VM inherits it and none can remove it (`PR_SET_NO_NEW_PRIVS`
is set by bubblewrap for the same reason). Everything not listed is allowed: the VM's
processes are already unprivileged (no capabilities, an unprivileged host uid), and the
filter's job is to take away the kernel interfaces that unprivileged code still reaches
and that sandbox escapes keep coming through. Anchors: Docker's default profile, Flatpak's
and Anthropic's sandbox-runtime's bubblewrap filters. Each entry says why; docs/security.md
lists them for users.

Calls of another architecture's ABI (32-bit `int 0x80` on x86-64) kill the process: the
filter is written for the native ABI only, so they must not slip past it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Final

import pyseccomp as sc

# (syscall, why). Refused with EPERM unless in ENOSYS_CALLS.
REFUSED: Final[tuple[tuple[str, str], ...]] = (
    ("ptrace", "reading or steering another process (credentials in memory, injection)"),
    ("process_vm_readv", "reading another process's memory"),
    ("process_vm_writev", "writing another process's memory"),
    ("kcmp", "probing other processes' kernel objects"),
    ("mount", "changing the VM's file system view"),
    ("umount2", "uncovering what the VM's mounts hide"),
    ("pivot_root", "changing the VM's root"),
    ("fsopen", "new-style mount API"),
    ("fsconfig", "new-style mount API"),
    ("fsmount", "new-style mount API"),
    ("fspick", "new-style mount API"),
    ("move_mount", "new-style mount API"),
    ("open_tree", "new-style mount API"),
    ("mount_setattr", "new-style mount API"),
    ("setns", "joining other namespaces"),
    ("keyctl", "the kernel keyring is not namespaced: keys of the host's users"),
    ("add_key", "the kernel keyring is not namespaced"),
    ("request_key", "the kernel keyring is not namespaced"),
    ("bpf", "loading programs into the kernel"),
    ("perf_event_open", "kernel profiling: a frequent source of exploits and side channels"),
    ("userfaultfd", "a tool of choice for winning kernel races"),
    ("init_module", "loading kernel modules"),
    ("finit_module", "loading kernel modules"),
    ("delete_module", "unloading kernel modules"),
    ("kexec_load", "replacing the running kernel"),
    ("kexec_file_load", "replacing the running kernel"),
    ("reboot", "rebooting the host"),
    ("swapon", "host swap"),
    ("swapoff", "host swap"),
    ("acct", "process accounting to a host file"),
    ("quotactl", "file system quotas"),
    ("syslog", "reading the host's kernel log (addresses for exploits)"),
    ("settimeofday", "the host's clock"),
    ("clock_settime", "the host's clock"),
    ("clock_adjtime", "the host's clock"),
    ("adjtimex", "the host's clock"),
    ("iopl", "raw I/O port access"),
    ("ioperm", "raw I/O port access"),
    ("open_by_handle_at", "opening files by handle bypasses mount boundaries (the 'shocker' escape)"),
    ("name_to_handle_at", "companion of open_by_handle_at"),
    ("lookup_dcookie", "kernel profiling internals"),
    ("vhangup", "hanging up terminals"),
    ("io_uring_setup", "a large kernel surface with a long record of escapes; programs fall back"),
    ("io_uring_enter", "see io_uring_setup"),
    ("io_uring_register", "see io_uring_setup"),
    ("clone3", "its flags are behind a pointer the filter cannot read; libc falls back to clone"),
)
# ENOSYS where programs probe and fall back: "not supported" is the honest answer.
ENOSYS_CALLS: Final = frozenset({"clone3", "io_uring_setup", "io_uring_enter", "io_uring_register"})

CLONE_NEWUSER: Final = 0x10000000
TIOCSTI: Final = 0x5412    # push bytes into a terminal's input: typing into another session
TIOCLINUX: Final = 0x541C  # the same through the Linux console


def build() -> sc.SyscallFilter:
    f = sc.SyscallFilter(sc.ALLOW)
    for name, _why in REFUSED:
        action = sc.ERRNO(errno.ENOSYS if name in ENOSYS_CALLS else errno.EPERM)
        try:
            f.add_rule(action, name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a system call of this architecture
    # New user namespaces would hand VM processes a fresh set of capabilities to probe the
    # kernel with (bubblewrap's --disable-userns stops the same from a second angle).
    f.add_rule(sc.ERRNO(errno.EPERM), "unshare", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    for request in (TIOCSTI, TIOCLINUX):
        # Compare the low 32 bits: the request is an int that libc may sign-extend.
        f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    return f


def compiled_fd() -> int:
    """A readable fd positioned at the start of the filter's BPF program (caller closes)."""
    with tempfile.TemporaryFile() as out:
        build().export_bpf(out)
        out.flush()
        fd = os.dup(out.fileno())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
