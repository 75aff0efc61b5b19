"""A compromised inner proxy against a real RootLink: forged opens, smuggled addresses, floods.

The forged inner is a bare ``Connection(Role.INNER)`` (or hand-made bytes) on a
fake UNIX transport; the root is the real ``RootLink`` on a ``MemoryReactorClock``,
with the default endpoint, so every connect attempt it makes shows up in
``reactor.tcpClients``.  What a compromised inner may get is exactly what its
bridge's map names, and nothing it sends can make the root's memory or log grow
without bound.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.trial import unittest

from tests.fake_transport import FakeTransport
from tests.logcapture import Captured
from tests.test_link import Harness
from tproxy.config import Limits
from tproxy.link import REFUSAL_LOG_BURST, RootLink
from tproxy.model import Destination
from tproxy.protocol import frames as fr
from tproxy.protocol.connection import Connection, Role
from tproxy.protocol.events import StreamAccepted, StreamRefused
from tproxy.protocol.frames import FrameType, Reason

DEST = Destination("10.11.12.13", 5030)
OTHER = Destination("10.11.12.34", 1234)

#: Twisted's FileDescriptor.bufferSize: where a real transport pauses its producer.
UNIX_BUFFER = 65536
#: What one read from a UNIX socket hands dataReceived at most.
READ_SIZE = 65536


class Forged:
    """A RootLink for bridge ``br0`` whose peer is a forged inner (raw bytes we write)."""

    def __init__(
        self,
        services: dict[int, Destination] | None = None,
        limit: int | None = None,
        ping_interval: float | None = None,
        bridge: str = "br0",
        reactor: MemoryReactorClock | None = None,
    ) -> None:
        self.reactor = reactor or MemoryReactorClock()
        self.services = {5030: DEST} if services is None else services
        self.root = RootLink(
            self.reactor,
            bridge,
            self.services.get,
            Limits(),
            ping_interval=ping_interval,
        )
        self.rt = FakeTransport(self.root, limit=limit)
        self.root.makeConnection(self.rt)
        self.inner = Connection(Role.INNER)
        self.inner.receive_data(self.rt.take())
        self.closed: list[None] = []
        self.root.closed.addCallback(self.closed.append)
        self.send(b"".join(self.inner.data_to_send()))

    def send(self, data: bytes) -> None:
        """The forged inner writes ``data``; the root reads it (as long as it reads at all)."""
        if not self.rt.lost and not self.rt.disconnecting:
            self.root.dataReceived(data)

    def open_raw(self, sid: int, payload: bytes, ftype: int = FrameType.OPEN) -> None:
        """A hand-made OPEN (or other frame) on stream ``sid``."""
        self.send(fr.header(ftype, sid, len(payload)) + payload)

    def answers(self) -> list[object]:
        """What the root sent back, decoded by the forged inner's own connection."""
        return list(self.inner.receive_data(self.rt.take()))

    def connects(self) -> list[tuple[str, int]]:
        """Every destination the root tried to connect to."""
        return [(host, port) for host, port, *_rest in self.reactor.tcpClients]


def _open_payload(port: int, guest: bytes, gport: int = 41000) -> bytes:
    return struct.pack("!HH", port, gport) + guest


class ForgedInnerTests(unittest.TestCase):
    """A compromised inner can only name service ports of its own bridge, never an address."""

    def test_unmapped_ports_are_refused_without_connecting(self) -> None:
        """OPENs for ports the bridge does not map are refused and nothing is connected."""
        f = Forged()
        ports = [22, 80, 443, 1234, 5029, 5031, 6443, 65535]
        sids = [f.inner.open_stream(p, "169.254.3.4", 41000) for p in ports]
        f.send(b"".join(f.inner.data_to_send()))
        self.assertEqual(f.answers(), [StreamRefused(sid, Reason.UNKNOWN_SERVICE) for sid in sids])
        self.assertEqual(f.connects(), [])
        self.assertEqual(f.root.counters.refused, {Reason.UNKNOWN_SERVICE: len(ports)})

    def test_port_of_another_bridge_is_refused(self) -> None:
        """A port mapped for another bridge is unknown on this one; its own maps to its own."""
        reactor = MemoryReactorClock()
        Forged({5030: DEST}, bridge="br0", reactor=reactor)
        f1 = Forged({1234: OTHER}, bridge="br1", reactor=reactor)
        refused = f1.inner.open_stream(5030, "169.254.3.4", 1)
        own = f1.inner.open_stream(1234, "169.254.3.4", 2)
        f1.send(b"".join(f1.inner.data_to_send()))
        self.assertEqual(f1.answers(), [StreamRefused(refused, Reason.UNKNOWN_SERVICE)])
        self.assertEqual(f1.connects(), [(OTHER.addr, OTHER.port)])
        del own

    def test_guest_address_never_becomes_a_destination(self) -> None:
        """Whatever the guest address and port fields hold, the root connects only to the map's."""
        f = Forged()
        weird = [
            b"\x0a\x00\x00\x01",  # 10.0.0.1
            b"\x7f\x00\x00\x01",  # 127.0.0.1
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
            b"\x0a\x0b\x0c\x0d",  # the front-end itself
            bytes(15) + b"\x01",  # ::1
            b"\xfe\x80" + bytes(13) + b"\x01",
            b"\x00" * 10 + b"\xff\xff\x7f\x00\x00\x01",  # ::ffff:127.0.0.1
        ]
        for i, guest in enumerate(weird, start=1):
            f.open_raw(i, _open_payload(5030, guest, gport=22))
        self.assertFalse(f.rt.disconnecting)
        self.assertEqual(f.connects(), [(DEST.addr, DEST.port)] * len(weird))

    def test_unmapped_port_with_weird_guest_connects_nothing(self) -> None:
        """An unmapped port with a guest field naming a real host still connects nowhere."""
        f = Forged()
        for i, guest in enumerate([b"\x0a\x0b\x0c\x0d", b"\x7f\x00\x00\x01"], start=1):
            f.open_raw(i, _open_payload(22, guest, gport=5030))
        self.assertEqual(f.connects(), [])
        self.assertEqual(f.root.counters.refused, {Reason.UNKNOWN_SERVICE: 2})

    def test_smuggled_destinations_are_protocol_errors(self) -> None:
        """Extra bytes in an OPEN, in any form, end the link before any connect."""
        smuggled = [
            _open_payload(5030, b"\xa9\xfe\x03\x04") + b"\x0a\x00\x00\x01\x00\x16",
            _open_payload(5030, b"\xa9\xfe\x03\x04") + b"evil.example:22",
            _open_payload(5030, b"\xa9\xfe\x03\x04") + b"\x00",
            _open_payload(5030, bytes(16)) + b"\x7f\x00\x00\x01",
            _open_payload(5030, b"\xa9\xfe\x03\x04")[:7],
            _open_payload(5030, b"\xa9\xfe\x03\x04" * 100),
            b"",
            _open_payload(0, b"\xa9\xfe\x03\x04"),
        ]
        for payload in smuggled:
            f = Forged()
            log = Captured(self)
            f.open_raw(1, payload)
            self.assertEqual(f.connects(), [], payload)
            self.assertTrue(f.rt.disconnecting, payload)
            out = fr.FrameDecoder(expect_preface=False).feed(f.rt.take())
            self.assertEqual(out[-1][0], FrameType.GO_AWAY)
            self.assertEqual(fr.parse_go_away(out[-1][3])[0], Reason.PROTOCOL_ERROR)
            self.assertTrue(
                any("protocol error" in m for m in log.messages(LogLevel.error)), payload
            )

    def test_wrong_side_frames_are_protocol_errors(self) -> None:
        """CONFIG or OPEN_RESULT sent to the root, or an OPEN on stream 0, end the link."""
        for ftype, sid, payload in [
            (FrameType.CONFIG, 0, struct.pack("!H", 22)),
            (FrameType.OPEN_RESULT, 1, b"\x00"),
            (FrameType.OPEN, 0, _open_payload(5030, b"\xa9\xfe\x03\x04")),
        ]:
            f = Forged()
            f.open_raw(sid, payload, ftype)
            self.assertTrue(f.rt.disconnecting, ftype)
            self.assertEqual(f.connects(), [])

    def test_mapped_port_still_works_after_refusals(self) -> None:
        """Refusals are per stream: the same link then opens a mapped port normally."""
        f = Forged()
        f.inner.open_stream(22, "169.254.3.4", 1)
        sid = f.inner.open_stream(5030, "169.254.3.4", 2)
        f.send(b"".join(f.inner.data_to_send()))
        self.assertEqual(f.connects(), [(DEST.addr, DEST.port)])
        host, port, factory, _t, _b = f.reactor.tcpClients[0]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        proto.makeConnection(FakeTransport(proto))
        self.assertIn(StreamAccepted(sid), f.answers())


class FloodTests(unittest.TestCase):
    """An inner that writes without ever reading cannot grow the root's buffers or log."""

    def _flood(self, f: Forged, make_chunk: Callable[[], bytes], rounds: int = 200) -> int:
        """Write chunks (about one read each) while the root reads; returns reads consumed."""
        consumed = 0
        for _ in range(rounds):
            if not f.rt.reading or f.rt.disconnecting:
                break
            f.send(make_chunk())
            consumed += 1
        self.assertFalse(f.rt.disconnecting)
        return consumed

    def _pings(self) -> bytes:
        return fr.encode_ping(b"flooding") * (READ_SIZE // 18)

    def test_ping_flood_stops_reading(self) -> None:
        """PINGs from an inner that never reads its PONGs stop the root reading; memory bounded."""
        f = Forged(limit=UNIX_BUFFER)
        consumed = self._flood(f, self._pings)
        self.assertFalse(f.rt.reading)
        self.assertTrue(f.root.reading_paused)
        self.assertLess(consumed, 10)
        # At most the buffer limit plus the answers to one read.
        self.assertLessEqual(len(f.rt.written), UNIX_BUFFER + READ_SIZE)
        f.rt.take()  # The inner finally reads: the root reads again.
        self.assertTrue(f.rt.reading)
        self.assertFalse(f.root.reading_paused)

    def test_refused_open_flood_stops_reading_and_log_is_bounded(self) -> None:
        """Doomed OPENs from a non-reading inner: bounded buffer, bounded log, exact counters."""
        f = Forged(limit=UNIX_BUFFER)
        log = Captured(self)
        per_read = READ_SIZE // 18

        def doomed_opens() -> bytes:
            for _ in range(per_read):
                f.inner.open_stream(22, "169.254.3.4", 1)
            return b"".join(f.inner.data_to_send())

        consumed = self._flood(f, doomed_opens)
        self.assertFalse(f.rt.reading)
        self.assertLessEqual(len(f.rt.written), UNIX_BUFFER + READ_SIZE)
        refused = f.root.counters.refused[Reason.UNKNOWN_SERVICE]
        self.assertEqual(refused, consumed * per_read)
        self.assertEqual(len(log.messages(LogLevel.warn)), REFUSAL_LOG_BURST)
        # A second later the next refusal logs a summary line, then the burst restarts.
        f.reactor.advance(1.0)
        f.rt.take()
        f.inner.open_stream(22, "169.254.3.4", 1)
        f.send(b"".join(f.inner.data_to_send()))
        lines = log.messages(LogLevel.warn)
        self.assertIn(f"{refused - REFUSAL_LOG_BURST} more streams refused", lines[-2])
        self.assertIn("refused (UNKNOWN_SERVICE)", lines[-1])
        self.assertEqual(f.connects(), [])

    def test_silent_inner_dies_of_ping_timeout(self) -> None:
        """An inner that never reads again is cut off by the ping timeout, not kept forever."""
        f = Forged(limit=UNIX_BUFFER, ping_interval=10.0)
        self._flood(f, self._pings)
        self.assertFalse(f.rt.reading)
        # Its PONGs would not be read anyway: reading is paused.
        f.reactor.advance(10.0)
        f.reactor.advance(30.0)
        self.assertTrue(f.rt.aborted)
        f.rt.deliver_loss()
        self.assertEqual(f.closed, [None])

    def test_honest_proxies_do_not_deadlock(self) -> None:
        """With tiny UNIX buffers and both directions busy, honest links still move every byte."""
        h = Harness(window=4096)
        g, s = h.stream()
        h.rt.set_limit(100)
        h.it.set_limit(100)
        up = bytes(range(256)) * 400
        down = bytes(reversed(range(256))) * 400
        got_up = bytearray()
        got_down = bytearray()
        for i in range(0, len(up), 1000):
            if g.reading:
                g.protocol.dataReceived(up[i : i + 1000])
            else:
                up_rest = i
                break
        else:
            up_rest = len(up)
        pos_up, pos_down = up_rest, 0
        for _ in range(20000):
            moved = False
            # Each side reads its UNIX socket only while it reads at all (as a reactor would).
            if h.it.reading and h.rt.written:
                h.inner.dataReceived(h.rt.take())
                moved = True
            if h.rt.reading and h.it.written:
                h.root.dataReceived(h.it.take())
                moved = True
            if pos_up < len(up) and g.reading:
                g.protocol.dataReceived(up[pos_up : pos_up + 1000])
                pos_up += 1000
                moved = True
            if pos_down < len(down) and s.reading:
                s.protocol.dataReceived(down[pos_down : pos_down + 1000])
                pos_down += 1000
                moved = True
            if s.written:
                got_up += s.take()
                moved = True
            if g.written:
                got_down += g.take()
                moved = True
            if not moved:
                break
        self.assertEqual(bytes(got_up), up)
        self.assertEqual(bytes(got_down), down)
        self.assertGreater(h.rt.pause_count, 0)  # The root did stop reading at times.


class IsolationTests(unittest.TestCase):
    """A violation on one link ends that link only."""

    def test_protocol_error_ends_only_that_link(self) -> None:
        """Garbage from one bridge's inner closes its link; another bridge's stream flows on."""
        h = Harness()
        g, s = h.stream()
        bad = Forged(reactor=h.reactor, bridge="br1")
        bad.send(b"\xff" * 64)
        self.assertTrue(bad.rt.disconnecting)
        g.protocol.dataReceived(b"still here")
        h.pump()
        self.assertEqual(s.take(), b"still here")
        self.assertFalse(h.rt.disconnecting)
        self.assertIsNone(h.root.conn.error)
