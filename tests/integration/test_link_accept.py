"""tproxy.link_accept against the real reactor on loopback (no root needed).

A guest connection accepted by a ``GuestEndpoint`` is not read until its
protocol resumes it; then it reads as any Twisted connection does.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, error, protocol, reactor, task
from twisted.trial import unittest

from tproxy.link_accept import GuestEndpoint, GuestPort, GuestServer


class _Held(protocol.Protocol):
    """Records what it reads; tells when it is connected and when it has data."""

    def __init__(self) -> None:
        self.made: defer.Deferred[None] = defer.Deferred()
        self.got: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.got.callback(data)


class GuestEndpointTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_not_read_until_resumed(self):  # type: ignore[no-untyped-def]
        """The accepted socket is not registered for reading until resumeProducing."""
        p = _Held()
        port = yield GuestEndpoint(reactor, 0, 10, "127.0.0.1").listen(
            protocol.Factory.forProtocol(lambda: p)
        )
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, GuestPort)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(b"hello")
        yield p.made
        self.assertIsInstance(p.transport, GuestServer)
        self.assertEqual(p.transport.client, ("127.0.0.1", client.getsockname()[1]))  # type: ignore[union-attr]
        self.assertIn("_Held #", repr(p.transport))
        self.assertNotIn(p.transport, reactor.getReaders())  # type: ignore[attr-defined]
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(p.got.called)
        p.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual((yield p.got), b"hello")
        p.transport.loseConnection()  # type: ignore[union-attr]

    def test_listen_error(self) -> None:
        """A port in use fails the Deferred with CannotListenError, as listenTCP raises."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        d = GuestEndpoint(reactor, taken.getsockname()[1], 10, "127.0.0.1").listen(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        self.failureResultOf(d, error.CannotListenError)
