"""Tests for tproxy.tap: the twistd plugin's options and service tree."""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.plugin import IPlugin, getPlugins
from twisted.trial import unittest

from tproxy import tap
from tproxy.root import RootService
from tproxy.spawn import SpawnLauncher, TemplateLauncher


class TapTests(unittest.TestCase):
    """``twistd one-tproxy``."""

    def test_options(self) -> None:
        """The global options of the CLI, and --spawn."""
        options = tap.Options()
        options.parseOptions(["--config", "/c", "--log-dir", "/l", "--run-dir", "/r", "--spawn"])
        self.assertEqual((options.paths.config, options.paths.log_dir), ("/c", "/l"))
        self.assertTrue(options["spawn"])

    def test_relative_paths(self) -> None:
        """Relative paths (options or environment) mean the caller's directory, not twistd's."""
        cwd = self.mktemp()
        os.makedirs(cwd)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd)
        here = os.getcwd()
        self.patch(os, "environ", {**os.environ, "ONE_TPROXY_LOG_DIR": "logs"})
        options = tap.Options()
        options.parseOptions(["--config", "c.yaml", "--run-dir", "./run"])
        self.assertEqual(
            (options.paths.config, options.paths.log_dir, options.paths.run_dir),
            (os.path.join(here, "c.yaml"), os.path.join(here, "logs"), os.path.join(here, "run")),
        )

    def test_service_tree(self) -> None:
        """The service is a RootDaemon holding the RootService; template launcher by default."""
        options = tap.Options()
        options.parseOptions(["--config", "/c", "--log-dir", "/l", "--run-dir", "/r"])
        service = tap.makeService(options)
        self.assertTrue(IService.providedBy(service))
        assert isinstance(service, tap.RootDaemon)
        self.assertIsInstance(service.root, RootService)
        self.assertIsInstance(service.launcher, TemplateLauncher)
        options.parseOptions(["--spawn"])
        service = tap.makeService(options)
        assert isinstance(service, tap.RootDaemon)
        self.assertIsInstance(service.launcher, SpawnLauncher)

    def test_counters_off(self) -> None:
        """ONE_TPROXY_COUNTERS=off at start: links that count nothing, a document saying so;
        every new link takes the stream window of the limits in force."""
        from tproxy.config import Limits

        options = tap.Options()
        options.parseOptions(["--config", "/c", "--log-dir", "/l", "--run-dir", "/r"])
        self.patch(os, "environ", {**os.environ, "ONE_TPROXY_COUNTERS": "off"})
        service = tap.makeService(options)
        assert isinstance(service, tap.RootDaemon)
        link = service._make_link("br0", lambda port: None, Limits(stream_window=65536))
        self.assertFalse(link.counting)
        self.assertEqual(link.conn.initial_window, 65536)
        self.assertEqual(service.stats, {})
        self.assertIs(service._status(None)["counting"], False)
        without = {k: v for k, v in os.environ.items() if k != "ONE_TPROXY_COUNTERS"}
        self.patch(os, "environ", without)
        counted = tap.makeService(options)
        assert isinstance(counted, tap.RootDaemon)
        link = counted._make_link("br0", lambda port: None, Limits(stream_window=32768))
        self.assertTrue(link.counting)
        self.assertEqual(link.conn.initial_window, 32768)
        self.assertEqual(
            counted._make_link("br0", lambda port: None, Limits()).conn.initial_window, 1048576
        )
        self.assertIs(counted._status(None)["counting"], True)

    def test_plugin_found(self) -> None:
        """twistd finds the one-tproxy plugin."""
        from twisted import plugins

        names = [getattr(p, "tapname", None) for p in getPlugins(IPlugin, plugins)]
        self.assertIn("one-tproxy", names)
