"""structlog set-up shared by the worker and the supervisor.

Owns the one place where log rendering is chosen: JSON lines when stderr is not a
terminal (so a supervisor or journald can parse them), a console renderer when a person
is watching. Callers bind their own context (`actor=`, `pid=`, `conn=`) on the logger
they get from `structlog.get_logger()`. This module never decides *what* to log and never
writes anywhere but stderr (stdout may be a protocol channel).

Two things every line gets on its way out, whoever logged it:

* secrets are masked: values of fields named like credentials (`api_key`, `token`,
  `password`, `authorization`, ...), any occurrence of the value of such an environment
  variable (`ANTHROPIC_API_KEY`), and anything shaped like an Anthropic key;
* under journald (stderr is the stream named by `$JOURNAL_STREAM`) a `<N>` syslog
  priority prefix, so `journalctl -p warning` filters by level.

Records of the standard `logging` module (asyncio's "Task exception was never
retrieved", aiohttp's errors) go through the same renderer, so they are JSON lines too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")

REDACTED = "[redacted]"
SECRET_NAME = re.compile(
    r"api[_-]?key|access[_-]?key|private[_-]?key|secret|token(?!s)|passw|authorization|cookie|credential",
    re.IGNORECASE)
SECRET_SHAPE = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2}


class RedactSecrets:
    """A processor that masks credentials anywhere in an event, nested values included."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        values = {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
        # Longest first, so a secret that contains another is masked whole.
        self._values = sorted(values, key=len, reverse=True)

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        return {key: self._clean(key, value) for key, value in event_dict.items()}

    def _clean(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            if key and SECRET_NAME.search(key) and value:
                return REDACTED
            for secret in self._values:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return SECRET_SHAPE.sub(REDACTED, value)
        if isinstance(value, Mapping):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean("", v) for v in value]
        return value


class JournalPrefixed:
    """Wraps the renderer: `<priority>` before each line, which journald turns into its level."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        priority = _PRIORITY.get(str(event_dict.get("level", method)).lower(), 6)
        line = self._renderer(logger, method, event_dict)
        if isinstance(line, bytes):
            return f"<{priority}>".encode() + line
        return f"<{priority}>{line}"


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr is the journald stream systemd connected us to (sd_journal_stream_fd)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def configure(level: str, *, json: bool | None = None) -> None:
    """Configure structlog process-wide; `json=None` picks JSON unless stderr is a TTY."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    if stderr_is_journal():
        renderer = JournalPrefixed(renderer)
    redact = RedactSecrets(os.environ)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exceptions: Processor = (structlog.processors.format_exc_info if json
                             else structlog.processors.StackInfoRenderer())
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, exceptions, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # WriteLogger writes message + "\n" in one call; PrintLogger's print() writes them
        # apart, and under PYTHONUNBUFFERED another process sharing stderr (supervisor,
        # zygote, workers) can land its line between the two.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        # Loggers are bound once per actor/connection and then reused; caching keeps the
        # per-event cost to the processors alone.
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    exceptions, redact, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
