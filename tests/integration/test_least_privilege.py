"""Least privilege of a running mesh (docs/security.md): the inner proxy's capabilities,
and no way into the mesh's UNIX link for any other local process."""

from __future__ import annotations

import os

from tests.integration.e2e import E2ETestCase
from tproxy.control import socket_path
from tproxy.privileges import CAP_NET_BIND_SERVICE, capability_status

KEEP = 1 << CAP_NET_BIND_SERVICE
#: ``__SO_ACCEPTCON`` in /proc/net/unix's Flags: a listening socket.
SO_ACCEPTCON = 0x10000
#: ``SS_CONNECTED`` in /proc/net/unix's St column.
SS_CONNECTED = 3


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets a process holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def unix_sockets(pid: int | str) -> dict[int, tuple[int, int, str]]:
    """/proc/PID/net/unix (the process's netns): inode -> (flags, state, path)."""
    table = {}
    with open(f"/proc/{pid}/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            flags, state, inode = int(parts[3], 16), int(parts[5], 16), int(parts[6])
            table[inode] = (flags, state, parts[7] if len(parts) > 7 else "")
    return table


class LeastPrivilegeTests(E2ETestCase):
    """The inner proxy keeps only CAP_NET_BIND_SERVICE; no mesh process listens on UNIX."""

    prefix = "tqh"

    def test_inner_capabilities_and_low_port(self) -> None:
        """A running inner has CapEff = CapPrm = CapBnd = {NET_BIND_SERVICE}, nothing
        inheritable or ambient, no_new_privs; it still serves a port below 1024 pushed
        after the drop; the root keeps its own capabilities."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (80, "127.0.0.1", 8080)],
            services={5030: "onegate\n", 8080: "low port\n"},
        )
        self.assertEqual(hv.guest.wait_serving(5030), "onegate\n")
        self.assertEqual(hv.guest.wait_serving(80), "low port\n")
        procs = hv.host.proxies()
        inner = capability_status(procs[f"one_tproxy_{hv.bridge}"])
        self.assertEqual(
            (inner["CapEff"], inner["CapPrm"], inner["CapBnd"], inner["CapInh"]),
            (KEEP, KEEP, KEEP, 0),
            inner,
        )
        self.assertEqual(inner.get("CapAmb", 0), 0)
        self.assertEqual(inner["NoNewPrivs"], 1)
        root = capability_status(procs["one_tproxy"])
        self.assertNotEqual(root["CapEff"], KEEP)  # It must create namespaces, read nft, ...
        self.assertIn("capabilities dropped", hv.host.log(f"one_tproxy_{hv.bridge}"))

    def test_no_listening_unix_socket(self) -> None:
        """No mesh process listens on a UNIX socket but the root's control socket (0600 in a
        0700 directory, read-only status): the link is a socket pair, so no other local
        process can connect to it and open a stream."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: "onegate\n"})
        self.assertEqual(hv.guest.wait_serving(5030), "onegate\n")
        pids = hv.host.product_pids()
        inner_pid = hv.host.proxies()[f"one_tproxy_{hv.bridge}"]
        self.assertIn(inner_pid, pids)
        # A UNIX socket is listed in the table of the namespace it was made in (the
        # link's pair is made by the root, in the host's): look in every table.
        table: dict[int, tuple[int, int, str]] = {}
        for pid in [*pids, "self"]:
            table.update(unix_sockets(pid))
        control = socket_path(hv.host.run_dir)
        root_pid = hv.host.proxies()["one_tproxy"]
        for pid in pids:
            mine = socket_inodes(pid)
            self.assertTrue(mine <= set(table) | _inet_inodes(pid), pid)
            listening = [
                table[i][2] for i in mine if i in table and table[i][0] & SO_ACCEPTCON
            ]
            self.assertEqual(listening, [control] if pid == root_pid else [], pid)
        self.assertEqual(os.stat(control).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(control)).st_mode & 0o777, 0o700)
        # The inner's link: a connected UNIX socket with no name (a socket pair end).
        links = [table[i] for i in socket_inodes(inner_pid) if i in table]
        self.assertTrue(any(state == SS_CONNECTED and not path for _f, state, path in links), links)


def _inet_inodes(pid: int | str) -> set[int]:
    """Inodes of the TCP/UDP/netlink sockets in the process's namespace (not UNIX)."""
    inodes: set[int] = set()
    for name, column in (("tcp", 9), ("tcp6", 9), ("udp", 9), ("udp6", 9), ("netlink", 9)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > column:
                        inodes.add(int(parts[column]))
        except (OSError, ValueError):
            continue
    return inodes
