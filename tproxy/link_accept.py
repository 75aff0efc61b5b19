"""The inner proxy's listening endpoint: guest connections not read before their stream opens.

Why: every accepted guest connection waits, unread, for the root's OPEN_RESULT
(``tproxy.link``: a stream in OPENING must not send data). Twisted's
``tcp.Server`` registers the new socket for reading as it is built, and the
stream then pauses it at once: two ``epoll_ctl`` (add, delete) per connection
for nothing, before the third that starts reading once the root accepts. A
``GuestServer`` skips that first registration; the stream's own resume (its
producer's ``resumeProducing``) starts reading when the stream opens.

``GuestEndpoint`` is ``TCP4ServerEndpoint`` with ``GuestPort`` for
``tcp.Port``; nothing else differs (backlog, interface, errors).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from zope.interface import implementer


class GuestServer(tcp.Server):
    """An accepted guest connection that is read only once something resumes it."""

    _armed = False

    def startReading(self) -> None:
        # The first call is tcp.Server.__init__'s; the stream resumes reading later.
        if self._armed:
            super().startReading()
        else:
            self._armed = True


class GuestPort(tcp.Port):
    """A listening TCP port whose connections are ``GuestServer``s."""

    transport = GuestServer


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
