"""A fake stream transport for protocol tests: half-close, abort, pausing and a full write buffer.

``twisted.test.iosim.FakeTransport`` makes ``loseWriteConnection`` and
pause/resume no-ops and ``StringTransport`` has no half-close; this one records
all of it and simulates a write buffer that fills up (pausing the registered
streaming producer, as a real ``FileDescriptor`` does) and drains on demand.
Losses are not delivered at once (a real reactor delivers them later): call
``deliver_loss`` (or a pump that does) to run ``connectionLost``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(ITCPTransport, IConsumer, IPushProducer)
class FakeTransport:
    """An in-memory transport with observable producer state.

    ``written`` holds what the protocol wrote and nobody took yet; when a
    ``limit`` is set and ``written`` grows past it, the registered streaming
    producer is paused, and ``take()`` (the peer reading) resumes it.
    """

    def __init__(
        self,
        protocol: Protocol,
        peer: Any = None,
        limit: int | None = None,
    ) -> None:
        self.protocol = protocol
        self.peer = peer or IPv4Address("TCP", "127.0.0.1", 40000)
        self.host = IPv4Address("TCP", "127.0.0.1", 1)
        self.limit = limit
        self.written = bytearray()
        self.producer: IPushProducer | None = None
        self.streaming = False
        self.producer_paused = False
        #: Whether the protocol wants data read (pauseProducing/resumeProducing on us).
        self.reading = True
        self.disconnecting = False
        self.aborted = False
        self.write_closed = False
        self.lost = False
        self.pause_count = 0

    # ITransport
    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes), type(data)
        assert not self.write_closed and not self.lost, "write after close"
        self.written += data
        self._check_full()

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def _check_full(self) -> None:
        if (
            self.limit is not None
            and len(self.written) > self.limit
            and self.producer is not None
            and self.streaming
            and not self.producer_paused
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def take(self) -> bytes:
        """The peer reads everything written; a paused producer resumes."""
        data = bytes(self.written)
        self.written.clear()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data

    def set_limit(self, limit: int | None) -> None:
        """Change the write buffer's size (None: unlimited), pausing the producer if now full."""
        self.limit = limit
        self._check_full()

    def loseConnection(self) -> None:
        # A real FileDescriptor with a paused streaming producer resumes it instead of
        # closing once its buffer drains: closing with a producer registered can hang.
        assert self.producer is None, "loseConnection with a producer still registered"
        self.disconnecting = True

    def loseWriteConnection(self) -> None:
        assert self.producer is None, "loseWriteConnection with a producer still registered"
        self.write_closed = True
        p = IHalfCloseableProtocol(self.protocol, None)
        if p is not None:
            p.writeConnectionLost()

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return self.host

    # ITCPTransport odds and ends
    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    # IConsumer
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        assert self.producer is None, "a consumer accepts one producer"
        self.producer = producer
        self.streaming = streaming
        self._check_full()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # IPushProducer (the protocol pausing our reading)
    def pauseProducing(self) -> None:
        self.reading = False
        self.pause_count += 1

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    # test helpers
    def deliver_loss(self) -> bool:
        """Run ``connectionLost`` if the connection is closing; True if it ran now."""
        if self.disconnecting and not self.lost:
            self.lost = True
            reason = error.ConnectionLost() if self.aborted else error.ConnectionDone()
            self.protocol.connectionLost(Failure(reason))
            return True
        return False

    def peer_eof(self) -> None:
        """The remote end sent FIN."""
        p = IHalfCloseableProtocol(self.protocol, None)
        assert p is not None
        p.readConnectionLost()

    def peer_reset(self) -> None:
        """The remote end reset the connection."""
        self.disconnecting = True
        self.lost = True
        self.protocol.connectionLost(Failure(error.ConnectionLost()))
