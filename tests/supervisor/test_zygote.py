"""The zygote's preload: frozen before any fork, so workers share it and never walk it."""

from __future__ import annotations

import json
import subprocess
import sys

from supervisor.spawner import ROOT

FORKED_COUNTS = """
import gc, json, os
from supervisor import zygote
zygote._preload()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, json.dumps([gc.get_freeze_count(), len(gc.get_objects())]).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(r, 200).decode())
"""


def test_a_forked_worker_s_collections_do_not_walk_the_preloaded_modules() -> None:
    """Every module a worker uses (the anthropic SDK among them) is imported once in the
    zygote; a worker's full collection that walked them took 115 ms and wrote into pages
    it then no longer shared with the zygote. A fork inherits them frozen instead."""
    out = subprocess.run([sys.executable, "-c", FORKED_COUNTS], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    frozen, tracked = json.loads(out)
    assert frozen > 50_000
    assert tracked < frozen // 10
