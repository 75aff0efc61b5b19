"""Tests for tproxy.link's bulk data path on real sockets: the link's write queue and splice.

The fakes of ``test_link`` have no socket, so they take Twisted's write path;
here a root and an inner link share a real UNIX socket pair in the test's
reactor, and the streams are real loopback TCP connections, so the writes
fill sockets, leftovers wait in the link's queue, and (where ``os.splice``
exists) stream bytes are spliced through the link's pipe.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from tproxy import link as link_mod
from tproxy.config import Limits
from tproxy.link import InnerLink, RootLink
from tproxy.model import Destination
from tproxy.root import adopt_with

R: Any = reactor
PORT = 5030


@implementer(IHalfCloseableProtocol)
class _Service(Protocol):
    """Reads the guest's bytes to EOF, then answers ``reply`` bytes and closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.got = hashlib.sha256()
        self.n = 0

    def dataReceived(self, data: bytes) -> None:
        self.got.update(data)
        self.n += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(self.reply)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _Guest(Protocol):
    """Sends ``payload``, half-closes, reads the reply to EOF."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.got = hashlib.sha256()
        self.n = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.got.update(data)
        self.n += len(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


class BulkPathTests(unittest.TestCase):
    """Several MB each way through a real inner + root pair, byte for byte."""

    def setUp(self) -> None:
        self.services: list[_Service] = []
        self.reply = os.urandom(6_000_000)
        sf = Factory.forProtocol(lambda: self._service())
        self.service_port = R.listenTCP(0, sf, interface="127.0.0.1")
        dest = Destination("127.0.0.1", self.service_port.getHost().port)
        self.root = RootLink(R, "br0", lambda p: dest, Limits(), ping_interval=None)
        self.inner = InnerLink(R, lambda ports: None, ping_interval=None, stats_interval=None)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s, link in ((a, self.root), (b, self.inner)):
            s.setblocking(False)
            adopt_with(R)(s.fileno(), link)
            s.close()
        self.guest_port = R.listenTCP(0, self.inner.guest_factory(PORT), interface="127.0.0.1")

    def _service(self) -> _Service:
        s = _Service(self.reply)
        self.services.append(s)
        return s

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        yield self.guest_port.stopListening()
        yield self.service_port.stopListening()
        for link in (self.inner, self.root):
            if link.transport is not None and not link._lost:
                link.transport.loseConnection()
        yield defer.DeferredList([self.inner.closed, self.root.closed])

    @defer.inlineCallbacks
    def transfer(self, payload: bytes) -> Any:
        guest = _Guest(payload)
        host = self.guest_port.getHost()
        R.connectTCP("127.0.0.1", host.port, _OneShot(guest))
        yield guest.done
        return guest

    @defer.inlineCallbacks
    def test_both_ways(self) -> Any:
        """8 MB up and 6 MB down arrive intact; the counters count every byte once."""
        payload = os.urandom(8_000_000)
        guest = yield self.transfer(payload)
        (svc,) = self.services
        self.assertEqual(
            (svc.n, svc.got.digest()), (len(payload), hashlib.sha256(payload).digest())
        )
        self.assertEqual(
            (guest.n, guest.got.digest()), (len(self.reply), hashlib.sha256(self.reply).digest())
        )
        yield _settle(lambda: not self.inner.stream_count and not self.root.stream_count)
        up = self.inner.link_counters()
        down = self.root.link_counters()
        self.assertEqual((up["bytes_to_link"], up["bytes_from_link"]), (8_000_000, 6_000_000))
        self.assertEqual((down["bytes_from_link"], down["bytes_to_link"]), (8_000_000, 6_000_000))
        self.assertEqual((self.inner._wq_len, self.root._wq_len), (0, 0))
        if link_mod._splice is not None:
            # Both sides sent through their pipe, and closed it when the streams ended.
            for link in (self.inner, self.root):
                self.assertGreater(link.spliced, 0)
                self.assertEqual(link._piped, 0)
                self.assertIsNone(link._pipe)

    @defer.inlineCallbacks
    def test_streams_after_each_other(self) -> Any:
        """A second stream on the same link (and pipe) is as intact as the first."""
        for size in (3_000_000, 65537):
            payload = os.urandom(size)
            guest = yield self.transfer(payload)
            self.assertEqual(self.services[-1].got.digest(), hashlib.sha256(payload).digest())
            self.assertEqual(guest.got.digest(), hashlib.sha256(self.reply).digest())


class _OneShot(ClientFactory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_


def _settle(done: Any, tries: int = 200) -> defer.Deferred[None]:
    """Fire once ``done()`` holds (checked every 10 ms, at most ``tries`` times)."""
    d: defer.Deferred[None] = defer.Deferred()

    def check(left: int) -> None:
        if done() or not left:
            d.callback(None)
        else:
            R.callLater(0.01, check, left - 1)

    check(tries)
    return d
