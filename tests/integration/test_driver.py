"""``one-tproxy up/down`` against the real kernel, each hypervisor in its own test netns.

The commands run as the product runs (``python -m tproxy``, entered with
``nsenter --net``) with ``--state-only``: these tests check the host state of
DESIGN.md 2.2; starting the mesh is the end-to-end tests' business.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from twisted.trial.unittest import TestCase

from tests.integration import _tqd
from tproxy.model import namespace_name

CONFIG = """\
:tproxy_debug_level: 2
:tproxy:
- :service_port: 5030
  :remote_addr: 10.11.12.13
  :remote_port: 5030
- :service_port: 1234
  :remote_addr: 10.11.12.34
  :remote_port: 1234
  :networks: [vnet1]
"""


class DriverTestCase(TestCase):
    """A test hypervisor namespace, a config file and a run dir for each test."""

    def setUp(self) -> None:
        _tqd.require_root_netns()
        self.hv = _tqd.add_netns(self, _tqd.unique_name("h"))
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "OpenNebulaNetwork.conf")
        self.write_config(CONFIG)

    def write_config(self, text: str) -> None:
        """Replace the configuration file."""
        with open(self.config, "w") as f:
            f.write(text)

    def bridge(self, tag: str = "b") -> str:
        """A bridge in the hypervisor; its tproxy namespace is removed at cleanup."""
        name = _tqd.unique_name(tag)
        self.addCleanup(_tqd.del_netns, namespace_name(name))
        return _tqd.add_bridge(self.hv, name, port=True)

    def tproxy(self, *args: str, hv: str | None = None) -> Any:
        """Run one-tproxy ARGS --state-only inside the hypervisor."""
        return _tqd.tproxy(
            hv or self.hv, *args, "--state-only", config=self.config, run_dir=self.dir
        )

    def up(self, br: str, *args: str, hv: str | None = None) -> None:
        """one-tproxy up, which must succeed."""
        proc = self.tproxy("up", br, *args, hv=hv)
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def down(self, br: str, hv: str | None = None) -> None:
        """one-tproxy down, which must succeed."""
        proc = self.tproxy("down", br, hv=hv)
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def listings(self, brs: list[str], hv: str | None = None) -> dict[str, Any]:
        """Every listing the state shows in (handles and all)."""
        hv = hv or self.hv
        result: dict[str, Any] = {
            "nft": _tqd.nft_ruleset_raw(hv),
            "links": _links(hv),
            "netns": sorted(set(os.listdir(_tqd.NETNS_DIR)) & {namespace_name(b) for b in brs}),
        }
        for br in brs:
            ns = namespace_name(br)
            if os.path.exists(os.path.join(_tqd.NETNS_DIR, ns)):
                result[ns] = (_links(ns), _tqd.ip_json(ns, "route"))
        return result

    def assert_up_state(self, br: str, elems: list[Any], hv: str | None = None) -> None:
        """The state of DESIGN.md 2.2 for ``br``, field by field."""
        hv = hv or self.hv
        ns = namespace_name(br)
        self.assertIn(ns, os.listdir(_tqd.NETNS_DIR))
        # BRb: a veth, port of BR, up.
        (b,) = _tqd.ip_json(hv, "-d", "link", "show", br + "b")
        self.assertEqual(b["linkinfo"]["info_kind"], "veth")
        self.assertEqual(b["master"], br)
        self.assertIn("UP", b["flags"])
        # BRa inside the namespace: up, 169.254.16.9/32, default dev BRa scope link.
        addrs = _tqd.ip_json(ns, "address")
        (a,) = [link for link in addrs if link["ifname"] == br + "a"]
        self.assertIn("UP", a["flags"])
        self.assertEqual(
            [(i["local"], i["prefixlen"]) for i in a["addr_info"] if i["family"] == "inet"],
            [("169.254.16.9", 32)],
        )
        self.assertEqual([link["ifname"] for link in addrs], ["lo", br + "a"])
        self.assertEqual(
            _tqd.ip_json(ns, "route"),
            [{"dst": "default", "dev": br + "a", "scope": "link", "flags": []}],
        )
        for key in ("net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.default.arp_ignore"):
            self.assertEqual(_tqd.sysctl_in(ns, key), "0", key)
        # nftables: map ep_BR and chain ch_BR with its one rule.
        ruleset = _tqd.nft_ruleset(hv)
        maps = [m for m in _tqd.nft_objects(ruleset, "map") if m["name"] == "ep_" + br]
        self.assertEqual(
            maps,
            [
                {
                    "family": "ip",
                    "name": "ep_" + br,
                    "table": "one_tproxy",
                    "type": "inet_service",
                    "map": "ipv4_addr . inet_service",
                    "elem": elems,
                }
            ],
        )
        chains = [c for c in _tqd.nft_objects(ruleset, "chain") if c["name"] == "ch_" + br]
        self.assertEqual(
            chains,
            [
                {
                    "family": "bridge",
                    "table": "one_tproxy",
                    "name": "ch_" + br,
                    "type": "filter",
                    "hook": "forward",
                    "prio": -200,
                    "policy": "accept",
                }
            ],
        )
        rules = [r for r in _tqd.nft_objects(ruleset, "rule") if r["chain"] == "ch_" + br]
        self.assertEqual(len(rules), 1)
        text = _tqd.sh("nft", "list", "chain", "bridge", "one_tproxy", "ch_" + br, netns=hv)
        fallback = "oifname != @tproxy_veths arp operation request arp daddr ip 169.254.16.9 drop"
        ibrname = (
            f'meta ibrname "{br}" oifname != "{br}b" arp operation request '
            "arp daddr ip 169.254.16.9 drop"
        )
        self.assertTrue(fallback in text or ibrname in text, text)
        if fallback in text:
            (veths,) = [s for s in _tqd.nft_objects(ruleset, "set") if s["name"] == "tproxy_veths"]
            members = veths["elem"] if isinstance(veths["elem"], list) else [veths["elem"]]
            self.assertIn(br + "b", members)

    def assert_gone(self, br: str, hv: str | None = None) -> None:
        """No trace of ``br``'s tproxy state."""
        hv = hv or self.hv
        self.assertNotIn(namespace_name(br), os.listdir(_tqd.NETNS_DIR))
        names = [link["ifname"] for link in _tqd.ip_json(hv, "link")]
        self.assertNotIn(br + "a", names)
        self.assertNotIn(br + "b", names)
        dump = json.dumps(_tqd.nft_ruleset(hv))
        self.assertNotIn(f'"ep_{br}"', dump)
        self.assertNotIn(f'"ch_{br}"', dump)
        self.assertNotIn(f'"{br}b"', dump)


ELEMS_VNET1 = [
    [1234, {"concat": ["10.11.12.34", 1234]}],
    [5030, {"concat": ["10.11.12.13", 5030]}],
]


class UpDownTests(DriverTestCase):
    """up builds exactly the state of DESIGN.md 2.2; down removes it without a trace."""

    def test_up_down(self) -> None:
        """up gives the design's state; up again changes nothing; down restores every listing."""
        br = self.bridge()
        before = self.listings([br])
        self.up(br, "--network", "vnet1")
        self.assert_up_state(br, ELEMS_VNET1)
        after_up = self.listings([br])
        self.up(br, "--network", "vnet1")
        self.assertEqual(self.listings([br]), after_up)
        self.down(br)
        self.assert_gone(br)
        self.assertEqual(self.listings([br]), before)
        self.down(br)  # on a clean host: exit 0, nothing changes
        self.assertEqual(self.listings([br]), before)

    def test_config_change_replaces_elements(self) -> None:
        """After the config changes, up replaces the map's elements and touches no link."""
        br = self.bridge()
        self.up(br, "--network", "vnet1")
        links = self.listings([br])[namespace_name(br)]
        self.write_config(
            ":tproxy:\n- :service_port: 8080\n  :remote_addr: 127.0.0.1\n  :remote_port: 80\n"
        )
        self.up(br, "--network-id", "7")
        self.assert_up_state(br, [[8080, {"concat": ["127.0.0.1", 80]}]])
        self.assertEqual(self.listings([br])[namespace_name(br)], links)

    def test_nothing_applies(self) -> None:
        """With no applicable endpoint up changes nothing and exits 0."""
        br = self.bridge()
        self.write_config(":tproxy: []\n")
        before = self.listings([br])
        self.up(br, "--network", "vnet1")
        self.assertEqual(self.listings([br]), before)

    def test_arp_ignore_set_in_existing_namespace(self) -> None:
        """A namespace found with arp_ignore=2 gets 0 (all and default) before BRa moves in."""
        br = self.bridge()
        ns = namespace_name(br)
        _tqd.sh("ip", "netns", "add", ns)
        for key in ("all", "default"):
            _tqd.sh("sysctl", "-qw", f"net.ipv4.conf.{key}.arp_ignore=2", netns=ns)
        self.up(br)
        self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])
        self.assertEqual(_tqd.sysctl_in(ns, f"net.ipv4.conf.{br}a.arp_ignore"), "0")

    def test_errors_change_nothing(self) -> None:
        """Missing bridge, long name and an unfixable BRb are clear errors changing nothing."""
        br = self.bridge()
        _tqd.add_bridge(self.hv, br + "b")  # BRb exists, but is not a veth
        before = self.listings([br])
        cases = [
            ("tqdnosuch", "bridge tqdnosuch does not exist"),
            ("tqd456789012345", "must have 1 to 14 characters"),
            (br, f"{br}b exists but is not a veth"),
        ]
        for name, message in cases:
            proc = self.tproxy("up", name)
            self.assertEqual(proc.returncode, 1, name)
            self.assertIn(message, proc.stderr)
        self.assertEqual(self.listings([br]), before)


class ConcurrencyTests(DriverTestCase):
    """Concurrent up/down for many bridges and for one bridge."""

    def test_parallel_up_of_8_bridges(self) -> None:
        """Eight up commands at once, one per bridge, all succeed with complete state."""
        brs = [self.bridge(f"p{i}") for i in range(8)]
        procs = [
            _tqd.tproxy_async(
                self.hv, "up", br, "--state-only", config=self.config, run_dir=self.dir
            )
            for br in brs
        ]
        for proc in procs:
            self.addCleanup(_kill, proc)
        for br, proc in zip(brs, procs, strict=True):
            _out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, f"{br}: {err}")
        for br in brs:
            self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])
        for br in brs:
            self.down(br)
        self.assertEqual(_tqd.nft_ruleset(self.hv), [])

    def test_up_down_race(self) -> None:
        """up and down racing on one bridge end either fully up or fully gone."""
        br = self.bridge()
        for _round in range(3):
            procs = [
                _tqd.tproxy_async(
                    self.hv, cmd, br, "--state-only", config=self.config, run_dir=self.dir
                )
                for cmd in ("up", "down", "up", "down")
            ]
            for proc in procs:
                self.addCleanup(_kill, proc)
            for proc in procs:
                _out, err = proc.communicate(timeout=60)
                self.assertEqual(proc.returncode, 0, err)
            if os.path.exists(os.path.join(_tqd.NETNS_DIR, namespace_name(br))):
                self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])
            else:
                self.assert_gone(br)
        self.down(br)
        self.assert_gone(br)


def _links(netns: str) -> list[dict[str, Any]]:
    """Links with their IPv4 addresses, without what changes by itself (timers, DAD, stats)."""
    keep = ("ifindex", "ifname", "flags", "mtu", "master", "link_type", "address", "link_index")
    result = []
    for link in _tqd.ip_json(netns, "-d", "address"):
        item = {k: link.get(k) for k in keep}
        item["kind"] = link.get("linkinfo", {}).get("info_kind")
        item["inet"] = [
            (i["local"], i["prefixlen"], i.get("scope"))
            for i in link.get("addr_info", [])
            if i.get("family") == "inet"
        ]
        result.append(item)
    return result


def _kill(proc: Any) -> None:
    """Kill a command we started if it still runs (by its PID)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class ArpTests(DriverTestCase):
    """The ARP rule keeps a guest's ARP for 169.254.16.9 on its own hypervisor."""

    def test_trunked_bridges(self) -> None:
        """A guest's ARP request is answered by its own hypervisor and never crosses the trunk."""
        hv1, hv2 = self.hv, _tqd.add_netns(self, _tqd.unique_name("h"))
        br1, br2 = self.bridge("t"), _tqd.unique_name("t")
        self.addCleanup(_tqd.del_netns, namespace_name(br2))
        _tqd.add_bridge(hv2, br2)
        # The trunk: a veth from hv1's bridge to hv2's bridge.
        t1, t2 = _tqd.unique_name("k"), _tqd.unique_name("k")
        _tqd.sh("ip", "link", "add", t1, "type", "veth", "peer", "name", t2, netns=hv1)
        _tqd.sh("ip", "link", "set", t2, "netns", hv2, netns=hv1)
        for hv, br, t in ((hv1, br1, t1), (hv2, br2, t2)):
            _tqd.sh("ip", "link", "set", t, "master", br, "up", netns=hv)
        # The guest on hv1's bridge.
        guest = _tqd.add_netns(self, _tqd.unique_name("g"))
        g, gp = _tqd.unique_name("v"), _tqd.unique_name("v")
        _tqd.sh("ip", "link", "add", gp, "type", "veth", "peer", "name", g, netns=hv1)
        _tqd.sh("ip", "link", "set", g, "netns", guest, netns=hv1)
        _tqd.sh("ip", "link", "set", gp, "master", br1, "up", netns=hv1)
        _tqd.sh("ip", "address", "add", "169.254.1.1/16", "dev", g, netns=guest)
        _tqd.sh("ip", "link", "set", g, "up", netns=guest)
        # tproxy on both hypervisors.
        self.up(br1, hv=hv1)
        self.up(br2, hv=hv2)
        # Count ARP requests for 169.254.16.9 arriving at hv2 through the trunk
        # (and, as a control, leaving the guest into hv1's bridge).
        count = (
            "add table bridge tqdcount; "
            "add chain bridge tqdcount c {{ type filter hook prerouting priority -300; }}; "
            "add rule bridge tqdcount c iifname {port} "
            "arp operation request arp daddr ip 169.254.16.9 counter"
        )
        _tqd.sh("nft", count.format(port=t2), netns=hv2)
        _tqd.sh("nft", count.format(port=gp), netns=hv1)
        # Give the veths a moment to carry traffic (IPv6 DAD is irrelevant to ARP).
        proc = _tqd.in_netns(guest, _knock)
        neigh = _tqd.ip_json(guest, "neigh", "show", "169.254.16.9")
        (bra,) = _tqd.ip_json(namespace_name(br1), "link", "show", br1 + "a")
        self.assertEqual([n.get("lladdr") for n in neigh], [bra["address"]], proc)
        self.assertGreater(_counted(hv1), 0)
        self.assertEqual(_counted(hv2), 0)
        # Without the rule the request would cross: the control that the trunk works.
        self.down(br1, hv=hv1)
        _tqd.sh("ip", "neigh", "flush", "dev", g, netns=guest)
        deadline = time.monotonic() + 5
        while _counted(hv2) == 0 and time.monotonic() < deadline:
            _tqd.in_netns(guest, _knock)
        self.assertGreater(_counted(hv2), 0)


def _knock() -> str:
    """Open a TCP connection to 169.254.16.9 (which makes the guest ARP for it); the outcome."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(("169.254.16.9", 9))
        except OSError as e:
            return f"connect: {e}"
    return "connect: connected"


def _counted(hv: str) -> int:
    """Packets counted by the tqdcount rule of a hypervisor."""
    ruleset = _tqd.nft_ruleset(hv)
    for rule in _tqd.nft_objects(ruleset, "rule"):
        if rule["table"] == "tqdcount":
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError("no tqdcount counter")
