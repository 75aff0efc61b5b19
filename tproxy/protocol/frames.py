"""Frame layout of the String-Phone protocol: constants, encoders and the incremental decoder.

Wire format (``docs/protocol.md`` sections 2 and 3): each side first sends a
16-byte preface (magic, version, reserved, initial window), then frames, each a
10-byte header ``type u8 | flags u8 | stream id u32 | length u32`` (network byte
order) followed by ``length`` payload bytes.

The encoders return ``bytes`` objects meant for ``transport.writeSequence``:
a DATA frame is its header plus the caller's own payload object, never a copy.
The decoder accepts any split of the byte stream; a DATA payload that arrives in
one piece is handed out as a ``memoryview`` of the caller's chunk (no copy), a
payload that spans several chunks is joined once from views of them.  A header's
length is checked against the limit before anything is buffered for it, so a
4 GiB length allocates nothing.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket
import struct
from collections.abc import Iterable

#: Protocol version spoken by this implementation.
VERSION = 1
#: First bytes of every connection, from each side.
MAGIC = b"STRPHONE"
#: Preface: magic, version u16, reserved u16 (0), initial stream window u32.
PREFACE = struct.Struct("!8sHHI")
#: Frame header: type u8, flags u8, stream id u32, payload length u32.
HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size

#: Largest payload of any frame (64 KiB).
MAX_PAYLOAD = 65536
#: Largest window (per stream) and largest WINDOW_UPDATE increment: 2**31 - 1.
MAX_WINDOW = 2**31 - 1
#: Default initial window per stream (1 MiB): a stream's throughput is bounded by
#: window / credit round trip, and 256 KiB held one stream to ~1 Gbit/s.
DEFAULT_WINDOW = 1048576
#: Largest stream id.
MAX_STREAM_ID = 2**32 - 1
#: Size of a PING/PONG payload.
PING_SIZE = 8

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_OPEN4 = struct.Struct("!HH4s")
_OPEN6 = struct.Struct("!HH16s")
_GO_AWAY = struct.Struct("!BI")


class FrameType(enum.IntEnum):
    """Frame types (header byte 0)."""

    DATA = 0x0
    OPEN = 0x1
    OPEN_RESULT = 0x2
    WINDOW_UPDATE = 0x3
    HALF_CLOSE = 0x4
    RESET = 0x5
    CONFIG = 0x6
    PING = 0x7
    PONG = 0x8
    GO_AWAY = 0x9
    STATS = 0xA


class Reason(enum.IntEnum):
    """Reason codes of OPEN_RESULT, RESET and GO_AWAY."""

    OK = 0
    REFUSED = 1
    UNREACHABLE = 2
    TIMED_OUT = 3
    UNKNOWN_SERVICE = 4
    TOO_MANY_STREAMS = 5
    PROTOCOL_ERROR = 6
    SHUTTING_DOWN = 7
    ABORTED = 8
    INTERNAL_ERROR = 9
    IDLE_TIMEOUT = 10
    FLOW_CONTROL_ERROR = 11
    UNSUPPORTED_VERSION = 12
    FRAME_TOO_LARGE = 13


#: ``Reason`` by its wire value, for a fast lookup.
REASONS: dict[int, Reason] = {r.value: r for r in Reason}

#: Frame types that concern the whole connection and carry stream id 0.
CONNECTION_FRAMES = frozenset(
    {FrameType.CONFIG, FrameType.PING, FrameType.PONG, FrameType.GO_AWAY, FrameType.STATS}
)


class FrameError(Exception):
    """A frame that cannot be decoded; ``reason`` says which ``Reason`` ends the connection."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- encoders


def encode_preface(initial_window: int = DEFAULT_WINDOW, version: int = VERSION) -> bytes:
    """The 16-byte preface each side sends first."""
    return PREFACE.pack(MAGIC, version, 0, initial_window)


def header(ftype: int, stream_id: int, length: int, flags: int = 0) -> bytes:
    """A frame header alone (the payload follows as its own chunk)."""
    return HEADER.pack(ftype, flags, stream_id, length)


#: IPv6 guest addresses remembered by the OPEN encoder and decoder. Parsing an
#: address with ``ipaddress`` costs a few microseconds per stream, and a
#: bridge's guests are few; the bound keeps a guest that cycles through many
#: source addresses from growing it. IPv4 addresses, the common case, go
#: through the C library (``inet_pton``/``inet_ntop``, under a microsecond) and
#: are not cached: a cache entry made during a burst of connections outlives
#: it among the burst's short-lived objects and keeps pymalloc from freeing
#: their memory (issue 7 (f), docs/performance.md).
_ADDRESS_CACHE = 4096


def _packed_address(host: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return _packed_other(host)


@functools.lru_cache(maxsize=_ADDRESS_CACHE)
def _packed_other(host: str) -> bytes:
    return ipaddress.ip_address(host).packed


def _address_text(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    return _address_text_other(raw)


@functools.lru_cache(maxsize=_ADDRESS_CACHE)
def _address_text_other(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


# Frame type codes as plain ints and Reason.OK as a global: the encoders and
# parsers run per frame, and on Python 3.11 a ``FrameType.OPEN``-style lookup
# goes through ``EnumType.__getattr__``'s slot (hundreds of instructions).
_T_CONFIG = int(FrameType.CONFIG)
_T_GO_AWAY = int(FrameType.GO_AWAY)
_T_HALF_CLOSE = int(FrameType.HALF_CLOSE)
_T_OPEN = int(FrameType.OPEN)
_T_OPEN_RESULT = int(FrameType.OPEN_RESULT)
_T_PING = int(FrameType.PING)
_T_PONG = int(FrameType.PONG)
_T_RESET = int(FrameType.RESET)
_T_STATS = int(FrameType.STATS)
_T_WINDOW_UPDATE = int(FrameType.WINDOW_UPDATE)
_REASON_OK = Reason.OK


def encode_open(stream_id: int, service_port: int, guest_host: str, guest_port: int) -> bytes:
    """OPEN: service port u16, guest port u16, guest IPv4 (4 bytes) or IPv6 (16 bytes)."""
    packed = _packed_address(guest_host)
    st = _OPEN4 if len(packed) == 4 else _OPEN6
    body = st.pack(service_port, guest_port, packed)
    return HEADER.pack(_T_OPEN, 0, stream_id, len(body)) + body


def encode_open_result(stream_id: int, reason: Reason) -> bytes:
    """OPEN_RESULT: reason u8 (OK accepts the stream)."""
    return HEADER.pack(_T_OPEN_RESULT, 0, stream_id, 1) + _U8.pack(reason)


def encode_window_update(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE: increment u32."""
    return HEADER.pack(_T_WINDOW_UPDATE, 0, stream_id, 4) + _U32.pack(increment)


def encode_half_close(stream_id: int) -> bytes:
    """HALF_CLOSE: no payload."""
    return HEADER.pack(_T_HALF_CLOSE, 0, stream_id, 0)


def encode_reset(stream_id: int, reason: Reason) -> bytes:
    """RESET: reason u8."""
    return HEADER.pack(_T_RESET, 0, stream_id, 1) + _U8.pack(reason)


def encode_config(service_ports: Iterable[int]) -> bytes:
    """CONFIG: the service ports, each u16, ascending, no duplicates."""
    ports = sorted(set(service_ports))
    body = struct.pack(f"!{len(ports)}H", *ports)
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"{len(ports)} service ports do not fit one CONFIG frame")
    return HEADER.pack(_T_CONFIG, 0, 0, len(body)) + body


def encode_ping(payload: bytes) -> bytes:
    """PING: 8 opaque bytes."""
    return HEADER.pack(_T_PING, 0, 0, PING_SIZE) + payload


def encode_pong(payload: bytes) -> bytes:
    """PONG: the 8 bytes of the PING it answers."""
    return HEADER.pack(_T_PONG, 0, 0, PING_SIZE) + payload


def encode_go_away(reason: Reason, last_stream_id: int) -> bytes:
    """GO_AWAY: reason u8, last stream id u32 (highest stream id the sender has seen)."""
    return HEADER.pack(_T_GO_AWAY, 0, 0, _GO_AWAY.size) + _GO_AWAY.pack(
        reason, last_stream_id
    )


def encode_stats(payload: bytes) -> bytes:
    """STATS: reserved for counters (inner to root); the payload is opaque in version 1."""
    return HEADER.pack(_T_STATS, 0, 0, len(payload)) + payload


# ---------------------------------------------------------------- payload parsers


def parse_reason(payload: bytes, allow_ok: bool) -> Reason:
    """Decode a one-byte reason code; anything else is a protocol error."""
    if len(payload) != 1:
        raise FrameError(Reason.PROTOCOL_ERROR, f"reason field of {len(payload)} bytes")
    reason = REASONS.get(payload[0])
    if reason is None:
        raise FrameError(Reason.PROTOCOL_ERROR, f"unknown reason code {payload[0]}")
    if reason is _REASON_OK and not allow_ok:
        raise FrameError(Reason.PROTOCOL_ERROR, "reason OK where a failure is required")
    return reason


def parse_open(payload: bytes) -> tuple[int, str, int]:
    """Decode an OPEN payload into (service port, guest host, guest port)."""
    if len(payload) == _OPEN4.size:
        port, gport, raw = _OPEN4.unpack(payload)
    elif len(payload) == _OPEN6.size:
        port, gport, raw = _OPEN6.unpack(payload)
    else:
        raise FrameError(Reason.PROTOCOL_ERROR, f"OPEN payload of {len(payload)} bytes")
    if port == 0:
        raise FrameError(Reason.PROTOCOL_ERROR, "OPEN for service port 0")
    return port, _address_text(raw), gport


def parse_window_update(payload: bytes) -> int:
    """Decode a WINDOW_UPDATE increment (1 .. MAX_WINDOW)."""
    if len(payload) != 4:
        raise FrameError(Reason.PROTOCOL_ERROR, f"WINDOW_UPDATE payload of {len(payload)} bytes")
    (inc,) = _U32.unpack(payload)
    if not 1 <= inc <= MAX_WINDOW:
        raise FrameError(Reason.FLOW_CONTROL_ERROR, f"WINDOW_UPDATE increment {inc}")
    return inc


def parse_config(payload: bytes) -> frozenset[int]:
    """Decode a CONFIG payload: u16 ports, strictly ascending, none zero."""
    if len(payload) % 2:
        raise FrameError(Reason.PROTOCOL_ERROR, f"CONFIG payload of odd length {len(payload)}")
    ports = struct.unpack(f"!{len(payload) // 2}H", payload)
    prev = 0
    for p in ports:
        if p <= prev:
            raise FrameError(Reason.PROTOCOL_ERROR, "CONFIG ports not ascending or zero")
        prev = p
    return frozenset(ports)


def parse_go_away(payload: bytes) -> tuple[Reason, int]:
    """Decode a GO_AWAY payload into (reason, last stream id)."""
    if len(payload) != _GO_AWAY.size:
        raise FrameError(Reason.PROTOCOL_ERROR, f"GO_AWAY payload of {len(payload)} bytes")
    return parse_reason(payload[:1], allow_ok=True), _U32.unpack(payload[1:])[0]


def parse_preface(data: bytes) -> int:
    """Check a 16-byte preface and return the peer's initial window."""
    magic, version, reserved, window = PREFACE.unpack(data)
    if magic != MAGIC:
        raise FrameError(Reason.PROTOCOL_ERROR, f"bad preface magic {magic!r}")
    if version != VERSION:
        raise FrameError(
            Reason.UNSUPPORTED_VERSION, f"peer speaks version {version}, we speak {VERSION}"
        )
    if reserved != 0:
        raise FrameError(Reason.PROTOCOL_ERROR, f"non-zero reserved preface field {reserved}")
    if not 1 <= window <= MAX_WINDOW:
        raise FrameError(Reason.FLOW_CONTROL_ERROR, f"initial window {window}")
    return window


# ---------------------------------------------------------------- decoder

#: Buffered pieces up to this size are merged (see ``FrameDecoder._keep``).
_MERGE_LIMIT = 4096

#: A byte string as the DATA path passes it on: ``bytes``, or a ``memoryview`` of
#: immutable bytes (a slice of a read, never copied).
Chunk = bytes | memoryview

#: A decoded frame: (type, flags, stream id, payload).  Plain tuple: the DATA path is hot.
#: A DATA payload is a ``memoryview`` (of the fed bytes, or of the one join of a
#: payload that spanned reads); every other payload is ``bytes``.
Frame = tuple[int, int, int, Chunk]


class FrameDecoder:
    """Incremental decoder: ``feed(chunk)`` returns every frame completed by it.

    The preface is consumed first (``preface_window`` holds the peer's initial
    window once it arrived).  Buffered bytes never exceed one header plus
    ``max_payload``: a header announcing more is rejected before its payload
    is read.  Frame types and flags are not checked here (the connection does).
    """

    __slots__ = ("_chunks", "_have", "_header", "max_payload", "preface_window")

    def __init__(self, max_payload: int = MAX_PAYLOAD, expect_preface: bool = True) -> None:
        self.max_payload = max_payload
        #: Views of the buffered input, oldest first.
        self._chunks: list[memoryview] = []
        #: Number of bytes held in ``_chunks``.
        self._have = 0
        #: Header of the frame whose payload is awaited, or None.
        self._header: tuple[int, int, int, int] | None = None
        #: The peer's initial window once its preface arrived (None before).
        self.preface_window: int | None = None if expect_preface else DEFAULT_WINDOW

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return self._have

    def _take(self, n: int, view: bool = False) -> Chunk:
        """Remove and return the first ``n`` buffered bytes (one join at most).

        ``view``: a payload within one buffered piece comes back as a view of it.
        """
        chunks = self._chunks
        first = chunks[0]
        if len(first) > n:
            chunks[0] = first[n:]
            self._have -= n
            return first[:n] if view else first[:n].tobytes()
        if len(first) == n:
            del chunks[0]
            self._have -= n
            obj = first.obj
            if type(obj) is bytes and len(obj) == n:
                return obj  # A whole chunk of the caller's: passed on, not copied.
            return first if view else first.tobytes()
        parts: list[memoryview] = []
        need = n
        while need:
            c = chunks[0]
            if len(c) <= need:
                parts.append(c)
                need -= len(c)
                del chunks[0]
            else:
                parts.append(c[:need])
                chunks[0] = c[need:]
                need = 0
        self._have -= n
        joined = b"".join(parts)
        return memoryview(joined) if view else joined

    def _keep(self, data: bytes, pos: int) -> None:
        """Buffer ``data[pos:]``, the start of a unit that is not complete yet.

        A piece that fits with the previous chunk into ``_MERGE_LIMIT`` bytes is
        merged into it (one small copy): a peer that trickles a payload a byte
        per read costs about the bytes it sent, not a view object per byte
        (which made a 64 KiB payload cost 21 MB).  Adjacent chunks then always
        sum to more than the limit, so at most ``2 * (max_payload +
        HEADER_SIZE) / _MERGE_LIMIT + 1`` chunks are held.
        """
        n = len(data) - pos
        chunks = self._chunks
        if chunks and n + len(chunks[-1]) <= _MERGE_LIMIT:
            chunks[-1] = memoryview(chunks[-1].tobytes() + data[pos:])
        else:
            view = memoryview(data)
            chunks.append(view[pos:] if pos else view)
        self._have += n

    def _check(self, hdr: tuple[int, int, int, int]) -> None:
        if hdr[3] > self.max_payload:
            raise FrameError(
                Reason.FRAME_TOO_LARGE,
                f"frame type {hdr[0]} announces {hdr[3]} bytes, more than {self.max_payload}",
            )

    def feed(self, data: bytes) -> list[Frame]:
        """Decode what ``data`` completes; raise ``FrameError`` on a malformed stream."""
        out: list[Frame] = []
        n = len(data)
        pos = 0
        view: memoryview | None = None
        # Slow path: finish the unit (preface, header or payload) that earlier chunks began,
        # taking from ``data`` only the bytes it needs; then go on at full speed.
        while self._have or self._header is not None or self.preface_window is None:
            if self.preface_window is None:
                need = PREFACE.size - self._have
            elif self._header is None:
                need = HEADER_SIZE - self._have
            else:
                need = self._header[3] - self._have
            if need > 0:
                if n - pos < need:
                    if n > pos:
                        self._keep(data, pos)
                    return out
                if view is None:
                    view = memoryview(data)
                self._chunks.append(view[pos : pos + need] if pos or need < n else view)
                self._have += need
                pos += need
            if self.preface_window is None:
                self.preface_window = parse_preface(bytes(self._take(PREFACE.size)))
            elif self._header is None:
                hdr = HEADER.unpack(self._take(HEADER_SIZE))
                self._check(hdr)
                self._header = hdr
            else:
                ftype, flags, sid, length = self._header
                self._header = None
                out.append(
                    (ftype, flags, sid, self._take(length, ftype == 0) if length else b"")
                )
        # Fast path: nothing buffered, slice frames straight from the caller's chunk.
        unpack = HEADER.unpack_from
        limit = self.max_payload
        if view is None:
            view = memoryview(data)
        while n - pos >= HEADER_SIZE:
            ftype, flags, sid, length = unpack(data, pos)
            if length > limit:
                self._check((ftype, flags, sid, length))
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            start = pos + HEADER_SIZE
            # DATA: a view of the read (no copy); control frames: bytes for their parsers.
            out.append((ftype, flags, sid, view[start:end] if ftype == 0 else data[start:end]))
            pos = end
        if pos < n:
            self._chunks.append(view[pos:] if pos else view)
            self._have = n - pos
        return out
