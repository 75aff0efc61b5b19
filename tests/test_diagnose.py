"""Tests for tproxy.diagnose with fake edges: each broken requirement is named by its own line."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from attrs import define, evolve, field
from twisted.trial import unittest

from tproxy.diagnose import (
    ConnectResult,
    Edges,
    Finding,
    describe_os_error,
    diagnose,
    parse_proc_net_tcp,
    proc_listeners,
    report,
    status_listen_errors,
    tcp_connect,
)
from tproxy.model import Destination

DEST = Destination("127.0.0.1", 8080)


@define
class FakeLink:
    index: int
    kind: str | None = "veth"
    up: bool = True
    master: int | None = None


@define
class FakeNet:
    """A healthy bridge br0 unless a test breaks something."""

    namespaces: set[str] = field(factory=lambda: {"one_tproxy_br0"})
    links: dict[tuple[str, str | None], FakeLink] = field(
        factory=lambda: {
            ("br0", None): FakeLink(3, "bridge"),
            ("br0b", None): FakeLink(7, master=3),
            ("br0a", "one_tproxy_br0"): FakeLink(2),
        }
    )
    addrs: list[tuple[str, int]] = field(factory=lambda: [("169.254.16.9", 32)])
    routes: list[tuple[int, int]] = field(factory=lambda: [(2, 253)])
    sysctl: str = "0\n"

    def namespace_exists(self, name: str) -> bool:
        return name in self.namespaces

    def link(self, name: str, netns: str | None = None) -> FakeLink | None:
        return self.links.get((name, netns))

    def addresses(self, name: str, netns: str | None = None) -> list[tuple[str, int]]:
        return self.addrs

    def default_routes(self, netns: str | None = None) -> list[tuple[int, int]]:
        return self.routes

    def get_sysctl(self, netns: str, key: str) -> str:
        return self.sysctl


@define
class FakeNft:
    maps: dict[str, dict[int, Destination]] = field(factory=lambda: {"br0": {5030: DEST}})
    form: str | None = "fallback"
    in_set: bool = True

    def read_service_maps(self) -> Mapping[str, Mapping[int, Destination]]:
        return self.maps

    def arp_rule_state(self, bridge: str) -> tuple[Any, bool]:
        return self.form, self.in_set


def edges(**kw: Any) -> Edges:
    base = Edges(
        net=FakeNet(),
        nft=FakeNft(),
        root_pid=lambda: 100,
        inner_pids=lambda: {"br0": (101,)},
        listeners=lambda pid: {("169.254.16.9", 5030)},
        connect=lambda dest, timeout: ConnectResult(True, 0.0012),
    )
    return evolve(base, **kw)


def failures(e: Edges, bridge: str | None = None) -> list[str]:
    return [f.line() for f in diagnose(e, bridge) if not f.ok]


class DiagnoseTests(unittest.TestCase):
    """The verdicts on a healthy bridge and on each broken variant."""

    def test_healthy(self) -> None:
        """Everything passes, one line per requirement, the connect time shown."""
        found = list(diagnose(edges()))
        self.assertTrue(all(f.ok for f in found), [f.line() for f in found])
        lines = [f.line() for f in found]
        self.assertEqual(len(lines), 10)
        self.assertIn(
            "br0 port 5030: \u2713 destination 127.0.0.1:8080: connected in 1.2 ms", lines
        )
        self.assertIn(
            "br0: \u2713 ARP rule in bridge one_tproxy chain ch_br0: fallback form", lines
        )

    def test_backend_stopped(self) -> None:
        """A refused connection names the destination and says refused."""
        e = edges(
            connect=lambda d, t: ConnectResult(False, 0.0, describe_os_error(errno.ECONNREFUSED))
        )
        self.assertEqual(
            failures(e),
            [
                "br0 port 5030: \u2717 destination 127.0.0.1:8080: "
                "connection refused (is the service running?)"
            ],
        )

    def test_listener_missing(self) -> None:
        """An inner proxy that does not listen on a mapped port is named."""
        e = edges(listeners=lambda pid: {("169.254.16.9", 80)})
        self.assertEqual(
            failures(e),
            [
                "br0 port 5030: \u2717 listening on 169.254.16.9:5030: "
                "the inner proxy does not listen on it"
            ],
        )

    def test_listener_bind_error(self) -> None:
        """A port the inner proxy cannot bind is named with the reason the root reports."""
        e = edges(
            listeners=lambda pid: set(),
            listen_errors=lambda br: {5030: "Address already in use"} if br == "br0" else {},
        )
        self.assertEqual(
            failures(e),
            [
                "br0 port 5030: \u2717 listening on 169.254.16.9:5030: "
                "the inner proxy does not listen on it "
                "(cannot bind: Address already in use; it keeps retrying)"
            ],
        )

    def test_status_listen_errors(self) -> None:
        """The bind errors of one bridge are read out of a status document."""
        doc = {
            "bridges": {
                "br0": {
                    "ports": {
                        "5030": {"listener": "not listening", "listen_error": "in use"},
                        "80": {"listener": "listening"},
                    }
                }
            }
        }
        self.assertEqual(status_listen_errors(doc, "br0"), {5030: "in use"})
        self.assertEqual(status_listen_errors(doc, "br1"), {})
        self.assertEqual(status_listen_errors({}, "br0"), {})

    def test_veth_down(self) -> None:
        """A veth that is down is named, both ends."""
        net = FakeNet()
        net.links[("br0b", None)].up = False
        self.assertEqual(
            failures(edges(net=net)), ["br0: \u2717 veth br0b on bridge br0: br0b is down"]
        )
        net = FakeNet()
        net.links[("br0a", "one_tproxy_br0")].up = False
        self.assertEqual(
            failures(edges(net=net)), ["br0: \u2717 veth br0a in one_tproxy_br0: br0a is down"]
        )

    def test_inner_not_running(self) -> None:
        """No inner proxy fails its line and every listener line of the bridge."""
        lines = failures(edges(inner_pids=lambda: {}))
        self.assertEqual(
            lines,
            [
                "br0: \u2717 inner proxy one_tproxy_br0: not running",
                "br0 port 5030: \u2717 listening on 169.254.16.9:5030: "
                "the inner proxy does not run",
            ],
        )

    def test_root_not_running(self) -> None:
        """A missing root proxy is the first line."""
        self.assertEqual(
            failures(edges(root_pid=lambda: None)),
            ["\u2717 root proxy one_tproxy: not running (one-tproxy start)"],
        )

    def test_namespace_missing(self) -> None:
        """Without the namespace the in-namespace checks say why they fail."""
        net = FakeNet(namespaces=set())
        lines = failures(edges(net=net))
        self.assertEqual(
            lines[0], "br0: \u2717 namespace one_tproxy_br0: missing (run one-tproxy up)"
        )
        self.assertIn(
            "br0: \u2717 route in one_tproxy_br0: namespace one_tproxy_br0 is missing", lines
        )

    def test_address_route_sysctl_arp(self) -> None:
        """Address, route, arp_ignore and ARP rule problems each have their own message."""
        net = FakeNet(addrs=[("10.0.0.1", 24)], routes=[], sysctl="1")
        nft = FakeNft(form=None)
        lines = failures(edges(net=net, nft=nft))
        self.assertEqual(
            lines,
            [
                "br0: \u2717 veth br0a in one_tproxy_br0: "
                "br0a lacks 169.254.16.9/32 (has 10.0.0.1/24)",
                "br0: \u2717 route default dev br0a scope link in one_tproxy_br0: no default route",
                "br0: \u2717 arp_ignore 0 in one_tproxy_br0: net.ipv4.conf.all.arp_ignore=1, "
                "net.ipv4.conf.default.arp_ignore=1",
                "br0: \u2717 ARP rule in bridge one_tproxy chain ch_br0: "
                "missing (or not exactly our one rule)",
            ],
        )
        lines = failures(edges(nft=FakeNft(in_set=False)))
        self.assertEqual(
            lines,
            [
                "br0: \u2717 ARP rule in bridge one_tproxy chain ch_br0: "
                "fallback rule, but br0b not in set tproxy_veths"
            ],
        )

    def test_unknown_bridge(self) -> None:
        """Asking for a bridge without a map says so."""
        lines = failures(edges(), "br9")
        self.assertEqual(
            lines[0], "br9: \u2717 map ep_br9 in table ip one_tproxy: missing (run one-tproxy up)"
        )

    def test_edge_failure_is_a_finding(self) -> None:
        """An edge that raises becomes a failed line, not a crash."""

        def broken(pid: int) -> set[tuple[str, int]]:
            raise PermissionError(13, "Permission denied")

        lines = failures(edges(listeners=broken))
        self.assertEqual(
            lines,
            [
                "br0 port 5030: \u2717 listening on 169.254.16.9:5030: "
                "cannot read its sockets: Permission denied"
            ],
        )

    def test_report(self) -> None:
        """report prints every line and tells whether all passed."""
        out: list[str] = []
        self.assertFalse(report([Finding(True, "a"), Finding(False, "b", "why")], out.append))
        self.assertEqual(out, ["\u2713 a", "\u2717 b: why"])
        self.assertTrue(report([Finding(True, "a")], out.append))


class EdgeHelperTests(unittest.TestCase):
    """The pure parts of the real edges."""

    def test_parse_proc_net_tcp(self) -> None:
        """LISTEN sockets are decoded (little-endian address, hex port); others skipped."""
        text = (
            "  sl  local_address rem_address   st tx_queue rx_queue\n"
            "   0: 0910FEA9:13A6 00000000:0000 0A 00000000:00000000 00:00000000\n"
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000\n"
            "   2: 0910FEA9:13A6 0403FEA9:A028 01 00000000:00000000 00:00000000\n"
            "garbage\n"
        )
        self.assertEqual(parse_proc_net_tcp(text), {("169.254.16.9", 5030), ("127.0.0.1", 8080)})

    def test_proc_listeners_own_sockets_only(self) -> None:
        """Only the listening sockets the process holds count, not others in its namespace."""
        mine = socket.socket()
        self.addCleanup(mine.close)
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        other = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys, time\n"
             "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
             "print(s.getsockname()[1], flush=True); time.sleep(30)\n"],
            stdout=subprocess.PIPE,
        )
        self.addCleanup(other.wait)
        self.addCleanup(other.kill)
        assert other.stdout is not None
        their_port = int(other.stdout.readline())
        found = proc_listeners(os.getpid())
        self.assertIn(("127.0.0.1", mine.getsockname()[1]), found)
        self.assertNotIn(("127.0.0.1", their_port), found)
        self.assertIn(("127.0.0.1", their_port), proc_listeners(other.pid))

    def test_describe(self) -> None:
        """Refused, no route and timed out have plain words."""
        self.assertIn("refused", describe_os_error(errno.ECONNREFUSED))
        self.assertEqual(describe_os_error(errno.EHOSTUNREACH), "no route to the destination")
        self.assertEqual(describe_os_error(errno.ENETUNREACH), "no route to the destination")
        self.assertEqual(describe_os_error(errno.ETIMEDOUT), "timed out")

    def test_tcp_connect_loopback(self) -> None:
        """A loopback listener connects; a closed port is refused."""
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        try:
            self.assertTrue(tcp_connect(Destination("127.0.0.1", port), 2.0).ok)
        finally:
            srv.close()
        result = tcp_connect(Destination("127.0.0.1", port), 2.0)
        self.assertFalse(result.ok)
        self.assertIn("refused", result.error)
