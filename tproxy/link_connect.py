"""A lean TCP connect for the root's streams: one socket adopted into one transport.

Why: the root opens one TCP connection per stream, so issue 7's (b), new
connections per second, pays for every layer of a connect. Twisted's
``TCP4ClientEndpoint(...).connect(factory)`` builds a wrapping factory, a
connector, a client transport that resolves its address, three Deferreds and a
timeout call, and makes twelve system calls (two FIONBIO ioctls, two SO_ERROR
reads, two ``connect``, five ``epoll_ctl``). Here a non-blocking socket
(``SOCK_NONBLOCK``: no ioctl) is connected once and wrapped at once in a
``tcp.Connection`` that finishes the connect in its first writable event:
``socket``, ``connect``, one ``getsockopt(SO_ERROR)``, three ``epoll_ctl``.

A connect that is complete when ``connect`` returns (to a service on
loopback the kernel runs the whole handshake inside the call: it returns
EINPROGRESS with the socket already established) is finished at once: one
``getpeername`` says so, and the protocol is connected before
``connect_tcp`` returns - no writable event, no ``getsockopt``, no reactor
turn between the connect and the first bytes to the service, one
``epoll_ctl`` (reading) instead of three. Elsewhere that ``getpeername``
fails with ENOTCONN and the first writable event finishes the connect as above.

What the caller sees is the endpoint path's: the protocol's ``makeConnection``
on success; on failure ``on_failed(Failure, arg)`` with the exceptions
Twisted's own connect raises - ``error.getConnectError`` of the errno (so
``ConnectionRefusedError`` and the same messages), ``error.TimeoutError``
after ``timeout`` seconds, ``defer.CancelledError`` after ``cancel()``.

The timeouts of one link's attempts share one timer (``ConnectDeadlines``):
a ``callLater`` per connect and its ``cancel`` a few milliseconds later were
a DelayedCall, a heap push and a lazy heap removal in the reactor per stream.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, address, error, tcp
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: ``on_failed(failure, arg)``: the connect attempt ended without a connection.
OnFailed = Callable[[Failure, Any], object]

_log = Logger(namespace="tproxy.link")

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


class OutgoingConnection(tcp.Connection):
    """A TCP client connection that connects itself; a plain ``tcp.Connection`` once connected.

    While connecting it is registered for writing only; its ``doWrite`` is the
    connect's completion (an instance attribute, dropped once connected, so
    the data path runs Twisted's own ``doWrite`` untouched).
    """

    logstr = "OutgoingConnection,client"
    _connecting = True

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        protocol: IProtocol,
        on_failed: OnFailed,
        arg: Any,
    ) -> None:
        # tcp.Connection.__init__ less its setblocking(False): the socket was made
        # non-blocking (SOCK_NONBLOCK), and that call is one more ioctl.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        self._on_failed = on_failed
        self._arg = arg
        self._timer: IDelayedCall | None = None
        #: This attempt's entry in a ``ConnectDeadlines`` (instead of ``_timer``).
        self._deadline: list[Any] | None = None
        self.doWrite = self._connect_done  # type: ignore[method-assign]

    def _connect_done(self) -> None:
        """Writable while connecting: the connect ended; connected or failed."""
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(error.getConnectError((err, os.strerror(err))))
            return
        self._stop_timer()
        self.stopWriting()
        self._connected_now()

    def _connected_now(self) -> None:
        """Connected (at once, or on the first writable event): reading, the protocol told."""
        self._connecting = False
        del self.doWrite
        # ``_arg`` (the stream's protocol, for ``on_failed``) is not needed
        # any more; kept, it and ``protocol.transport`` would make a reference
        # cycle that outlives the connection until a garbage collection
        # finds it (a collection every ~100 connections under load).
        self._arg = None
        self.startReading()
        self.connected = 1
        self.protocol.makeConnection(self)

    def _fail(self, exc: Exception) -> None:
        if not self._connecting:
            return
        self._connecting = False
        self._stop_timer()
        self.stopWriting()
        self.socket.close()
        self._on_failed(Failure(exc), self._arg)

    def _stop_timer(self) -> None:
        entry, self._deadline = self._deadline, None
        if entry is not None:
            entry[2] = None  # ConnectDeadlines skips (and drops) it.
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        self._deadline = None
        self._fail(error.TimeoutError())

    def cancel(self) -> None:
        """Give up a connect attempt (``on_failed`` gets a ``CancelledError``); else nothing."""
        self._fail(CancelledError())

    def connectionLost(self, reason: Failure) -> None:
        if self._connecting:
            # The reactor saw an error or hang-up while we waited to write.
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._fail(
                error.getConnectError((err, os.strerror(err)))
                if err
                else error.ConnectError(string=reason.getErrorMessage())
            )
            return
        super().connectionLost(reason)

    def getHost(self) -> address.IPv4Address:
        return address.IPv4Address("TCP", *self.socket.getsockname())

    def getPeer(self) -> address.IPv4Address:
        return address.IPv4Address("TCP", *self.socket.getpeername())


class ConnectDeadlines:
    """The connect timeouts of one link: one reactor timer for all its attempts.

    Entries ``[deadline, seq, conn]`` wait in a heap; an attempt that ends
    sets its entry's ``conn`` to None, and the sweep drops such entries. The
    timer is always set for the earliest entry, so a timeout fires when it is
    due, as a ``callLater`` of its own would. What this holds is bounded by
    the connects of the last ``timeout`` seconds (small lists, no transports).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._call: IDelayedCall | None = None
        self._at = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, conn: OutgoingConnection, timeout: float) -> None:
        """Fail ``conn`` with ``TimeoutError`` unless it ended within ``timeout`` seconds."""
        at = self._reactor.seconds() + timeout
        entry = [at, next(self._seq), conn]
        heapq.heappush(self._heap, entry)
        conn._deadline = entry
        if self._call is None or at < self._at:
            self._schedule(at)

    def _schedule(self, at: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._at = at
        self._call = self._reactor.callLater(max(0.0, at - self._reactor.seconds()), self._sweep)

    def _sweep(self) -> None:
        self._call = None
        heap = self._heap
        now = self._reactor.seconds()
        while heap and (heap[0][0] <= now or heap[0][2] is None):
            conn = heapq.heappop(heap)[2]
            if conn is not None:
                conn._timed_out()
        if heap and self._call is None:
            self._schedule(heap[0][0])

    def stop(self) -> None:
        """The link is gone: no more sweeps (its attempts were cancelled)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for entry in self._heap:
            conn = entry[2]
            if conn is not None:
                conn._deadline = None
        self._heap.clear()


def _established(sock: socket.socket) -> bool:
    """Whether a socket whose non-blocking connect said EINPROGRESS is connected already."""
    try:
        sock.getpeername()
    except OSError:
        return False  # ENOTCONN: still connecting (or failed; the writable event says)
    return True


def connect_tcp(
    reactor: Any,
    host: str,
    port: int,
    protocol: IProtocol,
    timeout: float,
    on_failed: OnFailed,
    arg: Any = None,
    deadlines: ConnectDeadlines | None = None,
) -> OutgoingConnection:
    """Connect ``protocol`` to ``host:port`` (an IPv4 address); the attempt can be cancelled.

    A connect complete at once (loopback) connects the protocol before this
    returns (its ``makeConnection`` runs inside the call). Failures,
    immediate ones included, are reported through ``on_failed`` from the
    reactor, never raised into the caller. The timeout is one of
    ``deadlines`` when given, else a ``callLater`` of its own.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    conn = OutgoingConnection(reactor, sock, protocol, on_failed, arg)
    try:
        result = sock.connect_ex((host, port))
    except OSError as e:  # e.g. an address the kernel rejects outright
        result = e.errno or errno.EINVAL
    if result and result not in _IN_PROGRESS:
        exc = error.getConnectError((result, os.strerror(result)))
        reactor.callLater(0, conn._fail, exc)
        return conn
    if result == 0 or _established(sock):
        try:
            conn._connected_now()
        except Exception:
            # What the reactor does with a connection whose event handler
            # raised: log it, and lose that connection alone (its protocol
            # ends its stream); the caller - a link reading frames - goes on.
            _log.failure("connecting {conn}", conn=conn)
            conn.connectionLost(Failure())
        return conn
    # In progress: the first writable event says how it ended.
    conn.startWriting()
    if deadlines is not None:
        deadlines.add(conn, timeout)
    else:
        conn._timer = reactor.callLater(timeout, conn._timed_out)
    return conn
