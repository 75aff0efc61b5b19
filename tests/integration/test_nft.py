"""The nftables edge against the real kernel, each test in its own test netns."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.integration import _tqd
from tests.integration.topology import Host, require_root
from tproxy.model import Destination
from tproxy.nft import ArpRuleForm, Nftables, NftError


class NftablesTests(TestCase):
    """Nftables reads and writes exactly the nft state of DESIGN.md 2.2."""

    def setUp(self) -> None:
        require_root()
        self.host = Host(self, prefix=_tqd.PREFIX)
        self.ns = self.host.name
        self.nft: Nftables = _tqd.in_netns(self.ns, Nftables)

    def run_nft(self, fn: Any, *args: Any) -> Any:
        """Call a method of the edge (made in the test netns) from a thread in that netns."""
        return _tqd.in_netns(self.ns, lambda: fn(*args))

    def capture_warnings(self) -> list[dict[str, Any]]:
        """Collect the warnings logged while the test runs."""
        events: list[dict[str, Any]] = []

        def observer(event: dict[str, Any]) -> None:
            if event.get("log_level") in (LogLevel.warn, LogLevel.error):
                events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def test_missing_table(self) -> None:
        """With no table ip one_tproxy the reader returns an empty mesh map."""
        self.assertEqual(self.run_nft(self.nft.read_service_maps), {})

    def test_reads_hand_made_state(self) -> None:
        """A map written by hand as OpenNebula does is read back element by element."""
        self.host.nft(
            "add table ip one_tproxy; add map ip one_tproxy ep_br0 "
            "{ type inet_service : ipv4_addr . inet_service; "
            "elements = { 5030 : 10.11.12.13 . 5030, 1234 : 10.11.12.34 . 1234 } }",
        )
        self.assertEqual(
            self.run_nft(self.nft.read_service_maps),
            {
                "br0": {
                    5030: Destination("10.11.12.13", 5030),
                    1234: Destination("10.11.12.34", 1234),
                }
            },
        )

    def test_odd_maps_skipped(self) -> None:
        """Maps that are not ep_BR of the right type are logged and skipped, never a crash."""
        warnings = self.capture_warnings()
        self.host.nft(
            "add table ip one_tproxy; "
            "add map ip one_tproxy other { type inet_service : ipv4_addr; }; "
            "add map ip one_tproxy ep_wrong { type inet_service : ipv4_addr; }; "
            "add map ip one_tproxy ep_ok { type inet_service : ipv4_addr . inet_service; "
            "elements = { 80 : 127.0.0.1 . 8080 } }",
        )
        self.assertEqual(
            self.run_nft(self.nft.read_service_maps),
            {"ok": {80: Destination("127.0.0.1", 8080)}},
        )
        self.assertEqual(len(warnings), 2)

    def test_write_map_exact_state(self) -> None:
        """write_service_map creates table and map exactly as DESIGN.md 2.2 lists them."""
        smap = {5030: Destination("10.11.12.13", 5030), 1234: Destination("10.0.0.1", 80)}
        self.assertTrue(self.run_nft(self.nft.write_service_map, "tqdb0", smap))
        ruleset = _tqd.nft_ruleset(self.host)
        self.assertEqual(
            ruleset,
            [
                {"table": {"family": "ip", "name": "one_tproxy"}},
                {
                    "map": {
                        "family": "ip",
                        "name": "ep_tqdb0",
                        "table": "one_tproxy",
                        "type": "inet_service",
                        "map": "ipv4_addr . inet_service",
                        "elem": [
                            [1234, {"concat": ["10.0.0.1", 80]}],
                            [5030, {"concat": ["10.11.12.13", 5030]}],
                        ],
                    }
                },
            ],
        )
        self.assertEqual(self.run_nft(self.nft.read_service_maps), {"tqdb0": smap})

    def test_write_map_idempotent_and_refill(self) -> None:
        """Writing the same map changes nothing; a new map replaces the elements."""
        first = {5030: Destination("10.11.12.13", 5030), 1234: Destination("10.0.0.1", 80)}
        self.run_nft(self.nft.write_service_map, "tqdb0", first)
        before = _tqd.nft_ruleset_raw(self.host)
        self.assertFalse(self.run_nft(self.nft.write_service_map, "tqdb0", first))
        self.assertEqual(_tqd.nft_ruleset_raw(self.host), before)
        second = {5030: Destination("10.11.12.14", 5031), 22: Destination("10.0.0.2", 2222)}
        self.assertTrue(self.run_nft(self.nft.write_service_map, "tqdb0", second))
        self.assertEqual(self.run_nft(self.nft.read_service_maps), {"tqdb0": second})

    def test_write_map_wrong_type(self) -> None:
        """A map ep_BR of another type is an error naming it, and nothing changes."""
        self.host.nft(
            "add table ip one_tproxy; add map ip one_tproxy ep_tqdb0 "
            "{ type inet_service : ipv4_addr; }",
        )
        before = _tqd.nft_ruleset_raw(self.host)
        e = self.assertRaises(
            NftError,
            self.run_nft,
            self.nft.write_service_map,
            "tqdb0",
            {1: Destination("10.0.0.1", 1)},
        )
        self.assertIn("ep_tqdb0", str(e))
        self.assertEqual(_tqd.nft_ruleset_raw(self.host), before)

    def test_arp_rule(self) -> None:
        """The ARP chain holds exactly one rule, in the form the kernel accepts."""
        form, changed = self.run_nft(self.nft.write_arp_rule, "tqdb0")
        self.assertTrue(changed)
        ruleset = _tqd.nft_ruleset(self.host)
        chains = _tqd.nft_objects(ruleset, "chain")
        self.assertEqual(
            chains,
            [
                {
                    "family": "bridge",
                    "table": "one_tproxy",
                    "name": "ch_tqdb0",
                    "type": "filter",
                    "hook": "forward",
                    "prio": -200,
                    "policy": "accept",
                }
            ],
        )
        rules = _tqd.nft_objects(ruleset, "rule")
        self.assertEqual(len(rules), 1)
        text = self.host.nft("list", "chain", "bridge", "one_tproxy", "ch_tqdb0").stdout
        if form is ArpRuleForm.IBRNAME:
            self.assertIn(
                'meta ibrname "tqdb0" oifname != "tqdb0b" arp operation request '
                "arp daddr ip 169.254.16.9 drop",
                text,
            )
        else:
            self.assertIn(
                "oifname != @tproxy_veths arp operation request arp daddr ip 169.254.16.9 drop",
                text,
            )
            sets = _tqd.nft_objects(ruleset, "set")
            self.assertEqual(
                sets,
                [
                    {
                        "family": "bridge",
                        "name": "tproxy_veths",
                        "table": "one_tproxy",
                        "type": "ifname",
                        "elem": ["tqdb0b"],
                    }
                ],
            )
        before = _tqd.nft_ruleset_raw(self.host)
        self.assertEqual(self.run_nft(self.nft.write_arp_rule, "tqdb0"), (form, False))
        self.assertEqual(_tqd.nft_ruleset_raw(self.host), before)

    def test_arp_rule_rewritten(self) -> None:
        """A chain ch_BR with other rules is flushed and left with its one ARP rule."""
        self.host.nft(
            "add table bridge one_tproxy; add chain bridge one_tproxy ch_tqdb0 "
            "{ type filter hook forward priority filter; policy accept; }; "
            "add rule bridge one_tproxy ch_tqdb0 counter; "
            "add rule bridge one_tproxy ch_tqdb0 counter",
        )
        self.run_nft(self.nft.write_arp_rule, "tqdb0")
        rules = _tqd.nft_objects(_tqd.nft_ruleset(self.host), "rule")
        self.assertEqual(len(rules), 1)
        self.assertNotIn({"counter": {"packets": 0, "bytes": 0}}, rules[0]["expr"])

    def test_remove_restores_earlier_state(self) -> None:
        """remove_bridge returns the ruleset to exactly what it was before the writes."""
        self.host.nft("add table inet tqdother; add chain inet tqdother c")
        before = _tqd.nft_ruleset(self.host)
        self.run_nft(self.nft.write_service_map, "tqdb0", {1: Destination("10.0.0.1", 1)})
        self.run_nft(self.nft.write_arp_rule, "tqdb0")
        self.run_nft(self.nft.write_service_map, "tqdb1", {2: Destination("10.0.0.2", 2)})
        self.run_nft(self.nft.write_arp_rule, "tqdb1")
        self.assertTrue(self.run_nft(self.nft.remove_bridge, "tqdb0"))
        self.assertEqual(set(self.run_nft(self.nft.read_service_maps)), {"tqdb1"})
        names = [c["name"] for c in _tqd.nft_objects(_tqd.nft_ruleset(self.host), "chain")]
        self.assertEqual(sorted(names), ["c", "ch_tqdb1"])
        self.assertTrue(self.run_nft(self.nft.remove_bridge, "tqdb1"))
        self.assertEqual(_tqd.nft_ruleset(self.host), before)
        self.assertFalse(self.run_nft(self.nft.remove_bridge, "tqdb1"))
