"""Unit tests of the nftables edge with a scripted fake libnftables context."""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from tproxy import nft
from tproxy.model import Destination, InvalidBridgeNameError
from tproxy.nft import ArpRuleForm, Nftables, NftError


class FakeContext:
    """Stands in for ``nftables.Nftables``: canned listings, recorded batches, chosen refusals."""

    def __init__(self, ibrname: bool = True) -> None:
        self.tables: dict[str, list[Any] | None] = {"ip": None, "bridge": None}
        self.ibrname = ibrname
        self.batches: list[Any] = []
        self.texts: list[str] = []
        self.fail_with: str | None = None

    def json_cmd(self, json_root: Any) -> tuple[int, Any, str]:
        cmds = json_root["nftables"]
        if len(cmds) == 1 and "list" in cmds[0]:
            family = cmds[0]["list"]["table"]["family"]
            objects = self.tables[family]
            if objects is None:
                return -1, "", "internal:0:0-0: Error: No such file or directory\n\n"
            return 0, {"nftables": [{"metainfo": {"version": "1.0.6"}}, *objects]}, ""
        self.batches.append(json_root)
        if self.fail_with is not None:
            return -1, "", self.fail_with
        if not self.ibrname and '"ibrname"' in json.dumps(json_root):
            return -1, "", "Error: Could not process rule: Operation not supported\n"
        return 0, "", ""

    def cmd(self, cmdline: str) -> tuple[int, Any, str]:
        self.texts.append(cmdline)
        if self.fail_with is not None:
            return -1, "", self.fail_with
        return 0, "", ""


def ep_map(name: str, elems: list[Any], data: str = "ipv4_addr . inet_service") -> Any:
    """A map object as ``nft -j list table`` shows it."""
    return {
        "map": {
            "family": "ip",
            "name": name,
            "table": "one_tproxy",
            "type": "inet_service",
            "map": data,
            "elem": elems,
        }
    }


def chain(name: str) -> Any:
    """A bridge chain object as listed."""
    return {"chain": {"family": "bridge", "table": "one_tproxy", "name": name}}


def rule(chain_name: str, expr: list[Any]) -> Any:
    """A rule object as listed."""
    return {"rule": {"family": "bridge", "table": "one_tproxy", "chain": chain_name, "expr": expr}}


def veth_set(*members: str) -> Any:
    """The tproxy_veths set as listed (nft shows one member as a bare string)."""
    elem: Any = members[0] if len(members) == 1 else list(members)
    body = {"family": "bridge", "name": "tproxy_veths", "table": "one_tproxy", "type": "ifname"}
    if members:
        body["elem"] = elem
    return {"set": body}


class LogCapture:
    """Collects the log events of a test."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def at(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") == level]


SMAP = {5030: Destination("10.11.12.13", 5030), 1234: Destination("10.0.0.1", 80)}


class BuildTests(TestCase):
    """The JSON and text built for each change."""

    def test_refill_batch(self) -> None:
        """The refill batch flushes the map, then adds every element sorted by port."""
        self.assertEqual(
            nft.refill_map_batch("br0", SMAP),
            {
                "nftables": [
                    {"flush": {"map": {"family": "ip", "table": "one_tproxy", "name": "ep_br0"}}},
                    {
                        "add": {
                            "element": {
                                "family": "ip",
                                "table": "one_tproxy",
                                "name": "ep_br0",
                                "elem": [
                                    [1234, {"concat": ["10.0.0.1", 80]}],
                                    [5030, {"concat": ["10.11.12.13", 5030]}],
                                ],
                            }
                        }
                    },
                ]
            },
        )

    def test_refill_empty(self) -> None:
        """An empty service map only flushes."""
        self.assertEqual(len(nft.refill_map_batch("br0", {})["nftables"]), 1)

    def test_create_text(self) -> None:
        """The map creation text declares the exact type of DESIGN.md 2.2 with its elements."""
        self.assertEqual(
            nft.create_map_text("br0", SMAP),
            "add table ip one_tproxy\n"
            "add map ip one_tproxy ep_br0 { type inet_service : ipv4_addr . inet_service; "
            "elements = { 1234 : 10.0.0.1 . 80, 5030 : 10.11.12.13 . 5030 }; }\n",
        )
        self.assertNotIn("elements", nft.create_map_text("br0", {}))

    def test_create_text_refuses_bad_values(self) -> None:
        """Nothing unchecked reaches the text command: bad bridge names and ports raise."""
        self.assertRaises(InvalidBridgeNameError, nft.create_map_text, "a b", {})
        self.assertRaises(ValueError, nft.create_map_text, "br0", {0: Destination("1.2.3.4", 1)})
        self.assertRaises(TypeError, nft.create_map_text, "br0", {1: ("1.2.3.4", 1)})

    def test_ibrname_rule(self) -> None:
        """The ibrname rule matches the bridge, excludes BRb, and drops ARP requests for .9."""
        batch = nft.arp_rule_batch("br0", ArpRuleForm.IBRNAME)["nftables"]
        self.assertEqual([next(iter(c)) for c in batch], ["add", "add", "flush", "add"])
        self.assertEqual(
            batch[1]["add"]["chain"],
            {
                "family": "bridge",
                "table": "one_tproxy",
                "name": "ch_br0",
                "type": "filter",
                "hook": "forward",
                "prio": -200,
                "policy": "accept",
            },
        )
        expr = batch[3]["add"]["rule"]["expr"]
        self.assertEqual(
            expr[:2],
            [
                {"match": {"op": "==", "left": {"meta": {"key": "ibrname"}}, "right": "br0"}},
                {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "br0b"}},
            ],
        )
        self.assertEqual(
            expr[3]["match"]["left"], {"payload": {"protocol": "arp", "field": "daddr ip"}}
        )
        self.assertEqual(expr[3]["match"]["right"], "169.254.16.9")
        self.assertEqual(expr[-1], {"drop": None})
        self.assertNotIn("tproxy_veths", json.dumps(batch))

    def test_fallback_rule(self) -> None:
        """The fallback batch adds the set, BRb to it, and the rule matching the set."""
        batch = nft.arp_rule_batch("br0", ArpRuleForm.FALLBACK)["nftables"]
        self.assertEqual(
            batch[1],
            {
                "add": {
                    "set": {
                        "family": "bridge",
                        "table": "one_tproxy",
                        "name": "tproxy_veths",
                        "type": "ifname",
                    }
                }
            },
        )
        self.assertEqual(batch[2]["add"]["element"]["elem"], ["br0b"])
        expr = batch[-1]["add"]["rule"]["expr"]
        self.assertEqual(
            expr[0],
            {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "@tproxy_veths"}},
        )
        self.assertNotIn("ibrname", json.dumps(batch))


class ReaderTests(TestCase):
    """read_service_maps turns the listing into a mesh map and skips odd JSON."""

    def test_missing_table(self) -> None:
        """A missing table is an empty mesh map."""
        self.assertEqual(Nftables(FakeContext()).read_service_maps(), {})

    def test_maps(self) -> None:
        """Each ep_BR map becomes bridge BR; wrapped elements are unwrapped."""
        ctx = FakeContext()
        ctx.tables["ip"] = [
            {"table": {"family": "ip", "name": "one_tproxy"}},
            ep_map("ep_br0", [[5030, {"concat": ["10.11.12.13", 5030]}]]),
            ep_map(
                "ep_br1", [[{"elem": {"val": 80, "comment": "x"}}, {"concat": ["127.0.0.1", 8080]}]]
            ),
            ep_map("ep_empty", []),
        ]
        self.assertEqual(
            Nftables(ctx).read_service_maps(),
            {
                "br0": {5030: Destination("10.11.12.13", 5030)},
                "br1": {80: Destination("127.0.0.1", 8080)},
                "empty": {},
            },
        )

    def test_odd_json_skipped(self) -> None:
        """Odd maps and elements are logged as warnings and skipped, never a crash."""
        logs = LogCapture(self)
        ctx = FakeContext()
        ctx.tables["ip"] = [
            "garbage",
            {"map": "not a dict"},
            {"two": 1, "keys": 2},
            ep_map("other", []),
            ep_map("ep_this_name_is_too_long", []),
            ep_map("ep_wrongtype", [], data="ipv4_addr"),
            ep_map("ep_elems", "nope"),  # type: ignore[arg-type]
            ep_map(
                "ep_br0",
                [
                    [5030, {"concat": ["10.11.12.13", 5030]}],
                    [0, {"concat": ["10.0.0.1", 1]}],
                    [True, {"concat": ["10.0.0.1", 1]}],
                    [7, {"concat": ["not-an-ip", 1]}],
                    [8, {"concat": ["10.0.0.1", 70000]}],
                    [9, "flat"],
                    "lonely",
                ],
            ),
        ]
        self.assertEqual(
            Nftables(ctx).read_service_maps(),
            {"br0": {5030: Destination("10.11.12.13", 5030)}, "elems": {}},
        )
        self.assertEqual(len(logs.at(LogLevel.warn)), 10)

    def test_other_failure_raises(self) -> None:
        """A libnftables failure other than a missing table raises NftError with the batch."""
        ctx = FakeContext()

        def broken(json_root: Any) -> tuple[int, Any, str]:
            return -1, "", "Error: Permission denied"

        ctx.json_cmd = broken  # type: ignore[method-assign]
        e = self.assertRaises(NftError, Nftables(ctx).read_service_maps)
        self.assertIn("Permission denied", str(e))
        self.assertIn('"list"', str(e))


class WriteMapTests(TestCase):
    """write_service_map creates, keeps or refills the map."""

    def test_creates_missing(self) -> None:
        """A missing map is created with its elements in one text transaction."""
        ctx = FakeContext()
        self.assertTrue(Nftables(ctx).write_service_map("br0", SMAP))
        self.assertEqual(ctx.texts, [nft.create_map_text("br0", SMAP)])
        self.assertEqual(ctx.batches, [])

    def test_unchanged(self) -> None:
        """A map already holding the elements is left alone: nothing is sent."""
        ctx = FakeContext()
        ctx.tables["ip"] = [ep_map("ep_br0", nft._elements(SMAP))]
        self.assertFalse(Nftables(ctx).write_service_map("br0", SMAP))
        self.assertEqual((ctx.batches, ctx.texts), ([], []))

    def test_refills(self) -> None:
        """A map with other elements is flushed and refilled in one batch."""
        ctx = FakeContext()
        ctx.tables["ip"] = [ep_map("ep_br0", [[1, {"concat": ["10.0.0.9", 9]}]])]
        self.assertTrue(Nftables(ctx).write_service_map("br0", SMAP))
        self.assertEqual(ctx.batches, [nft.refill_map_batch("br0", SMAP)])

    def test_wrong_type(self) -> None:
        """A map of another type, or a set of that name, is an error and nothing is sent."""
        ctx = FakeContext()
        ctx.tables["ip"] = [ep_map("ep_br0", [], data="ipv4_addr")]
        self.assertRaises(NftError, Nftables(ctx).write_service_map, "br0", SMAP)
        ctx.tables["ip"] = [{"set": {"name": "ep_br0", "type": "inet_service"}}]
        self.assertRaises(NftError, Nftables(ctx).write_service_map, "br0", SMAP)
        self.assertEqual((ctx.batches, ctx.texts), ([], []))

    def test_failure_carries_batch(self) -> None:
        """A refused change raises NftError with libnftables' message and what was sent."""
        ctx = FakeContext()
        ctx.fail_with = "Error: Could not process rule: No buffer space available\n\n"
        e = self.assertRaises(NftError, Nftables(ctx).write_service_map, "br0", SMAP)
        self.assertIn("No buffer space available", str(e))
        self.assertIn("add map ip one_tproxy ep_br0", str(e))
        ctx.tables["ip"] = [ep_map("ep_br0", [])]
        e = self.assertRaises(NftError, Nftables(ctx).write_service_map, "br0", SMAP)
        self.assertEqual(e.batch, nft.refill_map_batch("br0", SMAP))


class ArpRuleTests(TestCase):
    """write_arp_rule: the meta ibrname path, the fallback decision, idempotence."""

    def test_ibrname_accepted(self) -> None:
        """On a kernel with bridge meta support only the ibrname batch is sent."""
        ctx = FakeContext(ibrname=True)
        logs = LogCapture(self)
        self.assertEqual(Nftables(ctx).write_arp_rule("br0"), (ArpRuleForm.IBRNAME, True))
        self.assertEqual(ctx.batches, [nft.arp_rule_batch("br0", ArpRuleForm.IBRNAME)])
        self.assertEqual(logs.at(LogLevel.info), [])

    def test_ibrname_kept(self) -> None:
        """A chain already holding exactly the ibrname rule is left alone."""
        ctx = FakeContext(ibrname=True)
        ctx.tables["bridge"] = [
            chain("ch_br0"),
            rule("ch_br0", nft.arp_rule_exprs("br0", ArpRuleForm.IBRNAME)),
        ]
        self.assertEqual(Nftables(ctx).write_arp_rule("br0"), (ArpRuleForm.IBRNAME, False))
        self.assertEqual(ctx.batches, [])

    def test_duplicated_rule_rewritten(self) -> None:
        """A chain with the rule twice is rewritten (flush + one rule)."""
        ctx = FakeContext(ibrname=True)
        expr = nft.arp_rule_exprs("br0", ArpRuleForm.IBRNAME)
        ctx.tables["bridge"] = [chain("ch_br0"), rule("ch_br0", expr), rule("ch_br0", expr)]
        self.assertEqual(Nftables(ctx).write_arp_rule("br0"), (ArpRuleForm.IBRNAME, True))
        self.assertEqual(len(ctx.batches), 1)

    def test_fallback(self) -> None:
        """'Operation not supported' leads to the fallback batch, logged once per edge."""
        ctx = FakeContext(ibrname=False)
        logs = LogCapture(self)
        edge = Nftables(ctx)
        self.assertEqual(edge.write_arp_rule("br0"), (ArpRuleForm.FALLBACK, True))
        self.assertEqual(
            ctx.batches,
            [
                nft.arp_rule_batch("br0", ArpRuleForm.IBRNAME),
                nft.arp_rule_batch("br0", ArpRuleForm.FALLBACK),
            ],
        )
        self.assertEqual(edge.write_arp_rule("br1"), (ArpRuleForm.FALLBACK, True))
        # The second bridge skips the probe: the kernel's answer is remembered.
        self.assertEqual(ctx.batches[2:], [nft.arp_rule_batch("br1", ArpRuleForm.FALLBACK)])
        self.assertEqual(len(logs.at(LogLevel.info)), 1)

    def test_fallback_kept(self) -> None:
        """The fallback rule with BRb in the set is left alone; without BRb it is rewritten."""
        ctx = FakeContext(ibrname=False)
        ctx.tables["bridge"] = [
            veth_set("br0b"),
            chain("ch_br0"),
            rule("ch_br0", nft.arp_rule_exprs("br0", ArpRuleForm.FALLBACK)),
        ]
        self.assertEqual(Nftables(ctx).write_arp_rule("br0"), (ArpRuleForm.FALLBACK, False))
        self.assertEqual(ctx.batches, [])
        ctx.tables["bridge"][0] = veth_set("br1b", "br2b")
        self.assertEqual(Nftables(ctx).write_arp_rule("br0"), (ArpRuleForm.FALLBACK, True))

    def test_other_refusal_raises(self) -> None:
        """A refusal other than 'not supported' raises, without trying the fallback."""
        ctx = FakeContext(ibrname=True)
        ctx.fail_with = "Error: Could not process rule: Device or resource busy"
        e = self.assertRaises(NftError, Nftables(ctx).write_arp_rule, "br0")
        self.assertIn("busy", str(e))
        self.assertEqual(len(ctx.batches), 1)


class RemoveTests(TestCase):
    """remove_bridge deletes only what exists and drops tables left empty."""

    def test_clean_host(self) -> None:
        """Nothing present: nothing sent, False."""
        ctx = FakeContext()
        self.assertFalse(Nftables(ctx).remove_bridge("br0"))
        self.assertEqual(ctx.batches, [])

    def test_last_bridge(self) -> None:
        """The last bridge's removal also deletes both tables, in one batch."""
        ctx = FakeContext()
        ctx.tables["ip"] = [ep_map("ep_br0", [])]
        ctx.tables["bridge"] = [veth_set("br0b"), chain("ch_br0"), chain("guard_br0")]
        self.assertTrue(Nftables(ctx).remove_bridge("br0"))
        ip_ref = {"family": "ip", "table": "one_tproxy", "name": "ep_br0"}
        self.assertEqual(
            ctx.batches,
            [
                {
                    "nftables": [
                        {"delete": {"map": ip_ref}},
                        {"delete": {"table": {"family": "ip", "name": "one_tproxy"}}},
                        {
                            "delete": {
                                "chain": {
                                    "family": "bridge",
                                    "table": "one_tproxy",
                                    "name": "ch_br0",
                                }
                            }
                        },
                        {
                            "delete": {
                                "chain": {
                                    "family": "bridge",
                                    "table": "one_tproxy",
                                    "name": "guard_br0",
                                }
                            }
                        },
                        {
                            "delete": {
                                "element": {
                                    "family": "bridge",
                                    "table": "one_tproxy",
                                    "name": "tproxy_veths",
                                    "elem": ["br0b"],
                                }
                            }
                        },
                        {"delete": {"table": {"family": "bridge", "name": "one_tproxy"}}},
                    ]
                }
            ],
        )

    def test_other_bridges_stay(self) -> None:
        """With another bridge present the tables and the other members stay."""
        ctx = FakeContext()
        ctx.tables["ip"] = [ep_map("ep_br0", []), ep_map("ep_br1", [])]
        ctx.tables["bridge"] = [veth_set("br0b", "br1b"), chain("ch_br0"), chain("ch_br1")]
        self.assertTrue(Nftables(ctx).remove_bridge("br0"))
        sent = json.dumps(ctx.batches)
        self.assertNotIn('"table": {"family"', sent)
        self.assertNotIn("br1", sent)

    def test_foreign_objects_keep_table(self) -> None:
        """A table holding something else is not deleted, nor one that was found empty."""
        ctx = FakeContext()
        ctx.tables["ip"] = []
        ctx.tables["bridge"] = [{"set": {"name": "theirs", "type": "ifname"}}, chain("ch_br0")]
        self.assertTrue(Nftables(ctx).remove_bridge("br0"))
        self.assertNotIn('"delete": {"table"', json.dumps(ctx.batches))
        self.assertIn("ch_br0", json.dumps(ctx.batches))
        ctx2 = FakeContext()
        ctx2.tables["ip"] = []
        ctx2.tables["bridge"] = [veth_set()]
        self.assertFalse(Nftables(ctx2).remove_bridge("br0"))
        self.assertEqual(ctx2.batches, [])


def guard_chain(name: str, hook: str = "prerouting") -> Any:
    """A guard chain object as listed (with its hook)."""
    return {
        "chain": {
            "family": "bridge",
            "table": "one_tproxy",
            "name": name,
            "type": "filter",
            "hook": hook,
            "prio": -200,
            "policy": "accept",
        }
    }


MAC = "02:aa:bb:cc:dd:ee"


class GuardTests(TestCase):
    """write_guard: chain guard_BR drops ARP claiming 169.254.16.9, and frames with BRa's MAC,
    from any port but BRb."""

    def test_rule_forms(self) -> None:
        """Both ARP forms match by sender address; only the ibrname form names the bridge."""
        ibr = nft.guard_rule_exprs("br0", ArpRuleForm.IBRNAME)
        fb = nft.guard_rule_exprs("br0", ArpRuleForm.FALLBACK)
        sender = {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "arp", "field": "saddr ip"}},
                "right": "169.254.16.9",
            }
        }
        self.assertEqual(ibr[0]["match"]["right"], "br0")
        self.assertEqual(ibr[1]["match"]["left"], {"meta": {"key": "iifname"}})
        self.assertEqual(ibr[1]["match"]["right"], "br0b")
        self.assertEqual(fb[0]["match"]["right"], "@tproxy_veths")
        self.assertEqual(fb[0]["match"]["op"], "!=")
        for exprs in (ibr, fb):
            self.assertEqual(exprs[-2:], [sender, {"drop": None}])
        self.assertNotIn("operation", json.dumps(fb))  # Replies, requests, announcements.

    def test_mac_rule(self) -> None:
        """The MAC rule names BRb and BRa's MAC (lower case) and needs no bridge meta."""
        exprs = nft.guard_mac_exprs("br0", MAC.upper())
        self.assertEqual(exprs[0]["match"]["right"], "br0b")
        self.assertEqual(
            exprs[1]["match"]["left"], {"payload": {"protocol": "ether", "field": "saddr"}}
        )
        self.assertEqual(exprs[1]["match"]["right"], MAC)
        self.assertNotIn("ibrname", json.dumps(exprs))
        self.assertEqual(len(nft.guard_rules("br0", ArpRuleForm.FALLBACK, MAC)), 2)
        self.assertEqual(len(nft.guard_rules("br0", ArpRuleForm.FALLBACK)), 1)

    def test_written_on_prerouting_hook(self) -> None:
        """A missing guard is written: chain on prerouting (before forwarding, local delivery
        and address learning), flushed, the ARP rule then the MAC rule."""
        ctx = FakeContext(ibrname=False)
        ctx.tables["bridge"] = [veth_set("br0b")]
        self.assertTrue(Nftables(ctx).write_guard("br0", ArpRuleForm.FALLBACK, MAC))
        (batch,) = ctx.batches
        self.assertEqual(batch, nft.guard_batch("br0", ArpRuleForm.FALLBACK, MAC))
        cmds = batch["nftables"]
        (chain_cmd,) = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
        self.assertEqual(
            (chain_cmd["name"], chain_cmd["hook"], chain_cmd["prio"], chain_cmd["policy"]),
            ("guard_br0", "prerouting", -200, "accept"),
        )
        ref = {"family": "bridge", "table": "one_tproxy", "name": "guard_br0"}
        self.assertIn({"flush": {"chain": ref}}, cmds)
        rules = [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})]
        self.assertEqual(
            rules,
            [nft.guard_rule_exprs("br0", ArpRuleForm.FALLBACK), nft.guard_mac_exprs("br0", MAC)],
        )

    def test_kept_when_present(self) -> None:
        """Exactly the rules (and BRb in the set for the fallback): nothing is sent."""
        for form, objects in [
            (ArpRuleForm.IBRNAME, []),
            (ArpRuleForm.FALLBACK, [veth_set("br0b")]),
        ]:
            ctx = FakeContext(ibrname=form is ArpRuleForm.IBRNAME)
            ctx.tables["bridge"] = [
                *objects,
                guard_chain("guard_br0"),
                rule("guard_br0", nft.guard_rule_exprs("br0", form)),
                rule("guard_br0", nft.guard_mac_exprs("br0", MAC)),
            ]
            self.assertFalse(Nftables(ctx).write_guard("br0", form, MAC))
            self.assertEqual(ctx.batches, [])

    def test_rewritten_when_wrong(self) -> None:
        """Another rule, a doubled rule, BRb missing from the set, the old forward hook, or
        a changed MAC: rewritten."""
        fb = nft.guard_rule_exprs("br0", ArpRuleForm.FALLBACK)
        mac = nft.guard_mac_exprs("br0", MAC)
        g = guard_chain("guard_br0")
        for objects, want_mac in [
            ([veth_set("br0b"), g, rule("guard_br0", fb), rule("guard_br0", fb)], None),
            ([veth_set("br0b"), g, rule("guard_br0", fb[1:])], None),
            ([veth_set("br1b"), g, rule("guard_br0", fb)], None),
            ([veth_set("br0b"), guard_chain("guard_br0", "forward"), rule("guard_br0", fb)], None),
            (
                [veth_set("br0b"), g, rule("guard_br0", fb), rule("guard_br0", mac)],
                "02:00:00:00:00:01",
            ),
            ([veth_set("br0b"), g, rule("guard_br0", fb)], MAC),
        ]:
            ctx = FakeContext(ibrname=False)
            ctx.tables["bridge"] = objects
            self.assertTrue(Nftables(ctx).write_guard("br0", ArpRuleForm.FALLBACK, want_mac))
            self.assertEqual(ctx.batches, [nft.guard_batch("br0", ArpRuleForm.FALLBACK, want_mac)])

    def test_refusal_raises_with_batch(self) -> None:
        """A refused guard batch raises NftError carrying the batch."""
        ctx = FakeContext()
        ctx.fail_with = "Error: Could not process rule: No buffer space available"
        e = self.assertRaises(NftError, Nftables(ctx).write_guard, "br0", ArpRuleForm.IBRNAME)
        self.assertEqual(e.batch, nft.guard_batch("br0", ArpRuleForm.IBRNAME))
