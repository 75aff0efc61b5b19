"""Tests for tproxy.procs: titles and namespace scoping, on a fake /proc tree."""

from __future__ import annotations

import os

from twisted.trial import unittest

from tproxy.procs import Mesh, ProcFinder, ProxyProcess, has_title, parse_title


class ParseTitleTests(unittest.TestCase):
    """What a setproctitle'd cmdline looks like."""

    def test_root_with_nul_padding(self) -> None:
        """The root title followed by NUL padding is the root."""
        self.assertEqual(parse_title(b"one_tproxy" + b"\0" * 200), "one_tproxy")

    def test_inner_with_space_padding(self) -> None:
        """An inner title followed by spaces and NULs is that inner."""
        self.assertEqual(parse_title(b"one_tproxy_br0   \0\0"), "one_tproxy_br0")

    def test_other_processes(self) -> None:
        """Command lines with arguments, other names or an empty suffix are not proxies."""
        for cmdline in (
            b"python\0-m\0tproxy\0start\0",
            b"one_tproxy\0-n\0",
            b"one_tproxyx\0",
            b"one_tproxy_\0",
            b"",
            b"\0\0",
            b"one_tproxy_\xff\0",
            b"xone_tproxy\0",
        ):
            self.assertIsNone(parse_title(cmdline), cmdline)


class FakeProcTests(unittest.TestCase):
    """ProcFinder on a /proc tree built in a temporary directory."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.proc = os.path.join(self.base, "proc")
        self.netns = os.path.join(self.base, "netns")
        os.makedirs(self.netns)
        self.ns_files: dict[str, str] = {}
        for name in ("host", "other", "br0", "br1"):
            path = os.path.join(self.base, "ns-" + name)
            with open(path, "w") as f:
                f.write(name)
            self.ns_files[name] = path
        os.symlink(self.ns_files["br0"], os.path.join(self.netns, "one_tproxy_br0"))
        os.symlink(self.ns_files["br1"], os.path.join(self.netns, "one_tproxy_br1"))
        self._proc("self", b"python\0", "host")

    def _proc(
        self, pid: str, cmdline: bytes, ns: str | None, state: str = "S", ppid: int = 1
    ) -> None:
        d = os.path.join(self.proc, pid)
        os.makedirs(os.path.join(d, "ns"))
        with open(os.path.join(d, "cmdline"), "wb") as f:
            f.write(cmdline)
        with open(os.path.join(d, "stat"), "w") as f:
            f.write(f"{pid} (x) y) {state} {ppid} 2 3\n")
        if ns is not None:
            os.symlink(self.ns_files[ns], os.path.join(d, "ns", "net"))

    def finder(self) -> ProcFinder:
        return ProcFinder(proc_dir=self.proc, netns_dir=self.netns)

    def test_scoping(self) -> None:
        """Roots in the caller's netns and inners in their bridge's netns are found, no others."""
        self._proc("10", b"one_tproxy\0\0\0", "host")
        self._proc("11", b"one_tproxy\0", "other")  # another hypervisor's root
        self._proc("12", b"one_tproxy_br0\0\0", "br0", ppid=10)
        self._proc("13", b"one_tproxy_br1\0", "host")  # not in its namespace
        self._proc("14", b"one_tproxy_br2\0", "host")  # no such namespace
        self._proc("15", b"one_tproxy\0", "host", state="Z")  # zombie
        self._proc("16", b"one_tproxy_br1\0", "br1")
        self._proc("17", b"one_tproxy\0", None)  # namespace unreadable
        self._proc("9", b"one_tproxy\0", "host")
        mesh = self.finder().find()
        self.assertEqual(mesh.roots, (9, 10))
        self.assertEqual(mesh.inners, {"br0": (12,), "br1": (16,)})
        self.assertEqual(mesh.children_of(10), [ProxyProcess(12, "br0", 10)])
        self.assertEqual(mesh.root, 9)
        self.assertEqual(mesh.all_pids(), [9, 10, 12, 16])
        self.assertEqual(
            [p.title for p in mesh.processes],
            ["one_tproxy", "one_tproxy", "one_tproxy_br0", "one_tproxy_br1"],
        )

    def test_empty(self) -> None:
        """No proxies: no root, no inners."""
        mesh = self.finder().find()
        self.assertIsNone(mesh.root)
        self.assertEqual(mesh.processes, ())

    def test_missing_proc(self) -> None:
        """An unreadable /proc finds nothing rather than failing."""
        self.assertEqual(ProcFinder(proc_dir="/nonexistent").find(), Mesh())

    def test_alive(self) -> None:
        """alive() is false for zombies and missing PIDs."""
        self._proc("20", b"x\0", "host")
        self._proc("21", b"x\0", "host", state="Z")
        finder = self.finder()
        self.assertTrue(finder.alive(20))
        self.assertFalse(finder.alive(21))
        self.assertFalse(finder.alive(22))

    def test_process_title(self) -> None:
        """A ProxyProcess names its title."""
        self.assertEqual(ProxyProcess(1, "x").title, "one_tproxy_x")
        self.assertEqual(ProxyProcess(1, None).title, "one_tproxy")

    def test_has_title(self) -> None:
        """has_title compares a process's title; a missing process has none."""
        self._proc("30", b"one_tproxy_br0\0\0", "br0")
        self.assertTrue(has_title(30, "one_tproxy_br0", proc_dir=self.proc))
        self.assertFalse(has_title(30, "one_tproxy", proc_dir=self.proc))
        self.assertFalse(has_title(31, "one_tproxy_br0", proc_dir=self.proc))
