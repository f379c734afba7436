"""Log set-up: secrets never reach a line, and journald gets a priority per line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vmworker.logs import REDACTED, JournalPrefixed, RedactSecrets, stderr_is_journal

SECRET = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"


def test_fields_named_like_credentials_are_masked_at_any_depth() -> None:
    redact = RedactSecrets({})
    out = redact(None, "info", {
        "event": "session_created", "key": "my-agent", "input_tokens": 12,
        "options": {"env": {"API_KEY": "hunter22", "HOME": "/workspace"}},
        "headers": [{"authorization": "Bearer abc"}], "password": "",
    })
    assert out["key"] == "my-agent" and out["input_tokens"] == 12
    assert out["options"] == {"env": {"API_KEY": REDACTED, "HOME": "/workspace"}}
    assert out["headers"] == [{"authorization": REDACTED}]
    assert out["password"] == ""


def test_secret_values_from_the_environment_and_key_shapes_are_masked_anywhere() -> None:
    redact = RedactSecrets({"ANTHROPIC_API_KEY": SECRET, "MY_TOKEN": "tok-12345678", "PATH": "/usr/bin"})
    out = redact(None, "error", {
        "event": "agent_failed", "error": f"401 for key {SECRET}",
        "exception": "Traceback ...\nValueError: tok-12345678 rejected",
        "other": "sk-ant-somethingelse123", "path": "/usr/bin",
    })
    assert out["error"] == f"401 for key {REDACTED}"
    assert out["exception"].endswith(f"ValueError: {REDACTED} rejected")
    assert out["other"] == REDACTED and out["path"] == "/usr/bin"


def test_journal_prefix_carries_the_syslog_priority() -> None:
    wrapped = JournalPrefixed(lambda logger, method, event: event["event"])
    assert wrapped(None, "info", {"event": "x", "level": "info"}) == "<6>x"
    assert wrapped(None, "warning", {"event": "x", "level": "warning"}) == "<4>x"
    assert wrapped(None, "error", {"event": "x", "level": "error"}) == "<3>x"


def test_journal_stream_is_recognised_only_when_it_is_our_stderr() -> None:
    st = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal({})


WRITER = """
import sys
import structlog
from vmworker import logs
logs.configure("info", json=True)
log = structlog.get_logger().bind(writer=sys.argv[1])
for i in range(int(sys.argv[2])):
    log.info("line", i=i, pad="x" * 200)
"""


def test_processes_sharing_stderr_never_interleave_within_a_line(tmp_path: Path) -> None:
    # Supervisor, zygote and workers share one stderr (the journal stream). With
    # PYTHONUNBUFFERED a line written as message + "\n" in two writes can be split by
    # another process's line; each line must reach the stream in a single write.
    out = tmp_path / "shared.log"
    lines_each, writers = 3000, 4
    with out.open("wb") as shared:
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(n), str(lines_each)],
                                  stderr=shared, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                 for n in range(writers)]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    seen: dict[str, list[int]] = {str(n): [] for n in range(writers)}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        seen[record["writer"]].append(record["i"])
    assert all(got == list(range(lines_each)) for got in seen.values())
