"""Anti-spoofing (chain ``guard_BR``): no guest can claim 169.254.16.9 on its bridge.

A guest that answers ARP for 169.254.16.9, or announces it, could make another
guest send it the connections meant for OneGate (and with them that guest's
token).  ``one-tproxy up`` adds chain ``guard_BR`` to table ``bridge
one_tproxy``: ARP whose *sender* is 169.254.16.9 is dropped unless it comes in
from ``BRb`` (the inner namespace that really owns the address).  These tests
run the real driver and mesh in a test hypervisor namespace (prefix ``tqh``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from tests.integration.e2e import E2ETestCase, Hypervisor
from tests.integration.topology import SERVICE_ADDRESS, Guest

ARPSPOOF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arpspoof.py")
T = TypeVar("T")
ENDPOINTS = [(5030, "127.0.0.1", 5030)]
REAL = "real service\n"
STOLEN = "stolen token\n"


def _mac(ns: Guest, ifname: str = "eth0") -> str:
    return str(ns.ip_json("link", "show", ifname)[0]["address"])


def _neighbour(guest: Guest) -> list[str | None]:
    """The victim's neighbour entries for 169.254.16.9 (their MACs)."""
    return [n.get("lladdr") for n in guest.ip_json("neigh", "show", SERVICE_ADDRESS)]


class GuardStateTests(E2ETestCase):
    """``up`` writes guard_BR in the form the kernel takes; ``up`` again changes nothing;
    ``down`` removes it."""

    prefix = "tqh"

    def test_made_by_up_removed_by_down(self) -> None:
        """guard_BR sits on the prerouting hook with its ARP rule and BRa's MAC rule, is
        idempotent, and goes."""
        hv = self.hypervisor(ENDPOINTS, services={5030: REAL})
        host, br = hv.host, hv.bridge
        text = host.nft("list", "chain", "bridge", "one_tproxy", f"guard_{br}").stdout
        self.assertIn("type filter hook prerouting priority filter; policy accept;", text)
        fallback = f"iifname != @tproxy_veths arp saddr ip {SERVICE_ADDRESS} drop"
        ibrname = f'meta ibrname "{br}" iifname != "{br}b" arp saddr ip {SERVICE_ADDRESS} drop'
        bra = hv.host.inner(br).ip_json("link", "show", f"{br}a")[0]["address"]
        rules = [
            line.strip() for line in text.splitlines() if "drop" in line and "policy" not in line
        ]
        self.assertEqual(len(rules), 2, text)
        self.assertIn(rules[0], (fallback, ibrname))
        self.assertEqual(rules[1], f'iifname != "{br}b" ether saddr {bra} drop')
        if rules[0] == fallback:
            members = host.nft("list", "set", "bridge", "one_tproxy", "tproxy_veths").stdout
            self.assertIn(f'"{br}b"', members)
        before = host.nft("-a", "list", "ruleset").stdout
        host.up(br)
        self.assertEqual(host.nft("-a", "list", "ruleset").stdout, before)
        host.down(br)
        self.assertNotIn("guard_", host.nft("list", "ruleset").stdout)


class SpoofingTests(E2ETestCase):
    """Two guests on one bridge: the attacker floods forged ARP for 169.254.16.9."""

    prefix = "tqh"

    @staticmethod
    def _flood_argv(victim: Guest, rounds: int, *extra: str) -> list[str]:
        return [
            sys.executable,
            ARPSPOOF,
            "eth0",
            SERVICE_ADDRESS,
            victim.addr,
            _mac(victim),
            "--rounds",
            str(rounds),
            "--interval",
            "0.004",
            *extra,
        ]

    def _flood(
        self, hv: Hypervisor, victim: Guest, attacker: Guest, rounds: int, *extra: str
    ) -> None:
        done = attacker.run(self._flood_argv(victim, rounds, *extra), timeout=30, check=True)
        self.assertEqual(done.stdout.strip(), f"sent {rounds * 4}")

    def _flood_watching(
        self, victim: Guest, attacker: Guest, rounds: int, watch: Callable[[], T], *extra: str
    ) -> list[T]:
        """Flood, reading ``watch()`` until the flood ends (at most 30 s): every reading.

        Read during the flood, not after it: once the forged frames stop, any
        frame from the real owner (an ARP probe of the inner namespace, say)
        teaches the bridge its true port again, and a reading after the flood
        could miss what the flood did.
        """
        flood = attacker.spawn(self._flood_argv(victim, rounds, *extra))
        seen = [watch()]
        deadline = time.monotonic() + 30
        while flood.poll() is None and time.monotonic() < deadline:
            seen.append(watch())
        self.assertEqual(flood.wait(timeout=10), 0)
        seen.append(watch())
        return seen

    def test_forged_replies_and_announcements_do_not_divert(self) -> None:
        """With guard_BR the victim keeps BRa's MAC for 169.254.16.9 and keeps reaching the
        real service; with guard_BR deleted the very same flood steals its connections."""
        hv = self.hypervisor(ENDPOINTS, services={5030: REAL}, guests=2)
        victim, attacker = hv.guests
        bra = str(hv.host.inner(hv.bridge).ip_json("link", "show", f"{hv.bridge}a")[0]["address"])
        evil = _mac(attacker)
        # The attacker is ready to serve whoever it diverts: it owns 169.254.16.9 itself.
        attacker.ip("address", "add", f"{SERVICE_ADDRESS}/32", "dev", "eth0")
        hv.host.serve_http(
            5030, addr=SERVICE_ADDRESS, files={"index.html": STOLEN}, namespace=attacker
        )
        self.assertEqual(victim.wait_serving(5030), REAL)
        self.assertEqual(_neighbour(victim), [bra])

        # Flood while the victim forgets and re-learns the address and keeps fetching.
        flood = attacker.spawn(self._flood_argv(victim, 400))
        deadline = time.monotonic() + 20
        fetched = 0
        while flood.poll() is None and time.monotonic() < deadline:
            victim.ip("neigh", "flush", "dev", "eth0")
            done = victim.curl(victim.service_url(5030), timeout=5, check=True)
            self.assertEqual(done.stdout, REAL)
            fetched += 1
        self.assertEqual(flood.wait(timeout=10), 0)
        self.assertGreater(fetched, 0)
        self.assertEqual(_neighbour(victim), [bra])
        self.assertEqual(victim.curl(victim.service_url(5030), check=True).stdout, REAL)
        self._flood(hv, victim, attacker, 100)
        self.assertEqual(_neighbour(victim), [bra])
        self.assertEqual(victim.curl(victim.service_url(5030), check=True).stdout, REAL)

        # Control: without the guard the same flood poisons the victim (the test can fail).
        hv.host.nft("delete", "chain", "bridge", "one_tproxy", f"guard_{hv.bridge}")
        self._flood(hv, victim, attacker, 100)
        self.assertEqual(_neighbour(victim), [evil])
        self.assertEqual(victim.curl(victim.service_url(5030), check=True).stdout, STOLEN)

    def test_forged_bra_mac_does_not_move_it_in_the_bridge(self) -> None:
        """Frames forged with BRa's MAC as source do not teach the bridge that BRa is on
        the attacker's port (FDB poisoning); the victim keeps being served. Without
        guard_BR the same frames move BRa's MAC to the attacker's port."""
        hv = self.hypervisor(ENDPOINTS, services={5030: REAL}, guests=2)
        victim, attacker = hv.guests
        br = hv.bridge
        bra = str(hv.host.inner(br).ip_json("link", "show", f"{br}a")[0]["address"])
        self.assertEqual(victim.wait_serving(5030), REAL)

        def port_of_bra() -> list[str]:
            entries = hv.host.run(["bridge", "-j", "fdb", "show", "br", br], check=True).json()
            return [e.get("ifname") for e in entries if e.get("mac") == bra]

        self.assertEqual(port_of_bra(), [f"{br}b"])
        seen = self._flood_watching(victim, attacker, 100, port_of_bra, "--source-mac", bra)
        self.assertEqual({tuple(s) for s in seen}, {(f"{br}b",)}, seen)
        self.assertEqual(victim.curl(victim.service_url(5030), check=True).stdout, REAL)

        hv.host.nft("delete", "chain", "bridge", "one_tproxy", f"guard_{br}")
        seen = self._flood_watching(victim, attacker, 100, port_of_bra, "--source-mac", bra)
        self.assertIn([attacker.port], seen)
