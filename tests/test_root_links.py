"""The root service with real RootLink/InnerLink pairs over in-memory transports.

Opens from a bridge's inner end reach the destinations of THAT bridge's map,
unknown ports are refused, a failed connect resets the guest, and a reload
changes the destination of new connections only.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial import unittest

from tests.test_root import FakeLauncher
from tproxy.config import Limits
from tproxy.link import InnerLink, RootLink
from tproxy.model import Destination
from tproxy.root import RootService

A = Destination("127.0.0.1", 8001)
B = Destination("127.0.0.1", 8002)
C = Destination("127.0.0.1", 8003)


@define
class Attempt:
    """One outbound connection the root tried."""

    bridge: str
    dest: Destination
    factory: IProtocolFactory
    result: Deferred[IProtocol] = field(factory=Deferred)
    transport: StringTransport | None = None

    def succeed(self) -> StringTransport:
        """The remote accepts: a connected protocol on a string transport."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", self.dest.addr, self.dest.port))
        assert proto is not None
        self.transport = StringTransport()
        proto.makeConnection(self.transport)
        self.result.callback(proto)
        return self.transport

    def refuse(self) -> None:
        """The remote refuses."""
        self.result.errback(ConnectionRefusedError())


@define
class RecordingEndpoint:
    """A client endpoint that records the attempt and lets the test decide."""

    bridge: str
    dest: Destination
    attempts: list[Attempt]

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = Attempt(self.bridge, self.dest, factory)
        self.attempts.append(attempt)
        return attempt.result


@define
class Settings:
    """Config stand-in with real Limits."""

    debug_level: int = 2
    limits: Limits = field(factory=Limits)


class Wired:
    """A RootService whose links are real, each paired in memory with a real InnerLink."""

    def __init__(self, maps: dict[str, dict[int, Destination]]) -> None:
        self.clock = Clock()
        self.maps = maps
        self.attempts: list[Attempt] = []
        self.inners: dict[str, InnerLink] = {}
        self.pumps: list[IOPump] = []
        self.configs: dict[str, list[frozenset[int]]] = {}
        self.root = RootService(
            self.clock,
            lambda: self.maps,
            Settings(),
            Settings,
            FakeLauncher(),
            self.make_link,
            self.adopt,
            lambda: None,
        )
        self.root.startService()
        self.flush()

    def make_link(self, bridge: str, lookup: Any, limits: Any) -> RootLink:
        return RootLink(
            self.clock,
            bridge,
            lookup,
            limits,
            endpoint_for=lambda dest: RecordingEndpoint(bridge, dest, self.attempts),
            ping_interval=None,
        )

    def adopt(self, fd: int, protocol: IProtocol) -> None:
        assert isinstance(protocol, RootLink)
        bridge = protocol.bridge
        self.configs[bridge] = []
        inner = InnerLink(
            self.clock, self.configs[bridge].append, Limits(), bridge=bridge, ping_interval=None
        )
        self.inners[bridge] = inner
        self.pumps.append(
            connect(protocol, FakeTransport(protocol, True), inner, FakeTransport(inner, False))
        )

    def flush(self) -> None:
        for _ in range(3):
            for pump in self.pumps:
                pump.flush()

    def guest(self, bridge: str, port: int) -> tuple[IProtocol, StringTransport]:
        """A guest connection accepted on ``port`` by the inner proxy of ``bridge``."""
        peer = IPv4Address("TCP", "169.254.1.2", 40000)
        proto = self.inners[bridge].guest_factory(port).buildProtocol(peer)
        assert proto is not None
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        self.flush()
        return proto, transport


class RootLinkTests(unittest.TestCase):
    """Opens through real links."""

    def test_config_pushed(self) -> None:
        """Each inner end receives its bridge's service ports."""
        w = Wired({"br0": {5030: A, 80: B}, "br1": {5030: C}})
        self.assertEqual(w.configs["br0"], [frozenset({80, 5030})])
        self.assertEqual(w.configs["br1"], [frozenset({5030})])

    def test_open_connects_and_relays(self) -> None:
        """An open reaches the mapped destination; bytes then flow both ways."""
        w = Wired({"br0": {5030: A}})
        guest, guest_t = w.guest("br0", 5030)
        self.assertEqual([(a.bridge, a.dest) for a in w.attempts], [("br0", A)])
        remote_t = w.attempts[0].succeed()
        w.flush()
        guest.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        w.flush()
        self.assertEqual(remote_t.value(), b"GET / HTTP/1.0\r\n\r\n")

    def test_same_port_two_bridges(self) -> None:
        """Two bridges mapping one port to different destinations each reach their own."""
        w = Wired({"br0": {5030: A}, "br1": {5030: B}})
        w.guest("br0", 5030)
        w.guest("br1", 5030)
        self.assertEqual(
            sorted((a.bridge, a.dest.port) for a in w.attempts), [("br0", 8001), ("br1", 8002)]
        )

    def test_unknown_port_refused(self) -> None:
        """An open for a port the bridge does not map is refused: the guest is reset."""
        w = Wired({"br0": {5030: A}})
        _, guest_t = w.guest("br0", 9999)
        self.assertEqual(w.attempts, [])
        self.assertTrue(guest_t.disconnected)

    def test_connect_failure_resets_guest(self) -> None:
        """A refused remote connection resets the guest's connection and is logged."""
        w = Wired({"br0": {5030: A}})
        _, guest_t = w.guest("br0", 5030)
        w.attempts[0].refuse()
        w.flush()
        self.assertTrue(guest_t.disconnected)

    def test_reload_changes_new_connections_only(self) -> None:
        """After a reload new opens go to the new destination; the open stream is untouched."""
        w = Wired({"br0": {5030: A}})
        guest, guest_t = w.guest("br0", 5030)
        first = w.attempts[0].succeed()
        w.flush()
        w.maps = {"br0": {5030: C}}
        w.root.reload()
        w.flush()
        w.guest("br0", 5030)
        self.assertEqual([a.dest for a in w.attempts], [A, C])
        guest.dataReceived(b"still here")
        w.flush()
        self.assertEqual(first.value(), b"still here")
        self.assertFalse(guest_t.disconnected)
