"""Tests for tproxy.cli: parsing and dispatch."""

import io
from contextlib import redirect_stdout

from twisted.trial import unittest

from tproxy import cli


class ParserTests(unittest.TestCase):
    """The command line of DESIGN.md 2.3."""

    def test_help_lists_every_subcommand(self) -> None:
        """--help names every subcommand."""
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit):
            cli.main(["--help"])
        for name in cli.SUBCOMMANDS:
            self.assertIn(name, out.getvalue())

    def test_global_options_before_or_after(self) -> None:
        """Global options are accepted before and after the subcommand."""
        parser = cli.build_parser()
        a = parser.parse_args(["--config", "/a", "status"])
        b = parser.parse_args(["status", "--config", "/b"])
        self.assertEqual((a.config, b.config), ("/a", "/b"))
