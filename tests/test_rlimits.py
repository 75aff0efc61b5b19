"""Tests for tproxy.rlimits: raising the open-files soft limit."""

from __future__ import annotations

import resource

from twisted.trial import unittest

from tproxy import rlimits
from tproxy.rlimits import raise_nofile_limit

from .logcapture import Captured


class FakeLimits:
    """getrlimit/setrlimit over a dictionary, optionally refusing."""

    def __init__(self, soft: int, hard: int, refuse: Exception | None = None) -> None:
        self.limits = {resource.RLIMIT_NOFILE: (soft, hard)}
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits[which]

    def setrlimit(self, which: int, value: tuple[int, int]) -> None:
        self.calls.append(value)
        if self.refuse is not None:
            raise self.refuse
        self.limits[which] = value


class RaiseNofileTests(unittest.TestCase):
    """raise_nofile_limit."""

    def test_real_process(self) -> None:
        """The soft limit of this very process goes up to the hard limit."""
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, before)
        soft, hard = before
        if hard == resource.RLIM_INFINITY:
            raise unittest.SkipTest("hard limit is unlimited here; the fake tests cover it")
        lowered = min(256, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        self.assertEqual(raise_nofile_limit(), (lowered, hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
        # A second call has nothing left to do.
        self.assertEqual(raise_nofile_limit(), (hard, hard))

    def test_raises_to_hard(self) -> None:
        """1024/20000 becomes 20000/20000 and is logged at INFO."""
        seen = Captured(self, "tproxy.rlimits")
        fake = FakeLimits(1024, 20000)
        self.assertEqual(raise_nofile_limit(fake.getrlimit, fake.setrlimit), (1024, 20000))
        self.assertEqual(fake.calls, [(20000, 20000)])
        self.assertEqual(seen.messages(None), ["open-files limit raised from 1024 to 20000"])

    def test_already_at_hard(self) -> None:
        """Nothing is set when the soft limit already is the hard one."""
        fake = FakeLimits(4096, 4096)
        self.assertEqual(raise_nofile_limit(fake.getrlimit, fake.setrlimit), (4096, 4096))
        self.assertEqual(fake.calls, [])

    def test_unlimited_hard(self) -> None:
        """An unlimited hard limit is capped at fs.nr_open."""
        fake = FakeLimits(1024, resource.RLIM_INFINITY)
        result = raise_nofile_limit(fake.getrlimit, fake.setrlimit, lambda: 1048576)
        self.assertEqual(result, (1024, 1048576))
        self.assertEqual(fake.calls, [(1048576, resource.RLIM_INFINITY)])

    def test_refused(self) -> None:
        """A refusal is a warning, never an exception, and the old limit stays."""
        seen = Captured(self, "tproxy.rlimits")
        fake = FakeLimits(1024, 20000, refuse=ValueError("not allowed"))
        self.assertEqual(raise_nofile_limit(fake.getrlimit, fake.setrlimit), (1024, 1024))
        self.assertEqual(
            seen.messages(),
            ["cannot raise the open-files limit from 1024 to 20000: not allowed"],
        )

    def test_nr_open(self) -> None:
        """fs.nr_open is read from /proc, with a fallback when it cannot be."""
        self.assertGreater(rlimits._nr_open(), 1024)
        self.assertEqual(rlimits._nr_open("/nonexistent/nr_open"), 1024 * 1024)
