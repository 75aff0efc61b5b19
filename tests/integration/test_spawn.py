"""tproxy.spawn.SpawnLauncher against real child processes."""

from __future__ import annotations

import signal
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from tproxy.settings import Paths
from tproxy.spawn import SpawnLauncher


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


class SpawnLauncherTests(unittest.TestCase):
    """The child gets the socket pair's end as fd 3, and its end is reported."""

    timeout = 20

    def launch(self) -> tuple[socket.socket, Deferred[str], object]:
        """Start the fd3 child program; return our end, its exit Deferred and the handle."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        launcher = SpawnLauncher(
            reactor, Paths("/c", "/l", "/r"), module="tests.integration._children"
        )
        self.assertEqual(
            launcher.argv("br9")[2:],
            [
                "tests.integration._children",
                "br9",
                "--config",
                "/c",
                "--log-dir",
                "/l",
                "--run-dir",
                "/r",
            ],
        )
        inner = launcher.launch("br9", theirs.fileno())
        theirs.close()
        self.addCleanup(inner.signal, signal.SIGKILL)
        self.assertEqual(inner.bridge, "br9")
        self.assertIsNotNone(inner.pid)
        ours.settimeout(10)
        self.assertEqual(_read_line(ours), b"hello br9\n")
        return ours, inner.exited, inner

    async def test_eof_ends_child(self) -> None:
        """Closing our end is the child's EOF: it exits 0, and exited says so."""
        ours, exited, _ = self.launch()
        ours.sendall(b"ping\n")
        self.assertEqual(_read_line(ours), b"ping\n")
        ours.close()
        self.assertEqual(await exited, "exit code 0")

    async def test_kill(self) -> None:
        """A killed child is reported with its signal; signalling it afterwards is harmless."""
        _, exited, inner = self.launch()
        inner.signal(signal.SIGKILL)  # type: ignore[attr-defined]
        self.assertEqual(await exited, "signal SIGKILL")
        inner.signal(signal.SIGTERM)  # type: ignore[attr-defined]
