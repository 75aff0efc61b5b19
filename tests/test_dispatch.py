"""tproxy.dispatch: the reactors' per-event call without the legacy log context."""

from __future__ import annotations

from twisted.python import log as legacy
from twisted.trial import unittest

from tproxy import dispatch


class _Prefixed:
    def logPrefix(self) -> str:  # noqa: N802
        return "prefix-of-it"


class DispatchTests(unittest.TestCase):
    def setUp(self) -> None:
        dispatch.install()
        self.addCleanup(dispatch.uninstall)

    def test_installed(self) -> None:
        """install() replaces twisted.python.log.callWithLogger; uninstall() restores it."""
        self.assertIs(legacy.callWithLogger, dispatch.call_with_logger)
        dispatch.uninstall()
        self.assertIsNot(legacy.callWithLogger, dispatch.call_with_logger)

    def test_calls_through(self) -> None:
        """The handler runs with its arguments and its result is returned."""
        self.assertEqual(
            legacy.callWithLogger(_Prefixed(), lambda a, b=0: a + b, 1, b=2),  # type: ignore[no-untyped-call]
            3,
        )

    def test_exception_logged_with_prefix(self) -> None:
        """An escaping exception is logged as Twisted does, with the descriptor's prefix."""
        events: list[dict[str, object]] = []
        legacy.addObserver(events.append)
        self.addCleanup(legacy.removeObserver, events.append)

        def boom() -> None:
            raise ValueError("boom")

        self.assertIsNone(legacy.callWithLogger(_Prefixed(), boom))  # type: ignore[no-untyped-call]
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIn("prefix-of-it", [e.get("system") for e in events])
