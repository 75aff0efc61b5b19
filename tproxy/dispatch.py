"""Leaner reactor dispatch for the proxy processes: no legacy log context per I/O event.

Why: the epoll reactor hands every readable or writable socket to its handler
through ``twisted.python.log.callWithLogger``, which asks the descriptor for
its log prefix, copies the legacy log context, and runs the handler inside
``twisted.python.context`` (a thread-local stack push and pop). Under issue
7's (b) - every request a new guest connection, 3-4 socket events per
connection in each proxy - that wrapper was 13-15 % of each proxy's busy
samples (py-spy) and 15 % of its instructions (callgrind,
``bench/bench_setup.py``), more than any handler of ours.

What it gave: the descriptor's prefix as the ``system`` of *legacy*
(``twisted.python.log``) events logged from inside a handler. Our own code
logs through ``twisted.logger`` with a namespace, which does not use it; the
log file shows ``system`` only for legacy events (``tproxy.logs``), i.e.
Twisted's own. With :func:`install`, an exception that escapes a handler is
still logged with the descriptor's prefix; a legacy line logged inside a
handler says ``-`` instead.

Installed by the daemons only (``tproxy.inner``, ``tproxy.tap``), once, at
start; tests that install it uninstall it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python import log as _legacy

_twisted_call_with_logger = _legacy.callWithLogger


def call_with_logger(logger: Any, func: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``func(*args, **kw)``; an exception is logged with ``logger``'s prefix, as Twisted does."""
    try:
        return func(*args, **kw)
    except KeyboardInterrupt:
        raise
    except BaseException:
        try:
            prefix = logger.logPrefix()
        except BaseException:
            prefix = "(buggy logPrefix method)"
        _legacy.err(system=prefix)
        return None


def install() -> None:
    """Make the reactors' per-event dispatch :func:`call_with_logger` (this process)."""
    _legacy.callWithLogger = call_with_logger  # type: ignore[assignment]


def uninstall() -> None:
    """Give Twisted back its own ``callWithLogger``."""
    _legacy.callWithLogger = _twisted_call_with_logger
