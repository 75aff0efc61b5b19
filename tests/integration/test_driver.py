"""``one-tproxy up/down`` against the real kernel, each hypervisor in its own test netns.

The commands run as the product runs (``python -m tproxy``, entered with
``nsenter --net``) with ``--state-only``: these tests check the host state of
DESIGN.md 2.2; starting the mesh is the end-to-end tests' business.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from typing import Any

from twisted.trial.unittest import TestCase

from tests.integration import _tqd
from tests.integration.topology import Host, netns_names, require_root, run, wait_until
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
    """A test hypervisor (shared topology fixture, prefix ``tqd``) with its config file."""

    def setUp(self) -> None:
        require_root()
        self.host = self.make_host()
        self.host.write_config(CONFIG)

    def make_host(self) -> Host:
        """A new test hypervisor, removed with everything in it after the test."""
        return Host(self, prefix=_tqd.PREFIX)

    def bridge(self, host: Host | None = None) -> str:
        """A bridge with one guest on it (so it has carrier, as with real guests)."""
        host = host or self.host
        br = host.add_bridge()
        host.add_guest(br)
        return br

    def up(self, br: str, *args: str, host: Host | None = None) -> None:
        """one-tproxy up --state-only, which must succeed."""
        done = (host or self.host).tproxy("up", br, *args, "--state-only")
        self.assertEqual(done.returncode, 0, done.stderr)

    def down(self, br: str, host: Host | None = None) -> None:
        """one-tproxy down --state-only, which must succeed."""
        done = (host or self.host).tproxy("down", br, "--state-only")
        self.assertEqual(done.returncode, 0, done.stderr)

    def listings(self, brs: list[str], host: Host | None = None) -> dict[str, Any]:
        """Every listing the state shows in (nft handles included)."""
        host = host or self.host
        inners = {namespace_name(b) for b in brs}
        result: dict[str, Any] = {
            "nft": _tqd.nft_ruleset_raw(host),
            "links": _tqd.links(host),
            "netns": sorted(set(netns_names()) & inners),
        }
        for br in brs:
            inner = host.inner(br)
            if os.path.ismount(inner.path):  # a namespace, not a stale file
                result[inner.name] = (_tqd.links(inner), inner.ip_json("route"))
        return result

    def assert_up_state(self, br: str, elems: list[Any], host: Host | None = None) -> None:
        """The state of DESIGN.md 2.2 for ``br``, field by field."""
        host = host or self.host
        inner = host.inner(br)
        self.assertIn(inner.name, netns_names())
        # BRb: a veth, port of BR, up.
        (b,) = host.ip_json("-d", "link", "show", br + "b")
        self.assertEqual(b["linkinfo"]["info_kind"], "veth")
        self.assertEqual(b["master"], br)
        self.assertIn("UP", b["flags"])
        # BRa inside the namespace: up, 169.254.16.9/32, default dev BRa scope link.
        addrs = inner.ip_json("address")
        (a,) = [link for link in addrs if link["ifname"] == br + "a"]
        self.assertIn("UP", a["flags"])
        self.assertEqual(
            [(i["local"], i["prefixlen"]) for i in a["addr_info"] if i["family"] == "inet"],
            [("169.254.16.9", 32)],
        )
        self.assertEqual([link["ifname"] for link in addrs], ["lo", br + "a"])
        self.assertEqual(
            inner.ip_json("route"),
            [{"dst": "default", "dev": br + "a", "scope": "link", "flags": []}],
        )
        for key in ("net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.default.arp_ignore"):
            self.assertEqual(inner.sysctl(key), "0", key)
        # nftables: map ep_BR and chain ch_BR with its one rule.
        ruleset = _tqd.nft_ruleset(host)
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
        text = host.nft("list", "chain", "bridge", "one_tproxy", "ch_" + br).stdout
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

    def assert_gone(self, br: str, host: Host | None = None) -> None:
        """No trace of ``br``'s tproxy state."""
        host = host or self.host
        self.assertNotIn(namespace_name(br), netns_names())
        names = [link["ifname"] for link in host.ip_json("link")]
        self.assertNotIn(br + "a", names)
        self.assertNotIn(br + "b", names)
        dump = json.dumps(_tqd.nft_ruleset(host))
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
        self.host.write_config(
            ":tproxy:\n- :service_port: 8080\n  :remote_addr: 127.0.0.1\n  :remote_port: 80\n"
        )
        self.up(br, "--network-id", "7")
        self.assert_up_state(br, [[8080, {"concat": ["127.0.0.1", 80]}]])
        self.assertEqual(self.listings([br])[namespace_name(br)], links)

    def test_nothing_applies(self) -> None:
        """With no applicable endpoint up changes nothing and exits 0."""
        br = self.bridge()
        self.host.write_config(":tproxy: []\n")
        before = self.listings([br])
        self.up(br, "--network", "vnet1")
        self.assertEqual(self.listings([br]), before)

    def test_arp_ignore_set_in_existing_namespace(self) -> None:
        """A namespace found with arp_ignore=2 gets 0 (all and default) before BRa moves in."""
        br = self.bridge()
        inner = self.host.inner(br)
        run(["ip", "netns", "add", inner.name], check=True)
        for key in ("all", "default"):
            inner.run(["sysctl", "-qw", f"net.ipv4.conf.{key}.arp_ignore=2"], check=True)
        self.up(br)
        self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])
        self.assertEqual(inner.sysctl(f"net.ipv4.conf.{br}a.arp_ignore"), "0")

    def test_errors_change_nothing(self) -> None:
        """Missing bridge, long name and an unfixable BRb are clear errors changing nothing."""
        br = self.bridge()
        self.host.ip("link", "add", br + "b", "type", "bridge")  # BRb, but not a veth
        before = self.listings([br])
        cases = [
            ("tqdnosuch", "bridge tqdnosuch does not exist"),
            ("tqd456789012345", "must have 1 to 14 characters"),
            (br, f"{br}b exists but is not a veth"),
        ]
        for name, message in cases:
            done = self.host.tproxy("up", name, "--state-only")
            self.assertEqual(done.returncode, 1, name)
            self.assertIn(message, done.stderr)
        self.assertEqual(self.listings([br]), before)

    def test_stale_namespace_file(self) -> None:
        """A stale, unmounted namespace file (left by a crash) is replaced by a namespace."""
        br = self.bridge()
        with open(self.host.inner(br).path, "w"):
            pass
        self.up(br)
        self.assertTrue(os.path.ismount(self.host.inner(br).path))
        self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])


class ConcurrencyTests(DriverTestCase):
    """Concurrent up/down for many bridges and for one bridge."""

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        """Start one-tproxy ARGV --state-only in the hypervisor (killed at cleanup)."""
        return self.host.spawn(
            self.host.tproxy_argv(*argv, "--state-only"),
            env=self.host.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def test_parallel_up_of_8_bridges(self) -> None:
        """Eight up commands at once, one per bridge, all succeed; so do eight downs."""
        brs = [self.host.add_bridge() for _ in range(8)]
        procs = [self.spawn("up", br) for br in brs]
        for br, proc in zip(brs, procs, strict=True):
            _out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, f"{br}: {err!r}")
        for br in brs:
            self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])
        procs = [self.spawn("down", br) for br in brs]
        for br, proc in zip(brs, procs, strict=True):
            _out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, f"{br}: {err!r}")
        for br in brs:
            self.assert_gone(br)
        self.assertEqual(_tqd.nft_ruleset(self.host), [])

    def test_up_down_race(self) -> None:
        """up and down racing on one bridge end either fully up or fully gone."""
        br = self.bridge()
        for _round in range(2):
            procs = [self.spawn(cmd, br) for cmd in ("up", "down", "up", "down")]
            for proc in procs:
                _out, err = proc.communicate(timeout=60)
                self.assertEqual(proc.returncode, 0, err)
            if self.host.inner(br).exists():
                self.assert_up_state(br, [[5030, {"concat": ["10.11.12.13", 5030]}]])
            else:
                self.assert_gone(br)
        self.down(br)
        self.assert_gone(br)


class ArpTests(DriverTestCase):
    """The ARP rule keeps a guest's ARP for 169.254.16.9 on its own hypervisor."""

    def test_trunked_bridges(self) -> None:
        """A guest's ARP request is answered by its own hypervisor and never crosses the trunk."""
        hv1, hv2 = self.host, self.make_host()
        br1, br2 = hv1.add_bridge(), hv2.add_bridge()
        trunk1 = hv1.trunk(br1, hv2, br2)
        (trunk2,) = [
            link["ifname"]
            for link in hv2.ip_json("link")
            if link.get("master") == br2 and link["ifname"] != trunk1
        ]
        guest = hv1.add_guest(br1)
        hv2.write_config(CONFIG)
        self.up(br1, host=hv1)
        self.up(br2, host=hv2)
        # Count ARP requests for 169.254.16.9 arriving at hv2 through the trunk
        # (and, as a control, entering hv1's bridge from the guest).
        count = (
            "add table bridge tqdcount\n"
            "add chain bridge tqdcount c {{ type filter hook prerouting priority -300; }}\n"
            "add rule bridge tqdcount c iifname {port} "
            "arp operation request arp daddr ip 169.254.16.9 counter\n"
        )
        hv2.nft("-f", "-", input=count.format(port=trunk2))
        hv1.nft("-f", "-", input=count.format(port=guest.port))
        outcome = _tqd.in_netns(guest.name, _knock)
        neigh = guest.ip_json("neigh", "show", "169.254.16.9")
        (bra,) = hv1.inner(br1).ip_json("link", "show", br1 + "a")
        self.assertEqual([n.get("lladdr") for n in neigh], [bra["address"]], outcome)
        self.assertGreater(_counted(hv1), 0)
        self.assertEqual(_counted(hv2), 0)
        # Without hv1's rule the request crosses: the control that the trunk carries it.
        self.down(br1, host=hv1)
        guest.ip("neigh", "flush", "dev", "eth0")
        wait_until(
            lambda: _tqd.in_netns(guest.name, _knock) and _counted(hv2) > 0,
            timeout=10,
            message="an ARP request crossing the trunk once the rule is gone",
        )


def _knock() -> str:
    """Open a TCP connection to 169.254.16.9 (which makes the guest ARP for it); the outcome."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(("169.254.16.9", 9))
        except OSError as e:
            return f"connect: {e}"
    return "connect: connected"


def _counted(host: Host) -> int:
    """Packets counted by the tqdcount rule of a hypervisor."""
    for rule in _tqd.nft_objects(_tqd.nft_ruleset(host), "rule"):
        if rule["table"] == "tqdcount":
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError("no tqdcount counter")
