"""Tests for ``one-tproxy endpoints`` (DESIGN.md 2.3), in-process and as a subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial import unittest

from tproxy import cli
from tproxy.commands import endpoints
from tproxy.model import Destination

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "docs", "OpenNebulaNetwork.conf")

CONFIG = """\
:tproxy_debug_level: 2
:some_other_setting: yes
:tproxy:
- :service_port: 5030
  :remote_addr: 10.11.12.13
  :remote_port: 5030
- :service_port: 8080
  :remote_addr: localhost
  :remote_port: "80"
  :networks: [vnet0]
- :service_port: 1234
  :remote_addr: 10.11.12.34
  :remote_port: 1234
  :networks: [3, blue]
- :service_port: 5030
  :remote_addr: 10.99.99.99
  :remote_port: 5030
- :service_port: 99999
  :remote_addr: 10.11.12.13
  :remote_port: 1
"""


class EndpointsCommandTests(unittest.TestCase):
    """``one-tproxy endpoints`` run through ``cli.main``."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def test_network_name_and_id(self) -> None:
        """The exact JSON of DESIGN.md for a network given by name and id, warnings on stderr."""
        path = self.write(CONFIG)
        rc, out, err = self.run_cli(
            "--config", path, "endpoints", "--network", "vnet0", "--network-id", "3"
        )
        self.assertEqual(rc, 0)
        self.assertEqual(
            out,
            '[{"service_port": 5030, "remote_addr": "10.11.12.13", "remote_port": 5030}, '
            '{"service_port": 8080, "remote_addr": "127.0.0.1", "remote_port": 80}, '
            '{"service_port": 1234, "remote_addr": "10.11.12.34", "remote_port": 1234}]\n',
        )
        self.assertEqual(
            err.splitlines(),
            [
                f"one-tproxy: warning: {path}: :tproxy: entry 5 (line 18) skipped: "
                ":service_port: 99999 is not an integer port in 1-65535",
                f"one-tproxy: warning: {path}: :tproxy: entry 4 (line 15) ignored: "
                "service port 5030 is already used by entry 1 (line 4)",
            ],
        )

    def test_neither_option(self) -> None:
        """Without --network/--network-id only entries without :networks: are printed."""
        rc, out, _ = self.run_cli("--config", self.write(CONFIG), "endpoints")
        self.assertEqual(rc, 0)
        self.assertEqual(
            out, '[{"service_port": 5030, "remote_addr": "10.11.12.13", "remote_port": 5030}]\n'
        )

    def test_config_after_subcommand_and_id_only(self) -> None:
        """--config after the subcommand works; an id alone selects its entries."""
        rc, out, _ = self.run_cli("endpoints", "--network-id", "3", "--config", SAMPLE)
        self.assertEqual(rc, 0)
        self.assertEqual(
            out,
            '[{"service_port": 5030, "remote_addr": "10.11.12.13", "remote_port": 5030}, '
            '{"service_port": 1234, "remote_addr": "10.11.12.34", "remote_port": 1234}]\n',
        )

    def test_config_from_environment(self) -> None:
        """ONE_TPROXY_CONFIG names the file when --config is not given."""
        path = self.write(
            ":tproxy:\n- {':service_port': 7, ':remote_addr': 1.2.3.4, ':remote_port': 8}\n"
        )
        self.patch(os, "environ", {**os.environ, "ONE_TPROXY_CONFIG": path})
        rc, out, _ = self.run_cli("endpoints")
        self.assertEqual(
            (rc, out), (0, '[{"service_port": 7, "remote_addr": "1.2.3.4", "remote_port": 8}]\n')
        )

    def test_no_endpoints(self) -> None:
        """A file without endpoints prints an empty list."""
        rc, out, err = self.run_cli("--config", self.write(":other: 1\n"), "endpoints")
        self.assertEqual((rc, out, err), (0, "[]\n", ""))

    def test_invalid_file(self) -> None:
        """A broken file: exit 1, nothing on stdout, one line naming the file and line."""
        path = self.write(":tproxy:\n  :service_port: 5030\n")
        rc, out, err = self.run_cli("--config", path, "endpoints", "--network", "x")
        self.assertEqual((rc, out), (1, ""))
        self.assertEqual(
            err,
            f"one-tproxy: error: {path}, line 2: :tproxy: must be a list of endpoints, "
            "not a mapping\n",
        )

    def test_missing_file(self) -> None:
        """A missing file: exit 1 with the file named."""
        path = os.path.join(self.mktemp(), "OpenNebulaNetwork.conf")
        rc, out, err = self.run_cli("--config", path, "endpoints")
        self.assertEqual((rc, out), (1, ""))
        self.assertEqual(
            err,
            f"one-tproxy: error: {path}: cannot read the configuration file: "
            "No such file or directory\n",
        )

    def test_unresolvable_host(self) -> None:
        """An unresolvable host name is left out with a warning (fake resolver)."""

        def resolve(host: str) -> str:
            from tproxy.config import ResolveError

            raise ResolveError("Name or service not known")

        path = self.write(
            ":tproxy:\n- :service_port: 80\n  :remote_addr: gone.example\n  :remote_port: 80\n"
        )
        args = cli.build_parser().parse_args(["--config", path, "endpoints"])
        paths = cli.settings.Paths.from_sources(config=path)
        out, err = io.StringIO(), io.StringIO()
        with cli.logs.cli_logging(err):
            rc = endpoints.run("endpoints", args, paths, stdout=out, resolve=resolve)
        self.assertEqual((rc, out.getvalue()), (0, "[]\n"))
        self.assertIn("cannot resolve :remote_addr: 'gone.example'", err.getvalue())

    def test_render(self) -> None:
        """render keeps the map's order and the exact key order and spacing."""
        self.assertEqual(
            endpoints.render({2: Destination("1.1.1.1", 3), 1: Destination("2.2.2.2", 4)}),
            '[{"service_port": 2, "remote_addr": "1.1.1.1", "remote_port": 3}, '
            '{"service_port": 1, "remote_addr": "2.2.2.2", "remote_port": 4}]\n',
        )
        self.assertEqual(endpoints.render({}), "[]\n")

    def test_help(self) -> None:
        """``endpoints --help`` documents both options."""
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit):
            cli.main(["endpoints", "--help"])
        self.assertIn("--network NAME", out.getvalue())
        self.assertIn("--network-id ID", out.getvalue())


class EndpointsProcessTests(unittest.TestCase):
    """The real console command as a process."""

    def test_python_m_tproxy(self) -> None:
        """``python -m tproxy endpoints`` prints the sample's endpoints and exits 0."""
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tproxy",
                "--config",
                SAMPLE,
                "endpoints",
                "--network",
                "vnet_name_or_id",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ.copy(),
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(
            proc.stdout,
            '[{"service_port": 5030, "remote_addr": "10.11.12.13", "remote_port": 5030}, '
            '{"service_port": 1234, "remote_addr": "10.11.12.34", "remote_port": 1234}]\n',
        )
        self.assertEqual(proc.stderr, "")

    def test_python_m_tproxy_invalid(self) -> None:
        """A broken file makes the process exit 1 with the file named on stderr."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(":tproxy: [\n")
        proc = subprocess.run(
            [sys.executable, "-m", "tproxy", "endpoints", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((proc.returncode, proc.stdout), (1, ""))
        self.assertTrue(proc.stderr.startswith(f"one-tproxy: error: {path}, line 2: "), proc.stderr)
        self.assertEqual(proc.stderr.count("\n"), 1)
