"""Events that ``Connection.receive_data`` returns: what the peer said, already validated.

Each is a frozen attrs class with slots; the DATA path creates one
``DataReceived`` per frame and nothing else.
"""

from __future__ import annotations

from attrs import frozen

from tproxy.protocol.frames import Reason


@frozen
class Event:
    """Base class of every protocol event."""


@frozen
class OpenRequested(Event):
    """The inner proxy opened a stream (seen by the root only); answer with accept or refuse."""

    stream_id: int
    """The new stream's id (allocated by the inner proxy)."""
    service_port: int
    """The service port the guest connected to at 169.254.16.9."""
    guest_host: str
    """The guest's IP address, for logging and per-guest limits only."""
    guest_port: int
    """The guest's TCP source port, for logging only."""


@frozen
class StreamAccepted(Event):
    """The root connected the stream to its destination (seen by the inner only)."""

    stream_id: int
    """The stream that is now open."""


@frozen
class StreamRefused(Event):
    """The root refused to open the stream (seen by the inner only); the stream is closed."""

    stream_id: int
    """The stream that failed to open."""
    reason: Reason
    """Why: REFUSED, UNREACHABLE, TIMED_OUT, UNKNOWN_SERVICE, TOO_MANY_STREAMS, ..."""


@frozen
class DataReceived(Event):
    """Payload bytes of one DATA frame; give credit back with ``Connection.consumed``."""

    stream_id: int
    """The stream they belong to."""
    data: bytes | memoryview
    """The bytes, in order; never empty.  A ``memoryview`` of the received
    bytes (not a copy): hand it to ``sendmsg``/``send`` as it is, and make
    ``bytes`` of it only where it must be kept."""


@frozen
class StreamWritable(Event):
    """Data that waited for send window has all been framed: the stream's source may resume."""

    stream_id: int
    """The stream whose backlog drained."""


@frozen
class HalfClosed(Event):
    """The peer will send no more data on this stream (its FIN)."""

    stream_id: int
    """The stream the peer half-closed."""


@frozen
class StreamReset(Event):
    """The peer reset the stream; it is closed and any data still queued for it is dropped."""

    stream_id: int
    """The stream that was reset."""
    reason: Reason
    """The reason code the peer gave."""


@frozen
class ConfigReceived(Event):
    """The root pushed the service ports of the inner's bridge (seen by the inner only)."""

    service_ports: frozenset[int]
    """Every service port the inner proxy should listen on, replacing the previous set."""


@frozen
class PongReceived(Event):
    """The peer answered a PING."""

    payload: bytes
    """The 8 bytes of the PING it answers."""


@frozen
class GoAwayReceived(Event):
    """The peer is shutting down: no new streams; open ones may finish."""

    reason: Reason
    """Why (SHUTTING_DOWN for a graceful stop, PROTOCOL_ERROR before a close, ...)."""
    last_stream_id: int
    """The highest stream id the peer has seen."""


@frozen
class StatsReceived(Event):
    """A STATS frame (reserved: inner to root counters; opaque in protocol version 1)."""

    payload: bytes
    """The frame's raw payload."""
