"""End to end on one hypervisor: service ports, networks, two bridges, a security group."""

from __future__ import annotations

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import SERVICE_ADDRESS, wait_until

ONEGATE = "onegate page\n"
CUSTOM = "custom page\n"


class ServicePortsTests(E2ETestCase):
    """A guest reaches the services that apply to its network, and only those."""

    def test_two_ports_one_limited_by_network(self) -> None:
        """curl gets pages through 5030 (every network) and 1234 (this network); 4321,
        limited to another network, is neither in the map nor listened to."""
        hv = self.hypervisor(
            [
                (5030, "127.0.0.1", 5030),
                (1234, "127.0.0.1", 8080, ["net-a", "7"]),
                (4321, "127.0.0.1", 8080, ["net-b"]),
            ],
            services={5030: ONEGATE, 8080: CUSTOM},
            network="net-a",
        )
        guest = hv.guest
        self.assertEqual(guest.wait_serving(5030), ONEGATE)
        self.assertEqual(guest.wait_serving(1234), CUSTOM)
        self.assert_refused(guest, 4321)

        listing = hv.host.nft("list", "map", "ip", "one_tproxy", f"ep_{hv.bridge}").stdout
        self.assertIn("5030 : 127.0.0.1 . 5030", listing)
        self.assertIn("1234 : 127.0.0.1 . 8080", listing)
        self.assertNotIn("4321", listing)

        code, procs = hv.host.status()
        self.assertEqual(code, 0)
        self.assertEqual(procs, hv.host.proxies())
        self.assertEqual(set(procs), {"one_tproxy", f"one_tproxy_{hv.bridge}"})
        # A plain up and a few requests are nothing to warn about (e.g. an inner
        # proxy killed by the reload's SIGHUP while it was starting, and restarted).
        logs = hv.host.logs()
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            self.assertNotIn(level, logs)

    def test_network_by_id(self) -> None:
        """``--network-id`` selects the entries listing that id."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (1234, "127.0.0.1", 8080, ["net-a", "7"])],
            services={5030: ONEGATE, 8080: CUSTOM},
            network_id="7",
        )
        self.assertEqual(hv.guest.wait_serving(1234), CUSTOM)
        self.assertEqual(hv.guest.wait_serving(5030), ONEGATE)


class TwoBridgesTests(E2ETestCase):
    """Two bridges on one hypervisor each get their own inner proxy."""

    def test_two_bridges_then_down_of_one(self) -> None:
        """Both bridges serve at once, each by its own inner; ``down`` of one stops
        only that one, and a transfer on the other runs through it uncut."""
        one = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (1234, "127.0.0.1", 8080, ["net-a"])],
            services={5030: ONEGATE, 8080: CUSTOM},
            network="net-a",
        )
        host = one.host
        two = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (1234, "127.0.0.1", 8080, ["net-a"])],
            host=host,
            network="net-b",
        )
        g1, g2 = one.guest, two.guest
        self.assertEqual(g1.wait_serving(5030), ONEGATE)
        self.assertEqual(g1.wait_serving(1234), CUSTOM)
        self.assertEqual(g2.wait_serving(5030), ONEGATE)
        self.assert_refused(g2, 1234)  # net-b: the custom service does not apply

        names = {"one_tproxy", f"one_tproxy_{one.bridge}", f"one_tproxy_{two.bridge}"}
        procs = self.wait_proxies(host, names)
        self.assertEqual(len(set(procs.values())), 3)
        code, status = host.status()
        self.assertEqual((code, status), (0, procs))

        transfer = g2.start_transfer("download", 5030, 16 * 2**20, rate=4 * 2**20)  # ~4 s

        host.down(one.bridge)
        self.assertIsNone(transfer.poll(), "the transfer ended before the down: test too short")
        self.wait_proxies(host, {"one_tproxy", f"one_tproxy_{two.bridge}"})
        self.assertFalse(host.inner(one.bridge).exists())
        wait_until(lambda: not g1.curl(g1.service_url(5030), timeout=2).ok, 5, 0.1, "b1 gone")
        self.assertEqual(g2.curl(g2.service_url(5030), check=True).stdout, ONEGATE)
        out, _ = transfer.communicate(timeout=30)
        self.assertEqual(transfer.returncode, 0, out)
        code, status = host.status()
        self.assertEqual(code, 0)
        self.assertEqual(set(status), {"one_tproxy", f"one_tproxy_{two.bridge}"})


class SecurityGroupTests(E2ETestCase):
    """OpenNebula's security groups filter the guest's traffic on the bridge."""

    def test_only_5030_allowed(self) -> None:
        """A guest whose outbound traffic is limited to TCP 5030 (bridge filter on its
        port, as a security group would be) reaches 5030 and not 1234; an unfiltered
        guest reaches both."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (1234, "127.0.0.1", 8080)],
            services={5030: ONEGATE, 8080: CUSTOM},
            guests=2,
        )
        filtered, free = hv.guests
        hv.host.nft(
            "-f",
            "-",
            input=(
                "table bridge tqe_sg {\n"
                "  chain outbound {\n"
                "    type filter hook forward priority -10; policy accept;\n"
                f'    iifname "{filtered.port}" ether type arp accept\n'
                f'    iifname "{filtered.port}" ip daddr {SERVICE_ADDRESS} '
                "tcp dport 5030 accept\n"
                f'    iifname "{filtered.port}" drop\n'
                "  }\n"
                "}\n"
            ),
        )
        self.assertEqual(filtered.wait_serving(5030), ONEGATE)
        blocked = filtered.curl(filtered.service_url(1234), timeout=2)
        self.assertEqual(blocked.returncode, 28, blocked.stderr)  # dropped: no answer at all
        self.assertEqual(free.wait_serving(1234), CUSTOM)
        self.assertEqual(free.wait_serving(5030), ONEGATE)
