"""Tests for tproxy.settings."""

from twisted.trial import unittest

from tproxy import settings


class PathsTests(unittest.TestCase):
    """Paths come from options, then the environment, then the defaults."""

    def test_defaults(self) -> None:
        """With nothing given, the DESIGN.md defaults apply."""
        p = settings.Paths.from_sources(environ={})
        self.assertEqual(
            (p.config, p.log_dir, p.run_dir),
            ("/var/tmp/one/etc/vnm/OpenNebulaNetwork.conf", "/var/log", "/var/run"),
        )

    def test_environment(self) -> None:
        """Environment variables replace the defaults."""
        env = {"ONE_TPROXY_CONFIG": "/c", "ONE_TPROXY_LOG_DIR": "/l", "ONE_TPROXY_RUN_DIR": "/r"}
        p = settings.Paths.from_sources(environ=env)
        self.assertEqual((p.config, p.log_dir, p.run_dir), ("/c", "/l", "/r"))

    def test_options_win(self) -> None:
        """Explicit values win over the environment."""
        env = {"ONE_TPROXY_CONFIG": "/c"}
        p = settings.Paths.from_sources(config="/x", environ=env)
        self.assertEqual(p.config, "/x")
