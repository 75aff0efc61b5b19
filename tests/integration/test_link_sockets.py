"""RootLink and InnerLink over real sockets: a UNIX socket pair and loopback TCP (no root needed).

The unit tests in tests/test_link.py use fake transports; these check the
same splice against Twisted's real transports, where half-close, producers
and resets are the kernel's: an echo through the link with a FIN each way,
a refused open seen by the guest as a reset, a large transfer intact, and
a service that answers and closes (the connect complete at once, the
answer and its FIN read in one turn and sent on in one ``sendmsg``, and
written to the guest as one segment with the FIN).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tproxy import link as link_module
from tproxy.config import Limits
from tproxy.link import InnerLink, RootLink
from tproxy.model import Destination
from tproxy.protocol import frames as fr


@implementer(IHalfCloseableProtocol)
class _Echo(protocol.Protocol):
    """Echoes everything; answers a FIN with a FIN once its data is out."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class _Client(protocol.Protocol):
    """A guest: sends a payload, half-closes, collects the answer and how the connection ended."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.done: defer.Deferred[BaseException] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.done.callback(reason.value)


class _AnswerAndClose(protocol.Protocol):
    """A service that answers its request and closes (HTTP with ``Connection: close``)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"reply to " + data)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class _SendmsgRecorder:
    """A link's socket that records each ``sendmsg``'s buffers (and sends them)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sent: list[bytes] = []

    def sendmsg(self, chunks: list[Any]) -> int:
        n: int = self._sock.sendmsg(chunks)
        self.sent.append(b"".join(bytes(c) for c in chunks)[:n])
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _One(protocol.Factory):
    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> protocol.Protocol:
        return self.proto


class LinkSocketTests(unittest.TestCase):
    """The links splice real TCP connections over a real UNIX socket pair."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        answer = reactor.listenTCP(
            0, protocol.Factory.forProtocol(_AnswerAndClose), interface="127.0.0.1"
        )
        self.addCleanup(answer.stopListening)
        # A port nobody listens on: bound and closed again.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        s.close()
        self.services = {
            5030: Destination("127.0.0.1", echo.getHost().port),
            6000: Destination("127.0.0.1", dead_port),
            8000: Destination("127.0.0.1", answer.getHost().port),
        }
        self.root = RootLink(reactor, "lnk0", self.services.get, Limits(), ping_interval=None)
        self.inner = InnerLink(reactor, lambda ports: None, Limits(), bridge="lnk0")
        a, b = socket.socketpair()
        for sock, link in ((a, self.root), (b, self.inner)):
            sock.setblocking(False)
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _One(link))
            sock.close()
        self.listeners = {}
        for port in (5030, 6000, 7000, 8000):
            p = reactor.listenTCP(0, self.inner.guest_factory(port), interface="127.0.0.1")
            self.addCleanup(p.stopListening)
            self.listeners[port] = p.getHost().port
        self.addCleanup(self._close_links)

    def _close_links(self) -> defer.Deferred[object]:
        for link in (self.root, self.inner):
            if link.transport is not None:
                link.transport.loseConnection()
        return defer.gatherResults([self.root.closed, self.inner.closed])

    def _guest(self, service_port: int, payload: bytes) -> _Client:
        client = _Client(payload)
        cc = protocol.ClientCreator(self.reactor, lambda: client)
        cc.connectTCP("127.0.0.1", self.listeners[service_port])
        return client

    @defer.inlineCallbacks
    def test_echo_with_half_close(self):  # type: ignore[no-untyped-def]
        """A guest's request and FIN cross the link; the echo and its FIN come back, no reset."""
        payload = os.urandom(3_000_000)
        client = self._guest(5030, payload)
        reason = yield client.done
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertEqual(bytes(client.received), payload)
        yield self._settle()
        self.assertEqual((self.root.stream_count, self.inner.stream_count), (0, 0))
        self.assertEqual(self.root.counters.resets_sent, {})
        self.assertEqual(self.inner.counters.resets_sent, {})

    @defer.inlineCallbacks
    def test_parallel_streams(self):  # type: ignore[no-untyped-def]
        """Twenty guests at once each get exactly their own bytes back."""
        payloads = [os.urandom(50_000 + i) for i in range(20)]
        clients = [self._guest(5030, p) for p in payloads]
        yield defer.gatherResults([c.done for c in clients])
        for c, p in zip(clients, payloads, strict=True):
            self.assertEqual(bytes(c.received), p)

    @defer.inlineCallbacks
    def test_unknown_service_resets_guest(self):  # type: ignore[no-untyped-def]
        """A port without a destination ends the guest's connection with a reset."""
        client = self._guest(7000, b"hello")
        reason = yield client.done
        self.assertNotIsInstance(reason, error.ConnectionDone)
        self.assertEqual(bytes(client.received), b"")

    @defer.inlineCallbacks
    def test_refused_destination_resets_guest(self):  # type: ignore[no-untyped-def]
        """A destination that refuses the connection resets the guest."""
        client = self._guest(6000, b"hello")
        reason = yield client.done
        self.assertNotIsInstance(reason, error.ConnectionDone)
        self.assertEqual(sum(self.inner.counters.refused.values()), 1)

    @defer.inlineCallbacks
    def test_answer_and_close(self):  # type: ignore[no-untyped-def]
        """A service's answer and its FIN reach the guest; the root sent them in one sendmsg,
        DATA then HALF_CLOSE, and both sides end without a reset."""
        recorder = _SendmsgRecorder(self.root._sock)
        self.root._sock = recorder
        flags: list[int] = []
        write_now = link_module._write_now

        def recording(t: Any, sock: Any, data: Any, f: int = 0) -> None:
            flags.append(f)
            write_now(t, sock, data, f)

        self.patch(link_module, "_write_now", recording)
        client = self._guest(8000, b"hello")
        reason = yield client.done
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertEqual(bytes(client.received), b"reply to hello")
        [sent] = [b for b in recorder.sent if b"reply to hello" in b]
        data_type, _, sid, length = fr.HEADER.unpack_from(sent)
        self.assertEqual((data_type, length), (fr.FrameType.DATA, 14))
        end = fr.HEADER_SIZE + length
        self.assertEqual(
            fr.HEADER.unpack_from(sent, end), (fr.FrameType.HALF_CLOSE, 0, sid, 0)
        )
        # The inner wrote the answer with MSG_MORE: its shutdown sent it with the FIN.
        self.assertIn(socket.MSG_MORE, flags)
        yield self._settle()
        self.assertEqual((self.root.stream_count, self.inner.stream_count), (0, 0))
        resets = (self.root.counters.resets_sent, self.inner.counters.resets_sent)
        self.assertEqual(resets, ({}, {}))
        self.assertEqual(self.root.counters.accepted, 1)

    def _settle(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.reactor.callLater(0.05, d.callback, None)
        return d
