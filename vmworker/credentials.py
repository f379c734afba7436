"""The worker's credentials: taken out of its environment at start, held in memory only.

Owns the rule for what counts as a secret in the environment the worker inherits (the
service's: `ANTHROPIC_API_KEY`, `ANTHROPIC_AUTH_TOKEN`, the service's own auth token, any
`*_TOKEN`, `*_KEY`, `*_SECRET`, `*_PASSWORD`...). `take_from_environment()` runs first
thing in the worker: it moves each such variable out of `os.environ`, so no process the
worker starts (the VM's sandbox, mkfs, mount) can inherit one, and keeps the values for
the code that needs them (the claude agent reads them through `environment()`). Nothing
here is ever logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from typing import Final

SECRET_NAME: Final = re.compile(
    r"(^|_)(KEY|KEYS|TOKEN|TOKENS|SECRET|SECRETS|PASSWORD|PASSWD|CREDENTIAL|CREDENTIALS|AUTH)(_|$)",
    re.IGNORECASE)

_held: dict[str, str] = {}


def is_secret(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def take_from_environment(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Move every secret variable out of the environment into memory; returns the names."""
    env = os.environ if environ is None else environ
    taken = [name for name in env if is_secret(name)]
    for name in taken:
        _held[name] = env.pop(name)
    return taken


def environment() -> dict[str, str]:
    """The worker's environment as it was given, secrets included (for agent config)."""
    return {**os.environ, **_held}
