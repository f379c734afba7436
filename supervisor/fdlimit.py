"""The supervisor's open-file limit: raised to the hard limit when the service starts.

Each WebSocket connection is a socket, each worker a pipe, an ipc peer and a pidfd, so the
common soft limit of 1,024 caps the service near a thousand connections long before memory
or CPU does. This module only raises the soft limit as far as the hard limit allows (root
may also raise the hard one); it never lowers a limit. The systemd unit sets
`LimitNOFILE` to the same end.
"""

from __future__ import annotations

import resource
from typing import Final

import structlog

log = structlog.get_logger("supervisor.fdlimit")

WANTED: Final = 65536


def raise_nofile_limit(wanted: int = WANTED) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward `wanted`; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        # Root may lift the hard limit too; anyone may lift the soft one up to the hard one.
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        target = wanted
    except (ValueError, OSError):
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        else:
            target = soft
    log.info("open_files_limit", soft=target, was=soft)
    return target
