"""Tests for tproxy.link: RootLink and InnerLink wired in memory, TCP sides on fake transports."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error, main
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.fake_transport import FakeTransport
from tproxy import link as link_module
from tproxy.config import Limits
from tproxy.link import EARLY_DATA_MAX, InnerLink, RootLink
from tproxy.model import Destination
from tproxy.protocol import frames as fr
from tproxy.protocol.frames import Reason
from tproxy.turn_end import TurnEnd

DEST = Destination("10.11.12.13", 5030)


class Harness:
    """A root and an inner link joined by two fake UNIX transports, and a fake reactor."""

    def __init__(
        self,
        window: int = fr.DEFAULT_WINDOW,
        limits: Limits = Limits(),  # noqa: B008
        services: dict[int, Destination] | None = None,
        ping_interval: float | None = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.services = {5030: DEST} if services is None else services
        self.configs: list[frozenset[int]] = []
        self.root = RootLink(
            self.reactor,
            "br0",
            self.services.get,
            limits,
            initial_window=window,
            ping_interval=ping_interval,
        )
        self.inner = InnerLink(
            self.reactor,
            self.configs.append,
            limits,
            bridge="br0",
            initial_window=window,
            ping_interval=ping_interval,
        )
        self.rt = FakeTransport(self.root)
        self.it = FakeTransport(self.inner)
        self.transports = [self.rt, self.it]
        self.root_closed: list[None] = []
        self.inner_closed: list[None] = []
        self.root.closed.addCallback(self.root_closed.append)
        self.inner.closed.addCallback(self.inner_closed.append)
        self.root.makeConnection(self.rt)
        self.inner.makeConnection(self.it)
        self.drain_unix = True
        self.pump()

    def pump(self) -> None:
        """Carry bytes both ways and deliver pending losses until nothing moves."""
        for _ in range(10000):
            moved = False
            if self.drain_unix:
                data = self.rt.take()
                if data and not self.it.lost:
                    self.inner.dataReceived(data)
                    moved = True
                data = self.it.take()
                if data and not self.rt.lost:
                    self.root.dataReceived(data)
                    moved = True
            for t in list(self.transports):
                moved = t.deliver_loss() or moved
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def guest(
        self, port: int = 5030, host: str = "169.254.3.4", gport: int = 41000
    ) -> FakeTransport:
        """A guest connects to the inner proxy's listener of ``port``."""
        proto = self.inner.guest_factory(port).buildProtocol(IPv4Address("TCP", host, gport))
        t = FakeTransport(proto, peer=IPv4Address("TCP", host, gport))
        self.transports.append(t)
        proto.makeConnection(t)
        self.pump()
        return t

    def service(self, index: int = -1, limit: int | None = None) -> FakeTransport:
        """The root's pending connect attempt number ``index`` succeeds."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        t = FakeTransport(proto, peer=IPv4Address("TCP", host, port), limit=limit)
        self.transports.append(t)
        proto.makeConnection(t)
        self.pump()
        return t

    def service_fails(self, exc: Exception, index: int = -1) -> None:
        """The root's pending connect attempt number ``index`` fails with ``exc``."""
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(exc))
        self.pump()

    def stream(self) -> tuple[FakeTransport, FakeTransport]:
        """A guest connection spliced to a service connection."""
        g = self.guest()
        s = self.service()
        return g, s


class OpenTests(unittest.TestCase):
    """Opening streams: lookup, connect, refusals."""

    def test_connect_to_mapped_destination(self) -> None:
        """An open makes the root connect to the bridge's destination with the connect timeout."""
        h = Harness()
        g = h.guest()
        self.assertEqual(len(h.reactor.tcpClients), 1)
        host, port, _f, timeout, _b = h.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.11.12.13", 5030, 5.0))
        self.assertFalse(g.reading, "guest must stay paused until the open result")
        h.service()
        self.assertTrue(g.reading)
        self.assertEqual((h.root.counters.accepted, h.inner.counters.accepted), (1, 1))

    def test_lookup_at_open_time(self) -> None:
        """A changed map applies to the next stream (reload)."""
        h = Harness()
        h.guest()
        h.services[5030] = Destination("10.0.0.2", 80)
        h.guest(gport=2)
        self.assertEqual(h.reactor.tcpClients[1][:2], ("10.0.0.2", 80))

    def test_unknown_service(self) -> None:
        """A port the bridge's map does not have gets the guest reset, without a connect."""
        h = Harness()
        g = h.guest(port=9999)
        self.assertTrue(g.aborted)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.inner.counters.refused, {Reason.UNKNOWN_SERVICE: 1})
        self.assertEqual(h.root.counters.refused, {Reason.UNKNOWN_SERVICE: 1})
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))

    def test_connect_failures(self) -> None:
        """Refused, timed-out and unreachable connects reset the guest with that reason."""
        cases = [
            (error.ConnectionRefusedError(), Reason.REFUSED),
            (error.TimeoutError(), Reason.TIMED_OUT),
            (error.NoRouteError(), Reason.UNREACHABLE),
        ]
        for exc, reason in cases:
            h = Harness()
            g = h.guest()
            h.service_fails(exc)
            self.assertTrue(g.aborted, reason)
            self.assertEqual(h.inner.counters.refused, {reason: 1})
            self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
            self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_failure_affects_no_other_stream(self) -> None:
        """One failed connect leaves another open stream alone."""
        h = Harness()
        g1, s1 = h.stream()
        g2 = h.guest(gport=2)
        h.service_fails(error.ConnectionRefusedError())
        self.assertTrue(g2.aborted)
        self.assertFalse(g1.aborted or s1.aborted)
        g1.protocol.dataReceived(b"ping")
        h.pump()
        self.assertEqual(s1.take(), b"ping")

    def test_lookup_failure(self) -> None:
        """A lookup that raises refuses the stream (INTERNAL_ERROR) and keeps the link."""
        h = Harness()

        def broken(port: int) -> Destination | None:
            raise RuntimeError("map unreadable")

        h.root.lookup = broken
        g = h.guest()
        self.assertTrue(g.aborted)
        self.assertEqual(h.inner.counters.refused, {Reason.INTERNAL_ERROR: 1})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(h.rt.disconnecting)

    def test_endpoint_failure(self) -> None:
        """An endpoint that cannot even be built refuses the stream as unreachable."""
        h = Harness()

        def no_endpoint(dest: Destination) -> object:
            raise ValueError("bad destination")

        h.root._endpoint_for = no_endpoint  # type: ignore[assignment]
        g = h.guest()
        self.assertTrue(g.aborted)
        self.assertEqual(h.inner.counters.refused, {Reason.UNREACHABLE: 1})

    def test_too_many_streams_per_bridge(self) -> None:
        """Beyond the bridge's stream limit a new guest is reset, the others stay."""
        h = Harness(limits=Limits(max_streams_per_bridge=2))
        h.guest(gport=1)
        h.guest(gport=2)
        g3 = h.guest(gport=3)
        self.assertTrue(g3.aborted)
        self.assertEqual(h.root.counters.refused, {Reason.TOO_MANY_STREAMS: 1})
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_too_many_streams_per_guest(self) -> None:
        """Beyond one guest's limit that guest is reset; another guest still gets through."""
        h = Harness(limits=Limits(max_streams_per_guest=1))
        h.guest(gport=1)
        self.assertTrue(h.guest(gport=2).aborted)
        self.assertFalse(h.guest(host="169.254.3.5").aborted)
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_guest_limit_released(self) -> None:
        """A guest's closed stream no longer counts against its limit."""
        h = Harness(limits=Limits(max_streams_per_guest=1))
        g = h.guest(gport=1)
        h.service_fails(error.ConnectionRefusedError())
        self.assertTrue(g.aborted)
        self.assertFalse(h.guest(gport=2).aborted)

    def test_guest_leaves_while_connecting(self) -> None:
        """A guest that resets before the service answers cancels the connect attempt."""
        h = Harness()
        g = h.guest()
        g.peer_reset()
        h.pump()
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        self.assertEqual(h.inner.counters.resets_sent, {Reason.ABORTED: 1})


class _ScriptedSocket:
    """A non-blocking socket's reads, in order, then EAGAIN (a guest's for ``_send_early``,
    a service's for the root's ``_first_read``)."""

    def __init__(self, *reads: bytes | OSError) -> None:
        self.reads = list(reads)
        self.asked: list[int] = []

    def recv(self, n: int) -> bytes:
        self.asked.append(n)
        r = self.reads.pop(0) if self.reads else BlockingIOError()
        if isinstance(r, OSError):
            raise r
        return r


class EarlyDataTests(unittest.TestCase):
    """The inner sends the guest's first bytes behind the OPEN; the root holds them."""

    def early_guest(self, h: Harness, sock: _ScriptedSocket) -> FakeTransport:
        """A guest whose socket held ``sock``'s bytes when the inner accepted it."""

        def send_early(s: Any) -> None:
            s._sock = sock
            try:
                InnerLink._send_early(h.inner, s)
            finally:
                s._sock = None

        h.inner._send_early = send_early  # type: ignore[method-assign]
        return h.guest()

    def test_no_early_read_while_the_link_is_paused(self) -> None:
        """With the link's UNIX buffer full the guest's bytes stay in its socket: the
        stream reads them once it opens."""
        h = Harness()
        h.inner._set_link_paused(True)
        sock = _ScriptedSocket(b"GET / HTTP/1.1\r\n\r\n")
        self.early_guest(h, sock)
        self.assertEqual(sock.asked, [])
        [root_stream] = h.root._streams.values()
        self.assertIsNone(root_stream.held)

    def test_early_reads_of_one_iteration_are_bounded(self) -> None:
        """Accepts in one iteration, each with a full early read, the peer not reading:
        past ``LINK_HIGH_WATER`` the link is flushed at once and pauses, and the next
        accepts read nothing early (instead of ``EARLY_DATA_MAX`` per guest, unbounded)."""
        h = Harness()
        h.inner._turn_end = te = TurnEnd()
        h.drain_unix = False
        h.it.set_limit(0)
        socks = []
        for _ in range(40):
            sock = _ScriptedSocket(b"x" * EARLY_DATA_MAX)
            socks.append(sock)
            self.early_guest(h, sock)
        read = sum(len(sock.asked) for sock in socks) * EARLY_DATA_MAX
        self.assertLessEqual(read, link_module.LINK_HIGH_WATER + EARLY_DATA_MAX)
        self.assertTrue(h.inner._link_paused)
        self.assertEqual(len(h.inner._streams), 40)  # every guest still got its stream
        te.run()

    def test_early_data_reaches_the_service_first(self) -> None:
        """Early bytes are written to the service when its connect succeeds, before later ones."""
        h = Harness()
        sock = _ScriptedSocket(b"GET /small HTTP/1.1\r\n\r\n")
        g = self.early_guest(h, sock)
        self.assertEqual(sock.asked, [EARLY_DATA_MAX])
        self.assertFalse(g.reading, "the rest waits for the open result")
        [root_stream] = h.root._streams.values()
        self.assertEqual(root_stream.held, [b"GET /small HTTP/1.1\r\n\r\n"])
        s = h.service()
        self.assertTrue(g.reading)
        g.protocol.dataReceived(b"more")
        h.pump()
        self.assertEqual(s.take(), b"GET /small HTTP/1.1\r\n\r\nmore")
        self.assertEqual(h.inner.link_counters()["bytes_to_link"], 27)
        s.protocol.dataReceived(b"reply")
        s.peer_eof()
        h.pump()
        g.peer_eof()
        h.pump()
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        port = h.root.metrics.port(5030)
        self.assertEqual((port.bytes_to_service, port.bytes_to_guest), (27, 5))
        self.assertEqual(h.inner.counters.bytes_to_link, 27)

    def test_refused_early_data_is_dropped_and_not_counted(self) -> None:
        """A refused open drops the early bytes: the guest is reset, no byte is counted."""
        h = Harness()
        g = self.early_guest(h, _ScriptedSocket(b"hello"))
        h.service_fails(error.ConnectionRefusedError())
        self.assertTrue(g.aborted)
        self.assertEqual(h.inner.counters.refused, {Reason.REFUSED: 1})
        self.assertEqual((h.inner.counters.bytes_to_link, h.root.counters.bytes_from_link), (0, 0))
        port = h.root.metrics.port(5030)
        self.assertEqual((port.bytes_to_service, port.bytes_to_guest), (0, 0))

    def test_unknown_service_drops_early_data(self) -> None:
        """Early data for a port the root does not know is ignored with the refused stream."""
        h2 = Harness(services={})
        g2 = self.early_guest(h2, _ScriptedSocket(b"hello"))
        self.assertTrue(g2.aborted)
        self.assertEqual(h2.inner.counters.refused, {Reason.UNKNOWN_SERVICE: 1})
        self.assertEqual(h2.inner.counters.bytes_to_link, 0)

    def test_guest_leaves_while_connecting(self) -> None:
        """A guest reset while opening cancels the connect; its early bytes are not counted."""
        h = Harness()
        g = self.early_guest(h, _ScriptedSocket(b"hello"))
        g.peer_reset()
        h.pump()
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        self.assertEqual(h.inner.counters.bytes_to_link, 0)

    def test_nothing_yet_or_eof_or_error(self) -> None:
        """No bytes yet or EOF: nothing early; a socket error resets the guest."""
        h = Harness()
        g = self.early_guest(h, _ScriptedSocket())
        self.assertFalse(g.aborted)
        self.assertEqual(h.root._streams[1].held, None)
        g = self.early_guest(h, _ScriptedSocket(b""))
        self.assertFalse(g.aborted)
        g = self.early_guest(h, _ScriptedSocket(ConnectionResetError()))
        self.assertTrue(g.aborted)
        h.pump()
        self.assertEqual(h.inner.counters.resets_sent, {Reason.ABORTED: 1})


class FirstReadTests(unittest.TestCase):
    """The root reads a service's first bytes and, after a short read, the FIN behind them."""

    SIZE = 1000

    def first_read(
        self, *reads: bytes | OSError, on_stop_reading: Any = None
    ) -> tuple[Harness, Any, Any, _ScriptedSocket, Any]:
        """Run ``_first_read`` of a fresh stream's service side over ``reads``."""
        h = Harness()
        g, s = h.stream()
        [stream] = h.root._streams.values()
        sock = _ScriptedSocket(*reads)
        t: Any = s
        t.bufferSize = self.SIZE
        if on_stop_reading is not None:
            t.stopReading = on_stop_reading
        t.doRead = stream._first_read
        stream._sock = sock
        try:
            result = stream._first_read()
        finally:
            stream._sock = None
        self.assertNotIn("doRead", t.__dict__, "later reads are Twisted's own")
        return h, g, s, sock, result

    def test_answer_then_eof(self) -> None:
        """A short read and the EOF behind it: reading stops and the half-close runs at once
        (the reactor's part on CONNECTION_DONE, taken here); the guest gets answer and FIN."""
        stopped: list[bool] = []
        h, g, s, sock, result = self.first_read(
            b"reply", b"", on_stop_reading=lambda: stopped.append(True)
        )
        self.assertIsNone(result)
        self.assertEqual(stopped, [True])
        self.assertEqual(sock.asked, [self.SIZE, self.SIZE - 5])
        self.assertTrue(h.root._streams[1]._read_eof)
        h.pump()
        self.assertEqual(g.take(), b"reply")
        self.assertTrue(g.write_closed)
        g.peer_eof()
        h.pump()
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        self.assertEqual(h.root.counters.resets_sent, {})
        self.assertEqual(h.root.metrics.port(5030).bytes_to_guest, 5)

    def test_answer_then_nothing(self) -> None:
        """A short read and nothing behind it (EAGAIN): the answer is sent on, reading goes on."""
        h, g, s, sock, result = self.first_read(b"reply")
        self.assertIsNone(result)
        self.assertEqual(sock.asked, [self.SIZE, self.SIZE - 5])
        h.pump()
        self.assertEqual(g.take(), b"reply")
        self.assertFalse(g.write_closed)

    def test_answer_then_more(self) -> None:
        """More bytes behind the first: both go on together, in order."""
        h, g, s, sock, result = self.first_read(b"rep", b"ly")
        self.assertIsNone(result)
        h.pump()
        self.assertEqual(g.take(), b"reply")
        self.assertEqual(h.inner.link_counters()["bytes_from_link"], 5)

    def test_full_read(self) -> None:
        """A read that fills the buffer is the ordinary path: no second recv."""
        h, g, s, sock, result = self.first_read(b"x" * self.SIZE, b"")
        self.assertIsNone(result)
        self.assertEqual(sock.asked, [self.SIZE])
        h.pump()
        self.assertEqual(len(g.take()), self.SIZE)

    def test_eof_or_nothing_or_error_first(self) -> None:
        """EOF first is CONNECTION_DONE, EAGAIN nothing, an error CONNECTION_LOST."""
        self.assertIs(self.first_read(b"")[4], main.CONNECTION_DONE)
        self.assertIsNone(self.first_read()[4])
        self.assertIs(self.first_read(ConnectionResetError())[4], main.CONNECTION_LOST)

    def test_error_behind_the_answer(self) -> None:
        """An error on the second recv: the answer still goes on, then CONNECTION_LOST."""
        h, g, s, sock, result = self.first_read(b"reply", ConnectionResetError())
        self.assertIs(result, main.CONNECTION_LOST)
        h.pump()
        self.assertEqual(g.take(), b"reply")


class ConnectionDoneTests(unittest.TestCase):
    """``_connection_done`` ends a finished stream's socket exactly as Twisted's connectionLost."""

    def end(self, lean: bool) -> tuple[Any, socket.socket, list[Failure]]:
        from twisted.internet import tcp
        from twisted.internet.protocol import Protocol

        lost: list[Failure] = []

        class _Recorder(Protocol):
            def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:  # type: ignore[assignment]
                lost.append(reason)

        a, b = socket.socketpair()
        self.addCleanup(b.close)
        a.setblocking(False)
        reactor = MemoryReactorClock()
        proto = _Recorder()
        t: Any = tcp.Connection(a, proto, reactor)
        proto.makeConnection(t)
        t.connected = 1
        t._shouldShutdown = False  # both FINs through, as _maybe_finish sets it
        if lean:
            link_module._connection_done(t)
        else:
            t.connectionLost(link_module._CONNECTION_DONE)
        return t, a, lost

    def test_same_end_state_as_twisted(self) -> None:
        """Socket closed, flags, attributes dropped, one ConnectionDone: as Twisted's own."""
        states = []
        for lean in (False, True):
            t, sock, lost = self.end(lean)
            self.assertEqual(sock.fileno(), -1)
            self.assertEqual(len(lost), 1)
            self.assertIs(lost[0], link_module._CONNECTION_DONE)
            states.append(
                (
                    t.connected,
                    t.disconnected,
                    t.producer,
                    hasattr(t, "protocol"),
                    hasattr(t, "socket"),
                    "fileno" in t.__dict__,
                )
            )
        self.assertEqual(states[0], states[1])
        self.assertEqual(states[1], (0, 1, None, False, False, False))

    def test_only_plain_connection_lost(self) -> None:
        """Transports whose connectionLost does more (tcp.Client) keep Twisted's own path."""
        from twisted.internet import tcp

        from tproxy.link_connect import OutgoingConnection

        self.assertIn(tcp.Server.connectionLost, link_module._PLAIN_CONNECTION_LOST)
        self.assertIn(OutgoingConnection.connectionLost, link_module._PLAIN_CONNECTION_LOST)
        self.assertNotIn(tcp.Client.connectionLost, link_module._PLAIN_CONNECTION_LOST)


def _real_stream(h: Harness, role: str = "inner") -> tuple[Any, Any, socket.socket, socket.socket]:
    """A stream of ``h``'s link whose TCP side is a real ``tcp.Server`` on a socket pair.

    Returns (stream, transport, its socket, the peer's socket); the transport's
    reactor is a ``MemoryReactorClock`` (its ``_reads``/``_writes`` say what is watched).
    """
    from twisted.internet import tcp

    a, b = socket.socketpair()
    b.setblocking(False)
    link = h.inner if role == "inner" else h.root
    stream = link_module._StreamProtocol(link, 5030)
    t: Any = tcp.Server(a, stream, ("169.254.3.4", 41000), None, 1, MemoryReactorClock())
    stream.makeConnection(t)
    return stream, t, a, b


class CloseWriteTests(unittest.TestCase):
    """``close_write`` shuts the write side down as Twisted's ``_closeWriteConnection`` does."""

    def close_write(self, lean: bool) -> tuple[Any, Any, socket.socket, socket.socket]:
        h = Harness()
        stream, t, a, b = _real_stream(h)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        if lean:
            stream.close_write()
        else:  # what close_write did before: Twisted's own step, with its adaptation
            t.unregisterProducer()
            stream._write_closing = True
            t._writeDisconnecting = True
            t._writeDisconnected = True
            t._closeWriteConnection()
        return stream, t, a, b

    def test_same_end_state_as_twisted(self) -> None:
        """FIN sent, socket still open for reading, ``writeConnectionLost`` noted, no close."""
        states = []
        for lean in (False, True):
            stream, t, a, b = self.close_write(lean)
            self.assertEqual(b.recv(10), b"", "the peer reads our FIN")
            a.setblocking(False)
            with self.assertRaises(BlockingIOError):
                a.recv(10)  # still open for reading
            states.append(
                (
                    stream._write_done,
                    stream._read_eof,
                    t.connected,
                    t.disconnected,
                    t.disconnecting,
                    t._writeDisconnecting,
                    t._writeDisconnected,
                    t.producer,
                    a.fileno() >= 0,
                )
            )
        self.assertEqual(states[0], states[1])
        self.assertEqual(states[1], (True, False, 1, False, False, True, True, None, True))


class GuestRegistrationTests(unittest.TestCase):
    """A ``GuestServer`` is registered for reading once, when its stream opens."""

    def test_registered_once_at_the_open(self) -> None:
        from tproxy.link_accept import GuestServer

        h = Harness()
        calls: list[str] = []
        fake_reactor = MemoryReactorClock()
        fake_reactor.addReader = lambda r: calls.append("add")  # type: ignore[method-assign]
        fake_reactor.removeReader = lambda r: calls.append("remove")  # type: ignore[method-assign]
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        stream = h.inner.guest_factory(5030).buildProtocol(None)
        t: Any = GuestServer(a, stream, ("169.254.3.4", 41000), None, 1, fake_reactor)  # type: ignore[arg-type]
        stream.makeConnection(t)
        h.pump()
        self.assertEqual(calls, [], "no pause of a socket nobody reads")
        h.service()
        self.assertEqual(calls, ["add"])
        self.assertTrue(stream._reading)


class SpliceTests(unittest.TestCase):
    """Bytes, FINs and resets cross the link."""

    def test_data_both_ways(self) -> None:
        """Guest bytes reach the service and service bytes reach the guest, in order."""
        h = Harness()
        g, s = h.stream()
        for i in range(5):
            g.protocol.dataReceived(b"req%d;" % i)
        h.pump()
        self.assertEqual(s.take(), b"req0;req1;req2;req3;req4;")
        s.protocol.dataReceived(b"response")
        h.pump()
        self.assertEqual(g.take(), b"response")
        counters = h.inner.link_counters()  # open streams' bytes included
        self.assertEqual((counters["bytes_to_link"], counters["bytes_from_link"]), (25, 8))

    def test_last_data_and_fin_in_one_segment(self) -> None:
        """DATA with the stream's HALF_CLOSE right behind it in one link read is sent with
        MSG_MORE (the shutdown then sends it with the FIN); other DATA without."""
        sends: list[tuple[bytes, int]] = []
        write_now = link_module._write_now

        def recording(t: Any, sock: Any, data: Any, flags: int = 0) -> None:
            sends.append((bytes(data), flags))
            write_now(t, sock, data, flags)

        self.patch(link_module, "_write_now", recording)
        h = Harness()
        g, s = h.stream()
        s.protocol.dataReceived(b"part")
        h.pump()
        s.protocol.dataReceived(b"reply")
        s.peer_eof()
        h.pump()
        self.assertEqual(sends, [(b"part", 0), (b"reply", socket.MSG_MORE)])
        self.assertEqual(g.take(), b"partreply")
        self.assertTrue(g.write_closed)

    def test_half_close_guest_first(self) -> None:
        """A guest FIN shuts the service's write side; the response still flows, then all closes."""
        h = Harness()
        g, s = h.stream()
        g.protocol.dataReceived(b"GET /")
        g.peer_eof()
        h.pump()
        self.assertEqual(s.take(), b"GET /")
        self.assertTrue(s.write_closed)
        self.assertFalse(s.disconnecting)
        s.protocol.dataReceived(b"200 OK")
        h.pump()
        self.assertEqual(g.take(), b"200 OK")
        s.peer_eof()
        h.pump()
        self.assertTrue(g.write_closed)
        self.assertTrue(g.lost and s.lost)
        self.assertFalse(g.aborted or s.aborted)
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        self.assertEqual(h.root.counters.resets_sent, {})
        self.assertEqual(h.inner.counters.resets_sent, {})

    def test_half_close_service_first(self) -> None:
        """A service FIN shuts the guest's write side; the guest keeps sending."""
        h = Harness()
        g, s = h.stream()
        s.protocol.dataReceived(b"banner")
        s.peer_eof()
        h.pump()
        self.assertEqual(g.take(), b"banner")
        self.assertTrue(g.write_closed)
        g.protocol.dataReceived(b"later")
        h.pump()
        self.assertEqual(s.take(), b"later")
        g.peer_eof()
        h.pump()
        self.assertTrue(g.lost and s.lost)
        self.assertFalse(g.aborted or s.aborted)

    def test_service_reset(self) -> None:
        """A service connection that fails resets the guest (RST)."""
        h = Harness()
        g, s = h.stream()
        s.peer_reset()
        h.pump()
        self.assertTrue(g.aborted)
        self.assertEqual(h.inner.counters.resets_received, {Reason.ABORTED: 1})

    def test_guest_reset(self) -> None:
        """A guest that resets makes the root abort the service connection."""
        h = Harness()
        g, s = h.stream()
        g.peer_reset()
        h.pump()
        self.assertTrue(s.aborted)
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))


class FlowControlTests(unittest.TestCase):
    """Backpressure both ways, per stream and per link."""

    def test_slow_service_withholds_credit_and_pauses_guest(self) -> None:
        """A service that does not read stops the guest's reading; draining it resumes."""
        h = Harness(window=4096)
        g = h.guest()
        s = h.service(limit=1000)
        blob = bytes(range(256)) * 40  # 10240 bytes
        g.protocol.dataReceived(blob)
        h.pump()
        self.assertFalse(g.reading, "guest should be paused: window spent")
        received = bytearray(s.take())  # drain: credit flows back
        h.pump()
        for _ in range(20):
            received += s.take()
            h.pump()
        self.assertEqual(bytes(received), blob)
        self.assertTrue(g.reading)

    def test_window_bounds_buffered_data(self) -> None:
        """What a stalled service holds never exceeds the window."""
        h = Harness(window=4096)
        g = h.guest()
        s = h.service(limit=0)  # Never drains.
        for _ in range(10):
            g.protocol.dataReceived(b"x" * 3000)
            h.pump()
        self.assertLessEqual(len(s.written), 4096)
        self.assertFalse(g.reading)

    def test_stalled_stream_does_not_delay_another(self) -> None:
        """With one service stalled, a second stream still moves all its data."""
        h = Harness(window=4096)
        g1 = h.guest(gport=1)
        s1 = h.service(limit=0)
        g2 = h.guest(gport=2)
        s2 = h.service()
        g1.protocol.dataReceived(b"a" * 20000)
        h.pump()
        got = bytearray()
        for _ in range(10):
            g2.protocol.dataReceived(b"b" * 3000)
            h.pump()
            got += s2.take()
            h.pump()
        self.assertEqual(bytes(got), b"b" * 30000)
        self.assertLessEqual(len(s1.written), 4096)

    def test_slow_guest_pauses_service(self) -> None:
        """A guest that does not read stops the service's reading."""
        h = Harness(window=4096)
        g = h.guest()
        g.set_limit(0)
        s = h.service()
        s.protocol.dataReceived(b"z" * 10000)
        h.pump()
        self.assertFalse(s.reading)
        out = bytearray()
        for _ in range(20):
            out += g.take()
            h.pump()
        self.assertEqual(bytes(out), b"z" * 10000)
        self.assertTrue(s.reading)

    def test_full_unix_socket_pauses_every_tcp_socket(self) -> None:
        """A full UNIX write buffer pauses all guests of the link; draining resumes them."""
        h = Harness()
        g1 = h.guest(gport=1)
        h.service()
        g2 = h.guest(gport=2)
        h.service()
        h.drain_unix = False
        h.it.set_limit(10)
        g1.protocol.dataReceived(b"x" * 100)
        self.assertFalse(g1.reading)
        self.assertFalse(g2.reading)
        h.drain_unix = True
        h.it.set_limit(None)
        h.pump()
        self.assertTrue(g1.reading and g2.reading)

    def test_new_stream_while_link_paused(self) -> None:
        """A guest accepted while the link is paused stays paused after its open result."""
        h = Harness()
        h.drain_unix = False
        h.it.set_limit(0)
        g = h.guest()  # Its OPEN fills the inner's UNIX buffer: the link pauses.
        h.root.dataReceived(bytes(h.it.written))
        h.it.written.clear()  # The root read it, but the buffer is not reported drained yet.
        h.service()
        h.inner.dataReceived(h.rt.take())
        self.assertEqual(h.inner.counters.accepted, 1)
        self.assertFalse(g.reading)
        h.it.take()
        self.assertTrue(g.reading)


def _link_writes(t: FakeTransport) -> list[list[bytes]]:
    """The chunks of each ``writeSequence`` on ``t`` from now on (one list per write)."""
    writes: list[list[bytes]] = []
    write_sequence = t.writeSequence
    t.writeSequence = lambda chunks: (  # type: ignore[method-assign]
        writes.append(list(chunks)),
        write_sequence(chunks),
    )
    return writes


class FlushSoonTests(unittest.TestCase):
    """On a real reactor the frames of one iteration wait for its end (``tproxy.turn_end``)."""

    def test_opens_of_one_turn_leave_in_one_write(self) -> None:
        """Two guests accepted in one turn: their OPENs go out together when the turn ends."""
        h = Harness()
        h.inner._turn_end = te = TurnEnd()
        writes = _link_writes(h.it)
        h.drain_unix = False
        h.guest(gport=41000)
        h.guest(gport=41001)
        self.assertEqual(writes, [])
        te.run()
        self.assertEqual(len(writes), 1)
        self.assertEqual([c[0] for c in writes[0]], [fr.FrameType.OPEN] * 2)
        h.drain_unix = True
        h.pump()
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_requests_of_one_turn_leave_in_one_write(self) -> None:
        """Two guests' requests read in one iteration: one write on the link when it ends,
        and the root hands each to its service."""
        h = Harness()
        g1, g2 = h.guest(gport=41000), h.guest(gport=41001)
        s1, s2 = h.service(0), h.service(1)
        h.inner._turn_end = te = TurnEnd()
        writes = _link_writes(h.it)
        g1.protocol.dataReceived(b"GET /a")
        g2.protocol.dataReceived(b"GET /b")
        self.assertEqual(writes, [])
        te.run()
        self.assertEqual(len(writes), 1)
        h.pump()
        self.assertEqual((s1.take(), s2.take()), (b"GET /a", b"GET /b"))

    def test_data_leaves_behind_pending_frames(self) -> None:
        """A service's answer read in the iteration that connected it leaves with the
        OPEN_RESULT queued before it, behind it, in one write."""
        h = Harness()
        h.root._turn_end = te = TurnEnd()
        g = h.guest()
        s = h.service()
        self.assertFalse(g.reading)  # its OPEN_RESULT waits for the end of the turn
        s.protocol.dataReceived(b"hello")
        h.pump()
        self.assertEqual(h.inner.counters.accepted, 0)
        self.assertEqual(te.pending, 1)
        te.run()
        h.pump()
        self.assertEqual(h.inner.counters.accepted, 1)
        self.assertEqual(g.take(), b"hello")
        self.assertTrue(g.reading)
        te.run()  # nothing more is due
        self.assertEqual(te.pending, 0)

    def test_no_timer_inside_a_link_read(self) -> None:
        """A stream connected while a link read is handled: its OPEN_RESULT leaves with
        that read's own flush, and no end-of-turn timer is set for it."""
        h = Harness()
        h.root._turn_end = te = TurnEnd()
        opened = h.root._open

        def open_connected_at_once(event: Any) -> None:
            # As the lean connect on loopback: connected inside the OPEN's handling.
            opened(event)
            host, port, factory, _timeout, _bind = h.reactor.tcpClients[-1]
            proto = factory.buildProtocol(IPv4Address("TCP", host, port))
            t = FakeTransport(proto, peer=IPv4Address("TCP", host, port))
            h.transports.append(t)
            proto.makeConnection(t)

        h.root._open = open_connected_at_once  # type: ignore[method-assign]
        g = h.guest()
        self.assertEqual(te.pending, 0)
        self.assertFalse(h.root._flush_due)
        self.assertEqual(h.inner.counters.accepted, 1)
        self.assertTrue(g.reading)
        self.assertFalse(h.root._in_read)
        h.root.flush_soon()  # outside a read: at the end of the iteration, once
        h.root.flush_soon()
        self.assertEqual(te.pending, 1)
        self.assertTrue(h.root._flush_due)


class LinkLifeTests(unittest.TestCase):
    """Config, ping, go-away, protocol errors and the link's end."""

    def test_config_push(self) -> None:
        """The root's service ports reach the inner's callback."""
        h = Harness()
        h.root.push_config([5030, 22])
        h.pump()
        self.assertEqual(h.configs, [frozenset({22, 5030})])

    def test_config_callback_failure(self) -> None:
        """A config callback that raises is logged; the link stays up."""
        h = Harness()

        def broken(ports: frozenset[int]) -> None:
            raise RuntimeError("cannot listen")

        h.inner.on_config = broken
        h.root.push_config([5030])
        h.pump()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(h.it.disconnecting)

    def test_config_before_connection(self) -> None:
        """Config pushed before the link is connected goes out once it is."""
        reactor = MemoryReactorClock()
        root = RootLink(reactor, "br1", {}.get, Limits(), ping_interval=None)
        root.push_config([80])
        t = FakeTransport(root)
        root.makeConnection(t)
        self.assertIn(fr.encode_config([80]), t.take())

    def test_ping_keeps_link_alive(self) -> None:
        """PINGs answered in time keep the link up."""
        h = Harness(ping_interval=10.0)
        for _ in range(10):
            h.reactor.advance(10)
            h.pump()
        self.assertFalse(h.rt.disconnecting or h.it.disconnecting)

    def test_ping_timeout(self) -> None:
        """Without a PONG for the ping timeout the link is declared dead and closed."""
        h = Harness(ping_interval=10.0)
        h.drain_unix = False
        h.reactor.advance(10)
        h.reactor.advance(29)
        self.assertFalse(h.rt.aborted)
        h.reactor.advance(1)
        self.assertTrue(h.rt.aborted and h.it.aborted)
        h.pump()
        self.assertEqual((h.root_closed, h.inner_closed), ([None], [None]))
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_root_go_away(self) -> None:
        """After the root's go-away open streams finish, new guests are reset, then it closes."""
        h = Harness()
        g, s = h.stream()
        h.root.go_away()
        h.pump()
        self.assertTrue(h.guest(gport=2).aborted)
        g.protocol.dataReceived(b"still")
        h.pump()
        self.assertEqual(s.take(), b"still")
        self.assertFalse(h.rt.disconnecting)
        g.peer_eof()
        s.peer_eof()
        h.pump()
        self.assertTrue(h.rt.lost and h.it.lost)
        self.assertEqual((h.root_closed, h.inner_closed), ([None], [None]))
        self.assertFalse(g.aborted or s.aborted)

    def test_inner_go_away_when_idle(self) -> None:
        """A go-away with no stream open closes the link at once."""
        h = Harness()
        h.inner.go_away()
        h.pump()
        self.assertEqual((h.root_closed, h.inner_closed), ([None], [None]))

    def test_protocol_error_closes_link_and_resets_streams(self) -> None:
        """Garbage from the peer ends the link with GO_AWAY and resets every stream."""
        h = Harness()
        g, s = h.stream()
        h.drain_unix = False
        h.root.dataReceived(fr.header(0x42, 0, 0))
        out = h.rt.take()
        self.assertIn(fr.encode_go_away(Reason.PROTOCOL_ERROR, 1), out)
        self.assertTrue(h.rt.disconnecting)
        h.root.dataReceived(b"more is ignored")
        h.pump()
        self.assertTrue(s.aborted)
        self.assertEqual(h.root_closed, [None])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_link_loss_resets_streams_and_cancels_connects(self) -> None:
        """When the UNIX connection drops, guests are reset and connect attempts cancelled."""
        h = Harness()
        g1, s1 = h.stream()
        g2 = h.guest(gport=2)
        h.it.peer_reset()
        h.rt.peer_reset()
        h.pump()
        self.assertTrue(g1.aborted and g2.aborted and s1.aborted)
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        self.assertEqual((h.root_closed, h.inner_closed), ([None], [None]))

    def test_idle_timeout(self) -> None:
        """A stream with no data for the idle timeout is reset; a busy one is not."""
        h = Harness(limits=Limits(idle_timeout=60.0))
        g1, s1 = h.stream()
        g2, s2 = h.stream()
        for _ in range(3):
            h.reactor.advance(30)
            g2.protocol.dataReceived(b"tick")
            h.pump()
        self.assertFalse(s1.aborted)  # 90 s: one full idle period not yet seen by a sweep.
        h.reactor.advance(30)
        h.pump()
        self.assertTrue(s1.aborted and g1.aborted)
        self.assertFalse(s2.aborted or g2.aborted)
        self.assertEqual(h.root.counters.resets_sent, {Reason.IDLE_TIMEOUT: 1})
        self.assertEqual(h.inner.counters.resets_received, {Reason.IDLE_TIMEOUT: 1})
        h.rt.peer_reset()
        h.it.peer_reset()
        h.pump()
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_guest_before_link(self) -> None:
        """A guest accepted before the link is connected is reset."""
        reactor = MemoryReactorClock()
        inner = InnerLink(reactor, lambda ports: None, Limits(), ping_interval=None)
        proto = inner.guest_factory(5030).buildProtocol(None)
        t = FakeTransport(proto)
        proto.makeConnection(t)
        self.assertTrue(t.aborted)


class _Pair:
    """One guest connection and (once connected) its service connection, with what each sent."""

    def __init__(self, guest: FakeTransport, index: int) -> None:
        self.guest = guest
        self.index = index  # Its connect attempt in reactor.tcpClients.
        self.service: FakeTransport | None = None
        self.to_service = bytearray()
        self.to_guest = bytearray()
        self.got_service = bytearray()
        self.got_guest = bytearray()
        self.reset = False
        self.g_eof = False
        self.s_eof = False


class RandomSpliceTests(unittest.TestCase):
    """Random interleavings of guest and service actions keep every invariant."""

    @settings(max_examples=150, deadline=None)
    @given(
        steps=st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "new",
                        "connect",
                        "gdata",
                        "sdata",
                        "geof",
                        "seof",
                        "greset",
                        "sreset",
                        "gdrain",
                        "sdrain",
                        "glimit",
                        "slimit",
                        "ulimit",
                        "pump",
                    ]
                ),
                st.integers(0, 5),
                st.integers(1, 9000),
            ),
            max_size=60,
        )
    )
    def test_random_actions(self, steps: list[tuple[str, int, int]]) -> None:
        """Bytes of streams never reset arrive intact, every stream ends, nothing errs."""
        h = Harness(window=4096)
        pairs: list[_Pair] = []
        counter = 0

        def live(p: _Pair, t: FakeTransport | None) -> bool:
            return t is not None and not t.lost and not t.disconnecting

        def drain(p: _Pair) -> None:
            p.got_guest += p.guest.take()
            if p.service is not None:
                p.got_service += p.service.take()

        for action, i, n in steps:
            p = pairs[i % len(pairs)] if pairs else None
            if action == "new" or p is None:
                if len(pairs) < 6:
                    pairs.append(_Pair(h.guest(gport=len(pairs) + 1), len(pairs)))
                continue
            g, s = p.guest, p.service
            if action == "connect":
                if s is None and not p.reset and not g.lost and p.index < len(h.reactor.tcpClients):
                    p.service = h.service(index=p.index)
            elif action in ("gdata", "sdata"):
                t = g if action == "gdata" else s
                if t is not None and live(p, t) and t.reading:
                    if (action == "gdata" and p.g_eof) or (action == "sdata" and p.s_eof):
                        continue
                    data = bytes((counter + k) % 256 for k in range(n))
                    counter += n
                    (p.to_service if action == "gdata" else p.to_guest).extend(data)
                    t.protocol.dataReceived(data)
            elif action in ("geof", "seof"):
                t = g if action == "geof" else s
                done = p.g_eof if action == "geof" else p.s_eof
                if t is not None and live(p, t) and t.reading and not done:
                    if action == "geof":
                        p.g_eof = True
                    else:
                        p.s_eof = True
                    t.peer_eof()
            elif action in ("greset", "sreset"):
                t = g if action == "greset" else s
                if t is not None and not t.lost:
                    p.reset = True
                    t.peer_reset()
            elif action in ("gdrain", "sdrain"):
                drain(p)
            elif action in ("glimit", "slimit"):
                t = g if action == "glimit" else s
                if t is not None:
                    t.set_limit(None if t.limit is not None else n % 5000)
            elif action == "ulimit":
                h.drain_unix = not h.drain_unix
            h.pump()

        # Wind down: everything drains, every live stream gets its FINs.
        h.drain_unix = True
        h.pump()
        for p in pairs:
            for t in (p.guest, p.service):
                if t is not None:
                    t.set_limit(None)
            if p.service is None and not p.reset and not p.guest.lost:
                p.service = h.service(index=p.index)
        for _ in range(200):
            h.pump()
            for p in pairs:
                drain(p)
            h.pump()
            if not any(
                p.guest.written or (p.service is not None and p.service.written) for p in pairs
            ):
                break
        for p in pairs:
            for attr, t in (("g_eof", p.guest), ("s_eof", p.service)):
                if t is not None and not getattr(p, attr) and live(p, t):
                    setattr(p, attr, True)
                    self.assertTrue(t.reading, "a drained stream must be readable again")
                    t.peer_eof()
                    h.pump()
        for _ in range(200):
            for p in pairs:
                drain(p)
            h.pump()
        for p in pairs:
            aborted = p.guest.aborted or (p.service is not None and p.service.aborted)
            if not p.reset and not aborted:
                self.assertEqual(p.got_service, p.to_service)
                self.assertEqual(p.got_guest, p.to_guest)
            self.assertTrue(p.guest.lost)
            if p.service is not None:
                self.assertTrue(p.service.lost)
        self.assertEqual((h.root.stream_count, h.inner.stream_count), (0, 0))
        self.assertEqual((h.root.conn.stream_count, h.inner.conn.stream_count), (0, 0))
        self.assertEqual(self.flushLoggedErrors(), [])


class IterationHighWaterTests(unittest.TestCase):
    """``LINK_HIGH_WATER`` bounds what one reactor iteration reads."""

    def test_full_link_pauses_guests_within_the_iteration(self) -> None:
        """Many guests readable in one epoll batch, the link's UNIX buffer full: the reads
        of one iteration stay bounded near ``LINK_HIGH_WATER``, as with an immediate flush
        (the reactor skips the batch's sockets paused meanwhile), instead of every
        readable guest adding a full read to the link's connection queue."""
        h = Harness()
        guests = []
        for i in range(16):
            guests.append(h.guest(gport=41000 + i))
            h.service()
        h.inner._turn_end = te = TurnEnd()
        h.drain_unix = False
        h.it.set_limit(0)
        read = 0
        for g in guests:  # one iteration's events: a paused socket is not read
            if g.reading:
                g.protocol.dataReceived(b"x" * link_module.STREAM_BUFFER)
                read += link_module.STREAM_BUFFER
        self.assertLessEqual(read, link_module.LINK_HIGH_WATER + link_module.STREAM_BUFFER)
        te.run()
        self.assertFalse(any(g.reading for g in guests))


class GoAwayFlushTests(unittest.TestCase):
    """Frames queued for the end of the iteration leave before a closing link closes."""

    def test_last_fin_before_a_go_away_close(self) -> None:
        """After a go-away the last stream's HALF_CLOSE (queued for the end of the
        iteration) leaves before the link closes: the link's own write event in the
        same iteration (its write queue drained) must not close it first."""
        h = Harness()
        g, s = h.stream()
        h.inner.go_away()
        h.pump()
        s.peer_eof()  # the service's FIN reaches the guest
        h.pump()
        h.inner._turn_end = te = TurnEnd()
        g.peer_eof()  # the guest's FIN: its HALF_CLOSE waits for the end of the iteration
        g.deliver_loss()  # both FINs through: the guest's connection closes
        self.assertTrue(h.it.disconnecting)  # the last stream is gone: the link closes
        h.it.deliver_loss()  # the link's write event in the same iteration: closed
        te.run()
        h.pump()
        self.assertTrue(s.write_closed, "the service got the guest's FIN")
        self.assertFalse(s.aborted)
