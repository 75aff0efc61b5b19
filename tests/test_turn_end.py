"""Tests for tproxy.turn_end: calls due at the end of a reactor iteration."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.logcapture import Captured
from tproxy import turn_end
from tproxy.turn_end import TurnEnd


class TurnEndTests(unittest.TestCase):
    """The queue of due calls."""

    def test_runs_in_order_once(self) -> None:
        te = TurnEnd()
        seen: list[int] = []
        te.call(lambda: seen.append(1))
        te.call(lambda: seen.append(2))
        self.assertEqual(te.pending, 2)
        te.run()
        te.run()
        self.assertEqual(seen, [1, 2])
        self.assertEqual(te.pending, 0)

    def test_calls_queued_while_running_run_too(self) -> None:
        te = TurnEnd()
        seen: list[str] = []
        te.call(lambda: (seen.append("a"), te.call(lambda: seen.append("b"))))
        te.run()
        self.assertEqual(seen, ["a", "b"])

    def test_an_error_is_logged_and_the_rest_run(self) -> None:
        te = TurnEnd()
        seen: list[str] = []
        te.call(lambda: 1 / 0)
        te.call(lambda: seen.append("after"))
        log = Captured(self, "tproxy.turn_end")
        te.run()
        self.assertEqual(seen, ["after"])
        failures = [e for e in log.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(ZeroDivisionError))
        self.flushLoggedErrors(ZeroDivisionError)


class _Reactor:
    """Just a ``doIteration`` that records its calls."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.on_events: list[Any] = []

    def doIteration(self, timeout: float | None) -> None:  # noqa: N802
        self.log.append(f"poll {timeout}")
        for f in self.on_events:
            f()


class HookTests(unittest.TestCase):
    """``hook``: one ``TurnEnd`` per reactor, around its ``doIteration``."""

    def test_clock_has_none(self) -> None:
        self.assertIsNone(turn_end.hook(Clock()))

    def test_one_per_reactor(self) -> None:
        r = _Reactor([])
        self.assertIs(turn_end.hook(r), turn_end.hook(r))
        self.assertIsNot(turn_end.hook(r), turn_end.hook(_Reactor([])))

    def test_after_the_events_and_before_the_next_poll(self) -> None:
        """Queued by an event: right after that iteration's events. Queued outside an
        iteration (a timer, start-up): before the poll, which may sleep."""
        log: list[str] = []
        r = _Reactor(log)
        te = turn_end.hook(r)
        assert te is not None
        r.on_events.append(lambda: te.call(lambda: log.append("due (event)")))
        r.doIteration(0)
        r.on_events.clear()
        te.call(lambda: log.append("due (timer)"))
        r.doIteration(5.0)
        self.assertEqual(log, ["poll 0", "due (event)", "due (timer)", "poll 5.0"])


class RealReactorTests(unittest.TestCase):
    """On the real reactor: due calls run before the next iteration's timers."""

    def test_before_call_later_zero(self) -> None:
        te = turn_end.hook(global_reactor)
        if te is None:
            raise unittest.SkipTest("this reactor has no doIteration")
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        seen: list[str] = []
        done: Deferred[None] = Deferred()

        class Reader:
            def fileno(self) -> int:
                return b.fileno()

            def logPrefix(self) -> str:  # noqa: N802
                return "Reader"

            def doRead(self) -> None:  # noqa: N802
                b.recv(16)
                global_reactor.removeReader(self)
                global_reactor.callLater(0, lambda: (seen.append("timer"), done.callback(None)))
                te.call(lambda: seen.append("end of iteration"))

            def connectionLost(self, reason: object) -> None:  # noqa: N802
                pass

        global_reactor.addReader(Reader())
        a.send(b"x")
        done.addCallback(lambda _: self.assertEqual(seen, ["end of iteration", "timer"]))
        return done


class DueCallTests(unittest.TestCase):
    """No due call is lost or waits for a poll timeout."""

    def test_base_exception_keeps_the_rest_due(self) -> None:
        """A BaseException from a due call propagates, but the calls behind it stay due
        (a dropped ``LinkProtocol._flush_turn`` would leave ``_flush_due`` set for good:
        that link's ``flush_soon`` would never flush again)."""
        te = TurnEnd()
        seen: list[str] = []

        def interrupted() -> None:
            raise KeyboardInterrupt

        te.call(interrupted)
        te.call(lambda: seen.append("behind"))
        with self.assertRaises(KeyboardInterrupt):
            te.run()
        te.run()
        self.assertEqual(seen, ["behind"])

    def test_call_later_zero_from_a_pre_poll_call_is_not_delayed(self) -> None:
        """A due call queued by a timer runs before the poll; a ``callLater(0)`` it makes
        (``abortConnection`` after a failed link send does) must not wait for the poll's
        timeout, which was computed before it existed."""
        te = turn_end.hook(global_reactor)
        if te is None:
            raise unittest.SkipTest("this reactor has no doIteration")
        done: Deferred[float] = Deferred()
        start = global_reactor.seconds()

        def due() -> None:
            global_reactor.callLater(0, lambda: done.callback(global_reactor.seconds() - start))

        global_reactor.callLater(0, te.call, due)  # a timer queues it: outside an iteration
        fallback = global_reactor.callLater(2.0, lambda: None)  # the poll's timeout
        self.addCleanup(lambda: fallback.cancel() if fallback.active() else None)
        done.addCallback(lambda elapsed: self.assertLess(elapsed, 1.0))
        return done

    def test_asyncio_reactor_runs_due_calls(self) -> None:
        """A ``PosixReactorBase`` whose loop never calls ``doIteration`` (asyncio, the GLib
        reactors: ``twistd --reactor=asyncio one-tproxy``) must not get a hook whose
        calls never run."""
        import asyncio

        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        r = AsyncioSelectorReactor(loop)
        te = turn_end.hook(r)
        if te is None:
            return  # callers act at once: fine
        seen: list[str] = []
        r.callLater(0, te.call, lambda: seen.append("due"))
        r.callLater(0.2, r.stop)
        r.run(installSignalHandlers=False)
        self.assertEqual(seen, ["due"])
