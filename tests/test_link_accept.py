"""Tests for tproxy.link_accept's ``GuestServer.doRead``: the same end state as Twisted's path.

A guest connection's EOF is handled inside ``doRead`` (no reactor round trip
through ``_disconnectSelectable``); these tests run both paths on a real socket
pair in the test's reactor and compare what the protocol and the transport see.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import main, reactor, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tproxy.link_accept import GuestPort, GuestServer

R: Any = reactor


class _Recorder(Protocol):
    """Records every callback it gets, in order."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(("data", data))

    def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:  # type: ignore[assignment]
        self.seen.append(("lost", reason.type))


@implementer(IHalfCloseableProtocol)
class _HalfCloseable(_Recorder):
    def readConnectionLost(self) -> None:
        self.seen.append("read lost")

    def writeConnectionLost(self) -> None:
        self.seen.append("write lost")


class DoReadTests(unittest.TestCase):
    def read(self, proto: _Recorder, twisted: bool, peer_sends: bytes | None) -> tuple[Any, Any]:
        """One read event of a guest whose peer sent ``peer_sends`` (None: its FIN)."""
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        self.addCleanup(a.close)
        t: Any = GuestServer(a, proto, ("127.0.0.1", 40000), None, 1, R)  # type: ignore[arg-type]
        proto.makeConnection(t)
        t.startReading()
        self.addCleanup(lambda: t.connected and t.stopReading())
        if peer_sends is None:
            b.shutdown(socket.SHUT_WR)
        else:
            b.sendall(peer_sends)
        why = tcp.Connection.doRead(t) if twisted else t.doRead()
        if why is not None:  # the reactor's part (posixbase._doReadOrWrite)
            R._disconnectSelectable(t, why, True)
        state = (
            proto.seen,
            t in R.getReaders(),
            t.connected,
            t.disconnected,
            t.disconnecting,
            a.fileno() >= 0,
        )
        return why, state

    def test_eof_half_closeable(self) -> None:
        """EOF: reading stops, ``readConnectionLost`` runs, the socket stays open: as Twisted's."""
        lean, twisted = (self.read(_HalfCloseable(), tw, None) for tw in (False, True))
        self.assertIsNone(lean[0])
        self.assertIs(twisted[0], main.CONNECTION_DONE)
        self.assertEqual(lean[1], twisted[1])
        self.assertEqual(lean[1], (["read lost"], False, 1, False, False, True))

    def test_eof_other_protocol(self) -> None:
        """EOF for a protocol that cannot half-close: Twisted's own path (connection lost)."""
        lean, twisted = (self.read(_Recorder(), tw, None) for tw in (False, True))
        self.assertIs(lean[0], main.CONNECTION_DONE)
        self.assertEqual(lean[1], twisted[1])
        self.assertEqual(lean[1][0], [("lost", main.CONNECTION_DONE.__class__)])

    def test_data(self) -> None:
        """Data: ``dataReceived``, reading goes on."""
        lean, twisted = (self.read(_HalfCloseable(), tw, b"hello") for tw in (False, True))
        self.assertEqual(lean, twisted)
        self.assertEqual(lean[1], ([("data", b"hello")], True, 1, False, False, True))

    def test_nothing_to_read(self) -> None:
        """EAGAIN (a spurious wake-up): nothing happens."""
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        proto = _HalfCloseable()
        t: Any = GuestServer(a, proto, ("127.0.0.1", 40000), None, 1, R)  # type: ignore[arg-type]
        self.addCleanup(a.close)
        proto.makeConnection(t)
        self.assertIsNone(t.doRead())
        self.assertEqual(proto.seen, [])


class _Factory(Factory):
    """Records the addresses it is given; refuses (None) the connections numbered in ``refuse``."""

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.refuse = refuse
        self.addrs: list[Any] = []
        self.protocols: list[_HalfCloseable] = []

    def buildProtocol(self, addr: Any) -> _HalfCloseable | None:  # type: ignore[override]
        self.addrs.append(addr)
        if len(self.addrs) - 1 in self.refuse:
            return None
        p = _HalfCloseable()
        self.protocols.append(p)
        return p


class PortDoReadTests(unittest.TestCase):
    """``GuestPort.doRead`` accepts as Twisted's ``tcp.Port.doRead`` does."""

    def accept(self, twisted: bool, clients: int, limit: int, refuse: tuple[int, ...] = ()) -> Any:
        f = _Factory(refuse)
        port = GuestPort(0, f, 50, "127.0.0.1", R)
        port.startListening()
        port.stopReading()  # this test calls doRead itself
        self.addCleanup(port.stopListening)
        cs = []
        for _ in range(clients):
            c = socket.create_connection(("127.0.0.1", port.getHost().port))
            self.addCleanup(c.close)
            cs.append(c)
        port.numberAccepts = limit
        (tcp.Port.doRead if twisted else GuestPort.doRead)(port)
        for p in f.protocols:
            self.addCleanup(p.transport.socket.close)  # type: ignore[union-attr]
        names = [c.getsockname() for c in cs]
        return (
            [
                (
                    type(t),
                    t.client in names,
                    t.sessionno,
                    t.hostname,
                    t.server is port,
                    t.connected,
                    t in R.getReaders(),
                    t.socket.family,
                    t.socket.type,
                    t.socket.proto,
                    t.socket.gettimeout(),
                    t.socket.getpeername() in names,
                )
                for t in (p.transport for p in f.protocols)
            ],
            [(type(a), a.type, a.host, (a.host, a.port) in names) for a in f.addrs],
            port.numberAccepts,
            port.sessionno,
        )

    def test_same_as_twisted(self) -> None:
        """Transports, addresses, sessions and the accept limit's scaling: as Twisted's."""
        for clients, limit, refuse in ((1, 1, ()), (1, 5, ()), (3, 2, ()), (3, 5, (1,))):
            lean = self.accept(False, clients, limit, refuse)
            self.assertEqual(lean, self.accept(True, clients, limit, refuse))
            self.assertEqual(len(lean[1]), min(clients, limit))
            self.assertEqual(len(lean[0]), min(clients, limit) - len(refuse))
            self.assertEqual(lean[0][0][0], GuestServer)
            self.assertEqual(
                lean[0][0][-6:], (False, socket.AF_INET, socket.SOCK_STREAM, 0, 0.0, True)
            )

    def test_accept_error_goes_to_twisted(self) -> None:
        """An accept error other than EAGAIN: Twisted's ``doRead`` handles it (EMFILE...)."""
        port = GuestPort(0, _Factory(), 50, "127.0.0.1", R)
        calls: list[Any] = []

        class _Failing:
            def _accept(self) -> Any:
                raise OSError(errno.ECONNABORTED, "aborted")

        port.socket = _Failing()  # type: ignore[assignment]
        port.numberAccepts = 3
        self.patch(tcp.Port, "doRead", lambda self: calls.append(self))
        port.doRead()
        self.assertEqual(calls, [port])
