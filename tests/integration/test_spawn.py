"""tproxy.spawn.SpawnLauncher against real child processes."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tproxy.settings import Paths
from tproxy.spawn import SpawnLauncher, TemplateLauncher


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


class TemplateLauncherTests(unittest.TestCase):
    """Inner proxies forked from the template get fd 3; their ends are reported."""

    timeout = 30

    def setUp(self) -> None:
        self.launcher = TemplateLauncher(
            reactor, Paths("/c", "/l", "/r"), entry="tests.integration._children:fd3_main"
        )
        self.inners: list[Any] = []
        self.addCleanup(self._stop)

    async def _stop(self) -> None:
        for inner in self.inners:
            inner.signal(signal.SIGKILL)
            await inner.exited
        pid = self.launcher.template_pid
        ended = self.launcher.close()
        if ended is not None:
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await ended

    async def launch(self, bridge: str) -> tuple[socket.socket, Any]:
        """Launch, read the greeting, wait until the root knows the PID."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        inner = self.launcher.launch(bridge, theirs.fileno())
        theirs.close()
        self.inners.append(inner)
        ours.settimeout(10)
        self.assertEqual(_read_line(ours), f"hello {bridge}\n".encode())
        for _ in range(500):
            if inner.pid is not None:
                break
            await deferLater(reactor, 0.01)
        self.assertIsNotNone(inner.pid)
        return ours, inner

    async def test_eof_ends_child(self) -> None:
        """Closing our end ends the child; its exit code is reported; the template lives on."""
        ours, inner = await self.launch("tb1")
        template = self.launcher.template_pid
        self.assertNotEqual(inner.pid, template)
        ours.sendall(b"ping\n")
        self.assertEqual(_read_line(ours), b"ping\n")
        ours.close()
        self.assertEqual(await inner.exited, "exit code 0")
        await self.launch("tb2")
        self.assertEqual(self.launcher.template_pid, template)

    async def test_kill_gives_eof(self) -> None:
        """A killed child is reported, and nobody else held its end: we read EOF."""
        ours, inner = await self.launch("tb3")
        inner.signal(signal.SIGKILL)
        self.assertEqual(await inner.exited, "signal SIGKILL")
        self.assertEqual(ours.recv(10), b"")

    async def test_template_restarted(self) -> None:
        """After the template died, the next launch starts a new one; old inners keep running."""
        ours, old = await self.launch("tb4")
        first = self.launcher.template_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(200):
            if self.launcher.template_pid is None:
                break
            await deferLater(reactor, 0.02)
        await self.launch("tb5")
        self.assertNotEqual(self.launcher.template_pid, first)
        ours.sendall(b"still\n")
        self.assertEqual(_read_line(ours), b"still\n")
        self.assertFalse(old.exited.called)
