"""Twisted side of the String-Phone protocol: links over UNIX sockets, streams spliced to TCP.

``RootLink`` and ``InnerLink`` are the two ends of one UNIX stream connection
(``docs/protocol.md``); each drives a sans-I/O ``tproxy.protocol.Connection``
and splices every stream to one TCP connection (a guest's on the inner side, the
service's on the root side) with Twisted's producer/consumer machinery:

* a stream whose send window is spent pauses reading from its TCP socket, until
  the peer's WINDOW_UPDATE lets the backlog out (``StreamWritable``);
* a TCP socket whose write buffer is full withholds the stream's credit: bytes
  written to it are credited back to the peer only once the socket drains;
* a full UNIX-socket write buffer pauses reading from *all* TCP sockets of the
  link: one fan-in producer (``_FanIn``) is registered on the UNIX transport;
* a FIN is carried as HALF_CLOSE and becomes ``loseWriteConnection`` on the
  other side; a reset or a failed socket becomes RESET and ``abortConnection``.

Reactor and endpoints are injected; nothing here imports the global reactor.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
import struct
import types
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet import error as ierror
from twisted.internet import main, tcp
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tproxy import logs, turn_end
from tproxy.link_accept import GuestServer
from tproxy.link_connect import ConnectDeadlines, OutgoingConnection, connect_tcp
from tproxy.metrics import BridgeStats, Cell, PortStats
from tproxy.model import Destination
from tproxy.protocol import events as ev
from tproxy.protocol.connection import (
    ST_CLOSED,
    ST_HALF_CLOSED_REMOTE,
    ST_OPEN,
    ST_OPENING,
    Connection,
    ProtocolError,
    Role,
)
from tproxy.protocol.frames import DEFAULT_WINDOW, Chunk, Reason
from tproxy.turn_end import TurnEnd

#: Seconds between PINGs on an idle or busy link.
PING_INTERVAL = 10.0
#: Seconds without a PONG after which a link is declared dead.
PING_TIMEOUT = 30.0
#: Seconds between the inner proxy's STATS reports (docs/protocol.md).
STATS_INTERVAL = 2.0

# Why a stream's TCP socket is not being read (bit flags; read when none is set).
_PAUSE_OPENING = 1  # inner: waiting for OPEN_RESULT
_PAUSE_WINDOW = 2  # send window spent, backlog waiting
_PAUSE_LINK = 4  # UNIX socket's write buffer full

_PING = struct.Struct("!Q")

#: Read size and write high-water mark of a stream's TCP socket.
STREAM_BUFFER = 1 << 18

#: Inner: the most of a guest's first bytes read right after accept and sent
#: as early data behind the OPEN (docs/protocol.md, "Early data"); the rest
#: waits for the OPEN_RESULT as before.
EARLY_DATA_MAX = 1 << 16

#: Every stream's clean end, one instance for all (Twisted's reactor shares its own too).
_CONNECTION_DONE = Failure(ierror.ConnectionDone())

#: The ``connectionLost`` of the transports ``_connection_done`` may stand in
#: for: Twisted's own ``tcp.Connection``'s (``tcp.Server``, the inner's
#: ``GuestServer``) and the root's ``OutgoingConnection`` (which adds a
#: branch for a connect still in progress, not the case of a finished stream).
_PLAIN_CONNECTION_LOST = frozenset(
    {tcp.Connection.connectionLost, OutgoingConnection.connectionLost}
)

#: Most buffers one ``sendmsg`` of a link flush gathers (IOV_MAX is 1024).
_MAX_IOV = 512


def _socket_of(transport: Any) -> Any:
    """The socket of a real Twisted socket transport, else None (fakes in tests)."""
    return transport.socket if isinstance(transport, tcp.Connection) else None


def _idle(t: Any) -> bool:
    """Whether a socket transport has nothing queued and may still be written to."""
    return (
        not t.dataBuffer
        and not t._tempDataLen
        and t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._writeDisconnected
    )


def _connection_done(t: Any) -> None:
    """``tcp.Connection.connectionLost(_CONNECTION_DONE)`` of a socket whose two FINs are through.

    For a transport that no longer reads nor writes, has no producer and
    must not be shut down before its close (``_maybe_finish``): the same
    steps, less what cannot apply here - ``FileDescriptor.connectionLost``'s
    second ``stopReading``/``stopWriting``, and
    ``_closeSocket``'s ``reason.check(ConnectionAborted)`` (a ``Failure.check``
    walks the exception's classes by qualified name).
    """
    t.disconnected = 1
    t.connected = 0
    producer = t.producer
    if producer is not None:
        t.producer = None
        producer.stopProducing()
    try:
        t.socket.close()
    except OSError:  # as Twisted's _closeSocket: the descriptor is gone either way
        pass
    protocol = t.protocol
    del t.protocol
    del t.socket
    del t.fileno
    protocol.connectionLost(_CONNECTION_DONE)


def _as_bytes(data: Chunk) -> bytes:
    """``bytes`` of a chunk that has to wait in Twisted's buffer (which takes nothing else)."""
    return data if type(data) is bytes else bytes(data)


def _write_now(t: Any, sock: Any, data: Chunk, flags: int = 0) -> None:
    """``t.write(data)``, but straight to the socket while nothing is queued.

    Twisted's ``write`` only queues: the bytes leave one reactor turn later,
    joined into one buffer (a copy), at most 128 KiB per turn. Sending at once
    saves the turn and the copy; what the kernel does not take is queued as usual.
    ``flags``: ``MSG_MORE`` when our FIN follows at once (``_FIN_FOLLOWS``).
    """
    if sock is not None and _idle(t):
        try:
            n = sock.send(data, flags)
        except OSError:
            n = 0  # EAGAIN, or an error the transport's own write will report
        if n == len(data):
            return
        data = data[n:]
    t.write(_as_bytes(data))


def _write_sequence_now(t: Any, sock: Any, chunks: list[Chunk], flags: int = 0) -> None:
    """``t.writeSequence(chunks)``, gathered into one ``sendmsg`` while nothing is queued."""
    if sock is not None and len(chunks) <= _MAX_IOV and _idle(t):
        try:
            n = sock.sendmsg(chunks, (), flags)
        except OSError:
            n = 0
        if n:
            chunks = _unsent(chunks, n)
            if not chunks:
                return
    t.writeSequence([_as_bytes(c) for c in chunks])


#: ``send`` flags for a stream's last bytes when its FIN follows in the same
#: turn (DATA then HALF_CLOSE in one link read): MSG_MORE holds the last
#: partial segment back, and the ``shutdown``/``close`` right after sends it
#: with the FIN set - one TCP segment (and one ACK) instead of two each way,
#: one wake-up of the peer instead of two. Anything Twisted's buffer keeps
#: is sent later without the flag, which pushes what was held.
_FIN_FOLLOWS = getattr(socket, "MSG_MORE", 0)


def _unsent(chunks: list[Chunk], n: int) -> list[Chunk]:
    """What of ``chunks`` a gathered send of ``n`` bytes left (a view of the one it split)."""
    for i, c in enumerate(chunks):
        k = len(c)
        if n < k:
            rest = chunks[i:]
            if n:
                rest[0] = memoryview(c)[n:]
            return rest
        n -= k
    return []


#: Bytes the UNIX transport may buffer before the link's TCP sockets are paused
#: (Twisted's default ``bufferSize`` of 64 KiB paused them after every DATA
#: frame); also the size of each read from the UNIX socket.
LINK_HIGH_WATER = 1 << 20

_splice = getattr(os, "splice", None)  # Python 3.10+, Linux
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: Most bytes one splice moves from a stream's socket into the link's pipe (the pipe's size).
SPLICE_READ = 1 << 18
#: A read of at least this many bytes puts a stream in bulk mode (splice), a
#: splice of fewer takes it out: for small reads (requests, responses) splicing
#: costs one more system call than it saves copying.
BULK_READ = 1 << 16


class _Piped:
    """Stream bytes waiting in the link's pipe: the payload of one DATA frame in the queue.

    ``_drain`` splices them from the pipe into the link when their turn comes;
    the frame's header (bytes) is the queue entry before it.
    """

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


#: Refusals a root link logs one by one per second; beyond that they are counted
#: and summed up in one line (a hostile inner must not be able to flood the log).
REFUSAL_LOG_BURST = 20


class LinkLimits(TypingProtocol):
    """The limits a link enforces (``tproxy.config.Limits`` provides them)."""

    @property
    def max_streams_per_bridge(self) -> int: ...
    @property
    def max_streams_per_guest(self) -> int: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float | None: ...


class LinkCounters:
    """Per-link counters (read by the operations work, e.g. for STATS).

    The int counters are ``metrics.Cell`` s of one preallocated ``array('q')``:
    no int object born per bump outlives a burst (issue 7 (f)).
    """

    __slots__ = ("_cells", "refused", "resets_sent", "resets_received")

    opened = Cell(0)
    """Streams opened (inner) or requested (root)."""
    accepted = Cell(1)
    """Streams that reached the open state."""
    bytes_to_link = Cell(2)
    """Bytes read from TCP sockets and sent on the link, of streams that ended."""
    bytes_from_link = Cell(3)
    """Bytes received on the link and written to TCP sockets, of streams that ended."""

    def __init__(self) -> None:
        self._cells = array("q", bytes(4 * 8))
        self.refused: dict[Reason, int] = {}
        """Opens refused, by reason."""
        self.resets_sent: dict[Reason, int] = {}
        """RESETs this side sent, by reason."""
        self.resets_received: dict[Reason, int] = {}
        """RESETs the peer sent, by reason."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LinkCounters):
            return NotImplemented
        return (self._cells, self.refused, self.resets_sent, self.resets_received) == (
            other._cells, other.refused, other.resets_sent, other.resets_received
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LinkCounters({counters_dict(self)!r})"


# Indexes of the counters bumped once or more per connection, for direct
# ``_cells[i] += 1`` on the hot path: a ``Cell`` is a Python-level descriptor,
# and its __get__ + __set__ per bump cost the root ~5 % of a new connection's
# CPU (bench_metrics); the array itself stays the single place of the values.
_L_OPENED = LinkCounters.opened.index
_L_ACCEPTED = LinkCounters.accepted.index
_L_TO_LINK = LinkCounters.bytes_to_link.index
_L_FROM_LINK = LinkCounters.bytes_from_link.index
_P_OPEN = PortStats.streams_open.index
_P_REQUESTED = PortStats.requested.index
_P_ACCEPTED = PortStats.accepted.index
_P_TO_SERVICE = PortStats.bytes_to_service.index
_P_TO_GUEST = PortStats.bytes_to_guest.index


def _bump(counter: dict[Reason, int], reason: Reason) -> None:
    counter[reason] = counter.get(reason, 0) + 1


def counters_dict(counters: LinkCounters, live_to: int = 0, live_from: int = 0) -> dict[str, Any]:
    """``LinkCounters`` as a JSON-able dict (reasons by name), as STATS carries them.

    ``live_to``/``live_from`` are the bytes of the streams still open (the
    counters take a stream's bytes when it ends).
    """

    def names(d: dict[Reason, int]) -> dict[str, int]:
        return {r.name: n for r, n in sorted(d.items())}

    return {
        "opened": counters.opened,
        "accepted": counters.accepted,
        "refused": names(counters.refused),
        "resets_sent": names(counters.resets_sent),
        "resets_received": names(counters.resets_received),
        "bytes_to_link": counters.bytes_to_link + live_to,
        "bytes_from_link": counters.bytes_from_link + live_from,
    }


@implementer(IHalfCloseableProtocol, IPushProducer)
class _StreamProtocol(Protocol):
    """The TCP end of one stream: a protocol on the TCP socket and the producer it throttles.

    As a protocol it turns the socket's data, EOF and loss into stream commands;
    as the producer registered on its own transport it learns when the socket's
    write buffer is full (``pauseProducing``) and drained (``resumeProducing``),
    which is when withheld credit goes back to the peer.
    """

    def __init__(self, link: LinkProtocol, service_port: int) -> None:
        self.link = link
        self.service_port = service_port
        # Root only, set by RootLink._open when counting: the port's counters and
        # when the OPEN arrived. Set here for every stream: CPython's attribute
        # caches want every instance to get its attributes in the same order.
        self.stats: PortStats | None = None
        self.opened_at = 0.0
        self.stream_id = 0
        self.guest = ""
        self.guest_ip: str | None = None
        self.destination: Destination | None = None
        self.connecting: Any = None  # the connect attempt (``cancel()``), root only
        self._pause = 0
        self._reading = True
        self._read_eof = False
        self._write_done = False
        self._write_closing = False
        self._tcp_full = False
        self._withheld = 0
        self._sock: Any = None
        self._tcp_do_read: Callable[[], Any] | None = None  # set: splicing possible
        self._bulk = False  # splice reads (see _splice_read)
        self.sent = 0  # TCP -> link
        self.active = True  # data moved since the last idle sweep
        self.received = 0  # link -> TCP
        self.ended = False
        self.early = 0  # inner: early-data bytes in sent, not counted if the open fails
        self.held: list[bytes] | None = None  # root: early data held until connected

    # -- pausing reading from the TCP socket

    def set_pause(self, bit: int) -> None:
        self._pause |= bit
        self._apply_pause()

    def clear_pause(self, bit: int) -> None:
        self._pause &= ~bit
        self._apply_pause()

    def _apply_pause(self) -> None:
        t = self.transport
        if t is None or self.ended or self._read_eof:
            return
        want = not self._pause
        if want != self._reading:
            self._reading = want
            if want:
                t.resumeProducing()  # type: ignore[attr-defined]
            else:
                t.pauseProducing()  # type: ignore[attr-defined]

    # -- IPushProducer, registered on our own TCP transport

    def pauseProducing(self) -> None:
        """The TCP socket's write buffer is full: withhold credit from now on."""
        self._tcp_full = True

    def resumeProducing(self) -> None:
        """The TCP socket drained: return the withheld credit."""
        self._tcp_full = False
        if self._withheld:
            n, self._withheld = self._withheld, 0
            self.link.conn.consumed(self.stream_id, n)
            self.link.flush()

    def stopProducing(self) -> None:
        """The TCP transport is closing; connectionLost follows."""

    # -- the TCP socket's side

    def connectionMade(self) -> None:
        self._sock = _socket_of(self.transport)
        if self._sock is not None:
            # Read up to 256 KiB per wake-up (Twisted: 64 KiB), and queue as much
            # before the socket counts as full and credit is withheld.
            self.transport.bufferSize = STREAM_BUFFER  # type: ignore[union-attr]
            if _splice is not None and self.link._sock is not None:
                self._tcp_do_read = self.transport.doRead  # type: ignore[union-attr]
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._reading = True
        self.link._tcp_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._take(data):
            self.link.flush_soon(len(data))

    def _take(self, data: bytes) -> bool:
        """Queue bytes read from the TCP socket as DATA (not flushed); False if dropped."""
        link = self.link
        if self.ended or link.conn.stream_state(self.stream_id) is ST_CLOSED:
            return False
        n = len(data)
        self.sent += n
        self.active = True
        if (n >= BULK_READ) is not self._bulk and self._tcp_do_read is not None:
            self._set_bulk(not self._bulk)
        conn = link.conn
        conn.send_data(self.stream_id, data)
        if conn.buffered(self.stream_id):
            self.set_pause(_PAUSE_WINDOW)
        return True

    def _first_read(self) -> Any:
        """Root: the transport's ``doRead`` for the service's first read, and the FIN behind it.

        A service that answers and closes (HTTP with ``Connection: close``)
        has usually queued its FIN by the time the answer is read: a short
        read is followed by one more ``recv`` in the same turn, and when it
        finds the EOF, DATA and HALF_CLOSE leave in one send (reading
        stops and ``readConnectionLost`` runs here, as the reactor would
        on a ``CONNECTION_DONE``) instead of a reactor turn each, and
        the inner proxy wakes up once for both. Installed for the first read
        only: a keep-alive stream pays one ``recv`` (EAGAIN) per connection,
        not per request. Returns what Twisted's ``doRead`` returns.
        """
        t: Any = self.transport
        if "doRead" in t.__dict__:
            del t.doRead  # later reads: Twisted's own (or _splice_read, in bulk mode)
        sock = self._sock
        size = t.bufferSize
        try:
            data = sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        if len(data) == size:  # more may be coming: the ordinary path
            self.dataReceived(data)
            return None
        try:
            more = sock.recv(size - len(data))
        except (BlockingIOError, InterruptedError):
            self.dataReceived(data)
            return None
        except OSError:
            self.dataReceived(data)
            return main.CONNECTION_LOST
        if more:
            self.dataReceived(data + more)
            return None
        # EOF right behind the data: readConnectionLost queues the HALF_CLOSE,
        # and both leave at the end of the turn.
        if self._take(data):
            self.link.flush_soon()
        # The reactor's path for a CONNECTION_DONE from doRead, taken here: stop
        # reading, then our readConnectionLost. (Twisted's _disconnectSelectable
        # and tcp.Connection.readConnectionLost first adapt the transport and the
        # protocol to their half-close interfaces: a zope adaptation whose
        # failed __conform__ lookup raises and clears an AttributeError, about
        # 6k instructions per connection.) An exception from it reaches the
        # reactor, which logs it and loses the connection, as Twisted's would.
        t.stopReading()
        self.readConnectionLost()
        return None

    def _set_bulk(self, bulk: bool) -> None:
        """Enter or leave bulk mode: the transport's ``doRead`` is ``_splice_read`` in it.

        Outside it the transport reads with Twisted's own ``doRead`` and no
        wrapper, so a keep-alive stream pays nothing for splicing.
        """
        self._bulk = bulk
        link = self.link
        link._bulk_streams += 1 if bulk else -1
        t: Any = self.transport
        if bulk:
            t.doRead = self._splice_read
        else:
            if "doRead" in t.__dict__:
                del t.doRead
            link._release_pipe()

    def _splice_read(self) -> Any:
        """The TCP transport's ``doRead`` on a real link: the socket's bytes spliced, not read.

        In bulk mode (the last read was at least ``BULK_READ`` bytes), while
        the link's pipe is empty (nothing of it waits for the link) and the
        send window is open, up to ``min(window, SPLICE_READ)`` bytes move
        from the socket into the pipe without entering the process; each
        frame's header is queued with a ``_Piped`` placeholder, and
        ``LinkProtocol._drain`` splices the bytes on into the link in their
        turn. Otherwise (pipe busy, window spent, stream not sending) it is
        Twisted's own ``doRead``, i.e. ``dataReceived``. Returns what
        ``doRead`` returns: None, or the reason the connection ended.
        """
        link = self.link
        conn = link.conn
        sid = self.stream_id
        assert self._tcp_do_read is not None
        if link._piped or self.ended or link._lost:
            return self._tcp_do_read()
        window = conn.send_window(sid)
        state = conn.stream_state(sid)
        if (
            window <= 0
            or conn.buffered(sid)
            or (state is not ST_OPEN and state is not ST_HALF_CLOSED_REMOTE)
        ):
            return self._tcp_do_read()
        pipe_in = link._pipe_in()
        if pipe_in < 0:
            return self._tcp_do_read()
        assert _splice is not None
        try:
            n = _splice(self._sock.fileno(), pipe_in, min(window, SPLICE_READ), flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        self.sent += n
        self.active = True
        link._piped += n  # before leaving bulk mode, which closes an empty pipe
        if n < BULK_READ:
            self._set_bulk(False)
        limit = conn.max_payload
        while n > 0:
            k = n if n < limit else limit
            conn.send_frame(sid, cast(Chunk, _Piped(k)))
            n -= k
        if conn.send_window(sid) <= 0 and conn.notify_writable(sid):
            self.set_pause(_PAUSE_WINDOW)
        link.flush()
        return None

    def readConnectionLost(self) -> None:
        """The TCP peer sent FIN: carry it as HALF_CLOSE."""
        if self._read_eof:
            return
        self._read_eof = True
        state = self.link.conn.stream_state(self.stream_id)
        if state is ST_OPEN or state is ST_HALF_CLOSED_REMOTE:
            self.link.conn.half_close(self.stream_id)
            self.link.flush_soon()
        self._maybe_finish()

    def writeConnectionLost(self) -> None:
        """Our FIN went out on the TCP socket."""
        self._write_done = True
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._read_eof and self._write_done and self.transport is not None:
            # Both FINs are through: no shutdown(SHUT_RDWR) before close() (it
            # could only fail with ENOTCONN). Our producer was unregistered by
            # close_write(), so this really closes, at once.
            t: Any = self.transport
            t._shouldShutdown = False
            if self._sock is not None and t.connected and not t.disconnecting:
                # loseConnection()'s own path once the write side is shut, with
                # one shared Failure instead of a new one (and its traceback
                # walk) per connection, as the reactor's _disconnectSelectable does.
                t.stopReading()
                t.stopWriting()
                if type(t).connectionLost in _PLAIN_CONNECTION_LOST:
                    _connection_done(t)
                else:
                    t.connectionLost(_CONNECTION_DONE)
            else:
                t.loseConnection()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.ended:
            return
        self.ended = True
        if self._bulk:
            self._set_bulk(False)
        self.link._tcp_lost(self, reason)

    # -- the link's side

    def deliver(self, data: Chunk, flags: int = 0) -> None:
        """Stream data from the link: write it, credit it now or when the socket drains.

        Early data (root, stream still connecting) is held until the connection is made.
        ``flags``: the ``send`` flags (``_FIN_FOLLOWS`` when a HALF_CLOSE is next).
        """
        if self.transport is None:
            self.hold([data])
            return
        self.received += len(data)
        self.active = True
        _write_now(self.transport, self._sock, data, flags)
        if self._tcp_full:
            self._withheld += len(data)
        else:
            self.link.conn.consumed(self.stream_id, len(data))

    def hold(self, chunks: list[Chunk]) -> None:
        """Root: keep early data until the service's connection is made (copies: small)."""
        held = [bytes(c) for c in chunks]
        if self.held is None:
            self.held = held
        else:
            self.held.extend(held)

    def deliver_all(self, chunks: list[Chunk], flags: int = 0) -> None:
        """Consecutive DATA payloads of one link read: one ``sendmsg``, one credit."""
        if len(chunks) == 1:
            self.deliver(chunks[0], flags)  # a plain send (keep-alive requests, responses)
            return
        if self.transport is None:
            self.hold(chunks)
            return
        n = 0
        for c in chunks:
            n += len(c)
        self.received += n
        self.active = True
        _write_sequence_now(self.transport, self._sock, chunks, flags)
        if self._tcp_full:
            self._withheld += n
        else:
            self.link.conn.consumed(self.stream_id, n)

    def close_write(self) -> None:
        """The peer's FIN: shut down our socket's write side once its buffer is out."""
        if self._write_closing or self.transport is None:
            return
        self._write_closing = True
        self._withheld = 0
        t: Any = self.transport
        t.unregisterProducer()
        if self._sock is not None and _idle(t):
            # Nothing queued: shut down now. loseWriteConnection() would wait for
            # a writable event (two epoll_ctl, a zero-byte send, a reactor turn)
            # to do the same: doWrite's end-of-buffer path, word for word.
            t._writeDisconnecting = True
            t._writeDisconnected = True
            if self._read_eof:
                # The peer's FIN is in, so nothing can come to reset the close:
                # close() sends our FIN itself, without a shutdown() first.
                self._write_done = True
                self._maybe_finish()
                return
            # t._closeWriteConnection() less its IHalfCloseableProtocol(protocol)
            # adaptation (a zope lookup whose failed __conform__ raises and clears
            # an AttributeError, ~6k instructions): the protocol is us, and our
            # writeConnectionLost only notes it (the read side is still open).
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # as Twisted's: the read side reports what is wrong
            self._write_done = True
        else:
            t.loseWriteConnection()

    def abort(self) -> None:
        """Reset the TCP connection (RST) or cancel the connect attempt."""
        if self.connecting is not None:
            d, self.connecting = self.connecting, None
            d.cancel()
        if self.transport is not None and not self.ended:
            self.transport.abortConnection()  # type: ignore[attr-defined]


@implementer(IPushProducer)
class _FanIn:
    """The one producer registered on a link's UNIX transport: pauses all its TCP sockets."""

    def __init__(self, link: LinkProtocol) -> None:
        self.link = link

    def pauseProducing(self) -> None:
        self.link._set_link_paused(True)

    def resumeProducing(self) -> None:
        self.link._set_link_paused(False)

    def stopProducing(self) -> None:
        """The UNIX transport is closing; connectionLost follows."""


class LinkProtocol(Protocol):
    """Common machinery of both link ends: drives a ``Connection`` over a UNIX transport.

    Subclasses handle the role-specific events; this class owns the stream
    table, the pause fan-in, the ping timer, go-away and ``closed``.
    """

    role: Role

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        bridge: str = "",
        initial_window: int = DEFAULT_WINDOW,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        counting: bool = True,
    ) -> None:
        self.reactor = reactor
        self.bridge = bridge
        self.conn = Connection(self.role, initial_window=initial_window)
        self.counting = counting
        """False: no counting work at all (``ONE_TPROXY_COUNTERS=off``, ``tproxy.metrics``)."""
        self.counters = LinkCounters()
        self.closed: Deferred[None] = Deferred()
        self._log = Logger(namespace=f"tproxy.link.{bridge or self.role.value}")
        self._streams: dict[int, _StreamProtocol] = {}
        self._link_paused = False
        self._resume_turn = 0
        self._sock: Any = None
        # The link's own write queue (real sockets only; see ``flush``).
        self._wq: deque[Chunk] = deque()
        self._wq_len = 0
        self._wq_paused = False
        # The pipe that streams' bytes are spliced through (``_splice_read``), once
        # needed; (-1, -1) when none can be had. ``_piped``: bytes in it.
        self._pipe: tuple[int, int] | None = None
        self._piped = 0
        self._bulk_streams = 0  # streams in bulk mode: the pipe is kept while there are any
        self.spliced = 0  # bytes spliced into the link (not read into the process)
        self._lost = False
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_call: IDelayedCall | None = None
        self._pong_deadline: IDelayedCall | None = None
        #: Where ``flush_soon`` waits for the end of the reactor iteration (a real
        #: reactor only: with the fake clocks of tests it flushes at once).
        self._turn_end: TurnEnd | None = (
            turn_end.hook(reactor) if isinstance(reactor, PosixReactorBase) else None
        )
        self._flush_due = False
        #: DATA bytes read from TCP sockets since the last ``flush``
        #: (``flush_soon``'s ``read``: bounds what one iteration queues).
        self._unflushed = 0
        #: Inside ``dataReceived``'s frame loop, which ends with a flush: a
        #: ``flush_soon`` there needs nothing more.
        self._in_read = False
        self._ping_ids = itertools.count(1)

    @property
    def name(self) -> str:
        """How log lines name this link."""
        return f"{self.role.value} link {self.bridge}".rstrip()

    @property
    def stream_count(self) -> int:
        """Streams currently spliced (open or opening)."""
        return len(self._streams)

    # -- transport plumbing

    def connectionMade(self) -> None:
        t = self.transport
        if isinstance(t, tcp.Connection):  # a real socket transport (UNIX or TCP)
            t.bufferSize = LINK_HIGH_WATER
            # The link carries no file descriptors: a plain recv() instead of the
            # UNIX transport's recvmsg() (ancillary buffer, a tuple per read).
            t.doRead = types.MethodType(tcp.Connection.doRead, t)  # type: ignore[method-assign]
            t.doWrite = self._make_do_write(t.doWrite)  # type: ignore[method-assign]
        self._sock = _socket_of(t)
        t.registerProducer(_FanIn(self), True)  # type: ignore[union-attr]
        self.flush()
        if self._ping_interval is not None:
            self._ping_call = self.reactor.callLater(self._ping_interval, self._ping)

    def flush(self) -> None:
        """Write what the connection queued.

        On a real socket the link keeps its own write queue instead of
        Twisted's buffer (which takes only ``bytes``, joins everything queued
        into one string on each write-ready and sends at most 128 KiB per
        reactor turn): frame headers and payload views go out gathered, up to
        ``_MAX_IOV`` buffers per ``sendmsg``, with no copy; what the socket
        does not take waits as views, and the transport's ``doWrite`` sends
        it first. Beyond ``LINK_HIGH_WATER`` queued bytes the link's TCP
        sockets are paused, as Twisted's producer machinery would.
        """
        self._unflushed = 0
        t = self.transport
        if t is None or self._lost:
            return
        chunks = self.conn.data_to_send()
        if not chunks:
            return
        if self._sock is None:  # a fake transport (tests)
            t.writeSequence([_as_bytes(c) for c in chunks])
            return
        wq = self._wq
        busy = bool(wq)
        full = False
        if not busy and len(chunks) <= _MAX_IOV:
            # The common case, inlined: nothing queued, send at once.
            try:
                n = self._sock.sendmsg(chunks)
                full = True  # unless all of it went
            except BlockingIOError:
                n = 0
                full = True
            except TypeError:  # a _Piped among the chunks: _drain splices it
                n = 0
            except OSError:
                t.abortConnection()  # type: ignore[attr-defined]
                return
            chunks = _unsent(chunks, n)
            if not chunks:
                return
        wq.extend(chunks)
        for c in chunks:
            self._wq_len += len(c)
        if not busy:
            if not full and not self._drain():
                t.abortConnection()  # type: ignore[attr-defined]
                return
            if not wq:
                return
            t.startWriting()  # type: ignore[attr-defined]
        if self._wq_len > LINK_HIGH_WATER and not self._wq_paused:
            self._wq_paused = True
            self._set_link_paused(True)

    def _pipe_in(self) -> int:
        """The write end of the link's splice pipe (made on first use), or -1 if there is none."""
        if self._pipe is None:
            try:
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self._pipe = (-1, -1)
            else:
                self._pipe = (r, w)
                try:
                    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_READ)
                except OSError:
                    pass  # the default 64 KiB: smaller splices
        return self._pipe[1]

    def _release_pipe(self) -> None:
        """Close the splice pipe once no stream is in bulk mode and nothing waits in it.

        A link outlives its bulk transfers; holding two descriptors per link
        for good would make every bridge that once carried a download look
        like it leaks them.
        """
        if not self._bulk_streams and not self._piped and self._pipe is not None:
            self._close_pipe()

    def _close_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        self._piped = 0
        if pipe is not None and pipe[0] >= 0:
            os.close(pipe[0])
            os.close(pipe[1])

    def _drain(self) -> bool:
        """Send from the write queue until it is empty or the socket is full; False on error.

        Runs of bytes go out gathered by ``sendmsg``; a ``_Piped`` entry is
        spliced from the pipe (partly, if the socket fills, and finished first
        on the next call).
        """
        wq = self._wq
        sock = self._sock
        sendmsg = sock.sendmsg
        while wq:
            first = wq[0]
            piped = type(first) is _Piped
            batch: list[Chunk] = []
            if not piped:
                for c in wq:
                    if type(c) is _Piped or len(batch) == _MAX_IOV:
                        break
                    batch.append(c)
            try:
                if piped:
                    assert _splice is not None and self._pipe is not None
                    n = _splice(self._pipe[0], sock.fileno(), len(first), flags=_SPLICE_FLAGS)
                else:
                    n = sendmsg(batch)
            except BlockingIOError:
                return True
            except OSError:
                wq.clear()
                self._wq_len = 0
                return False
            self._wq_len -= n
            if piped:
                assert isinstance(first, _Piped)
                first.n -= n
                self.spliced += n
                self._piped -= n
                if first.n:
                    return True  # the socket is full
                wq.popleft()
                if not self._piped and not self._bulk_streams:
                    self._close_pipe()
                continue
            for c in batch:
                k = len(c)
                if n < k:
                    if n:
                        wq[0] = memoryview(c)[n:]
                    return True  # the socket is full
                n -= k
                wq.popleft()
        return True

    def _make_do_write(self, twisted_do_write: Callable[[], Any]) -> Callable[[], Any]:
        """The link transport's ``doWrite``: the link's queue first, then Twisted's own.

        Twisted's buffer stays empty on a real socket, so its ``doWrite``
        only does the bookkeeping: stop writing, close after
        ``loseConnection``.
        """

        def do_write() -> Any:
            if self._wq:
                if not self._drain():
                    return ierror.ConnectionLost("writing to the link failed")
                if self._wq:
                    return None
                if self._wq_paused:
                    self._wq_paused = False
                    self._set_link_paused(False)
            return twisted_do_write()

        return do_write

    def flush_soon(self, read: int = 0) -> None:
        """Write what the connection queued at the end of this reactor iteration.

        The frames of all the streams one iteration handles (requests read
        from guests, answers from services, OPEN, OPEN_RESULT, HALF_CLOSE)
        then leave in one send, and the peer wakes up once for them; a
        ``flush`` before then takes them along, in order (``tproxy.turn_end``).
        ``read``: bytes of DATA just read from a TCP socket. Once those of one
        iteration pass ``LINK_HIGH_WATER`` the link is flushed at once: over
        it the link pauses its TCP sockets, and the reactor then skips the
        rest of the iteration's readers.
        """
        if read:
            self._unflushed += read
            if self._unflushed > LINK_HIGH_WATER:
                self.flush()
                return
        if self._turn_end is None:
            self.flush()
        elif self._in_read:
            pass  # dataReceived flushes once the read's frames are handled
        elif not self._flush_due:
            self._flush_due = True
            self._turn_end.call(self._flush_turn)

    def _flush_turn(self) -> None:
        self._flush_due = False
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self.conn.terminated or self._lost:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self._log.error(
                "{link}: protocol error ({reason}): {message}; closing the link",
                link=self.name,
                reason=e.reason.name,
                message=str(e),
            )
            self.flush()
            self._close()
            return
        self._in_read = True
        try:
            self._handle(events)
        except BaseException:
            self._in_read = False
            self.flush_soon()  # what was queued still leaves, as before
            raise
        self._in_read = False
        self.flush()
        self._maybe_close()

    def _handle(self, events: list[ev.Event]) -> None:
        """Act on one link read's events (``dataReceived`` flushes afterwards)."""
        streams = self._streams
        # Consecutive DATA of one stream (a link read carries up to 16 frames of a
        # bulk stream) is written to its socket with one sendmsg.
        batch_s: _StreamProtocol | None = None
        batch: list[Chunk] = []
        for event in events:
            if type(event) is ev.DataReceived:
                s = streams.get(event.stream_id)
                if s is None:
                    continue
                if s is batch_s:
                    batch.append(event.data)
                    continue
                if batch_s is not None:
                    batch_s.deliver_all(batch)
                batch_s = s
                batch = [event.data]
            else:
                if batch_s is not None:
                    if type(event) is ev.HalfClosed and event.stream_id == batch_s.stream_id:
                        # Its FIN follows at once: data and FIN in one TCP segment.
                        batch_s.deliver_all(batch, _FIN_FOLLOWS)
                    else:
                        batch_s.deliver_all(batch)
                    batch_s = None
                self._event(event)
        if batch_s is not None:
            batch_s.deliver_all(batch)

    def _event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamWritable):
            s = self._streams.get(event.stream_id)
            if s is not None:
                s.clear_pause(_PAUSE_WINDOW)
        elif isinstance(event, ev.HalfClosed):
            s = self._streams.get(event.stream_id)
            if s is not None:
                s.close_write()
        elif isinstance(event, ev.StreamReset):
            if self.counting:
                _bump(self.counters.resets_received, event.reason)
            s = self._streams.get(event.stream_id)
            if s is not None:
                if s.stats is not None:
                    s.stats.reset(event.reason.name)
                if logs.debug_enabled:
                    self._log.debug(
                        "{link}: stream {sid} reset by peer ({reason})",
                        link=self.name,
                        sid=event.stream_id,
                        reason=event.reason.name,
                    )
                s.abort()
                if s.transport is None:
                    self._forget(s)
        elif isinstance(event, ev.PongReceived):
            if self._pong_deadline is not None and self._pong_deadline.active():
                self._pong_deadline.cancel()
            self._pong_deadline = None
        elif isinstance(event, ev.GoAwayReceived):
            self._log.info(
                "{link}: peer goes away ({reason}); no new streams",
                link=self.name,
                reason=event.reason.name,
            )
        else:
            self._role_event(event)

    def _role_event(self, event: ev.Event) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:  # type: ignore[assignment]
        self._lost = True
        self._wq.clear()
        self._wq_len = 0
        self._close_pipe()
        for call in (self._ping_call, self._pong_deadline):
            if call is not None and call.active():
                call.cancel()
        streams = list(self._streams.values())
        if streams:
            self._log.info(
                "{link}: link closed with {n} streams open; resetting them",
                link=self.name,
                n=len(streams),
            )
        for s in streams:
            if s.stats is not None:
                s.stats.reset("LINK_LOST")
            s.abort()
            self._forget(s)
        self._log.info("{link}: link closed", link=self.name)
        self.closed.callback(None)

    # -- streams

    def _tcp_connected(self, s: _StreamProtocol) -> None:
        raise NotImplementedError

    def _tcp_lost(self, s: _StreamProtocol, reason: Failure) -> None:
        """A stream's TCP connection is gone: if the stream still lives, reset it."""
        state = self.conn.stream_state(s.stream_id) if s.stream_id else ST_CLOSED
        if state is not ST_CLOSED:
            if state is ST_OPENING:
                s.sent -= s.early  # Early data that never reached the service.
            if not self._lost:
                self.conn.reset(s.stream_id, Reason.ABORTED)
                if self.counting:
                    _bump(self.counters.resets_sent, Reason.ABORTED)
                if s.stats is not None:
                    s.stats.reset(Reason.ABORTED.name)
                self.flush()
        if logs.debug_enabled:
            self._log.debug(
                "{link}: stream {sid} closed (guest {guest}, service port {port}{dest}): "
                "{sent} bytes to the link, {received} bytes from it",
                link=self.name,
                sid=s.stream_id,
                guest=s.guest,
                port=s.service_port,
                dest=f", destination {s.destination}" if s.destination is not None else "",
                sent=s.sent,
                received=s.received,
            )
        self._forget(s)
        self._maybe_close()

    def _forget(self, s: _StreamProtocol) -> None:
        if self._streams.get(s.stream_id) is s:
            del self._streams[s.stream_id]
            if self.counting:
                cells = self.counters._cells
                cells[_L_TO_LINK] += s.sent
                cells[_L_FROM_LINK] += s.received

    def link_counters(self) -> dict[str, Any]:
        """``counters_dict`` of this link now, the open streams' bytes included."""
        streams = self._streams.values()
        return counters_dict(
            self.counters, sum(s.sent for s in streams), sum(s.received for s in streams)
        )

    def _set_link_paused(self, paused: bool) -> None:
        if paused == self._link_paused:
            return
        self._link_paused = paused
        streams = list(self._streams.values())
        if paused:
            for s in streams:
                s.set_pause(_PAUSE_LINK)
            return
        # Resume in a rotating order: the epoll loop skips, within one turn, the
        # sockets paused again meanwhile, so a fixed order (oldest first) lets the
        # first bulk streams refill the UNIX buffer and starve the newest ones.
        n = len(streams)
        if n:
            k = self._resume_turn % n
            self._resume_turn += 1
            for s in itertools.chain(streams[k:], streams[:k]):
                s.clear_pause(_PAUSE_LINK)

    # -- ping, go-away

    def _ping(self) -> None:
        self._ping_call = None
        if self._lost:
            return
        self.conn.ping(_PING.pack(next(self._ping_ids)))
        self.flush()
        if self._pong_deadline is None:
            self._pong_deadline = self.reactor.callLater(self._ping_timeout, self._dead)
        assert self._ping_interval is not None
        self._ping_call = self.reactor.callLater(self._ping_interval, self._ping)

    def _dead(self) -> None:
        self._pong_deadline = None
        self._log.error(
            "{link}: no PONG for {timeout} seconds; the link is dead, closing it",
            link=self.name,
            timeout=self._ping_timeout,
        )
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def go_away(self) -> None:
        """Graceful: refuse new streams, let open ones finish, then close the link."""
        self.conn.go_away()
        self.flush()
        self._maybe_close()

    def _maybe_close(self) -> None:
        conn = self.conn
        if (
            (conn.go_away_sent or conn.go_away_received)
            and not self._streams
            and self.transport is not None
            and not self._lost
            and not conn.terminated
        ):
            self._close()

    def _close(self) -> None:
        """Close the UNIX connection once its buffer is written.

        The fan-in producer is unregistered first: a transport whose streaming
        producer is paused resumes it instead of closing when its buffer drains,
        and with no stream left nothing would ever write again.
        """
        t = self.transport
        if t is not None:
            # What waits for the end of the iteration (``flush_soon``: the last
            # stream's HALF_CLOSE) goes first: the transport may close before then.
            self.flush()
            t.unregisterProducer()  # type: ignore[attr-defined]
            t.loseConnection()


class _QuietOneShot(Factory):
    """Hands one existing stream protocol to a client endpoint, without logging.

    ``connectProtocol``'s factory logs "Starting/Stopping factory" at INFO for
    every outgoing connection, which would drown an administrator's log.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class RootLink(LinkProtocol):
    """The root proxy's end of one inner proxy's link.

    Each OPEN is looked up with ``lookup(service_port)`` (the bridge's current
    map, so a reload takes effect for new streams); the destination is connected
    through ``endpoint_for(destination)`` when one is given (tests), else with
    the limits' connect timeout by ``tproxy.link_connect`` on a real reactor
    (no endpoint layers per connection) or a ``TCP4ClientEndpoint`` on others.
    """

    role = Role.ROOT

    def __init__(
        self,
        reactor: Any,
        bridge: str,
        lookup: Callable[[int], Destination | None],
        limits: LinkLimits,
        *,
        endpoint_for: Callable[[Destination], IStreamClientEndpoint] | None = None,
        metrics: BridgeStats | None = None,
        initial_window: int = DEFAULT_WINDOW,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        counting: bool = True,
    ) -> None:
        super().__init__(
            reactor,
            bridge=bridge,
            initial_window=initial_window,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            counting=counting,
        )
        self.lookup = lookup
        self.limits = limits
        self.metrics = metrics if metrics is not None else BridgeStats()
        """Per service port counters (``tproxy.metrics``); pass one to keep it across links."""
        self.inner_report: dict[str, Any] | None = None
        """The inner proxy's last STATS report (docs/protocol.md), None before the first."""
        self.inner_report_at: float | None = None
        """``reactor.seconds()`` when that report arrived."""
        self._endpoint_for = endpoint_for or self._tcp_endpoint
        #: Connect with ``link_connect`` (a real reactor, no endpoint given).
        self._lean_connect = endpoint_for is None and isinstance(reactor, PosixReactorBase)
        #: The lean connects' timeouts: one timer for the link, not one per stream.
        self._deadlines = ConnectDeadlines(reactor)
        self._per_guest: dict[str, int] = {}
        self._idle_call: IDelayedCall | None = None
        #: Reading from the UNIX socket is paused because the inner does not read.
        self.reading_paused = False
        self._refusal_window = -1.0
        self._refusals_logged = 0
        self._refusals_unlogged = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        idle = self.limits.idle_timeout
        if idle:
            self._idle_call = self.reactor.callLater(idle, self._idle_sweep, idle)

    def _idle_sweep(self, idle: float) -> None:
        """Reset streams that moved no byte during the last ``idle`` seconds.

        A stream idle for between ``idle`` and twice ``idle`` seconds is reset
        (one sweep per period, one flag per stream: no timer per stream).
        """
        self._idle_call = None
        if self._lost:
            return
        for s in list(self._streams.values()):
            if s.active or s.transport is None:
                s.active = False
                continue
            self._log.info(
                "{link}: stream {sid} ({guest} -> {dest}) idle for {idle} seconds; resetting it",
                link=self.name,
                sid=s.stream_id,
                guest=s.guest,
                dest=str(s.destination),
                idle=idle,
            )
            self.conn.reset(s.stream_id, Reason.IDLE_TIMEOUT)
            if self.counting:
                _bump(self.counters.resets_sent, Reason.IDLE_TIMEOUT)
            if s.stats is not None:
                s.stats.reset(Reason.IDLE_TIMEOUT.name)
            s.abort()
        self.flush()
        self._idle_call = self.reactor.callLater(idle, self._idle_sweep, idle)

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:  # type: ignore[assignment]
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._refusals_unlogged:
            self._log.warn(
                "{link}: {n} more streams refused in its last second, not logged one by one",
                link=self.name,
                n=self._refusals_unlogged,
            )
            self._refusals_unlogged = 0
        super().connectionLost(reason)
        self._deadlines.stop()  # After the streams' connects were cancelled.

    def _tcp_endpoint(self, dest: Destination) -> IStreamClientEndpoint:
        reactor: IReactorTCP = self.reactor  # type: ignore[assignment]
        return TCP4ClientEndpoint(
            reactor, dest.addr, dest.port, timeout=self.limits.connect_timeout
        )

    def push_config(self, service_ports: Iterable[int]) -> None:
        """Send the inner proxy the service ports of its bridge."""
        self.conn.push_config(frozenset(service_ports))
        self.flush()

    def live_bytes(self) -> list[tuple[int, int, int]]:
        """(service port, bytes to the service, bytes to the guest) of each open stream."""
        return [(s.service_port, s.received, s.sent) for s in self._streams.values()]

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """Service port -> its counters now (``tproxy.metrics``), open streams' bytes included."""
        return self.metrics.snapshot(self.live_bytes())

    def _set_link_paused(self, paused: bool) -> None:
        """The UNIX write buffer filled (or drained): also stop (or resume) reading the link.

        Everything the root writes to its inner is either stream data, bounded by
        the inner's windows, or an answer to something the inner sent (PONG,
        OPEN_RESULT, RESET).  An inner that keeps sending PINGs or doomed OPENs
        but never reads would otherwise grow the root's write buffer without
        bound; so while the buffer is over the transport's limit (64 KiB) the
        root reads nothing more from it.  The inner proxy itself always reads
        its link, so this cannot deadlock two honest proxies, and a link whose
        inner stops reading for good dies of the ping timeout (its PONGs are
        not read either).
        """
        changed = paused != self._link_paused
        super()._set_link_paused(paused)
        if not changed or self.transport is None or self._lost:
            return
        self.reading_paused = paused
        if paused:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        else:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _refuse(self, sid: int, reason: Reason, why: str, port: int) -> None:
        self.conn.refuse(sid, reason)
        if self.counting:
            _bump(self.counters.refused, reason)
            self.metrics.port(port).refuse(reason.name)
        now = self.reactor.seconds()
        if now - self._refusal_window >= 1.0:
            if self._refusals_unlogged:
                self._log.warn(
                    "{link}: {n} more streams refused in one second, not logged one by one",
                    link=self.name,
                    n=self._refusals_unlogged,
                )
            self._refusal_window = now
            self._refusals_logged = 0
            self._refusals_unlogged = 0
        if self._refusals_logged >= REFUSAL_LOG_BURST:
            self._refusals_unlogged += 1
            return
        self._refusals_logged += 1
        self._log.warn(
            "{link}: stream {sid} refused ({reason}): {why}",
            link=self.name,
            sid=sid,
            reason=reason.name,
            why=why,
        )

    def _role_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.OpenRequested):
            self._open(event)
        elif isinstance(event, ev.StatsReceived):
            self._stats(event.payload)

    def _stats(self, payload: bytes) -> None:
        """Keep the inner proxy's report; a malformed one is logged and ignored."""
        try:
            report = json.loads(payload)
            if not isinstance(report, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            self._log.warn(
                "{link}: ignoring a malformed STATS report: {error}", link=self.name, error=e
            )
            return
        self.inner_report = report
        self.inner_report_at = self.reactor.seconds()

    def _open(self, event: ev.OpenRequested) -> None:
        sid, port, guest = event.stream_id, event.service_port, event.guest_host
        stats: PortStats | None = None
        if self.counting:
            self.counters._cells[_L_OPENED] += 1
            stats = self.metrics.ports.get(port) or self.metrics.port(port)
            stats._cells[_P_REQUESTED] += 1
        try:
            dest = self.lookup(port)
        except Exception:
            where = _where(port, f"{guest}:{event.guest_port}")
            self._log.failure(
                "{link}: looking up service port {port} failed", link=self.name, port=port
            )
            self._refuse(sid, Reason.INTERNAL_ERROR, f"{where}: the lookup failed", port)
            return
        if dest is None:
            where = _where(port, f"{guest}:{event.guest_port}")
            self._refuse(
                sid, Reason.UNKNOWN_SERVICE, f"{where}: no such service on this bridge", port
            )
            return
        if len(self._streams) >= self.limits.max_streams_per_bridge:
            where = _where(port, f"{guest}:{event.guest_port}")
            self._refuse(
                sid,
                Reason.TOO_MANY_STREAMS,
                f"{where}: {len(self._streams)} streams open, the bridge's limit",
                port,
            )
            return
        if self._per_guest.get(guest, 0) >= self.limits.max_streams_per_guest:
            where = _where(port, f"{guest}:{event.guest_port}")
            self._refuse(
                sid,
                Reason.TOO_MANY_STREAMS,
                f"{where}: the guest has {self._per_guest[guest]} streams open, its limit",
                port,
            )
            return
        s = _StreamProtocol(self, port)
        s.stream_id = sid
        s.guest = f"{guest}:{event.guest_port}"
        s.destination = dest
        if stats is not None:
            s.stats = stats
            s.opened_at = self.reactor.seconds()
            stats._cells[_P_OPEN] += 1
        self._streams[sid] = s
        self._per_guest[guest] = self._per_guest.get(guest, 0) + 1
        s.guest_ip = guest
        if self._link_paused:
            s._pause |= _PAUSE_LINK
        if self._lean_connect:
            attempt = connect_tcp(
                self.reactor,
                dest.addr,
                dest.port,
                s,
                self.limits.connect_timeout,
                self._connect_failed,
                s,
                self._deadlines,
            )
            if s.transport is None:  # else connected at once (_tcp_connected ran)
                s.connecting = attempt
            return
        try:
            d = self._endpoint_for(dest).connect(_QuietOneShot(s))
        except Exception:
            d = fail()
        s.connecting = d
        d.addErrback(self._connect_failed, s)

    def _forget(self, s: _StreamProtocol) -> None:
        if self._streams.get(s.stream_id) is s:
            del self._streams[s.stream_id]
            stats = s.stats
            if stats is not None:  # PortStats.ended, inlined, and the link's byte counts
                sent, received = s.sent, s.received
                cells = stats._cells
                cells[_P_OPEN] -= 1
                cells[_P_TO_SERVICE] += received
                cells[_P_TO_GUEST] += sent
                cells = self.counters._cells
                cells[_L_TO_LINK] += sent
                cells[_L_FROM_LINK] += received
            ip = s.guest_ip
            if ip is not None:
                left = self._per_guest.get(ip, 1) - 1
                if left > 0:
                    self._per_guest[ip] = left
                else:
                    self._per_guest.pop(ip, None)

    def _tcp_connected(self, s: _StreamProtocol) -> None:
        s.connecting = None
        if self._lost or self.conn.stream_state(s.stream_id) is not ST_OPENING:
            s.abort()
            return
        self.conn.accept(s.stream_id)
        stats = s.stats
        if stats is not None:
            self.counters._cells[_L_ACCEPTED] += 1
            stats._cells[_P_ACCEPTED] += 1
            stats.latency.record(self.reactor.seconds() - s.opened_at)
        if s._sock is not None:
            s.transport.doRead = s._first_read  # type: ignore[union-attr]
        held = s.held
        if held is not None:  # Early data, in order, before anything else.
            s.held = None
            s.deliver_all(held)  # type: ignore[arg-type]
        if logs.debug_enabled:
            self._log.debug(
                "{link}: stream {sid} open: guest {guest} -> {dest} (service port {port})",
                link=self.name,
                sid=s.stream_id,
                guest=s.guest,
                dest=str(s.destination),
                port=s.service_port,
            )
        s._apply_pause()
        self.flush_soon()

    def _connect_failed(self, failure: Failure, s: _StreamProtocol) -> None:
        s.connecting = None
        if failure.check(CancelledError, ierror.ConnectingCancelledError):
            self._forget(s)
            return None
        if failure.check(ierror.ConnectionRefusedError):
            reason = Reason.REFUSED
        elif failure.check(ierror.TimeoutError):
            reason = Reason.TIMED_OUT
        else:
            reason = Reason.UNREACHABLE
        self._forget(s)
        if not self._lost:
            self._refuse(
                s.stream_id,
                reason,
                f"{_where(s.service_port, s.guest)}: connecting to {s.destination} failed: "
                f"{failure.getErrorMessage()}",
                s.service_port,
            )
            self.flush()
            self._maybe_close()
        return None


def _where(port: int, guest: str) -> str:
    """How a refusal's log line names the stream."""
    return f"service port {port} from guest {guest}"


class _GuestFactory(Factory):
    """Builds the protocol of each guest connection accepted on one service port."""

    noisy = False

    def __init__(self, link: InnerLink, service_port: int) -> None:
        self.link = link
        self.service_port = service_port

    def buildProtocol(self, addr: Any) -> _StreamProtocol:
        return _StreamProtocol(self.link, self.service_port)


class InnerLink(LinkProtocol):
    """The inner proxy's end of its link to the root.

    ``guest_factory(port)`` gives the factory for the listening endpoint of a
    service port: each accepted guest connection opens one stream, sends up to
    ``EARLY_DATA_MAX`` bytes early (docs/protocol.md) and is then paused until
    the root's answer, and is reset (RST) if the root refuses.
    ``on_config`` receives the root's CONFIG pushes.
    """

    role = Role.INNER

    def __init__(
        self,
        reactor: IReactorTime,
        on_config: Callable[[frozenset[int]], None],
        limits: LinkLimits | None = None,
        *,
        bridge: str = "",
        stats_source: Callable[[], Mapping[str, Any]] | None = None,
        stats_interval: float | None = STATS_INTERVAL,
        initial_window: int = DEFAULT_WINDOW,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        counting: bool = True,
    ) -> None:
        super().__init__(
            reactor,
            bridge=bridge,
            initial_window=initial_window,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            counting=counting,
        )
        self.on_config = on_config
        self.limits = limits
        self.stats_source = stats_source
        self._stats_interval = stats_interval
        self._stats_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._stats_interval is not None:
            self._stats_call = self.reactor.callLater(self._stats_interval, self._stats_tick)

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:  # type: ignore[assignment]
        if self._stats_call is not None and self._stats_call.active():
            self._stats_call.cancel()
        self._stats_call = None
        super().connectionLost(reason)

    def _stats_tick(self) -> None:
        self._stats_call = None
        if self._lost:
            return
        self.send_stats()
        assert self._stats_interval is not None
        self._stats_call = self.reactor.callLater(self._stats_interval, self._stats_tick)

    def report(self) -> dict[str, Any]:
        """The STATS report: the link's counters (when counting), open streams, and
        ``stats_source()``'s keys."""
        report: dict[str, Any] = {"streams": len(self._streams)}
        if self.counting:
            report["counters"] = self.link_counters()
        if self.stats_source is not None:
            try:
                report.update(self.stats_source())
            except Exception:
                self._log.failure("{link}: collecting the STATS report failed", link=self.name)
        return report

    def send_stats(self) -> None:
        """Send a STATS report to the root now (also sent every ``stats_interval`` seconds)."""
        if self._lost or self.transport is None or self.conn.terminated:
            return
        payload = json.dumps(self.report(), separators=(",", ":")).encode()
        try:
            self.conn.send_stats(payload)
        except Exception:
            self._log.failure("{link}: cannot send a STATS report", link=self.name)
            return
        self.flush()

    def guest_factory(self, service_port: int) -> IProtocolFactory:
        """The factory for the guests' listening endpoint of ``service_port``."""
        return _GuestFactory(self, service_port)

    def _tcp_connected(self, s: _StreamProtocol) -> None:
        client = getattr(s.transport, "client", None)
        if type(client) is tuple:  # tcp.Server: the address accept() gave, no address object
            host, gport = client[0], client[1]
        else:
            peer = s.transport.getPeer()  # type: ignore[union-attr]
            host = getattr(peer, "host", "0.0.0.0")
            gport = getattr(peer, "port", 0)
        s.guest = f"{host}:{gport}"
        if self._lost or self.transport is None or not self.conn.may_open:
            if self.counting:
                _bump(self.counters.refused, Reason.SHUTTING_DOWN)
            self._log.info(
                "{link}: guest {guest} on port {port} reset: the link is going away",
                link=self.name,
                guest=s.guest,
                port=s.service_port,
            )
            s.transport.abortConnection()  # type: ignore[union-attr]
            return
        if type(s.transport) is GuestServer:
            s._reading = False  # never registered for reading yet: nothing to pause
        s.set_pause(_PAUSE_OPENING)
        if self._link_paused:
            s.set_pause(_PAUSE_LINK)
        s.stream_id = self.conn.open_stream(s.service_port, host, gport)
        if self.counting:
            self.counters._cells[_L_OPENED] += 1
        self._streams[s.stream_id] = s
        self._send_early(s)
        self.flush_soon()

    def _send_early(self, s: _StreamProtocol) -> None:
        """Send what the guest already sent as early data, behind the OPEN.

        One non-blocking recv of at most ``EARLY_DATA_MAX`` right after accept:
        a client's request is usually there by then, and the root can write it
        to the service as soon as its connect succeeds, without waiting for the
        OPEN_RESULT to come back and the guest's socket to be read then.

        Not while the link is paused (its UNIX buffer full): the bytes wait in
        the guest's socket until the stream opens and reads them. What the
        accepts of one iteration read counts toward ``LINK_HIGH_WATER`` like
        any stream read (``flush_soon``'s ``read``): past it the link is
        flushed at once, which pauses it if the peer does not keep up.
        """
        sock = s._sock
        if sock is None or self._link_paused:
            return
        try:
            data = sock.recv(EARLY_DATA_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            s.transport.abortConnection()  # type: ignore[union-attr]
            return
        if not data:
            return  # EOF: the reader finds it again once the stream is open.
        n = len(data)
        s.sent += n
        s.early = n
        conn = self.conn
        conn.send_data(s.stream_id, data)
        if conn.buffered(s.stream_id):
            s.set_pause(_PAUSE_WINDOW)
        self.flush_soon(n)

    def _role_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamAccepted):
            s = self._streams.get(event.stream_id)
            if s is not None:
                if self.counting:
                    self.counters._cells[_L_ACCEPTED] += 1
                if logs.debug_enabled:
                    self._log.debug(
                        "{link}: stream {sid} open: guest {guest} (service port {port})",
                        link=self.name,
                        sid=event.stream_id,
                        guest=s.guest,
                        port=s.service_port,
                    )
                s.clear_pause(_PAUSE_OPENING)
        elif isinstance(event, ev.StreamRefused):
            if self.counting:
                _bump(self.counters.refused, event.reason)
            s = self._streams.get(event.stream_id)
            if s is not None:
                s.sent -= s.early  # The root dropped the early data.
                s.early = 0
                self._log.info(
                    "{link}: guest {guest} on port {port} refused by the root ({reason})",
                    link=self.name,
                    guest=s.guest,
                    port=s.service_port,
                    reason=event.reason.name,
                )
                s.abort()
        elif isinstance(event, ev.ConfigReceived):
            self._log.info(
                "{link}: service ports from the root: {ports}",
                link=self.name,
                ports=sorted(event.service_ports),
            )
            try:
                self.on_config(event.service_ports)
            except Exception:
                self._log.failure("{link}: applying the service ports failed", link=self.name)
