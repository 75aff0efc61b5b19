"""The shared fixture itself: hand-built DESIGN.md 2.2 state works, and cleanup leaves nothing."""

from __future__ import annotations

import os

from twisted.trial import unittest

from tests.integration import topology
from tests.integration.topology import SERVICE_ADDRESS, Host


class RequirementTests(unittest.TestCase):
    """The skip decision is explained."""

    def test_reason_or_none(self) -> None:
        """missing_requirement() is None exactly when root with the tools, else a reason."""
        reason = topology.missing_requirement()
        if os.geteuid() == 0 and all(
            any(os.access(os.path.join(d, c), os.X_OK) for d in os.environ["PATH"].split(":"))
            for c in topology.REQUIRED_COMMANDS
        ):
            self.assertIsNone(reason)
        else:
            self.assertIsInstance(reason, str)
            self.assertTrue(reason)

    def test_unique_names(self) -> None:
        """Tags are unique, carry the prefix and leave room for 14-character bridge names."""
        tags = {topology.unique_tag("tqe") for _ in range(50)}
        self.assertEqual(len(tags), 50)
        for tag in tags:
            self.assertTrue(tag.startswith("tqe"))
            self.assertLessEqual(len(tag) + len("b9"), 14)

    def test_bad_prefix(self) -> None:
        """A prefix that could break interface names is refused."""
        self.assertRaises(ValueError, topology.unique_tag, "tq-e")


class TopologyTests(unittest.TestCase):
    """A simulated hypervisor with hand-built tproxy state serves the direct path."""

    def setUp(self) -> None:
        topology.require_root()

    def test_direct_path_and_cleanup(self) -> None:
        """A guest reaches an HTTP server on 169.254.16.9 inside one_tproxy_BR; cleanup
        then leaves no namespace, link or process."""
        links_before = topology.run(["ip", "-o", "link"], check=True).stdout
        host = Host(self)
        br = host.add_bridge()
        guest = host.add_guest(br)
        form = host.build_tproxy_state(br, {5030: ("127.0.0.1", 5030), 1234: ("10.0.0.1", 99)})
        self.assertIn(form, ("ibrname", "veths"))

        # DESIGN.md 2.2, as the tools show it.
        inner = host.inner(br)
        self.assertIn(inner.name, topology.netns_names())
        self.assertEqual(inner.sysctl("net.ipv4.conf.all.arp_ignore"), "0")
        self.assertEqual(inner.sysctl("net.ipv4.conf.default.arp_ignore"), "0")
        addrs = inner.ip_json("-4", "address", "show", "dev", f"{br}a")
        self.assertEqual(
            [(a["local"], a["prefixlen"]) for a in addrs[0]["addr_info"]], [(SERVICE_ADDRESS, 32)]
        )
        routes = inner.ip_json("route")
        self.assertEqual(
            [(r["dst"], r.get("dev"), r.get("scope")) for r in routes],
            [("default", f"{br}a", "link")],
        )
        port = host.ip_json("link", "show", f"{br}b")[0]
        self.assertEqual(port["master"], br)
        ruleset = host.nft("list", "ruleset").stdout
        self.assertIn(f"map ep_{br}", ruleset)
        self.assertIn("5030 : 127.0.0.1 . 5030", ruleset)
        self.assertIn(f"chain ch_{br}", ruleset)
        self.assertIn(f"arp daddr ip {SERVICE_ADDRESS} drop", ruleset)

        # The direct path: a server in the inner namespace on 169.254.16.9 (lo up only
        # so that the fixture can see it listen from inside; DESIGN 2.2 leaves lo down).
        inner.ip("link", "set", "lo", "up")
        inner_server = host.serve_http(
            8080, addr=SERVICE_ADDRESS, files={"hello.txt": "hello direct\n"}, namespace=inner
        )
        got = guest.curl(guest.service_url(8080, "/hello.txt"), check=True)
        self.assertEqual(got.stdout, "hello direct\n")
        guest.download(8080, 3 * 65536 + 7).check()
        host.serve_sink(9000, addr=SERVICE_ADDRESS, namespace=inner)
        up = guest.upload(9000, 100_001).check()
        self.assertIn("reply 100001 ", up.stdout)
        # A service on 127.0.0.1 in the host is NOT reachable from the guest directly.
        host.serve_http(5030)
        miss = guest.curl(guest.service_url(5030), timeout=3)
        self.assertFalse(miss.ok)

        pids = [p for ns in (host, guest, inner) for p in ns.pids()]
        self.assertIn(inner_server.pid, pids)
        host.cleanup()

        names = topology.netns_names()
        for ns in (host.name, guest.name, inner.name):
            self.assertNotIn(ns, names)
        for pid in pids:
            self.assertFalse(topology.is_alive(pid), f"process {pid} survived cleanup")
        self.assertEqual(topology.run(["ip", "-o", "link"], check=True).stdout, links_before)
        self.assertFalse(os.path.exists(host.tmp))

    def test_state_rewrite_and_removal(self) -> None:
        """The service map can be rewritten, and the hand-built state removed to
        exactly the listings of before."""
        host = Host(self)
        br = host.add_bridge()
        ruleset_before = host.nft("list", "ruleset").stdout
        links_before = [link["ifname"] for link in host.ip_json("link")]
        host.build_tproxy_state(br, {5030: ("127.0.0.1", 5030)})
        host.set_service_map(br, {1234: ("127.0.0.2", 99)})
        listing = host.nft("list", "map", "ip", "one_tproxy", f"ep_{br}").stdout
        self.assertIn("1234 : 127.0.0.2 . 99", listing)
        self.assertNotIn("5030", listing)
        host.remove_tproxy_state(br)
        self.assertFalse(host.inner(br).exists())
        self.assertEqual([link["ifname"] for link in host.ip_json("link")], links_before)
        leftover = host.nft("list", "ruleset").stdout
        self.assertNotIn(f"ep_{br}", leftover)
        self.assertNotIn(f"ch_{br}", leftover)
        self.assertNotIn(f'"{br}b"', leftover)
        self.assertTrue(ruleset_before.strip() == "" or ruleset_before in leftover)

    def test_trunked_hosts(self) -> None:
        """Two hosts whose bridges are trunked: a guest of one reaches a guest of the other."""
        one, two = Host(self), Host(self)
        b1, b2 = one.add_bridge(), two.add_bridge()
        one.trunk(b1, two, b2)
        g1, g2 = one.add_guest(b1), two.add_guest(b2)
        one.serve_http(8000, addr=g2.addr, namespace=g2)
        got = g1.curl(f"http://{g2.addr}:8000/", check=True)
        self.assertEqual(got.stdout, "service 8000\n")

    def test_run_times_out(self) -> None:
        """A command that overruns its timeout is killed and reported as 124."""
        done = topology.run(["sleep", "5"], timeout=0.2)
        self.assertEqual(done.returncode, 124)
        self.assertRaises(topology.CommandError, done.check)
