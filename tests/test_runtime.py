"""Tests for tproxy.runtime: configuration fallback, log file, reload."""

from __future__ import annotations

import os

from twisted.logger import Logger
from twisted.trial import unittest

from tproxy.runtime import DaemonRuntime
from tproxy.settings import Paths

log = Logger(namespace="tests.runtime")


class DaemonRuntimeTests(unittest.TestCase):
    """One daemon's limits, configuration and log file."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "one.conf")
        self.paths = Paths(self.config, self.dir, self.dir)

    def write(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write(text)

    def runtime(self) -> DaemonRuntime:
        rt = DaemonRuntime("one_tproxy_x", self.paths)
        rt.prepare(begin_logging=False)
        assert rt.log_file is not None
        self.addCleanup(rt.log_file.close)
        self.addCleanup(rt.log_file.uninstall)
        return rt

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "one_tproxy_x.log")) as f:
            return f.read()

    def test_level_and_limits_from_file(self) -> None:
        """The file's debug level filters the log; its limits are in force."""
        self.write(":tproxy_debug_level: 1\n:tproxy_grace_period: 3\n:tproxy: []\n")
        rt = self.runtime()
        self.assertEqual(rt.limits().grace_period, 3)
        log.info("not written")
        log.warn("written")
        text = self.log_text()
        self.assertIn("written", text)
        self.assertNotIn("not written", text)

    def test_missing_file_defaults(self) -> None:
        """A missing configuration file means the defaults, with an error in the log."""
        rt = self.runtime()
        self.assertEqual(rt.config.debug_level, 2)
        self.assertIn("cannot read", self.log_text())

    def test_reload(self) -> None:
        """Reload reopens the (rotated) file and applies the new level; a broken file keeps it."""
        self.write(":tproxy_debug_level: 2\n:tproxy: []\n")
        rt = self.runtime()
        path = os.path.join(self.dir, "one_tproxy_x.log")
        os.rename(path, path + ".1")
        self.write(":tproxy_debug_level: 3\n:tproxy: []\n")
        rt.reload()
        self.assertTrue(os.path.exists(path))
        log.debug("debug now")
        self.assertIn("debug now", self.log_text())
        self.write(":tproxy: {not a list\n")
        rt.reload()
        self.assertEqual(rt.config.debug_level, 3)
        rt.set_debug_level(0)
        log.warn("filtered")
        self.assertNotIn("filtered", self.log_text())
        rt.reopen()
