"""Tests for tproxy.privileges: the drop sequence with a fake libc, and for real in a child."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

from twisted.trial import unittest

from tproxy.privileges import (
    CAP_NET_BIND_SERVICE,
    PR_CAP_AMBIENT,
    PR_CAPBSET_DROP,
    PR_SET_NO_NEW_PRIVS,
    PrivilegeError,
    capability_status,
    drop_capabilities,
    mask,
)

KEEP = 1 << CAP_NET_BIND_SERVICE


class FakeLibc:
    """Records prctl/capset calls; fails the ones it is told to."""

    def __init__(self, last: int = 40, fail: dict[tuple[int, int] | str, int] | None = None):
        self.last = last
        self.fail = fail or {}
        self.calls: list[tuple[object, ...]] = []

    def prctl(self, option: int, arg2: int) -> None:
        self.calls.append(("prctl", option, arg2))
        e = self.fail.get((option, arg2))
        if e is not None:
            raise OSError(e, os.strerror(e))

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        self.calls.append(("capset", effective, permitted, inheritable))
        e = self.fail.get("capset")
        if e is not None:
            raise OSError(e, os.strerror(e))

    def last_cap(self) -> int:
        return self.last


class DropSequenceTests(unittest.TestCase):
    """The order and content of the calls."""

    def test_sequence(self) -> None:
        """Bounding set first (all but 10), ambient cleared, capset to {10}, NNP last."""
        libc = FakeLibc(last=40)
        drop_capabilities(libc=libc)
        drops = [c[2] for c in libc.calls if c[:2] == ("prctl", PR_CAPBSET_DROP)]
        self.assertEqual(drops, [c for c in range(41) if c != CAP_NET_BIND_SERVICE])
        self.assertEqual(
            libc.calls[-3:],
            [
                ("prctl", PR_CAP_AMBIENT, 4),
                ("capset", KEEP, KEEP, 0),
                ("prctl", PR_SET_NO_NEW_PRIVS, 1),
            ],
        )

    def test_keep_nothing(self) -> None:
        """With nothing to keep every capability goes, and capset clears all sets."""
        libc = FakeLibc(last=3)
        drop_capabilities(keep=(), libc=libc)
        self.assertIn(("capset", 0, 0, 0), libc.calls)
        self.assertEqual(len([c for c in libc.calls if c[1] == PR_CAPBSET_DROP]), 4)

    def test_bounding_eperm_tolerated(self) -> None:
        """A process without CAP_SETPCAP still shrinks its own sets and sets NNP."""
        libc = FakeLibc(last=2, fail={(PR_CAPBSET_DROP, c): errno.EPERM for c in range(3)})
        drop_capabilities(libc=libc)
        self.assertEqual(libc.calls[-1], ("prctl", PR_SET_NO_NEW_PRIVS, 1))

    def test_capset_failure_raises(self) -> None:
        """A refused capset is a PrivilegeError (the caller logs it), and NNP is not skipped
        silently: the error says what failed."""
        libc = FakeLibc(last=2, fail={"capset": errno.EPERM})
        e = self.assertRaises(PrivilegeError, drop_capabilities, libc=libc)
        self.assertEqual(e.errno, errno.EPERM)

    def test_other_bounding_error_raises(self) -> None:
        """An unexpected errno from a bounding drop is an error."""
        libc = FakeLibc(last=2, fail={(PR_CAPBSET_DROP, 1): errno.EFAULT})
        self.assertRaises(PrivilegeError, drop_capabilities, libc=libc)

    def test_mask(self) -> None:
        """Masks are 64-bit bit sets."""
        self.assertEqual(mask([0, 10, 40]), 1 | 1 << 10 | 1 << 40)


class RealLibcTests(unittest.TestCase):
    """What the real libc wrapper prepares once (in the template, before it forks)."""

    def test_last_cap_read_once(self) -> None:
        """The kernel's highest capability is read once and kept for the process tree."""
        from tproxy import privileges

        self.patch(privileges, "_last_cap", [])
        first = privileges.RealLibc().last_cap()
        with open("/proc/sys/kernel/cap_last_cap") as f:
            self.assertEqual(first, int(f.read()))
        self.assertEqual(privileges._last_cap, [first])
        privileges._last_cap[0] = 999  # kept, not read again
        self.assertEqual(privileges.RealLibc().last_cap(), 999)

    def test_capset_types_made_at_import(self) -> None:
        """capset's argument types and libc's functions exist before any call."""
        from tproxy import privileges

        self.assertEqual(privileges._CapDataPair._length_, 2)
        libc = privileges.process_libc()
        self.assertIn("prctl", vars(libc))
        self.assertIn("capset", vars(libc))


_CHILD = """
import json, socket
from tproxy.privileges import drop_capabilities, capability_status
drop_capabilities()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
low_ok = True
try:
    t = socket.socket(); t.bind(("127.0.0.1", 1)); t.close()  # port 1: needs CAP_NET_BIND_SERVICE
except PermissionError:
    low_ok = False
denied = False
try:
    open("/proc/1/environ").read()
except PermissionError:
    denied = True
print(json.dumps({"status": capability_status(), "low_ok": low_ok, "denied": denied}))
"""


class RealDropTests(unittest.TestCase):
    """In a child process of root: the kernel's view after the drop."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (to have capabilities to drop)")

    def test_child_keeps_only_net_bind_service(self) -> None:
        """CapEff/CapPrm/CapBnd = {NET_BIND_SERVICE}, no inheritable or ambient, NNP set;
        it still binds a low port, and can no longer read root-only files of other
        processes (/proc/1/environ)."""
        import json

        done = subprocess.run(
            [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=30, check=True
        )
        result = json.loads(done.stdout)
        st = result["status"]
        self.assertEqual(
            (st["CapEff"], st["CapPrm"], st["CapBnd"], st["CapInh"]), (KEEP, KEEP, KEEP, 0)
        )
        self.assertEqual(st.get("CapAmb", 0), 0)
        self.assertEqual(st["NoNewPrivs"], 1)
        self.assertTrue(result["low_ok"])
        self.assertTrue(result["denied"])
        # The parent (this test) kept everything: the drop is per process.
        self.assertNotEqual(capability_status()["CapEff"], KEEP)
