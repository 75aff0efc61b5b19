"""The open-files limit of the proxies (DESIGN.md 2.4).

Every stream costs a socket, so each proxy raises its soft ``RLIMIT_NOFILE`` to
the hard limit when it starts (OpenNebula's daemon kept an inherited 1024 and
then served only ~500 connections). Raising a soft limit up to the hard one
needs no privilege; a hard limit of "unlimited" is capped at the kernel's
``fs.nr_open``, the most one process may have.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

from twisted.logger import Logger

log = Logger()

NR_OPEN_PATH = "/proc/sys/fs/nr_open"
"""The kernel's ceiling for RLIMIT_NOFILE."""

_FALLBACK_NR_OPEN = 1024 * 1024


def _nr_open(path: str = NR_OPEN_PATH) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return _FALLBACK_NR_OPEN


def raise_nofile_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    nr_open: Callable[[], int] = _nr_open,
) -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit; return (old soft, new soft).

    Never raises: when the kernel refuses, a warning is logged and the old
    limit is kept (returned as both values).
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = nr_open()
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft, soft
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warn(
            "cannot raise the open-files limit from {soft} to {target}: {error}",
            soft=soft,
            target=target,
            error=e,
        )
        return soft, soft
    log.info("open-files limit raised from {soft} to {target}", soft=soft, target=target)
    return soft, target
