"""Tests for tproxy.template that run in-process (the fork loop is covered by integration)."""

from __future__ import annotations

import gc
import os
import sys

from twisted.trial import unittest

from tproxy import template


class TemplateTests(unittest.TestCase):
    """Preloading and entry points."""

    def test_resolve_entry(self) -> None:
        """``module:function`` names the child's entry; the default function is main."""
        entry = template.resolve_entry("tproxy.inner:main")
        self.assertIs(entry, template.resolve_entry("tproxy.inner"))

    def test_warm_up_leaves_nothing(self) -> None:
        """The warm-up installs no reactor and leaves no descriptor open."""
        before = set(os.listdir("/proc/self/fd"))
        had_reactor = "twisted.internet.reactor" in sys.modules
        template.warm_up()
        after = set(os.listdir("/proc/self/fd"))
        self.assertEqual(len(after - before), 0, after - before)
        self.assertEqual("twisted.internet.reactor" in sys.modules, had_reactor)

    def test_preload_freezes(self) -> None:
        """preload imports what it is told and freezes the collector."""
        self.addCleanup(gc.unfreeze)
        template.preload(("json",), warm=False)
        self.assertIn("json", sys.modules)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_preload_looks_up_libc_once(self) -> None:
        """preload leaves the C library handles the inner proxy uses already made."""
        from tproxy import privileges, runtime

        self.addCleanup(gc.unfreeze)
        template.preload(("json",), warm=False)
        self.assertEqual(len(privileges._process_libc), 1)
        self.assertIs(privileges.process_libc(), privileges._process_libc[0])
        self.assertEqual(len(runtime._libc), 1)
        self.assertIn("tproxy.privileges", template.PRELOAD)
