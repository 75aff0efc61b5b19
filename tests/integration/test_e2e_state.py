"""The driver's state is DESIGN.md 2.2 exactly: the same as the fixture builds by hand."""

from __future__ import annotations

from typing import Any

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import Host, Namespace, config_yaml, tproxy_namespace

ENDPOINTS = [(5030, "10.11.12.13", 5030), (1234, "10.11.12.34", 1234)]


def _scrub(value: Any, bridge: str) -> Any:
    """``value`` with the bridge name replaced by BR and nft handles dropped."""
    if isinstance(value, dict):
        return {k: _scrub(v, bridge) for k, v in value.items() if k != "handle"}
    if isinstance(value, list | tuple):
        return [_scrub(v, bridge) for v in value]
    if isinstance(value, str):
        return value.replace(bridge, "BR")
    return value


def _is_guard(item: dict[str, Any], bridge: str) -> bool:
    """Chain ``guard_BR`` or one of its rules: the hardening's anti-spoofing chain, ours
    beyond OpenNebula's state (DESIGN.md 2.2), checked on its own."""
    body = next(iter(item.values()), {})
    guard = f"guard_{bridge}"
    return isinstance(body, dict) and guard in (body.get("chain"), body.get("name"))


def nft_state(host: Host, bridge: str) -> list[Any]:
    """The ruleset as comparable JSON: no metainfo, no handles, BR for the bridge, and
    without chain ``guard_BR``."""
    items = [i for i in host.nft_json() if "metainfo" not in i and not _is_guard(i, bridge)]
    return sorted((_scrub(i, bridge) for i in items), key=repr)


def inner_state(inner: Namespace, bridge: str) -> dict[str, Any]:
    """Links (name, state, flags, IPv4 addresses), routes and arp_ignore sysctls."""
    links = []
    for link in inner.ip_json("-4", "address", "show"):
        links.append(
            (
                link["ifname"],
                link.get("operstate"),
                sorted(f for f in link.get("flags", []) if f != "LOWER_UP"),
                sorted((a["local"], a["prefixlen"], a.get("scope")) for a in link["addr_info"]),
            )
        )
    routes = [
        {k: r.get(k) for k in ("dst", "dev", "scope", "gateway", "protocol")}
        for r in inner.ip_json("-4", "route", "show")
    ]
    sysctls = {key: inner.sysctl(f"net.ipv4.conf.{key}.arp_ignore") for key in ("all", "default")}
    return _scrub({"links": sorted(links, key=repr), "routes": routes, "sysctl": sysctls}, bridge)


class StateTests(E2ETestCase):
    """``one-tproxy up`` builds what OpenNebula's Ruby driver would, and ``down`` undoes it."""

    def test_driver_state_equals_hand_built(self) -> None:
        """nft ruleset, inner addresses/routes/sysctls and the BRb port after ``up`` are
        those of the hand-built state; ``down`` removes all of it."""
        by_hand, by_driver = self.make_host(), self.make_host()
        b1, b2 = by_hand.add_bridge(), by_driver.add_bridge()
        nft_before = by_driver.nft("list", "ruleset").stdout
        by_hand.build_tproxy_state(b1, {p: (a, rp) for p, a, rp in ENDPOINTS})
        by_driver.write_config(config_yaml(ENDPOINTS))
        by_driver.up(b2)

        self.assertEqual(nft_state(by_driver, b2), nft_state(by_hand, b1))
        guard = [i for i in by_driver.nft_json() if _is_guard(i, b2) and "rule" in i]
        self.assertEqual(len(guard), 2)  # the driver's one extra: the anti-spoofing rules
        self.assertEqual(inner_state(by_driver.inner(b2), b2), inner_state(by_hand.inner(b1), b1))
        for host, br in ((by_hand, b1), (by_driver, b2)):
            port = host.ip_json("link", "show", f"{br}b")[0]
            self.assertEqual((port.get("master"), port.get("operstate")), (br, "UP"))

        by_driver.down(b2)
        self.assertNotIn(tproxy_namespace(b2), by_driver.run(["ip", "netns", "list"]).stdout)
        self.assertEqual(by_driver.run(["ip", "link", "show", f"{b2}b"]).returncode, 1)
        self.assertNotIn(f"ep_{b2}", by_driver.nft("list", "ruleset").stdout)
        self.assertNotIn(f"ch_{b2}", by_driver.nft("list", "ruleset").stdout)
        self.assertNotIn(f"guard_{b2}", by_driver.nft("list", "ruleset").stdout)
        self.assertEqual(by_driver.nft("list", "ruleset").stdout.strip(), nft_before.strip())
