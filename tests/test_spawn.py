"""Tests for tproxy.spawn without processes: what the template launcher tells the root's log."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.trial import unittest

from tests.logcapture import Captured
from tproxy.settings import Paths
from tproxy.spawn import TemplateLauncher, _ForkedInner


class _Reactor(MemoryReactorClock):
    """A memory reactor that records readers (pidfd watches)."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


class ForkedInnerTests(unittest.TestCase):
    """The handle of an inner proxy forked by the template."""

    def test_pid_logged_when_known(self) -> None:
        """The template's report names the inner proxy's pid in the log; the pidfd is watched."""
        reactor = _Reactor()
        launcher = TemplateLauncher(reactor, Paths("/nonexistent", "/tmp", "/tmp"))
        handle = _ForkedInner("tqrbr0", launcher)
        captured = Captured(self, "tproxy.spawn")
        handle.started(os.getpid())
        self.addCleanup(handle.ended, "test over")
        self.assertEqual(handle.pid, os.getpid())
        self.assertEqual(
            captured.messages(LogLevel.info),
            [f"inner proxy one_tproxy_tqrbr0 forked (pid {os.getpid()})"],
        )
        self.assertEqual(len(reactor.readers), 1)
