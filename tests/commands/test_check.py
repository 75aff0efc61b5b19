"""Tests for ``one-tproxy check`` and ``status --json`` argument handling, in-process."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial import unittest

from tproxy import cli
from tproxy.commands import check


class CheckCommandTests(unittest.TestCase):
    """The check command's arguments."""

    def test_parser(self) -> None:
        """check takes an optional bridge and a timeout; status takes one output format."""
        parser = cli.build_parser()
        args = parser.parse_args(["check", "br0", "--timeout", "1.5"])
        self.assertEqual((args.command, args.bridge, args.timeout), ("check", "br0", 1.5))
        self.assertIsNone(parser.parse_args(["check"]).bridge)
        self.assertEqual(parser.parse_args(["status", "--json"]).format, "json")
        self.assertEqual(parser.parse_args(["status", "-v"]).format, "text")
        self.assertEqual(parser.parse_args(["status", "--prometheus"]).format, "prometheus")
        self.assertIsNone(parser.parse_args(["status"]).format)
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit):
            parser.parse_args(["status", "--json", "--prometheus"])

    def test_bad_bridge_name(self) -> None:
        """A bridge name that cannot exist is refused before anything is read."""
        out, err = io.StringIO(), io.StringIO()

        def no_edges() -> object:
            raise AssertionError("edges must not be built for a bad name")

        self.patch(check, "real_edges", no_edges)
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(["check", "x" * 15])
        self.assertEqual(rc, 1)
        self.assertIn("must have 1 to 14 characters", err.getvalue())
        self.assertEqual(out.getvalue(), "")
