"""tproxy.procs and tproxy.spawn.enter_netns against real processes and namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

from twisted.trial import unittest

from tproxy.procs import ProcFinder
from tproxy.spawn import NamespaceError, enter_netns


def skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    return None


class RealProcTests(unittest.TestCase):
    """Processes titled with setproctitle are found, scoped by network namespace."""

    skip = skip_reason()

    def setUp(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"tqmp{tag}"
        self.inner_ns = f"one_tproxy_{self.bridge}"
        self.other_ns = f"tqmp{tag}h"
        for ns in (self.inner_ns, self.other_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False)

    def child(self, netns: str, title: str) -> subprocess.Popen[bytes]:
        """Start a titled child in ``netns`` and wait until it is ready."""
        path = "-" if netns == "-" else f"/run/netns/{netns}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration._children", "title", path, title],
            stdout=subprocess.PIPE,
        )
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        assert proc.stdout is not None
        self.assertEqual(proc.stdout.readline(), b"ready\n")
        return proc

    def test_scoped_by_namespace(self) -> None:
        """Only the root in our netns and the inner in its bridge's netns are found."""
        root = self.child("-", "one_tproxy")
        self.child(self.other_ns, "one_tproxy")  # another hypervisor's root
        inner = self.child(self.inner_ns, f"one_tproxy_{self.bridge}")
        self.child("-", f"one_tproxy_{self.bridge}")  # right title, wrong netns
        mesh = ProcFinder().find()
        self.assertIn(root.pid, mesh.roots)
        self.assertEqual(mesh.inners.get(self.bridge), (inner.pid,))
        self.assertTrue(ProcFinder().alive(inner.pid))
        inner.kill()
        inner.wait()
        self.assertFalse(ProcFinder().alive(inner.pid))
        self.assertNotIn(self.bridge, ProcFinder().find().inners)

    def test_enter_missing_namespace(self) -> None:
        """Entering a missing namespace fails and creates nothing."""
        path = f"/run/netns/{self.other_ns}x"
        self.assertRaises(NamespaceError, enter_netns, path)
        self.assertFalse(os.path.exists(path))

    def test_enter_non_namespace(self) -> None:
        """A file that is no namespace is refused."""
        self.assertRaises(NamespaceError, enter_netns, "/proc/self/cmdline")
