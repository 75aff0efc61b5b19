"""The end of a reactor iteration: where a link sends what one iteration queued.

Why: the streams that one reactor iteration handles (a guest's request read,
a service's answer, an OPEN accepted) each queue frames on their link; sent
when the iteration's I/O events are all handled, they leave in one
``sendmsg`` and wake the peer proxy once, instead of a send and a wake-up per
stream. ``reactor.callLater(0, ...)`` gives the same moment at the price of a
DelayedCall per iteration (its object, a heap push and pop, the timeout
pass), which costs as much as the send it saves when an iteration carries a
single request; this hook costs one Python call per iteration.

The hook wraps the reactor's ``doIteration``, which ``ReactorBase.mainLoop``
calls once per turn after ``runUntilCurrent``. What is due runs right after
the I/O events of the iteration that queued it, and what a timer or start-up
code queued (outside an iteration) runs before the next poll, so nothing
waits for the poll's timeout. A reactor without ``doIteration`` (the
``Clock`` of unit tests) gets no hook: callers act at once, or tests drive a
``TurnEnd`` of their own with :meth:`TurnEnd.run`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.base import ReactorBase
from twisted.logger import Logger

_log = Logger(namespace="tproxy.turn_end")


class TurnEnd:
    """Calls due at the end of the current reactor iteration, in the order they were asked for."""

    def __init__(self) -> None:
        self._due: list[Callable[[], object]] = []

    def call(self, f: Callable[[], object]) -> None:
        """Run ``f()`` once the current iteration's I/O events are handled."""
        self._due.append(f)

    @property
    def pending(self) -> int:
        """How many calls are due."""
        return len(self._due)

    def run(self) -> None:
        """Run what is due, and what those calls ask for; an error is logged, not raised."""
        while self._due:
            due, self._due = self._due, []
            for i, f in enumerate(due):
                try:
                    f()
                except Exception:
                    _log.failure("a call at the end of a reactor iteration failed")
                except BaseException:
                    # It propagates, but what was due behind it stays due (a lost
                    # call would leave its caller's "already due" flag set for good).
                    self._due[:0] = due[i + 1 :]
                    raise

    def wrap(
        self,
        do_iteration: Callable[[Any], object],
        next_timeout: Callable[[], float | None] | None = None,
    ) -> Callable[[Any], None]:
        """``do_iteration`` with what is due run before its poll and after its events.

        ``next_timeout`` (the reactor's ``timeout``): the poll's timeout was
        computed before the calls run before the poll; a timer they set (a
        ``callLater(0)``) shortens it, instead of waiting for the old one.
        """

        def iteration(timeout: Any) -> None:
            if self._due:
                self.run()
                if next_timeout is not None and timeout != 0:
                    t = next_timeout()
                    if t is not None and (timeout is None or t < timeout):
                        timeout = t
            do_iteration(timeout)
            if self._due:
                self.run()

        return iteration


_hooks: weakref.WeakKeyDictionary[Any, TurnEnd] = weakref.WeakKeyDictionary()


def hook(reactor: Any) -> TurnEnd | None:
    """``reactor``'s ``TurnEnd``, wrapped around its ``doIteration`` on first use.

    None when the reactor has no ``doIteration`` to wrap (``Clock``), or its
    loop does not call it (the asyncio and GLib reactors run their own).
    """
    te = _hooks.get(reactor)
    if te is not None:
        return te
    do_iteration = getattr(reactor, "doIteration", None)
    if do_iteration is None:
        return None
    if isinstance(reactor, ReactorBase) and (
        type(reactor).run is not ReactorBase.run
        or type(reactor).mainLoop is not ReactorBase.mainLoop
    ):
        # Its loop is not mainLoop (asyncio, GLib): doIteration is never called.
        return None
    te = TurnEnd()
    reactor.doIteration = te.wrap(do_iteration, getattr(reactor, "timeout", None))
    _hooks[reactor] = te
    return te
