"""Capturing twisted.logger events in tests."""

from __future__ import annotations

from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest


class Captured:
    """Events seen by the global log publisher while a test runs."""

    def __init__(self, test: unittest.TestCase, namespace: str | None = None) -> None:
        self.events: list[LogEvent] = []
        self._namespace = namespace
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: LogEvent) -> None:
        if self._namespace is None or event.get("log_namespace") == self._namespace:
            self.events.append(event)

    def messages(self, level: LogLevel | None = LogLevel.warn) -> list[str]:
        """The formatted messages at ``level`` (every level when None)."""
        return [formatEvent(e) for e in self.events if level is None or e.get("log_level") == level]

    def clear(self) -> None:
        """Forget what was seen so far."""
        self.events.clear()
