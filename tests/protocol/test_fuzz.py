"""Fuzzing the String-Phone core: the decoder and the connection state machine under hostile input.

Three kinds of test:

* hypothesis properties.  A hostile peer (``peer_stream``: mostly plausible
  frames with one field bent now and then, or raw garbage) is fed in random
  reads to either role of ``Connection`` while ``_Driver`` answers events as a
  proxy would; and ``PairFuzz`` wires a real inner and a real root together,
  drives both with legal commands and now and then bends bytes on the wire.
  Properties: nothing but ``ProtocolError`` (``FrameError`` for the bare
  decoder) ever escapes; two legal peers never fail each other; a violation
  leaves the connection terminal with one GO_AWAY naming the reason and the
  error sticks; whatever a connection emits is well-formed; decoder buffers,
  windows and stream counts stay within their bounds; the decoder gives the
  same frames (or the same error) whatever the read sizes.
* the hand-made corpus in ``tests/protocol/corpus/`` (one ``.hex`` file per
  case, format in its README), replayed as written, byte by byte and in one
  read: each ends in exactly the error (or the events) the file names.
* tracemalloc checks that a huge length field allocates nothing and a payload
  trickled one byte per read costs about its own size.

Each property runs ``TPROXY_FUZZ_EXAMPLES`` examples (default 2000, the
``make check`` setting, about 10 s of CPU under coverage for the module); a
nightly-style run sets e.g. ``TPROXY_FUZZ_EXAMPLES=100000``.
"""

from __future__ import annotations

import collections
import os
import random
import re
import struct
import tracemalloc
from pathlib import Path

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tproxy.protocol import frames as fr
from tproxy.protocol.connection import Connection, ProtocolError, Role, StreamState
from tproxy.protocol.events import (
    DataReceived,
    Event,
    OpenRequested,
    StreamAccepted,
)
from tproxy.protocol.frames import FrameType, Reason

#: Examples per property (``make check``: 2000; raise it for a long run).
FUZZ_EXAMPLES = int(os.environ.get("TPROXY_FUZZ_EXAMPLES", "2000"))

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CORPUS = Path(__file__).parent / "corpus"

#: Most bytes a decoder may hold: one header plus one maximum payload.
BUFFER_BOUND = fr.HEADER_SIZE + fr.MAX_PAYLOAD

# ---------------------------------------------------------------- generators

# Hypothesis draws one byte string per example (a "tape"); a small deterministic
# generator turns it into a peer's byte stream, the read sizes and the proxy's own
# choices.  Drawing one blob is far cheaper than composing strategies per field
# (2,000 examples run in seconds), and hypothesis still shrinks it: a shorter tape
# or smaller bytes give fewer frames and simpler choices (an exhausted tape reads
# as zeros: the most ordinary choice everywhere).

_tapes = st.binary(max_size=400)


class Tape:
    """Reads choices from the bytes hypothesis drew; zeros once exhausted."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        """The next byte (0 when exhausted)."""
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def below(self, n: int) -> int:
        """A number in 0 .. n-1 (n <= 65536)."""
        return ((self.byte() << 8) | self.byte()) % n if n > 256 else self.byte() % n

    def rare(self, one_in: int) -> bool:
        """True about once in ``one_in`` draws (never when exhausted)."""
        return self.below(one_in) == one_in - 1

    def blob(self, max_size: int) -> bytes:
        """A few bytes, taken from the tape itself."""
        n = self.below(max_size + 1)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


_ODD_SIDS = (0, 2**31, 2**32 - 1, 7)
_ODD_INCREMENTS = (0, 2**31 - 1, 2**31, 2**32 - 1)


def _reason(tape: Tape) -> int:
    return tape.below(256) if tape.rare(8) else 1 + tape.below(len(Reason) - 1)


def peer_stream(tape: Tape, receiver: Role, opened: int = 0) -> bytes:
    """What a hostile (mostly plausible) peer of ``receiver`` sends: preface, frames, junk.

    The peer keeps a little state (next stream id, ids in use) so that most
    frames are legal and the receiver's state machine is explored deep, then
    bends one field now and then: a flag, a stream id, a length that lies, an
    unknown type, a frame for the wrong side, a window beyond the maximum.
    """
    window = fr.DEFAULT_WINDOW if not tape.rare(3) else 1 + tape.below(4096)
    magic, version, reserved = fr.MAGIC, fr.VERSION, 0
    roll = tape.below(40)
    if roll == 0:
        magic = b"STRPHONX"
    elif roll == 1:
        version = tape.below(65536)
    elif roll == 2:
        reserved = tape.below(65536)
    elif roll == 3:
        window = _ODD_INCREMENTS[tape.below(4)]
    out = [fr.PREFACE.pack(magic, version, reserved, window)]
    next_sid = 1
    sids = list(range(1, opened + 1))  # inner receiver: the streams it opened
    for _ in range(40):
        if tape.exhausted:
            break
        kind = tape.below(16)
        sid = (
            sids[tape.below(len(sids))] if sids and not tape.rare(16) else _ODD_SIDS[tape.below(4)]
        )
        payload = b""
        if kind <= 2 and receiver is Role.ROOT:
            ftype = FrameType.OPEN
            sid = next_sid if not tape.rare(16) else tape.below(next_sid + 2)
            next_sid = max(next_sid, sid + 1)
            sids.append(sid)
            port = 5030 if not tape.rare(8) else tape.below(65536)
            addr = b"\xa9\xfe\x03\x04" if not tape.rare(4) else tape.blob(17)
            payload = struct.pack("!HH", port, tape.below(65536)) + addr
        elif kind <= 2:
            ftype = FrameType.OPEN_RESULT
            payload = bytes([0 if tape.below(3) else _reason(tape)])
        elif kind <= 6:
            ftype = FrameType.DATA
            payload = bytes(tape.below(300)) if not tape.rare(16) else bytes(tape.below(65537))
        elif kind <= 8:
            ftype = FrameType.WINDOW_UPDATE
            inc = 1 + tape.below(60000) if not tape.rare(8) else _ODD_INCREMENTS[tape.below(4)]
            payload = struct.pack("!I", inc)
        elif kind == 9:
            ftype = FrameType.HALF_CLOSE
        elif kind == 10:
            ftype = FrameType.RESET
            payload = bytes([_reason(tape)])
        elif kind == 11:
            ftype, sid = FrameType.PING, 0
            payload = tape.blob(8).ljust(8, b"p") if not tape.rare(8) else tape.blob(12)
        elif kind == 12:
            ftype, sid = FrameType.PONG, 0
            payload = b"p" * (8 if not tape.rare(4) else tape.below(12))
        elif kind == 13:
            ftype, sid = FrameType.GO_AWAY, 0
            payload = bytes([_reason(tape) if tape.rare(2) else 7]) + struct.pack("!I", next_sid)
        elif kind == 14:
            ftype, sid = (FrameType.CONFIG, FrameType.STATS)[tape.below(2)], 0
            ports = sorted({1 + tape.below(65535) for _ in range(tape.below(5))})
            if tape.rare(4):
                ports = [tape.below(65536) for _ in range(tape.below(4))]
            payload = struct.pack(f"!{len(ports)}H", *ports)
        else:
            ftype = tape.below(256)
            payload = tape.blob(30)
        flags = 0 if not tape.rare(24) else 1 + tape.below(255)
        if tape.rare(32):
            sid = _ODD_SIDS[tape.below(4)]
        length = len(payload)
        if tape.rare(40):
            length = (2**32 - 1, fr.MAX_PAYLOAD + 1, length + 1, max(0, length - 1))[tape.below(4)]
        out.append(fr.HEADER.pack(int(ftype), flags, sid, length))
        out.append(payload)
    if tape.rare(8):
        out.append(tape.blob(20))
    return b"".join(out)


def reads(tape: Tape, data: bytes) -> list[bytes]:
    """``data`` cut into reads of sizes the tape chooses (1 byte .. the rest)."""
    chunks = []
    pos = 0
    while pos < len(data):
        roll = tape.below(4)
        n = len(data) - pos if roll == 0 else 1 + tape.below(64 if roll == 1 else 4096)
        chunks.append(data[pos : pos + n])
        pos += n
    return chunks


def _check_output(testcase: unittest.TestCase, out: bytes, preface: bool = True) -> list[fr.Frame]:
    """Everything a connection emits decodes cleanly: preface, known types, no flags."""
    decoder = fr.FrameDecoder(expect_preface=preface)
    frames_out = decoder.feed(out)
    testcase.assertEqual(decoder.buffered, 0)
    for ftype, flags, sid, payload in frames_out:
        testcase.assertIn(ftype, {t.value for t in FrameType})
        testcase.assertEqual(flags, 0)
        testcase.assertEqual(sid == 0, FrameType(ftype) in fr.CONNECTION_FRAMES)
        testcase.assertLessEqual(len(payload), fr.MAX_PAYLOAD)
    return frames_out


def _check_invariants(testcase: unittest.TestCase, conn: Connection) -> None:
    """Bounds a connection keeps whatever it was fed."""
    decoder = conn._decoder
    testcase.assertLessEqual(decoder.buffered, BUFFER_BOUND)
    testcase.assertLessEqual(len(decoder._chunks), 2 * BUFFER_BOUND // fr._MERGE_LIMIT + 2)
    testcase.assertLessEqual(conn.stream_count, conn.max_streams)
    for sid in conn.stream_ids():
        testcase.assertTrue(0 <= conn.recv_window(sid) <= fr.MAX_WINDOW)
        testcase.assertTrue(0 <= conn.send_window(sid) <= fr.MAX_WINDOW)


def _check_terminal(
    testcase: unittest.TestCase,
    conn: Connection,
    error: ProtocolError,
    out: bytes,
    preface: bool = True,
) -> None:
    """After a protocol error: terminal, one GO_AWAY with the reason last, the error sticks."""
    testcase.assertIs(conn.error, error)
    testcase.assertTrue(conn.terminated)
    frames_out = _check_output(testcase, out, preface)
    go_aways = [f for f in frames_out if f[0] == FrameType.GO_AWAY]
    testcase.assertTrue(go_aways)
    testcase.assertEqual(frames_out[-1][0], FrameType.GO_AWAY)
    testcase.assertEqual(fr.parse_go_away(frames_out[-1][3])[0], error.reason)
    again = testcase.assertRaises(ProtocolError, conn.receive_data, b"more")
    testcase.assertIs(again, error)
    for sid in conn.stream_ids():  # Commands are silently ignored now.
        conn.reset(sid, Reason.ABORTED)
    testcase.assertEqual(conn.data_to_send(), [])


class _Driver:
    """Plays the proxy around a fuzzed connection: answers events with legal commands.

    Its tape decides each answer, so the state machine is explored beyond the
    opening handshake: the root accepts, refuses or leaves opens pending; both
    sides send data, half-close, reset, consume and return credit.
    """

    def __init__(self, conn: Connection, tape: Tape) -> None:
        self.conn = conn
        self.tape = tape
        self.half_closed: set[int] = set()

    def react(self, events: list[Event]) -> None:
        conn, tape = self.conn, self.tape
        for e in events:
            if isinstance(e, OpenRequested):
                c = tape.below(3)
                if c == 0:
                    conn.accept(e.stream_id)
                elif c == 1:
                    conn.refuse(e.stream_id, Reason.UNKNOWN_SERVICE)
            elif isinstance(e, DataReceived):
                if not tape.rare(3):
                    conn.consumed(e.stream_id, len(e.data))
        for sid in conn.stream_ids():
            state = conn.stream_state(sid)
            c = tape.below(6)
            sending = state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE) or (
                state is StreamState.OPENING and conn.role is Role.INNER  # early data
            )
            if c == 1 and sending and sid not in self.half_closed:
                conn.send_data(sid, b"d" * (1 + tape.below(700)))
            elif (
                c == 2
                and sending
                and state is not StreamState.OPENING
                and sid not in self.half_closed
            ):
                self.half_closed.add(sid)
                conn.half_close(sid)
            elif c == 3:
                conn.reset(sid, Reason.ABORTED)
            elif c == 4:
                conn.window_update(sid)


class _Side:
    """One end of the fuzzed pair: a ``Connection`` plus what a proxy would remember."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending_opens: list[int] = []
        self.unconsumed: dict[int, int] = {}
        self.half_closed: set[int] = set()
        #: Its output (starting with the preface) was taken at least once.
        self.flushed = False
        self.events: collections.Counter[str] = collections.Counter()

    def record(self, events: list[Event]) -> None:
        for e in events:
            self.events[type(e).__name__] += 1
            if isinstance(e, OpenRequested):
                self.pending_opens.append(e.stream_id)
            elif isinstance(e, DataReceived):
                self.unconsumed[e.stream_id] = self.unconsumed.get(e.stream_id, 0) + len(e.data)

    def act(self, tape: Tape) -> None:
        """One legal command chosen by the tape (a no-op when it does not apply)."""
        conn = self.conn
        sids = conn.stream_ids()
        sid = sids[tape.below(len(sids))] if sids else 0
        state = conn.stream_state(sid)
        sending = state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE) or (
            state is StreamState.OPENING and conn.role is Role.INNER  # early data
        )
        c = tape.below(12)
        if c <= 2:
            if conn.role is Role.INNER and conn.may_open:
                conn.open_stream(5030, "169.254.3.4", tape.below(65536))
            elif conn.role is Role.ROOT and self.pending_opens:
                opened = self.pending_opens.pop(0)
                if tape.rare(4):
                    conn.refuse(opened, Reason.REFUSED)
                else:
                    conn.accept(opened)
        elif c <= 5 and sending and sid not in self.half_closed:
            conn.send_data(sid, bytes(1 + tape.below(3000)))
        elif (
            c == 6 and sending and state is not StreamState.OPENING and sid not in self.half_closed
        ):
            self.half_closed.add(sid)
            conn.half_close(sid)
        elif c == 7 and sids and tape.rare(3):
            conn.reset(sid, Reason.ABORTED)
        elif c <= 9:
            for s, n in list(self.unconsumed.items()):
                conn.consumed(s, n)
                del self.unconsumed[s]
        elif c == 10:
            conn.ping(bytes([tape.byte()]) * 8)
        elif tape.rare(8):
            if conn.role is Role.ROOT and not tape.rare(2):
                conn.push_config([5030, 1 + tape.below(65535)])
            else:
                conn.go_away()


def _mutate(tape: Tape, data: bytes) -> bytes:
    """Bend a chunk of legal bytes: flip, drop, insert or duplicate a few bytes."""
    if not data:
        return tape.blob(16)
    pos = tape.below(len(data))
    how = tape.below(5)
    if how == 0:
        return data[:pos] + bytes([data[pos] ^ (1 + tape.below(255))]) + data[pos + 1 :]
    if how == 1:
        return data[:pos] + data[pos + 1 + tape.below(8) :]
    if how == 2:
        return data[:pos] + tape.blob(16) + data[pos:]
    if how == 3:
        return data[:pos] + data[pos : pos + 1 + tape.below(40)] * 2 + data[pos:]
    return data[:pos] + fr.header(tape.below(12), tape.below(8), tape.below(65536)) + data[pos:]


class PairFuzz:
    """An inner and a root connection wired together, driven by tapes, with rare mutations.

    Until a mutation crosses the wire neither side may ever see a protocol error
    (two legal peers never fail each other); after one, only ``ProtocolError``
    may escape, and the side that raised it is terminal.  ``run`` returns how
    it ended, for the generator-depth check.
    """

    def __init__(self, testcase: unittest.TestCase, setup: int) -> None:
        self.t = testcase
        windows = (fr.DEFAULT_WINDOW, 64, 3000, 1)
        self.inner = _Side(Connection(Role.INNER, initial_window=windows[setup & 3]))
        self.root = _Side(
            Connection(
                Role.ROOT,
                initial_window=windows[setup >> 2 & 3],
                max_streams=(65536, 3)[setup >> 4 & 1],
            )
        )
        self.mutated = False
        self.errors: list[ProtocolError] = []

    def _carry(self, src: _Side, dst: _Side, cut: Tape, mut: Tape | None) -> bool:
        """Move src's output to dst in tape-sized reads; False once dst raised."""
        out = b"".join(src.conn.data_to_send())
        src.flushed = True
        if mut is not None and out and mut.rare(6):
            out = _mutate(mut, out)
            self.mutated = True
        for chunk in reads(cut, out):
            try:
                events = dst.conn.receive_data(chunk)
            except ProtocolError as e:
                if not self.mutated:
                    self.t.fail(f"legal peers failed each other: {e.reason.name}: {e}")
                self.errors.append(e)
                _check_terminal(
                    self.t, dst.conn, e, b"".join(dst.conn.data_to_send()), not dst.flushed
                )
                return False
            except Exception as e:  # pragma: no cover - the failure this test looks for
                self.t.fail(f"{type(e).__name__} escaped receive_data: {e!r}")
            dst.record(events)
            _check_invariants(self.t, dst.conn)
        return True

    def run(self, steps: Tape, cut: Tape, mut: Tape | None) -> None:
        for _ in range(80):
            if steps.exhausted:
                break
            side = (self.inner, self.root)[steps.below(2)]
            side.act(steps)
            if steps.below(3) == 0:
                if not self._carry(self.inner, self.root, cut, mut):
                    return
                if not self._carry(self.root, self.inner, cut, mut):
                    return
        for _ in range(4):  # Settle: everything queued reaches the other side.
            if not (
                self._carry(self.inner, self.root, cut, None)
                and self._carry(self.root, self.inner, cut, None)
            ):
                return


class DecoderFuzzTests(unittest.TestCase):
    """``FrameDecoder`` against arbitrary bytes."""

    @FUZZ
    @given(stream=_tapes, junk=st.binary(max_size=200), cut=_tapes)
    def test_any_bytes_any_split(self, stream: bytes, junk: bytes, cut: bytes) -> None:
        """Any bytes in any split yield the same frames or the same FrameError, buffer bounded."""
        data = peer_stream(Tape(stream), Role.ROOT) if stream[:1] != b"\xff" else junk
        whole: list[fr.Frame] | fr.FrameError
        try:
            whole = fr.FrameDecoder().feed(data)
        except fr.FrameError as e:
            whole = e
        decoder = fr.FrameDecoder()
        got: list[fr.Frame] = []
        error: fr.FrameError | None = None
        for chunk in reads(Tape(cut), data):
            try:
                got += decoder.feed(chunk)
            except fr.FrameError as e:
                error = e
                break
            self.assertLessEqual(decoder.buffered, BUFFER_BOUND)
        if isinstance(whole, fr.FrameError):
            self.assertIsNotNone(error)
            assert error is not None
            self.assertEqual(error.reason, whole.reason)
        else:
            self.assertIsNone(error)
            self.assertEqual([(t, f, s, bytes(p)) for t, f, s, p in got], whole)

    @settings(FUZZ, max_examples=max(100, FUZZ_EXAMPLES // 4))
    @given(tape=_tapes, cut=_tapes)
    def test_round_trip(self, tape: bytes, cut: bytes) -> None:
        """Frames encoded and fed back in any split decode to exactly themselves."""
        t = Tape(tape)
        frames = []
        while not t.exhausted:
            frames.append((t.byte(), t.byte(), t.below(65536) << 16 | t.below(65536), t.blob(300)))
        data = fr.encode_preface() + b"".join(
            fr.header(ft, s, len(p), flags=f) + p for ft, f, s, p in frames
        )
        decoder = fr.FrameDecoder()
        got: list[fr.Frame] = []
        for chunk in reads(Tape(cut), data):
            got += decoder.feed(chunk)
        self.assertEqual([(ft, f, s, bytes(p)) for ft, f, s, p in got], frames)
        self.assertEqual(decoder.buffered, 0)


class ConnectionFuzzTests(unittest.TestCase):
    """Both roles of ``Connection`` against hostile byte streams, driven like a proxy."""

    def _fuzz(self, conn: Connection, data: bytes, cut: bytes, choices: bytes) -> None:
        driver = _Driver(conn, Tape(choices))
        out = [b"".join(conn.data_to_send())]
        for chunk in reads(Tape(cut), data):
            try:
                events = conn.receive_data(chunk)
            except ProtocolError as e:
                out.append(b"".join(conn.data_to_send()))
                _check_terminal(self, conn, e, b"".join(out))
                return
            except Exception as e:  # pragma: no cover - the failure this test looks for
                self.fail(f"{type(e).__name__} escaped receive_data: {e!r}")
            _check_invariants(self, conn)
            driver.react(events)
            out.append(b"".join(conn.data_to_send()))
        self.assertIsNone(conn.error)
        _check_output(self, b"".join(out))

    @FUZZ
    @given(stream=_tapes, cut=_tapes, choices=_tapes, setup=st.integers(0, 1023))
    def test_hostile_peer(self, stream: bytes, cut: bytes, choices: bytes, setup: int) -> None:
        """Either role fed a hostile stream (or raw garbage after a valid preface) raises only
        ProtocolError, ends with one GO_AWAY naming the reason, and stays bounded."""
        window = (fr.DEFAULT_WINDOW, 64, 1000, 1)[setup & 3]
        if setup & 4:
            conn = Connection(
                Role.ROOT, initial_window=window, max_streams=(65536, 2)[setup >> 3 & 1]
            )
            opens = 0
        else:
            conn = Connection(Role.INNER, initial_window=window)
            opens = setup >> 3 & 7
            for i in range(opens):
                conn.open_stream(5030, "169.254.3.4", 41000 + i)
        if setup >> 6 & 7 == 0:
            data = fr.encode_preface() + stream
        else:
            data = peer_stream(Tape(stream), conn.role, opens)
        self._fuzz(conn, data, cut, choices)

    @FUZZ
    @given(steps=_tapes, cut=_tapes, mut=_tapes, setup=st.integers(0, 255))
    def test_pair_with_mutations(self, steps: bytes, cut: bytes, mut: bytes, setup: int) -> None:
        """Legal peers never fail each other; a bent byte on the wire only ever ends in
        ProtocolError and a terminal connection."""
        PairFuzz(self, setup).run(Tape(steps), Tape(cut), Tape(mut) if setup & 32 else None)

    def test_generator_reaches_deep_states(self) -> None:
        """The pair generator is not shallow: fixed tapes reach every event and error kind."""
        rng = random.Random(8)
        inner: collections.Counter[str] = collections.Counter()
        root: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[Reason] = collections.Counter()
        for i in range(400):
            tapes = [bytes(rng.randrange(256) for _ in range(400)) for _ in range(3)]
            pair = PairFuzz(self, i)
            pair.run(Tape(tapes[0]), Tape(tapes[1]), Tape(tapes[2]) if i & 32 else None)
            inner.update(pair.inner.events)
            root.update(pair.root.events)
            reasons.update(e.reason for e in pair.errors)
        for name in (
            "OpenRequested",
            "DataReceived",
            "HalfClosed",
            "StreamReset",
            "StreamWritable",
            "PongReceived",
            "GoAwayReceived",
        ):
            self.assertGreater(root[name], 0, name)
        for name in (
            "StreamAccepted",
            "StreamRefused",
            "DataReceived",
            "HalfClosed",
            "StreamWritable",
            "ConfigReceived",
            "PongReceived",
            "GoAwayReceived",
        ):
            self.assertGreater(inner[name], 0, name)
        for reason in (Reason.PROTOCOL_ERROR, Reason.FLOW_CONTROL_ERROR, Reason.FRAME_TOO_LARGE):
            self.assertGreater(reasons[reason], 0, reason)

    def test_violation_ends_only_that_connection(self) -> None:
        """A protocol error on one connection leaves another, with an open stream, untouched."""
        inner = Connection(Role.INNER)
        good = Connection(Role.ROOT)
        bad = Connection(Role.ROOT)
        good.receive_data(b"".join(inner.data_to_send()))
        sid = inner.open_stream(5030, "169.254.3.4", 1)
        (req,) = good.receive_data(b"".join(inner.data_to_send()))
        good.accept(req.stream_id)
        self.assertEqual(inner.receive_data(b"".join(good.data_to_send())), [StreamAccepted(sid)])
        self.assertRaises(ProtocolError, bad.receive_data, b"\xff" * 64)
        inner.send_data(sid, b"still flowing")
        self.assertEqual(
            good.receive_data(b"".join(inner.data_to_send())),
            [DataReceived(sid, b"still flowing")],
        )
        self.assertIsNone(good.error)


# ---------------------------------------------------------------- memory


class MemoryTests(unittest.TestCase):
    """What hostile length fields and trickled payloads cost, measured with tracemalloc."""

    def _peak(self, feed: list[bytes], role: Role = Role.ROOT) -> tuple[int, ProtocolError | None]:
        conn = Connection(role)
        error = None
        tracemalloc.start()
        try:
            for chunk in feed:
                conn.receive_data(chunk)
        except ProtocolError as e:
            error = e
        finally:
            _current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        return peak, error

    def test_4gib_length_allocates_nothing(self) -> None:
        """A header announcing 4 GiB is refused from the header, with a few KiB allocated."""
        head = fr.encode_preface() + fr.header(FrameType.DATA, 1, 2**32 - 1)
        for feed in ([head + b"x" * 1000], [bytes([b]) for b in head]):
            peak, error = self._peak(feed)
            assert error is not None
            self.assertEqual(error.reason, Reason.FRAME_TOO_LARGE)
            self.assertLess(peak, 16 * 1024)

    def test_every_huge_length_type(self) -> None:
        """Every frame type, known or not, with a 2 GiB length costs a few KiB, both roles."""
        for role in (Role.ROOT, Role.INNER):
            for ftype in range(0, 256, 5):
                head = fr.encode_preface() + fr.header(ftype, 0, 2**31)
                peak, error = self._peak([head], role)
                assert error is not None
                self.assertEqual(error.reason, Reason.FRAME_TOO_LARGE)
                self.assertLess(peak, 16 * 1024)

    def test_trickled_payload_costs_its_size(self) -> None:
        """A maximum payload sent a byte per read holds about its own size, not a view per byte."""
        feed = [fr.encode_preface(), fr.header(FrameType.STATS, 0, fr.MAX_PAYLOAD)]
        feed += [b"s"] * (fr.MAX_PAYLOAD - 1)
        peak, error = self._peak(feed)
        self.assertIsNone(error)
        # Was ~21 MB before pieces were merged; now the payload plus small overheads.
        self.assertLess(peak, 3 * fr.MAX_PAYLOAD)

    def test_trickled_odd_sizes_stay_bounded(self) -> None:
        """Pieces of every size up to 5000 bytes keep the buffered chunk count bounded."""
        decoder = fr.FrameDecoder()
        decoder.feed(fr.encode_preface() + fr.header(FrameType.STATS, 0, fr.MAX_PAYLOAD))
        size = 1
        left = fr.MAX_PAYLOAD
        while left > 1:
            n = min(size, left - 1)
            self.assertEqual(decoder.feed(b"p" * n), [])
            left -= n
            size = size * 7 % 5003 + 1
            self.assertLessEqual(len(decoder._chunks), 2 * BUFFER_BOUND // fr._MERGE_LIMIT + 2)
        (frame,) = decoder.feed(b"p")
        self.assertEqual(frame[3], b"p" * fr.MAX_PAYLOAD)


# ---------------------------------------------------------------- corpus


@attrs.frozen
class CorpusCase:
    """One hand-made corpus file: who receives the bytes and what must happen."""

    name: str
    description: str
    receiver: Role
    expect: Reason | None
    """The protocol error the receiver must raise, or None for no error."""
    window: int
    events: list[str] | None
    """The events expected (in ``_event_text`` form), when the file names them."""
    steps: list[tuple[str, list[bytes] | int]]
    """("bytes", reads as split by ``|``), ("accept", stream id) or ("open", service port)."""


_META = re.compile(r"^# (receiver|expect|window|events): (.*)$")


def load_case(path: Path) -> CorpusCase:
    """Parse a corpus file (format: ``tests/protocol/corpus/README.md``)."""
    meta: dict[str, str] = {}
    description = ""
    steps: list[tuple[str, list[bytes] | int]] = []
    reads: list[bytes] = [b""]
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _META.match(line)
            if m:
                meta[m.group(1)] = m.group(2).strip()
            elif not description:
                description = line[1:].strip()
            continue
        if line.startswith("@"):
            if any(reads):
                steps.append(("bytes", [r for r in reads if r]))
            reads = [b""]
            verb, arg = line[1:].split()
            steps.append((verb, int(arg)))
            continue
        parts = line.split("|")
        for i, part in enumerate(parts):
            if i:
                reads.append(b"")
            reads[-1] += bytes.fromhex("".join(part.split()))
    if any(reads):
        steps.append(("bytes", [r for r in reads if r]))
    expect = meta["expect"]
    return CorpusCase(
        name=path.stem,
        description=description,
        receiver=Role(meta["receiver"]),
        expect=None if expect == "ok" else Reason[expect],
        window=int(meta.get("window", fr.DEFAULT_WINDOW)),
        events=[e.strip() for e in meta["events"].split(" ; ") if e.strip()]
        if "events" in meta
        else None,
        steps=steps,
    )


def _event_text(e: Event) -> str:
    """An event as corpus files write it: ``Name(field, field, ...)`` with reprs."""
    fields = (getattr(e, a.name) for a in attrs.fields(type(e)))
    # DATA payloads are memoryviews: written as the bytes they show.
    values = ", ".join(repr(bytes(v) if type(v) is memoryview else v) for v in fields)
    return f"{type(e).__name__}({values})"


def replay(case: CorpusCase, mode: str) -> tuple[Connection, list[Event], ProtocolError | None]:
    """Feed a case to a fresh receiver: ``as-written``, ``bytewise`` or ``one-read`` per step."""
    conn = Connection(case.receiver, initial_window=case.window)
    events: list[Event] = []
    for verb, arg in case.steps:
        if verb == "accept":
            assert isinstance(arg, int)
            conn.accept(arg)
            continue
        if verb == "open":
            assert isinstance(arg, int)
            conn.open_stream(arg, "169.254.3.4", 41000)
            continue
        assert verb == "bytes" and isinstance(arg, list), verb
        if mode == "as-written":
            reads = arg
        elif mode == "one-read":
            reads = [b"".join(arg)]
        else:
            joined = b"".join(arg)
            reads = [joined[i : i + 1] for i in range(len(joined))]
        for chunk in reads:
            try:
                events += conn.receive_data(chunk)
            except ProtocolError as e:
                return conn, events, e
    return conn, events, None


class CorpusTests(unittest.TestCase):
    """Replays every hand-made malformed (or tricky but legal) input of the corpus."""

    def test_corpus_is_there(self) -> None:
        """The corpus holds the cases this module replays (one test each)."""
        self.assertGreaterEqual(len(list(CORPUS.glob("*.hex"))), 50)

    def check_case(self, path: Path) -> None:
        """Replay one file three ways; each must end exactly as the file says."""
        case = load_case(path)
        outcomes = []
        for mode in ("as-written", "bytewise", "one-read"):
            conn, events, error = replay(case, mode)
            texts = [_event_text(e) for e in events]
            if case.expect is None:
                self.assertIsNone(error, f"{case.name} ({mode}): {error!r}")
                _check_output(self, b"".join(conn.data_to_send()))
            else:
                self.assertIsNotNone(error, f"{case.name} ({mode}): no protocol error")
                assert error is not None
                self.assertEqual(error.reason, case.expect, f"{case.name} ({mode}): {error}")
                _check_terminal(self, conn, error, b"".join(conn.data_to_send()))
            if case.events is not None:
                self.assertEqual(texts, case.events, f"{case.name} ({mode})")
            # Events that came before the error in the same read are not returned.
            outcomes.append((texts, None) if error is None else ([], error.reason))
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual(outcomes[0], outcomes[2])


def _add_corpus_tests() -> None:
    for path in sorted(CORPUS.glob("*.hex")):
        case_name = path.stem

        def test(self: CorpusTests, path: Path = path) -> None:
            self.check_case(path)

        test.__doc__ = f"Corpus case {case_name}: {load_case(path).description}"
        test.__name__ = f"test_{case_name}"
        setattr(CorpusTests, test.__name__, test)


_add_corpus_tests()
