"""Builds the VM's own programs once per source version, with the host's C compiler:
`vminit.c` (its PID 1) and `netbridge.c` (its loopback port to the egress proxy).

A binary is kept as `<cache>/<name>-<sha of the source>` and replaced atomically, so
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
BRIDGE_SOURCE: Final = Path(__file__).with_name("netbridge.c")


def ensure_built(cache_dir: Path, source_path: Path = SOURCE) -> Path:
    source = source_path.read_bytes()
    name = source_path.stem
    binary = cache_dir / f"{name}-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(f"no C compiler (cc) to build the VM's {name}; install gcc "
                           "(Debian: apt-get install gcc)")
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{name}-", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, "-O2", "-Wall", "-o", partial, str(source_path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the VM's {name} failed: {done.stderr.strip()[:1000]}")
        os.chmod(partial, 0o755)
        os.replace(partial, binary)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return binary
