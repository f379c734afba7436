"""The open-file limit is raised at start, never lowered (in a child: limits are per process)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_soft_limit_is_raised_toward_the_wanted_and_never_lowered() -> None:
    out = _run(
        "import resource\n"
        "from supervisor.fdlimit import raise_nofile_limit\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "got = raise_nofile_limit(4096)\n"
        "assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0], got\n"
        "again = raise_nofile_limit(512)\n"
        "print(got, again)\n")
    got, again = map(int, out.splitlines()[-1].split())
    assert got >= 4096 and again == got
