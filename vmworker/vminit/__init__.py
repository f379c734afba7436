"""Builds `vminit.c`, the VM's PID 1, once per source version, with the host's C compiler.

The binary is kept as `<cache>/vminit-<sha of the source>` and replaced atomically, so
concurrent builders (several workers booting at once) and upgrades never see a partial
file. It is dynamically linked against the host's libc, which every VM already sees
read-only under `/usr`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

SOURCE: Final = Path(__file__).with_name("vminit.c")


def ensure_built(cache_dir: Path) -> Path:
    source = SOURCE.read_bytes()
    binary = cache_dir / f"vminit-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) to build the VM's init; install gcc "
                           "(Debian: apt-get install gcc)")
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".vminit-", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, "-O2", "-Wall", "-o", partial, str(SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the VM's init failed: {done.stderr.strip()[:1000]}")
        os.chmod(partial, 0o755)
        os.replace(partial, binary)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return binary
