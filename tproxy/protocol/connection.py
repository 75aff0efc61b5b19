"""The String-Phone connection: stream table, stream state machine and flow control, sans-I/O.

Theory of operation
-------------------
One ``Connection`` is one end of one UNIX-socket link.  The caller feeds it
the bytes it reads (``receive_data`` returns events) and collects the bytes to
write (``data_to_send`` returns a list of chunks for ``writeSequence``); the
command methods (``open_stream``, ``accept``, ``send_data``, ...) only queue
bytes.  Nothing here knows about sockets, reactors or time.

What lives where:

* ``_streams`` maps each live stream id to a ``_Stream`` (slots: its state,
  both windows, credit not yet returned, and data waiting for window).  A
  stream leaves the table when it reaches CLOSED; ids at or below
  ``_last_id`` that are not in the table are *closed* streams, and frames for
  them that were in flight when they closed are ignored.  Ids above
  ``_last_id`` were never opened: a frame for one is a protocol error.
* ``TRANSITIONS`` is the whole stream state machine: ``(state, input) ->
  next state``, where an input is a frame sent (``SEND_*``) or received
  (``RECV_*``).  A stream changes state exactly when such a frame goes onto
  or comes off the wire.  A received frame that has no entry is a protocol
  error; a command with no entry is a ``UsageError`` (a bug in the caller,
  not the peer's fault).  Which *role* may send OPEN and OPEN_RESULT is
  checked before the table is consulted: only the inner proxy opens, only
  the root answers.
* Flow control is per stream and one-directional per window: ``send_window``
  is the credit the peer granted us (its preface's initial window, plus its
  WINDOW_UPDATEs); ``recv_window`` is the credit we granted it.  DATA larger
  than ``recv_window`` is a FLOW_CONTROL_ERROR.  The caller says when the
  bytes it received have really left (``consumed``); credit is returned in
  WINDOW_UPDATEs of at least a quarter window, so a reader that stops
  stops its stream's sender and nothing else.  Data beyond ``send_window``
  waits in the stream's ``pending`` list (``buffered`` says how much: the
  caller pauses its source while it is non-zero) and goes out when credit
  arrives, after which a ``StreamWritable`` event tells the caller to resume.
* Early data: the inner may send DATA on a stream that is still OPENING
  (the guest's first bytes travel right behind the OPEN), charged to the
  root's initial window like any DATA; the root receives it as ordinary
  ``DataReceived`` events before it answers, and a refusal simply closes the
  stream (the bytes are the caller's to drop).  ``TRANSITIONS`` allows DATA
  in OPENING both ways; the role check (only the inner sends it, only the
  root receives it) is made in ``send_data`` and ``receive_data``.
* Any protocol error makes the connection terminal: a GO_AWAY with the
  reason is queued for the peer, ``error`` is set, ``receive_data`` raises
  again, and commands do nothing.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import cast

from tproxy.protocol import frames
from tproxy.protocol.events import (
    ConfigReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HalfClosed,
    OpenRequested,
    PongReceived,
    StatsReceived,
    StreamAccepted,
    StreamRefused,
    StreamReset,
    StreamWritable,
)
from tproxy.protocol.frames import FrameType, Reason

#: Default cap on concurrent streams of one connection (protocol limit; proxies set lower ones).
MAX_CONCURRENT_STREAMS = 65536


class Role(enum.Enum):
    """Which end of the link a connection is."""

    INNER = "inner"
    """The inner proxy: opens streams, receives CONFIG, may send STATS."""
    ROOT = "root"
    """The root proxy: answers opens, sends CONFIG."""


class StreamState(enum.Enum):
    """States of one stream (``docs/protocol.md`` section 5)."""

    # Identity hash (C speed): the transition table is keyed by (state, input) tuples.
    __hash__ = object.__hash__

    IDLE = "idle"
    OPENING = "opening"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed local"
    HALF_CLOSED_REMOTE = "half-closed remote"
    CLOSED = "closed"


class Input(enum.Enum):
    """Inputs of the stream state machine: a frame sent or received."""

    __hash__ = object.__hash__

    SEND_OPEN = enum.auto()
    RECV_OPEN = enum.auto()
    SEND_ACCEPT = enum.auto()
    RECV_ACCEPT = enum.auto()
    SEND_REFUSE = enum.auto()
    RECV_REFUSE = enum.auto()
    SEND_DATA = enum.auto()
    RECV_DATA = enum.auto()
    SEND_HALF_CLOSE = enum.auto()
    RECV_HALF_CLOSE = enum.auto()
    SEND_RESET = enum.auto()
    RECV_RESET = enum.auto()
    SEND_WINDOW_UPDATE = enum.auto()
    RECV_WINDOW_UPDATE = enum.auto()


S = StreamState
I = Input  # noqa: E741

#: The stream state machine.  Missing entries are errors (see the module docstring).
TRANSITIONS: dict[tuple[StreamState, Input], StreamState] = {
    (S.IDLE, I.SEND_OPEN): S.OPENING,
    (S.IDLE, I.RECV_OPEN): S.OPENING,
    (S.OPENING, I.SEND_ACCEPT): S.OPEN,
    (S.OPENING, I.RECV_ACCEPT): S.OPEN,
    (S.OPENING, I.SEND_REFUSE): S.CLOSED,
    (S.OPENING, I.RECV_REFUSE): S.CLOSED,
    # Early data: the inner may send DATA before the OPEN_RESULT (role-checked:
    # only the inner sends it, only the root receives it; docs/protocol.md 5).
    (S.OPENING, I.SEND_DATA): S.OPENING,
    (S.OPENING, I.RECV_DATA): S.OPENING,
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.SEND_HALF_CLOSE): S.HALF_CLOSED_LOCAL,
    (S.OPEN, I.RECV_HALF_CLOSE): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_WINDOW_UPDATE): S.OPEN,
    (S.OPEN, I.RECV_WINDOW_UPDATE): S.OPEN,
    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_HALF_CLOSE): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_WINDOW_UPDATE): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_WINDOW_UPDATE): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_HALF_CLOSE): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_WINDOW_UPDATE): S.HALF_CLOSED_REMOTE,
}
# A reset, sent or received, closes a stream from every state but IDLE and CLOSED.
for _state in (S.OPENING, S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE):
    TRANSITIONS[(_state, I.SEND_RESET)] = S.CLOSED
    TRANSITIONS[(_state, I.RECV_RESET)] = S.CLOSED
del _state


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is over.  ``reason`` goes into GO_AWAY."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UsageError(Exception):
    """A command that the connection's state does not allow (a bug in the caller)."""


class _Stream:
    """One live stream: state, windows, unreturned credit and data waiting for credit."""

    __slots__ = (
        "fin_queued",
        "pending",
        "pending_len",
        "recv_window",
        "send_window",
        "state",
        "unacked",
    )

    def __init__(self, state: StreamState, recv_window: int) -> None:
        self.state = state
        #: Credit the peer granted us; -1 until known (an inner that opened
        #: before the peer's preface arrived: its data waits for the OPEN_RESULT).
        self.send_window = 0
        #: Credit we granted the peer.
        self.recv_window = recv_window
        #: Bytes the caller consumed that were not yet returned as credit.
        self.unacked = 0
        #: Payload waiting for send window (None when there is none).
        self.pending: deque[frames.Chunk] | None = None
        self.pending_len = 0
        #: half_close() was called while data was pending: HALF_CLOSE follows the data.
        self.fin_queued = False


# Enum members as module globals for the per-frame paths: on Python 3.11 every
# ``StreamState.OPEN``-style lookup goes through ``EnumType.__getattr__``'s
# slot (about 850 instructions, callgrind), a global costs a few. The ``ST_``
# names are public: ``tproxy.link`` tests stream states on its hot paths too.
_FT_CONFIG = FrameType.CONFIG
_FT_DATA = FrameType.DATA
_FT_GO_AWAY = FrameType.GO_AWAY
_FT_HALF_CLOSE = FrameType.HALF_CLOSE
_FT_OPEN = FrameType.OPEN
_FT_OPEN_RESULT = FrameType.OPEN_RESULT
_FT_PING = FrameType.PING
_FT_PONG = FrameType.PONG
_FT_WINDOW_UPDATE = FrameType.WINDOW_UPDATE
_IN_RECV_ACCEPT = Input.RECV_ACCEPT
_IN_RECV_HALF_CLOSE = Input.RECV_HALF_CLOSE
_IN_RECV_REFUSE = Input.RECV_REFUSE
_IN_RECV_RESET = Input.RECV_RESET
_IN_RECV_WINDOW_UPDATE = Input.RECV_WINDOW_UPDATE
_IN_SEND_ACCEPT = Input.SEND_ACCEPT
_IN_SEND_HALF_CLOSE = Input.SEND_HALF_CLOSE
_IN_SEND_OPEN = Input.SEND_OPEN
_IN_SEND_REFUSE = Input.SEND_REFUSE
_IN_SEND_RESET = Input.SEND_RESET
_IN_SEND_WINDOW_UPDATE = Input.SEND_WINDOW_UPDATE
_REASON_OK = Reason.OK
_ROLE_INNER = Role.INNER
_ROLE_ROOT = Role.ROOT
ST_CLOSED = StreamState.CLOSED
ST_HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
ST_IDLE = StreamState.IDLE
ST_OPEN = StreamState.OPEN
ST_OPENING = StreamState.OPENING
_RECV_DATA = Input.RECV_DATA
_HEADER_PACK = frames.HEADER.pack
_DATA = int(_FT_DATA)
_FRAME_TYPES = {t.value: t for t in FrameType}


class Connection:
    """One end of a String-Phone link (see the module docstring)."""

    def __init__(
        self,
        role: Role,
        *,
        initial_window: int = frames.DEFAULT_WINDOW,
        max_payload: int = frames.MAX_PAYLOAD,
        max_streams: int = MAX_CONCURRENT_STREAMS,
    ) -> None:
        if not 1 <= initial_window <= frames.MAX_WINDOW:
            raise ValueError(f"initial window {initial_window} out of 1..{frames.MAX_WINDOW}")
        if not 1 <= max_payload <= frames.MAX_PAYLOAD:
            raise ValueError(f"max payload {max_payload} out of 1..{frames.MAX_PAYLOAD}")
        self.role = role
        self.initial_window = initial_window
        self.max_payload = max_payload
        self.max_streams = max_streams
        self._out: list[frames.Chunk] = [frames.encode_preface(initial_window)]
        self._decoder = frames.FrameDecoder(frames.MAX_PAYLOAD)
        self._streams: dict[int, _Stream] = {}
        self._last_id = 0
        self._threshold = max(1, initial_window // 4)
        #: The protocol error that ended the connection, if any.
        self.error: ProtocolError | None = None
        #: We sent GO_AWAY: new streams are refused (root) or not opened (inner).
        self.go_away_sent = False
        #: The peer sent GO_AWAY.
        self.go_away_received = False
        #: OPENs refused by the connection itself (after GO_AWAY, over max_streams).
        self.refused_automatically = 0

    # ------------------------------------------------------------ queries

    @property
    def terminated(self) -> bool:
        """True once a protocol error ended the connection."""
        return self.error is not None

    @property
    def stream_count(self) -> int:
        """Number of live (not closed) streams."""
        return len(self._streams)

    @property
    def may_open(self) -> bool:
        """Whether ``open_stream`` may be called now (inner, no GO_AWAY either way)."""
        return (
            self.role is _ROLE_INNER
            and not self.go_away_sent
            and not self.go_away_received
            and self.error is None
            and self._last_id < frames.MAX_STREAM_ID
        )

    def stream_ids(self) -> list[int]:
        """Ids of the live streams."""
        return list(self._streams)

    def stream_state(self, stream_id: int) -> StreamState:
        """The state of a stream (IDLE if never opened, CLOSED once gone)."""
        st = self._streams.get(stream_id)
        if st is not None:
            return st.state
        return ST_CLOSED if 0 < stream_id <= self._last_id else ST_IDLE

    def send_window(self, stream_id: int) -> int:
        """Credit left for sending on a stream (0 for a closed one)."""
        st = self._streams.get(stream_id)
        return max(st.send_window, 0) if st is not None else 0

    def recv_window(self, stream_id: int) -> int:
        """Credit the peer has left on a stream (0 for a closed one)."""
        st = self._streams.get(stream_id)
        return st.recv_window if st is not None else 0

    def buffered(self, stream_id: int) -> int:
        """Bytes given to ``send_data`` that wait for send window."""
        st = self._streams.get(stream_id)
        return st.pending_len if st is not None else 0

    # ------------------------------------------------------------ output

    def data_to_send(self) -> list[frames.Chunk]:
        """Take the chunks queued for the peer (possibly empty).

        DATA payloads are the caller's own objects or ``memoryview`` slices of
        them (a read larger than one frame is framed without a copy): write
        them with ``sendmsg``, or make ``bytes`` of them where they must wait.
        """
        out = self._out
        self._out = []
        return out

    def _transition(self, st: _Stream, stream_id: int, inp: Input) -> StreamState:
        nxt = TRANSITIONS.get((st.state, inp))
        if nxt is None:
            raise UsageError(
                f"stream {stream_id}: {inp.name} not allowed in state {st.state.value}"
            )
        st.state = nxt
        if nxt is ST_CLOSED:
            del self._streams[stream_id]
        return nxt

    # ------------------------------------------------------------ commands

    def open_stream(self, service_port: int, guest_host: str, guest_port: int) -> int:
        """Inner: open a stream to a service port; returns its id."""
        if self.role is not _ROLE_INNER:
            raise UsageError("only the inner proxy opens streams")
        if not self.may_open:
            raise UsageError("no new streams on this connection (GO_AWAY or error)")
        if not 1 <= service_port <= 65535:
            raise UsageError(f"service port {service_port}")
        sid = self._last_id + 1
        frame = frames.encode_open(sid, service_port, guest_host, guest_port)
        self._last_id = sid
        st = _Stream(ST_IDLE, self.initial_window)
        self._streams[sid] = st
        self._transition(st, sid, _IN_SEND_OPEN)
        # Early data is charged to the root's initial window from the start.
        w = self._decoder.preface_window
        st.send_window = -1 if w is None else w
        self._out.append(frame)
        return sid

    def _command_stream(self, stream_id: int) -> _Stream | None:
        if self.error is not None:
            return None
        return self._streams.get(stream_id)

    def accept(self, stream_id: int) -> None:
        """Root: the stream's destination is connected; the stream is open."""
        if self.role is not _ROLE_ROOT:
            raise UsageError("only the root proxy answers opens")
        st = self._command_stream(stream_id)
        if st is None:
            return
        self._transition(st, stream_id, _IN_SEND_ACCEPT)
        st.send_window = self._peer_window()
        self._out.append(frames.encode_open_result(stream_id, _REASON_OK))

    def refuse(self, stream_id: int, reason: Reason) -> None:
        """Root: the stream cannot be opened, for ``reason``; it is closed."""
        if self.role is not _ROLE_ROOT:
            raise UsageError("only the root proxy answers opens")
        if reason is _REASON_OK:
            raise UsageError("refuse needs a failure reason")
        st = self._command_stream(stream_id)
        if st is None:
            return
        self._transition(st, stream_id, _IN_SEND_REFUSE)
        self._out.append(frames.encode_open_result(stream_id, reason))

    def send_data(self, stream_id: int, data: frames.Chunk) -> None:
        """Queue stream data; what exceeds the send window waits (see ``buffered``).

        Data for a stream that is already closed (say, reset by the peer) is dropped.
        """
        st = self._command_stream(stream_id)
        if st is None or not data:
            return
        state = st.state
        if st.fin_queued or (
            state is not ST_OPEN
            and state is not ST_HALF_CLOSED_REMOTE
            and (state is not ST_OPENING or self.role is not _ROLE_INNER)
        ):
            raise UsageError(f"stream {stream_id}: no data may be sent in state {st.state.value}")
        n = len(data)
        if st.pending is None and n <= st.send_window:
            st.send_window -= n
            out = self._out
            limit = self.max_payload
            if n <= limit:
                out.append(_HEADER_PACK(_DATA, 0, stream_id, n))
                out.append(data)
                return
            # A read larger than one frame: views of it, one per frame, no copy.
            view = memoryview(data)
            for pos in range(0, n - limit, limit):
                out.append(_HEADER_PACK(_DATA, 0, stream_id, limit))
                out.append(view[pos : pos + limit])
            pos = (n - 1) // limit * limit
            out.append(_HEADER_PACK(_DATA, 0, stream_id, n - pos))
            out.append(view[pos:])
            return
        if st.pending is None:
            st.pending = deque((data,))
        else:
            st.pending.append(data)
        st.pending_len += n
        self._flush(stream_id, st)

    def send_frame(self, stream_id: int, payload: frames.Chunk) -> None:
        """Queue ``payload`` as exactly one DATA frame, never as pending data.

        For a caller that sizes its reads to the window itself: a zero-copy
        writer passes a placeholder whose ``len`` is the payload's length and
        writes the bytes itself where the placeholder comes out of
        ``data_to_send`` (the connection never looks inside a payload it
        does not split). It must fit the send window and one frame, with
        nothing pending; else ``UsageError``.
        """
        st = self._command_stream(stream_id)
        if st is None:
            return
        n = len(payload)
        if (
            st.fin_queued
            or (st.state is not ST_OPEN and st.state is not ST_HALF_CLOSED_REMOTE)
            or st.pending is not None
            or not 0 < n <= min(st.send_window, self.max_payload)
        ):
            raise UsageError(f"stream {stream_id}: no frame of {n} bytes fits now")
        st.send_window -= n
        self._out.append(_HEADER_PACK(_DATA, 0, stream_id, n))
        self._out.append(payload)

    def notify_writable(self, stream_id: int) -> bool:
        """Ask for a ``StreamWritable`` once a spent send window opens again.

        For a caller that never sends beyond the window (``send_frame``) and so
        has nothing pending to wait on. False when the window is open now.
        """
        st = self._command_stream(stream_id)
        if st is None or st.send_window > 0:
            return False
        if st.pending is None:
            st.pending = deque()  # empty: the next WINDOW_UPDATE flushes it and says so
        return True

    def _flush(self, stream_id: int, st: _Stream) -> bool:
        """Frame as much pending data as the window allows; True when none is left."""
        pending = st.pending
        assert pending is not None
        out = self._out
        limit = self.max_payload
        while pending and st.send_window > 0:
            data = pending[0]
            n = len(data)
            take = min(n, st.send_window, limit)
            if take == n:
                pending.popleft()
                chunk = data
            else:
                view = data if type(data) is memoryview else memoryview(data)
                chunk = view[:take]
                pending[0] = view[take:]
            out.append(_HEADER_PACK(_DATA, 0, stream_id, take))
            out.append(chunk)
            st.send_window -= take
            st.pending_len -= take
        if pending:
            return False
        st.pending = None
        if st.fin_queued:
            st.fin_queued = False
            self._out.append(frames.encode_half_close(stream_id))
            # The state changes when the HALF_CLOSE really goes out, i.e. now.
            self._transition(st, stream_id, _IN_SEND_HALF_CLOSE)
        return True

    def half_close(self, stream_id: int) -> None:
        """Send no more data on the stream (FIN); queued data goes out first."""
        st = self._command_stream(stream_id)
        if st is None:
            return
        if st.fin_queued or TRANSITIONS.get((st.state, _IN_SEND_HALF_CLOSE)) is None:
            raise UsageError(f"stream {stream_id}: cannot half-close in state {st.state.value}")
        if st.pending_len:
            st.fin_queued = True
            return
        self._transition(st, stream_id, _IN_SEND_HALF_CLOSE)
        self._out.append(frames.encode_half_close(stream_id))

    def reset(self, stream_id: int, reason: Reason) -> None:
        """Abort the stream with ``reason``; data still queued for it is dropped."""
        st = self._command_stream(stream_id)
        if st is None:
            return
        st.pending = None
        st.pending_len = 0
        st.fin_queued = False
        self._transition(st, stream_id, _IN_SEND_RESET)
        self._out.append(frames.encode_reset(stream_id, reason))

    def consumed(self, stream_id: int, n: int) -> None:
        """``n`` received bytes of the stream have left: return that credit to the peer.

        Credit goes out in WINDOW_UPDATEs of at least a quarter of the initial window.
        """
        st = self._command_stream(stream_id)
        if st is None or n <= 0:
            return
        st.unacked += n
        if st.unacked + st.recv_window > self.initial_window:
            st.unacked -= n
            raise UsageError(f"stream {stream_id}: consumed more than was received")
        if st.unacked >= self._threshold:
            self.window_update(stream_id)

    def window_update(self, stream_id: int) -> None:
        """Return every consumed byte's credit now (at most one WINDOW_UPDATE)."""
        st = self._command_stream(stream_id)
        if st is None or not st.unacked:
            return
        if TRANSITIONS.get((st.state, _IN_SEND_WINDOW_UPDATE)) is None:
            return  # The peer sends no more data: its credit no longer matters.
        inc = st.unacked
        st.unacked = 0
        st.recv_window += inc
        self._out.append(frames.encode_window_update(stream_id, inc))

    def push_config(self, service_ports: frozenset[int] | set[int] | list[int]) -> None:
        """Root: tell the inner proxy the service ports of its bridge."""
        if self.role is not _ROLE_ROOT:
            raise UsageError("only the root proxy pushes config")
        for p in service_ports:
            if not 1 <= p <= 65535:
                raise UsageError(f"service port {p}")
        if self.error is None:
            self._out.append(frames.encode_config(service_ports))

    def ping(self, payload: bytes = b"\0" * frames.PING_SIZE) -> None:
        """Send a PING with 8 opaque bytes; the peer answers with a PONG carrying them."""
        if len(payload) != frames.PING_SIZE:
            raise UsageError(f"PING payload must be {frames.PING_SIZE} bytes")
        if self.error is None:
            self._out.append(frames.encode_ping(payload))

    def go_away(self, reason: Reason = Reason.SHUTTING_DOWN) -> None:
        """Announce a shutdown: no new streams from now on; open ones may finish."""
        if self.error is None and not self.go_away_sent:
            self.go_away_sent = True
            self._out.append(frames.encode_go_away(reason, self._last_id))

    def send_stats(self, payload: bytes) -> None:
        """Inner: send a STATS frame (reserved; opaque payload in version 1)."""
        if self.role is not _ROLE_INNER:
            raise UsageError("only the inner proxy sends STATS")
        if len(payload) > self.max_payload:
            raise UsageError("STATS payload too large")
        if self.error is None:
            self._out.append(frames.encode_stats(payload))

    # ------------------------------------------------------------ input

    def _peer_window(self) -> int:
        w = self._decoder.preface_window
        assert w is not None, "a stream opened before the peer's preface"
        return w

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the link; returns the events they complete.

        Raises ``ProtocolError`` (and the connection becomes terminal) on any violation.
        """
        if self.error is not None:
            raise self.error
        try:
            decoded = self._decoder.feed(data)
            events: list[Event] = []
            streams = self._streams
            for ftype, flags, sid, payload in decoded:
                if ftype == _DATA and flags == 0:
                    # The hot path, inlined: DATA on an open stream.
                    st = streams.get(sid)
                    if st is not None:
                        nxt = TRANSITIONS.get((st.state, _RECV_DATA))
                        if nxt is None or (nxt is ST_OPENING and self.role is _ROLE_INNER):
                            raise ProtocolError(
                                Reason.PROTOCOL_ERROR,
                                f"stream {sid}: DATA in state {st.state.value}",
                            )
                        n = len(payload)
                        if n > st.recv_window:
                            raise ProtocolError(
                                Reason.FLOW_CONTROL_ERROR,
                                f"stream {sid}: {n} bytes of DATA exceed window {st.recv_window}",
                            )
                        st.recv_window -= n
                        if n:
                            events.append(DataReceived(sid, payload))
                        continue
                # Only DATA payloads are views (frames.Frame); this one is not used as data.
                self._frame(ftype, flags, sid, cast(bytes, payload), events)
            return events
        except frames.FrameError as e:
            raise self._fail(ProtocolError(e.reason, str(e)))
        except ProtocolError as e:
            raise self._fail(e)

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self.error = error
        self._out.append(frames.encode_go_away(error.reason, self._last_id))
        self.go_away_sent = True
        return error

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        kind = _FRAME_TYPES.get(ftype)
        if kind is None:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"unknown frame type {ftype:#x}")
        if flags:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{kind.name} with flags {flags:#x}")
        if kind in frames.CONNECTION_FRAMES:
            if sid != 0:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"{kind.name} on stream {sid}")
            self._connection_frame(kind, payload, events)
            return
        if sid == 0:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{kind.name} on stream 0")
        if kind is _FT_OPEN:
            self._recv_open(sid, payload, events)
            return
        st = self._streams.get(sid)
        if st is None:
            if sid > self._last_id:
                raise ProtocolError(
                    Reason.PROTOCOL_ERROR, f"{kind.name} on stream {sid} that was never opened"
                )
            return  # In flight when the stream closed (a reset crossed it): ignored.
        # DATA never gets here: flags were checked above and the hot path took it otherwise.
        if kind is _FT_OPEN_RESULT:
            if self.role is not _ROLE_INNER:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "OPEN_RESULT sent to the root")
            reason = frames.parse_reason(payload, allow_ok=True)
            if reason is _REASON_OK:
                self._recv_transition(st, sid, _IN_RECV_ACCEPT, kind)
                events.append(StreamAccepted(sid))
                if st.send_window < 0:  # Opened before the root's preface came.
                    st.send_window = self._peer_window()
                    if st.pending is not None and self._flush(sid, st):
                        events.append(StreamWritable(sid))
            else:
                self._recv_transition(st, sid, _IN_RECV_REFUSE, kind)
                events.append(StreamRefused(sid, reason))
        elif kind is _FT_WINDOW_UPDATE:
            inc = frames.parse_window_update(payload)
            self._recv_transition(st, sid, _IN_RECV_WINDOW_UPDATE, kind)
            st.send_window += inc
            if st.send_window > frames.MAX_WINDOW:
                raise ProtocolError(
                    Reason.FLOW_CONTROL_ERROR, f"stream {sid}: window grew past {frames.MAX_WINDOW}"
                )
            if st.pending is not None and self._flush(sid, st):
                events.append(StreamWritable(sid))
        elif kind is _FT_HALF_CLOSE:
            if payload:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "HALF_CLOSE with a payload")
            self._recv_transition(st, sid, _IN_RECV_HALF_CLOSE, kind)
            events.append(HalfClosed(sid))
        else:  # RESET
            reason = frames.parse_reason(payload, allow_ok=False)
            st.pending = None
            st.pending_len = 0
            self._recv_transition(st, sid, _IN_RECV_RESET, kind)
            events.append(StreamReset(sid, reason))

    def _recv_transition(self, st: _Stream, sid: int, inp: Input, kind: FrameType) -> None:
        nxt = TRANSITIONS.get((st.state, inp))
        if nxt is None:
            raise ProtocolError(
                Reason.PROTOCOL_ERROR, f"stream {sid}: {kind.name} in state {st.state.value}"
            )
        st.state = nxt
        if nxt is ST_CLOSED:
            del self._streams[sid]

    def _recv_open(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if self.role is not _ROLE_ROOT:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "OPEN sent to the inner proxy")
        if sid <= self._last_id:
            raise ProtocolError(
                Reason.PROTOCOL_ERROR, f"OPEN reuses stream id {sid} (last was {self._last_id})"
            )
        if self.go_away_received:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "OPEN after the peer's GO_AWAY")
        port, host, gport = frames.parse_open(payload)
        self._last_id = sid
        if self.go_away_sent or len(self._streams) >= self.max_streams:
            self.refused_automatically += 1
            reason = Reason.SHUTTING_DOWN if self.go_away_sent else Reason.TOO_MANY_STREAMS
            self._out.append(frames.encode_open_result(sid, reason))
            return
        st = _Stream(ST_OPENING, self.initial_window)
        self._streams[sid] = st
        events.append(OpenRequested(sid, port, host, gport))

    def _connection_frame(self, kind: FrameType, payload: bytes, events: list[Event]) -> None:
        if kind is _FT_PING:
            if len(payload) != frames.PING_SIZE:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"PING of {len(payload)} bytes")
            self._out.append(frames.encode_pong(payload))
        elif kind is _FT_PONG:
            if len(payload) != frames.PING_SIZE:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"PONG of {len(payload)} bytes")
            events.append(PongReceived(payload))
        elif kind is _FT_CONFIG:
            if self.role is not _ROLE_INNER:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "CONFIG sent to the root")
            events.append(ConfigReceived(frames.parse_config(payload)))
        elif kind is _FT_GO_AWAY:
            reason, last = frames.parse_go_away(payload)
            self.go_away_received = True
            events.append(GoAwayReceived(reason, last))
        else:  # STATS
            if self.role is not _ROLE_ROOT:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "STATS sent to the inner proxy")
            events.append(StatsReceived(payload))


__all__ = [
    "MAX_CONCURRENT_STREAMS",
    "TRANSITIONS",
    "Connection",
    "Input",
    "ProtocolError",
    "Role",
    "StreamState",
    "UsageError",
]
