"""tproxy.link_connect.ConnectDeadlines: one timer for a link's connect timeouts (fake clock).

The connects themselves need the kernel: tests/integration/test_link_connect.py.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.trial import unittest

from tproxy.link_connect import ConnectDeadlines, OutgoingConnection


class _Attempt:
    """What ConnectDeadlines uses of an OutgoingConnection: its entry and ``_timed_out``."""

    def __init__(self, clock: Clock, ended: list[tuple[str, float]], name: str) -> None:
        self._deadline: list[Any] | None = None
        self.clock = clock
        self.ended = ended
        self.name = name

    def _timed_out(self) -> None:
        self._deadline = None
        self.ended.append((self.name, self.clock.seconds()))

    def connected(self) -> None:
        """As OutgoingConnection._stop_timer does when the connect ends."""
        entry, self._deadline = self._deadline, None
        assert entry is not None
        entry[2] = None


class ConnectDeadlinesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ended: list[tuple[str, float]] = []
        self.deadlines = ConnectDeadlines(self.clock)

    def attempt(self, name: str, timeout: float) -> _Attempt:
        a = _Attempt(self.clock, self.ended, name)
        self.deadlines.add(cast(OutgoingConnection, a), timeout)
        return a

    def test_one_timer_for_many(self) -> None:
        """Many attempts, one pending call; each times out when due, not before."""
        for i in range(100):
            self.attempt(str(i), 5.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(4.999)
        self.assertEqual(self.ended, [])
        self.clock.advance(0.001)
        self.assertEqual([n for n, _ in self.ended], [str(i) for i in range(100)])
        self.assertEqual((len(self.deadlines), self.clock.getDelayedCalls()), (0, []))

    def test_ended_attempts_do_not_time_out(self) -> None:
        """An attempt that connected is skipped; the timer then serves the next one on time."""
        a = self.attempt("a", 5.0)
        self.clock.advance(1.0)
        self.attempt("b", 5.0)
        a.connected()
        self.clock.advance(4.0)  # a's deadline: nothing times out.
        self.assertEqual(self.ended, [])
        self.assertEqual(len(self.deadlines), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.ended, [("b", 6.0)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shorter_timeout_later(self) -> None:
        """A shorter timeout (after a reload) is not delayed behind a longer one."""
        self.attempt("long", 10.0)
        self.attempt("short", 1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.ended, [("short", 1.0)])
        self.clock.advance(9.0)
        self.assertEqual(self.ended, [("short", 1.0), ("long", 10.0)])

    def test_stop(self) -> None:
        """A stopped set fires nothing and forgets its attempts."""
        a = self.attempt("a", 5.0)
        self.deadlines.stop()
        self.assertEqual((self.clock.getDelayedCalls(), len(self.deadlines)), ([], 0))
        self.assertIsNone(a._deadline)
        self.clock.advance(10.0)
        self.assertEqual(self.ended, [])
