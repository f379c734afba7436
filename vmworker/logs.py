"""structlog set-up shared by the worker and the supervisor.

Owns the one place where log rendering is chosen: JSON lines when stderr is not a
terminal (so a supervisor or journald can parse them), a console renderer when a person
is watching. Callers bind their own context (`actor=`, `pid=`, `conn=`) on the logger
they get from `structlog.get_logger()`. This module never decides *what* to log and never
writes anywhere but stderr (stdout may be a protocol channel).
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(level: str, *, json: bool | None = None) -> None:
    """Configure structlog process-wide; `json=None` picks JSON unless stderr is a TTY."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Loggers are bound once per actor/connection and then reused; caching keeps the
        # per-event cost to the processors alone.
        cache_logger_on_first_use=True,
    )
