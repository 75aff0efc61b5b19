"""End to end on two hypervisors whose bridges are trunked into one layer-2 network."""

from __future__ import annotations

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import SERVICE_ADDRESS


class TrunkTests(E2ETestCase):
    """On a shared segment, every guest is answered by its own hypervisor."""

    def test_each_guest_served_by_its_own_hypervisor(self) -> None:
        """Guests of two trunked hypervisors each reach their own hypervisor's service,
        and each resolves 169.254.16.9 to its own hypervisor's inner namespace."""
        endpoints = [(5030, "127.0.0.1", 5030)]
        one = self.hypervisor(endpoints, services={5030: "hypervisor one\n"}, up=False)
        two = self.hypervisor(endpoints, services={5030: "hypervisor two\n"}, up=False)
        one.host.trunk(one.bridge, two.host, two.bridge)
        one.host.up(one.bridge)
        two.host.up(two.bridge)

        for _ in range(3):
            self.assertEqual(one.guest.wait_serving(5030), "hypervisor one\n")
            self.assertEqual(two.guest.wait_serving(5030), "hypervisor two\n")

        for hv in (one, two):
            inner = hv.host.inner(hv.bridge)
            mac = inner.ip_json("link", "show", f"{hv.bridge}a")[0]["address"]
            neigh = hv.guest.ip_json("neigh", "show", SERVICE_ADDRESS)
            self.assertEqual([n.get("lladdr") for n in neigh], [mac], hv.guest.name)

        # Each hypervisor's mesh is its own: status is scoped to its namespace.
        for hv in (one, two):
            code, procs = hv.host.status()
            self.assertEqual(code, 0)
            self.assertEqual(set(procs), {"one_tproxy", f"one_tproxy_{hv.bridge}"})
