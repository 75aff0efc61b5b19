"""The netlink edge against the real kernel, inside a test hypervisor netns."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import TestCase

from tests.integration import _tqd
from tests.integration.topology import NETNS_DIR, Host, Namespace, require_root
from tproxy import netlink
from tproxy.netlink import Netlink


class NetlinkTests(TestCase):
    """Each operation of the edge does exactly what ``ip`` then shows."""

    def setUp(self) -> None:
        require_root()
        self.host = Host(self, prefix=_tqd.PREFIX)
        self.hv = self.host.name
        self.inner = Namespace(self.host.tag + "n")  # made by the edge itself
        self.addCleanup(self.inner.delete)
        self.ns = self.inner.name

    def net_do(self, fn: Any) -> Any:
        """Run ``fn(net)`` with a fresh edge in a thread inside the hypervisor netns."""

        def body() -> Any:
            net = Netlink()
            try:
                return fn(net)
            finally:
                net.close()

        return _tqd.in_netns(self.hv, body)

    def test_namespaces(self) -> None:
        """Namespaces are created as ip netns add does, never implicitly, and removed."""
        self.assertFalse(self.net_do(lambda net: net.namespace_exists(self.ns)))
        self.assertRaises(netlink.NotFoundError, self.net_do, lambda net: net.link("lo", self.ns))
        self.assertFalse(os.path.exists(os.path.join(NETNS_DIR, self.ns)))
        self.net_do(lambda net: net.create_namespace(self.ns))
        self.assertIn(self.ns, self.host.run(["ip", "netns", "list"]).stdout)
        self.assertRaises(
            netlink.ExistsError, self.net_do, lambda net: net.create_namespace(self.ns)
        )
        self.assertEqual(self.net_do(lambda net: net.link("lo", self.ns)).name, "lo")
        self.net_do(lambda net: net.remove_namespace(self.ns))
        self.assertFalse(os.path.exists(os.path.join(NETNS_DIR, self.ns)))

    def test_veth_into_namespace(self) -> None:
        """A veth pair: one end a bridge port and up, the other moved, addressed, routed."""
        br = self.host.add_bridge()
        a, b = br + "a", br + "b"

        def build(net: Netlink) -> Any:
            net.create_namespace(self.ns)
            net.create_veth(b, a)
            lb, la = net.link(b), net.link(a)
            net.set_master(b, br)
            net.set_up(b)
            net.move_to_namespace(a, self.ns)
            net.add_address(a, "169.254.16.9", 32, self.ns)
            net.set_up(a, self.ns)
            net.replace_default_route(a, self.ns)
            net.replace_default_route(a, self.ns)  # replace: still one route
            return (
                lb,
                la,
                net.link(b),
                net.link(a),
                net.link(a, self.ns),
                net.addresses(a, self.ns),
                net.default_routes(self.ns),
            )

        lb, la, lb2, gone, la2, addrs, routes = self.net_do(build)
        self.assertEqual((lb.kind, la.kind), ("veth", "veth"))
        self.assertEqual((lb.peer, la.peer), (la.index, lb.index))
        self.assertEqual((lb.up, lb2.up), (False, True))
        self.assertEqual(lb2.master, self.net_do(lambda net: net.link(br)).index)
        self.assertIsNone(gone)
        self.assertTrue(la2.up)
        self.assertEqual(la2.peer, lb.index)
        self.assertEqual(addrs, [("169.254.16.9", 32)])
        self.assertEqual(routes, [(la2.index, 253)])
        self.assertEqual(
            self.inner.ip_json("route"),
            [{"dst": "default", "dev": a, "scope": "link", "flags": []}],
        )
        (link,) = self.host.ip_json("link", "show", b)
        self.assertEqual(link["master"], br)
        self.net_do(lambda net: net.delete_link(b))
        self.assertIsNone(self.net_do(lambda net: net.link(a, self.ns)))

    def test_sysctl_inside_namespace_only(self) -> None:
        """A sysctl written for a namespace changes it there and not in the caller's netns."""
        key = "net.ipv4.conf.default.arp_ignore"
        self.net_do(lambda net: net.create_namespace(self.ns))
        self.net_do(lambda net: net.set_sysctl(self.ns, key, "2"))
        self.assertEqual(self.inner.sysctl(key), "2")
        self.assertEqual(self.net_do(lambda net: net.get_sysctl(self.ns, key)), "2")
        self.assertEqual(self.host.sysctl(key), "0")
        self.assertRaises(
            netlink.NotFoundError,
            self.net_do,
            lambda net: net.set_sysctl(self.ns, "net.ipv4.conf.nosuch.arp_ignore", "0"),
        )

    def test_errors(self) -> None:
        """Kernel errors come out as our exceptions, saying what was being done."""
        self.assertIsNone(self.net_do(lambda net: net.link("tqdnosuch")))
        e = self.assertRaises(
            netlink.NotFoundError, self.net_do, lambda net: net.delete_link("tqdnosuch")
        )
        self.assertIn("tqdnosuch", str(e))
        br = self.host.add_bridge()
        self.assertRaises(
            netlink.ExistsError, self.net_do, lambda net: net.create_veth(br, br + "x")
        )
        self.assertRaises(
            netlink.NotFoundError,
            self.net_do,
            lambda net: net.move_to_namespace(br, "tqdnonamespace"),
        )
