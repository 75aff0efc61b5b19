"""Control of the running mesh from the command line: start, stop, restart, reload, status.

Placeholder with the final signatures; the mesh issue implements it. The driver
(``one-tproxy up/down``) calls ``start`` and ``reload`` after it changed the host
state.
"""

from __future__ import annotations

import sys

from tproxy.settings import Paths


def _missing(name: str) -> int:
    print(f"one-tproxy {name}: the mesh is not implemented yet", file=sys.stderr)
    return 2


def start(paths: Paths) -> int:
    """Start the mesh unless it runs; exit status."""
    return _missing("start")


def stop(paths: Paths) -> int:
    """Stop every proxy process, waiting (bounded) until they are gone; exit status."""
    return _missing("stop")


def restart(paths: Paths) -> int:
    """Stop, then start; exit status."""
    return _missing("restart")


def reload(paths: Paths) -> int:
    """SIGHUP to the root proxy; exit status."""
    return _missing("reload")


def status(paths: Paths) -> int:
    """Print ``one_tproxy: PID`` and ``one_tproxy_BR: PID`` lines; 0 if the root runs, else 3."""
    return _missing("status")
