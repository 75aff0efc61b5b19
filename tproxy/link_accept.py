"""The inner proxy's listening endpoint: guest connections not registered for reading at once.

Why: an accepted guest connection is read once by the stream itself (early
data, ``tproxy.link``), then waits for the root's OPEN_RESULT. Twisted's
``tcp.Server`` registers the new socket for reading as it is built, and
the stream paused it at once: two ``epoll_ctl`` (add, delete) per connection
for nothing, before the third that starts reading. A ``GuestServer`` skips
that first registration (and the log prefix and repr strings ``tcp.Server``
formats per connection); the stream's own resume (its producer's
``resumeProducing``) starts reading when the stream opens.

Both also take a few generic steps out of each guest connection's path
(issue 7 (b); docs/performance.md, "Less Python per connection in the
inner"): ``GuestPort.doRead`` accepts without ``tcp.Port.doRead``'s per-call
logging context, generator and ``socket.accept`` wrapper, and
``GuestServer.doRead`` takes the guest's EOF itself instead of the reactor's
half-close path with its zope adaptation. Anything unusual (an accept error,
an IPv6 port, a protocol that cannot half-close) goes to Twisted's own code;
tests/test_link_accept.py compares the end states with Twisted's.

``GuestEndpoint`` is ``TCP4ServerEndpoint`` with ``GuestPort`` for
``tcp.Port``; nothing else differs (backlog, interface, errors).
"""

from __future__ import annotations

import socket
from errno import EWOULDBLOCK
from typing import Any

from twisted.internet import address, defer, main, tcp
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.python import log
from zope.interface import implementer


class GuestServer(tcp.Server):
    """An accepted guest connection that is read only once something resumes it."""

    logstr = "GuestServer"

    def __init__(
        self,
        sock: socket.socket,
        protocol: IProtocol,
        client: tuple[Any, ...],
        server: tcp.Port,
        sessionno: int,
        reactor: Any,
    ) -> None:
        # tcp.Server.__init__ less its startReading(), and less the log prefix
        # and repr it formats for every connection (``logstr``, ``__repr__``).
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.connected = 1

    def doRead(self) -> Any:
        """``tcp.Connection.doRead``; on EOF, the reactor's half-close step taken here.

        Twisted's ``doRead`` returns ``CONNECTION_DONE`` on EOF, and the
        reactor (``_disconnectSelectable``) stops reading and calls
        ``tcp.Connection.readConnectionLost``, which adapts the protocol to
        ``IHalfCloseableProtocol``: a zope adaptation whose failed
        ``__conform__`` lookup raises and clears an AttributeError, once per
        guest connection (its FIN). For a half-closeable protocol (the link's
        streams) the same two steps run here with a plain ``providedBy``;
        any other protocol gets Twisted's own path. An exception from
        ``readConnectionLost`` reaches the reactor, which logs it and loses
        the connection, as Twisted's would.
        """
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if data:
            self.protocol.dataReceived(data)
            return None
        protocol = self.protocol
        if not IHalfCloseableProtocol.providedBy(protocol):
            return main.CONNECTION_DONE
        self.stopReading()
        protocol.readConnectionLost()
        return None

    def __repr__(self) -> str:
        name = type(self.protocol).__name__
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"


class GuestPort(tcp.Port):
    """A listening TCP port whose connections are ``GuestServer``s."""

    transport = GuestServer

    def doRead(self) -> None:
        """``tcp.Port.doRead`` for IPv4, less its generic steps; accept errors go to Twisted's.

        The same accepts, ``numberAccepts`` scaling, transports and
        ``buildProtocol`` addresses, without what Twisted's adds per call or
        per connection: a buffering ``Logger`` context (two more ``Logger``
        objects via the ``_logger`` descriptor), the ``_accept`` generator and
        ``enumerate``, and ``socket.accept``'s Python wrapper (which looks up
        the listening socket's family and type as enums). An accept error
        other than EAGAIN (EMFILE and its recovery, ECONNABORTED, EPERM ...)
        hands over to ``tcp.Port.doRead``, which retries the accept and
        handles it as always.
        """
        if self.addressFamily != socket.AF_INET:
            return tcp.Port.doRead(self)  # type: ignore[no-any-return]
        try:
            accept = self.socket._accept  # type: ignore[union-attr]
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    return tcp.Port.doRead(self)  # type: ignore[no-any-return]
                accepted += 1
                skt = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
                protocol = self.factory.buildProtocol(self._buildAddr(addr))  # type: ignore[union-attr]
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                transport = self.transport(skt, protocol, addr, self, s, self.reactor)
                protocol.makeConnection(transport)
            self.numberAccepts = limit + 20 if accepted == limit else max(1, accepted)
        except BaseException:
            log.deferr()  # as Twisted's
        return None


@implementer(IStreamServerEndpoint)
class GuestEndpoint:
    """``TCP4ServerEndpoint`` that listens with a ``GuestPort``."""

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = "") -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:  # noqa: N803
        """Listen as ``reactor.listenTCP`` would; errors come as a failed Deferred."""
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        port = GuestPort(self._port, factory, self._backlog, self._interface, self._reactor)
        port.startListening()
        return port
