"""tproxy.link_connect against the real reactor on loopback (no root needed).

The connect completes on the kernel's word, so these use real sockets: a
connection made (at once, as on loopback, and through the writable event),
one refused, one cancelled, one timed out; each failure arrives as the
exception Twisted's own connect gives, through ``on_failed``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from tproxy import link_connect
from tproxy.link_connect import ConnectDeadlines, OutgoingConnection, connect_tcp


class _Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.made: defer.Deferred[None] = defer.Deferred()
        self.data = b""

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class _Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hi")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class ConnectTests(unittest.TestCase):
    def _failures(self) -> tuple[list[tuple[Failure, Any]], defer.Deferred[None]]:
        seen: list[tuple[Failure, Any]] = []
        done: defer.Deferred[None] = defer.Deferred()

        def on_failed(failure: Failure, arg: Any) -> None:
            seen.append((failure, arg))
            done.callback(None)

        self.on_failed = on_failed
        return seen, done

    @defer.inlineCallbacks
    def test_connects(self):  # type: ignore[no-untyped-def]
        """A listening service: the protocol is connected and reads what the service sends."""
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, protocol.Factory.forProtocol(_Greeter), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        p = _Recorder()
        lost: defer.Deferred[None] = defer.Deferred()
        p.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign,assignment]
        seen, _ = self._failures()
        conn = connect_tcp(reactor, "127.0.0.1", listening.getHost().port, p, 5.0, self.on_failed)
        yield p.made
        self.assertIs(p.transport, conn)
        self.assertEqual(conn.getPeer().port, listening.getHost().port)
        self.assertEqual(conn.getHost().host, "127.0.0.1")
        yield lost
        self.assertEqual(p.data, b"hi")
        self.assertEqual(seen, [])

    def test_connected_at_once(self) -> None:
        """On loopback the connect is complete when connect() returns: the protocol is
        connected inside the call, reading, never registered for writing, no timeout kept."""
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        p = _Recorder()
        seen, _ = self._failures()
        deadlines = ConnectDeadlines(reactor)
        conn = connect_tcp(
            reactor, "127.0.0.1", listening.getHost().port, p, 5.0, self.on_failed, p, deadlines
        )
        self.addCleanup(conn.abortConnection)
        self.assertTrue(p.made.called)
        self.assertIsNone(conn._arg)  # on_failed's argument dropped: no cycle with the protocol
        self.assertIs(p.transport, conn)
        self.assertIn(conn, reactor.getReaders())  # type: ignore[attr-defined]
        self.assertNotIn(conn, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertNotIn("doWrite", conn.__dict__)
        self.assertEqual((len(deadlines), conn._deadline, seen), (0, None, []))
        conn.cancel()  # connected: nothing to cancel
        self.assertEqual(seen, [])

    def test_connected_at_once_protocol_raises(self) -> None:
        """A protocol that raises as it is connected at once loses that connection alone:
        connect_tcp returns, the error is logged, the socket is closed, the protocol is told."""
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)

        class Broken(protocol.Protocol):
            lost: list[Failure] = []

            def connectionMade(self) -> None:
                raise ZeroDivisionError("bug")

            def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
                self.lost.append(reason)

        p = Broken()
        seen, _ = self._failures()
        conn = connect_tcp(reactor, "127.0.0.1", listening.getHost().port, p, 5.0, self.on_failed)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(p.lost), 1)
        self.assertTrue(p.lost[0].check(ZeroDivisionError))
        self.assertFalse(hasattr(conn, "socket"))  # closed and dropped by tcp.Connection
        self.assertNotIn(conn, reactor.getReaders())  # type: ignore[attr-defined]
        self.assertEqual(seen, [])

    @defer.inlineCallbacks
    def test_connects_on_writable(self):  # type: ignore[no-untyped-def]
        """A connect still in progress after connect() finishes in its first writable event."""
        self.patch(link_connect, "_established", lambda sock: False)
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, protocol.Factory.forProtocol(_Greeter), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        p = _Recorder()
        seen, _ = self._failures()
        conn = connect_tcp(
            reactor, "127.0.0.1", listening.getHost().port, p, 5.0, self.on_failed, p
        )
        self.assertFalse(p.made.called)
        self.assertIs(conn._arg, p)
        self.assertIn(conn, reactor.getWriters())  # type: ignore[attr-defined]
        yield p.made
        self.assertIs(p.transport, conn)
        self.assertIsNone(conn._arg)  # on_failed's argument dropped: no cycle with the protocol
        self.assertNotIn(conn, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertIsNone(conn._timer)
        self.assertEqual(seen, [])

    @defer.inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        """No listener: on_failed gets ConnectionRefusedError and the argument given."""
        seen, done = self._failures()
        p = _Recorder()
        conn = connect_tcp(reactor, "127.0.0.1", _dead_port(), p, 5.0, self.on_failed, "arg")
        yield done
        [(failure, arg)] = seen
        self.assertTrue(failure.check(error.ConnectionRefusedError))
        self.assertEqual(arg, "arg")
        self.assertIsNone(p.transport)
        self.assertEqual(conn.socket.fileno(), -1)

    def test_cancelled(self) -> None:
        """cancel() before the connect ends: CancelledError, socket closed, nothing more."""
        seen, _ = self._failures()
        p = _Recorder()
        conn = connect_tcp(reactor, "127.0.0.1", _dead_port(), p, 5.0, self.on_failed)
        conn.cancel()
        conn.cancel()
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0][0].check(defer.CancelledError))
        self.assertEqual(conn.socket.fileno(), -1)
        self.assertNotIn(conn, reactor.getWriters())  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_timeout(self):  # type: ignore[no-untyped-def]
        """A connect not done within the timeout fails with TimeoutError."""
        seen, done = self._failures()
        conn = connect_tcp(reactor, "127.0.0.1", _dead_port(), _Recorder(), 0.0, self.on_failed)
        self.assertIsInstance(conn, OutgoingConnection)
        yield done
        self.assertTrue(seen[0][0].check(error.TimeoutError))

    @defer.inlineCallbacks
    def test_immediate_error(self):  # type: ignore[no-untyped-def]
        """An address connect() rejects at once fails from the reactor, not in the call."""
        seen, done = self._failures()
        connect_tcp(reactor, "0.0.0.0", 0, _Recorder(), 5.0, self.on_failed)
        self.assertEqual(seen, [])
        yield done
        self.assertTrue(seen[0][0].check(error.ConnectError))
