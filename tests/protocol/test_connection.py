"""Tests for tproxy.protocol.connection: streams, state machine, flow control, violations."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tproxy.protocol import frames as fr
from tproxy.protocol.connection import (
    MAX_CONCURRENT_STREAMS,
    TRANSITIONS,
    Connection,
    ProtocolError,
    Role,
    StreamState,
    UsageError,
)
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


def pump(src: Connection, dst: Connection) -> list[Event]:
    """Move everything ``src`` queued into ``dst``; return ``dst``'s events."""
    data = b"".join(src.data_to_send())
    return dst.receive_data(data) if data else []


def pair(
    window: int = fr.DEFAULT_WINDOW, max_streams: int = MAX_CONCURRENT_STREAMS
) -> tuple[Connection, Connection]:
    """An inner and a root connection that exchanged their prefaces."""
    inner = Connection(Role.INNER, initial_window=window)
    root = Connection(Role.ROOT, initial_window=window, max_streams=max_streams)
    assert pump(inner, root) == []
    assert pump(root, inner) == []
    return inner, root


def opened(inner: Connection, root: Connection, port: int = 5030) -> int:
    """Open and accept one stream; return its id."""
    sid = inner.open_stream(port, "169.254.3.4", 41000)
    [ev] = pump(inner, root)
    assert ev == OpenRequested(sid, port, "169.254.3.4", 41000)
    root.accept(sid)
    assert pump(root, inner) == [StreamAccepted(sid)]
    return sid


def raw_root() -> Connection:
    """A root connection that has received the inner's preface only."""
    root = Connection(Role.ROOT)
    root.receive_data(fr.encode_preface())
    root.data_to_send()
    return root


def raw_inner() -> Connection:
    """An inner connection that has received the root's preface only."""
    inner = Connection(Role.INNER)
    inner.receive_data(fr.encode_preface())
    inner.data_to_send()
    return inner


class EarlyDataTests(unittest.TestCase):
    """The inner sends DATA behind its OPEN; the root gets it before answering."""

    def test_early_data_then_accept(self) -> None:
        """Early data arrives with the OPEN, is charged to the window, and the stream goes on."""
        inner, root = pair(window=100)
        sid = inner.open_stream(5030, "169.254.3.4", 41000)
        inner.send_data(sid, b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(inner.send_window(sid), 100 - 18)
        self.assertEqual(
            pump(inner, root),
            [
                OpenRequested(sid, 5030, "169.254.3.4", 41000),
                DataReceived(sid, b"GET / HTTP/1.0\r\n\r\n"),
            ],
        )
        self.assertEqual(root.stream_state(sid), StreamState.OPENING)
        self.assertEqual(root.recv_window(sid), 100 - 18)
        root.accept(sid)
        root.consumed(sid, 18)  # Under a quarter window: no WINDOW_UPDATE yet.
        self.assertEqual(pump(root, inner), [StreamAccepted(sid)])
        self.assertEqual(inner.send_window(sid), 100 - 18)  # Not reset by the OPEN_RESULT.
        inner.send_data(sid, b"x" * 82)
        self.assertEqual(inner.send_window(sid), 0)
        inner.send_data(sid, b"y")
        self.assertEqual(inner.buffered(sid), 1)
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"x" * 82)])
        root.consumed(sid, 82)
        self.assertEqual(pump(root, inner), [StreamWritable(sid)])
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"y")])

    def test_early_data_beyond_window_waits(self) -> None:
        """Early data beyond the window waits for credit, which comes after the accept."""
        inner, root = pair(window=8)
        sid = inner.open_stream(5030, "169.254.3.4", 41000)
        inner.send_data(sid, b"0123456789")
        self.assertEqual(inner.buffered(sid), 2)
        self.assertEqual(pump(inner, root)[1:], [DataReceived(sid, b"01234567")])
        root.accept(sid)
        root.consumed(sid, 8)
        self.assertEqual(pump(root, inner), [StreamAccepted(sid), StreamWritable(sid)])
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"89")])

    def test_early_data_refused(self) -> None:
        """A refused open closes the stream; early data still in flight is ignored."""
        inner, root = pair()
        sid = inner.open_stream(9999, "169.254.3.4", 1)
        inner.send_data(sid, b"early")
        self.assertEqual(len(pump(inner, root)), 2)
        root.refuse(sid, Reason.UNKNOWN_SERVICE)
        inner.send_data(sid, b"crossing")  # Sent before the refusal arrived.
        self.assertEqual(pump(inner, root), [])
        self.assertEqual(pump(root, inner), [StreamRefused(sid, Reason.UNKNOWN_SERVICE)])
        self.assertEqual((inner.stream_count, root.stream_count), (0, 0))

    def test_early_data_to_an_automatic_refusal(self) -> None:
        """Early data for an open the connection refused itself (too many streams) is ignored."""
        inner, root = pair(max_streams=1)
        first = inner.open_stream(5030, "169.254.3.4", 1)
        second = inner.open_stream(5030, "169.254.3.4", 2)
        inner.send_data(second, b"early")
        self.assertEqual(pump(inner, root), [OpenRequested(first, 5030, "169.254.3.4", 1)])
        self.assertEqual(pump(root, inner), [StreamRefused(second, Reason.TOO_MANY_STREAMS)])

    def test_opened_before_the_roots_preface(self) -> None:
        """Without the root's preface the window is unknown: early data waits for the accept."""
        inner = Connection(Role.INNER)
        root = Connection(Role.ROOT, initial_window=16)
        sid = inner.open_stream(5030, "169.254.3.4", 1)
        inner.send_data(sid, b"early")
        self.assertEqual((inner.send_window(sid), inner.buffered(sid)), (0, 5))
        self.assertEqual(pump(inner, root), [OpenRequested(sid, 5030, "169.254.3.4", 1)])
        root.accept(sid)
        self.assertEqual(pump(root, inner), [StreamAccepted(sid), StreamWritable(sid)])
        self.assertEqual(inner.send_window(sid), 11)
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"early")])

    def test_root_may_not_send_early(self) -> None:
        """Only the inner sends early data."""
        inner, root = pair()
        sid = inner.open_stream(5030, "169.254.3.4", 1)
        pump(inner, root)
        self.assertRaises(UsageError, root.send_data, sid, b"x")


class StreamLifecycleTests(unittest.TestCase):
    """A stream opens, carries data both ways, half-closes and closes."""

    def test_open_accept_data_close(self) -> None:
        """The happy path, with exact events on both sides."""
        inner, root = pair()
        sid = opened(inner, root)
        self.assertEqual(sid, 1)
        self.assertEqual(inner.stream_state(sid), StreamState.OPEN)
        inner.send_data(sid, b"GET / HTTP/1.0\r\n\r\n")
        inner.half_close(sid)
        self.assertEqual(
            pump(inner, root), [DataReceived(sid, b"GET / HTTP/1.0\r\n\r\n"), HalfClosed(sid)]
        )
        self.assertEqual(root.stream_state(sid), StreamState.HALF_CLOSED_REMOTE)
        self.assertEqual(inner.stream_state(sid), StreamState.HALF_CLOSED_LOCAL)
        root.send_data(sid, b"HTTP/1.0 200 OK\r\n\r\nhi")
        root.half_close(sid)
        self.assertEqual(
            pump(root, inner), [DataReceived(sid, b"HTTP/1.0 200 OK\r\n\r\nhi"), HalfClosed(sid)]
        )
        self.assertEqual(inner.stream_state(sid), StreamState.CLOSED)
        self.assertEqual(root.stream_state(sid), StreamState.CLOSED)
        self.assertEqual((inner.stream_count, root.stream_count), (0, 0))

    def test_half_close_from_root_first(self) -> None:
        """The root may half-close first; the inner keeps sending."""
        inner, root = pair()
        sid = opened(inner, root)
        root.half_close(sid)
        self.assertEqual(pump(root, inner), [HalfClosed(sid)])
        inner.send_data(sid, b"more")
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"more")])
        inner.half_close(sid)
        self.assertEqual(pump(inner, root), [HalfClosed(sid)])
        self.assertEqual(root.stream_ids(), [])

    def test_refuse(self) -> None:
        """A refused open closes the stream on both sides with the reason."""
        inner, root = pair()
        sid = inner.open_stream(9999, "169.254.3.4", 1)
        pump(inner, root)
        root.refuse(sid, Reason.UNKNOWN_SERVICE)
        self.assertEqual(pump(root, inner), [StreamRefused(sid, Reason.UNKNOWN_SERVICE)])
        self.assertEqual(inner.stream_state(sid), StreamState.CLOSED)
        self.assertEqual(root.stream_state(sid), StreamState.CLOSED)

    def test_ids_increase(self) -> None:
        """The inner allocates ids 1, 2, 3, ..."""
        inner, root = pair()
        self.assertEqual([opened(inner, root) for _ in range(3)], [1, 2, 3])
        self.assertEqual(inner.stream_state(10), StreamState.IDLE)

    def test_ipv6_guest(self) -> None:
        """A guest with an IPv6 address is carried in OPEN."""
        inner, root = pair()
        sid = inner.open_stream(80, "fe80::5", 7)
        self.assertEqual(pump(inner, root), [OpenRequested(sid, 80, "fe80::5", 7)])

    def test_reset_from_inner(self) -> None:
        """A reset closes the stream; the peer learns the reason."""
        inner, root = pair()
        sid = opened(inner, root)
        inner.reset(sid, Reason.ABORTED)
        self.assertEqual(pump(inner, root), [StreamReset(sid, Reason.ABORTED)])
        self.assertEqual((inner.stream_count, root.stream_count), (0, 0))

    def test_reset_while_opening_and_late_result(self) -> None:
        """A guest that leaves before the answer resets; the late answer is ignored."""
        inner, root = pair()
        sid = inner.open_stream(5030, "169.254.3.4", 1)
        pump(inner, root)
        inner.reset(sid, Reason.ABORTED)
        root.accept(sid)  # Crosses the reset.
        self.assertEqual(pump(root, inner), [])
        self.assertEqual(pump(inner, root), [StreamReset(sid, Reason.ABORTED)])

    def test_frames_crossing_a_reset_are_ignored(self) -> None:
        """DATA, WINDOW_UPDATE and HALF_CLOSE in flight when a stream was reset are dropped."""
        inner, root = pair(window=1000)
        sid = opened(inner, root)
        root.send_data(sid, b"x" * 1000)
        pump(root, inner)
        inner.consumed(sid, 1000)
        root.reset(sid, Reason.SHUTTING_DOWN)
        inner.send_data(sid, b"late")
        inner.half_close(sid)
        self.assertEqual(pump(inner, root), [])
        self.assertEqual(pump(root, inner), [StreamReset(sid, Reason.SHUTTING_DOWN)])

    def test_reset_drops_pending(self) -> None:
        """Data waiting for window is discarded by a reset."""
        inner, root = pair(window=10)
        sid = opened(inner, root)
        inner.send_data(sid, b"x" * 25)
        self.assertEqual(inner.buffered(sid), 15)
        inner.reset(sid, Reason.ABORTED)
        self.assertEqual(inner.buffered(sid), 0)
        self.assertEqual(
            pump(inner, root), [DataReceived(sid, b"x" * 10), StreamReset(sid, Reason.ABORTED)]
        )

    def test_peer_reset_drops_pending(self) -> None:
        """A reset from the peer discards data waiting for its window."""
        inner, root = pair(window=10)
        sid = opened(inner, root)
        inner.send_data(sid, b"x" * 25)
        root.reset(sid, Reason.REFUSED)
        self.assertEqual(pump(root, inner), [StreamReset(sid, Reason.REFUSED)])
        self.assertEqual(inner.buffered(sid), 0)
        self.assertEqual(inner.stream_count, 0)

    def test_commands_on_closed_streams_do_nothing(self) -> None:
        """Commands for a stream that is gone queue nothing."""
        inner, root = pair()
        for cmd in (
            lambda: inner.send_data(5, b"x"),
            lambda: inner.half_close(5),
            lambda: inner.reset(5, Reason.ABORTED),
            lambda: inner.consumed(5, 3),
            lambda: inner.window_update(5),
            lambda: root.accept(5),
            lambda: root.refuse(5, Reason.REFUSED),
        ):
            cmd()
        self.assertEqual(inner.data_to_send() + root.data_to_send(), [])


class FlowControlTests(unittest.TestCase):
    """Windows bound what is in flight; credit comes back as data is consumed."""

    def test_window_never_exceeded(self) -> None:
        """The sender frames at most the window; the rest waits and then follows in order."""
        inner, root = pair(window=4096)
        sid = opened(inner, root)
        blob = bytes(random.Random(1).randbytes(20000))
        inner.send_data(sid, blob)
        self.assertEqual(inner.buffered(sid), 20000 - 4096)
        got = b""
        writable = 0
        for _ in range(100):
            evs = pump(inner, root)
            for ev in evs:
                assert isinstance(ev, DataReceived)
                self.assertLessEqual(len(ev.data), 4096)
                got += ev.data
                root.consumed(sid, len(ev.data))
            self.assertLessEqual(4096 - root.recv_window(sid), 4096)
            evs = pump(root, inner)
            writable += evs.count(StreamWritable(sid))
            if not evs and not inner.buffered(sid):
                break
        self.assertEqual(got, blob)
        self.assertEqual(writable, 1)

    def test_max_payload_split(self) -> None:
        """A write larger than the maximum payload goes out as several frames."""
        inner, root = pair(window=fr.MAX_WINDOW)
        sid = opened(inner, root)
        blob = bytes(200000)
        inner.send_data(sid, blob)
        evs = pump(inner, root)
        self.assertEqual(
            [len(e.data) for e in evs if isinstance(e, DataReceived)],
            [65536, 65536, 65536, 200000 - 3 * 65536],
        )

    def test_small_write_passed_through(self) -> None:
        """A write that fits is queued as the caller's own bytes object."""
        inner, root = pair()
        sid = opened(inner, root)
        data = b"z" * 1000
        inner.send_data(sid, data)
        chunks = inner.data_to_send()
        self.assertIs(chunks[1], data)

    def test_credit_batched(self) -> None:
        """Credit is returned only once a quarter window was consumed."""
        inner, root = pair(window=4000)
        sid = opened(inner, root)
        inner.send_data(sid, b"a" * 4000)
        pump(inner, root)
        root.consumed(sid, 999)
        self.assertEqual(root.data_to_send(), [])
        root.consumed(sid, 1)
        self.assertEqual(b"".join(root.data_to_send()), fr.encode_window_update(sid, 1000))
        self.assertEqual(root.recv_window(sid), 1000)
        root.consumed(sid, 10)
        root.window_update(sid)
        self.assertEqual(b"".join(root.data_to_send()), fr.encode_window_update(sid, 10))

    def test_consumed_more_than_received(self) -> None:
        """Returning credit for bytes never received is a usage error."""
        inner, root = pair(window=4000)
        sid = opened(inner, root)
        self.assertRaises(UsageError, root.consumed, sid, 1)

    def test_stalled_reader_does_not_delay_others(self) -> None:
        """A stream whose reader never consumes blocks only itself."""
        inner, root = pair(window=1000)
        slow = opened(inner, root)
        fast = opened(inner, root)
        inner.send_data(slow, b"s" * 50000)
        got = b""
        for _ in range(50):
            inner.send_data(fast, b"f" * 1000)
            for ev in pump(inner, root):
                assert isinstance(ev, DataReceived)
                if ev.stream_id == fast:
                    got += ev.data
                    root.consumed(fast, len(ev.data))
            pump(root, inner)
        self.assertEqual(got, b"f" * 50000)
        self.assertEqual(inner.buffered(slow), 49000)
        self.assertEqual(inner.buffered(fast), 0)

    def test_half_close_waits_for_pending(self) -> None:
        """HALF_CLOSE goes out after the data that waited for window, not before."""
        inner, root = pair(window=10)
        sid = opened(inner, root)
        inner.send_data(sid, b"0123456789abcde")
        inner.half_close(sid)
        self.assertEqual(inner.stream_state(sid), StreamState.OPEN)
        self.assertRaises(UsageError, inner.send_data, sid, b"x")
        self.assertRaises(UsageError, inner.half_close, sid)
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"0123456789")])
        root.consumed(sid, 10)
        root.window_update(sid)
        self.assertEqual(pump(root, inner), [StreamWritable(sid)])
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"abcde"), HalfClosed(sid)])
        self.assertEqual(inner.stream_state(sid), StreamState.HALF_CLOSED_LOCAL)

    def test_large_write_framed_as_views(self) -> None:
        """A write of several frames' worth that fits the window: views of it, no copies."""
        inner, root = pair()
        sid = opened(inner, root)
        data = bytes(range(256)) * 1000  # 256,000 bytes: 3 full frames and one of 59,392
        inner.send_data(sid, data)
        out = inner.data_to_send()
        payloads = out[1::2]
        self.assertEqual([len(p) for p in payloads], [65536, 65536, 65536, 59392])
        self.assertTrue(all(type(p) is memoryview and p.obj is data for p in payloads))
        events = root.receive_data(b"".join(out))
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, DataReceived)), data)

    def test_send_frame_and_notify_writable(self) -> None:
        """send_frame queues one frame within the window; notify_writable asks for the
        StreamWritable that the next WINDOW_UPDATE then brings."""
        inner, root = pair(window=10)
        sid = opened(inner, root)
        self.assertFalse(inner.notify_writable(sid))  # the window is open
        self.assertRaises(UsageError, inner.send_frame, sid, b"x" * 11)  # beyond the window
        inner.send_frame(sid, b"0123456789")
        self.assertEqual(inner.send_window(sid), 0)
        self.assertRaises(UsageError, inner.send_frame, sid, b"x")
        self.assertTrue(inner.notify_writable(sid))
        self.assertEqual(inner.buffered(sid), 0)
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"0123456789")])
        root.consumed(sid, 10)
        root.window_update(sid)
        self.assertEqual(pump(root, inner), [StreamWritable(sid)])
        inner.send_frame(sid, b"abc")
        inner.half_close(sid)
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"abc"), HalfClosed(sid)])

    def test_no_credit_after_peer_half_close(self) -> None:
        """After the peer's FIN, consumed data sends no WINDOW_UPDATE."""
        inner, root = pair(window=100)
        sid = opened(inner, root)
        inner.send_data(sid, b"x" * 100)
        inner.half_close(sid)
        pump(inner, root)
        root.consumed(sid, 100)
        self.assertEqual(root.data_to_send(), [])

    @settings(max_examples=60, deadline=None)
    @given(
        ops=st.lists(st.tuples(st.integers(0, 19), st.integers(1, 9000)), min_size=1, max_size=120),
        window=st.integers(1, 20000),
        seed=st.integers(0, 2**32),
    )
    def test_random_interleavings(self, ops: list[tuple[int, int]], window: int, seed: int) -> None:
        """Many streams written in random order each deliver every byte intact, in order."""
        rng = random.Random(seed)
        inner, root = pair(window=window)
        sids = [opened(inner, root) for _ in range(20)]
        sent = {s: bytearray() for s in sids}
        got = {s: bytearray() for s in sids}
        counter = 0

        def deliver() -> None:
            for _ in range(100000):
                data = b"".join(inner.data_to_send())
                if not data:
                    return
                pos = 0
                while pos < len(data):  # Random read sizes, as a socket would give.
                    n = rng.randint(1, 70000)
                    for ev in root.receive_data(data[pos : pos + n]):
                        if isinstance(ev, DataReceived):
                            self.assertLessEqual(len(ev.data), window)
                            got[ev.stream_id] += ev.data
                            root.consumed(ev.stream_id, len(ev.data))
                            if rng.random() < 0.2:
                                root.window_update(ev.stream_id)
                    pos += n
                pump(root, inner)

        for idx, size in ops:
            sid = sids[idx]
            chunk = bytes((counter + i) % 251 for i in range(size))
            counter += size
            inner.send_data(sid, chunk)
            sent[sid] += chunk
            if rng.random() < 0.3:
                deliver()
        deliver()
        self.assertFalse(any(inner.buffered(s) for s in sids))
        self.assertEqual(got, sent)


class ConnectionFrameTests(unittest.TestCase):
    """CONFIG, PING/PONG, GO_AWAY and STATS."""

    def test_config(self) -> None:
        """The root's CONFIG reaches the inner as a set of ports."""
        inner, root = pair()
        root.push_config([5030, 1234])
        self.assertEqual(pump(root, inner), [ConfigReceived(frozenset({1234, 5030}))])
        root.push_config([])
        self.assertEqual(pump(root, inner), [ConfigReceived(frozenset())])
        self.assertRaises(UsageError, root.push_config, [0])
        self.assertRaises(UsageError, inner.push_config, [1])

    def test_ping_pong(self) -> None:
        """A PING is answered with a PONG carrying the same bytes, both ways."""
        inner, root = pair()
        inner.ping(b"abcdefgh")
        self.assertEqual(pump(inner, root), [])
        self.assertEqual(pump(root, inner), [PongReceived(b"abcdefgh")])
        root.ping()
        pump(root, inner)
        self.assertEqual(pump(inner, root), [PongReceived(b"\0" * 8)])
        self.assertRaises(UsageError, root.ping, b"short")

    def test_go_away_from_root(self) -> None:
        """After the root's GO_AWAY open streams finish and new opens are refused."""
        inner, root = pair()
        sid = opened(inner, root)
        new = inner.open_stream(5030, "169.254.3.4", 2)  # Crosses the GO_AWAY.
        root.go_away()
        root.go_away()  # Only the first counts.
        self.assertEqual(pump(inner, root), [])
        self.assertEqual(root.refused_automatically, 1)
        self.assertEqual(
            pump(root, inner),
            [GoAwayReceived(Reason.SHUTTING_DOWN, sid), StreamRefused(new, Reason.SHUTTING_DOWN)],
        )
        self.assertFalse(inner.may_open)
        self.assertRaises(UsageError, inner.open_stream, 5030, "169.254.3.4", 3)
        inner.send_data(sid, b"still")
        self.assertEqual(pump(inner, root), [DataReceived(sid, b"still")])

    def test_go_away_from_inner(self) -> None:
        """The inner's GO_AWAY stops its own opens; an OPEN after it is a protocol error."""
        inner, root = pair()
        inner.go_away()
        self.assertFalse(inner.may_open)
        self.assertEqual(pump(inner, root), [GoAwayReceived(Reason.SHUTTING_DOWN, 0)])
        e = self.assertRaises(
            ProtocolError, root.receive_data, fr.encode_open(1, 5030, "169.254.1.1", 1)
        )
        self.assertEqual(e.reason, Reason.PROTOCOL_ERROR)

    def test_too_many_streams(self) -> None:
        """Over the connection's stream cap, an OPEN is refused, not an error."""
        inner = Connection(Role.INNER)
        root = Connection(Role.ROOT, max_streams=2)
        pump(inner, root)
        pump(root, inner)
        a = inner.open_stream(1, "169.254.0.1", 1)
        b = inner.open_stream(1, "169.254.0.1", 2)
        c = inner.open_stream(1, "169.254.0.1", 3)
        self.assertEqual([type(e) for e in pump(inner, root)], [OpenRequested, OpenRequested])
        self.assertEqual(pump(root, inner), [StreamRefused(c, Reason.TOO_MANY_STREAMS)])
        self.assertEqual(sorted(root.stream_ids()), [a, b])

    def test_stats(self) -> None:
        """STATS from the inner reaches the root as raw bytes."""
        inner, root = pair()
        inner.send_stats(b"\1\2")
        self.assertEqual(pump(inner, root), [StatsReceived(b"\1\2")])
        self.assertRaises(UsageError, root.send_stats, b"")
        self.assertRaises(UsageError, inner.send_stats, bytes(70000))


class UsageTests(unittest.TestCase):
    """Commands that the role or state does not allow raise UsageError."""

    def test_role_checks(self) -> None:
        """Only the inner opens, only the root answers."""
        inner, root = pair()
        self.assertRaises(UsageError, root.open_stream, 1, "169.254.0.1", 1)
        self.assertRaises(UsageError, inner.accept, 1)
        self.assertRaises(UsageError, inner.refuse, 1, Reason.REFUSED)
        sid = inner.open_stream(1, "169.254.0.1", 1)
        pump(inner, root)
        self.assertRaises(UsageError, root.refuse, sid, Reason.OK)
        self.assertRaises(UsageError, inner.open_stream, 0, "169.254.0.1", 1)

    def test_state_checks(self) -> None:
        """Root data or a half-close before the stream is open, or twice accepting, is refused."""
        inner, root = pair()
        sid = inner.open_stream(1, "169.254.0.1", 1)
        self.assertRaises(UsageError, inner.half_close, sid)
        pump(inner, root)
        self.assertRaises(UsageError, root.send_data, sid, b"early")
        self.assertRaises(UsageError, root.half_close, sid)
        root.accept(sid)
        self.assertRaises(UsageError, root.accept, sid)
        root.half_close(sid)
        self.assertRaises(UsageError, root.half_close, sid)
        self.assertRaises(UsageError, root.send_data, sid, b"x")
        root.send_data(sid, b"")  # Nothing to send is no error.

    def test_bad_parameters(self) -> None:
        """A connection needs a sane window and payload limit."""
        self.assertRaises(ValueError, Connection, Role.ROOT, initial_window=0)
        self.assertRaises(ValueError, Connection, Role.ROOT, max_payload=70000)


class ViolationTests(unittest.TestCase):
    """Every protocol violation raises ProtocolError and ends the connection."""

    def assertViolation(self, conn: Connection, data: bytes, reason: Reason, text: str) -> None:
        e = self.assertRaises(ProtocolError, conn.receive_data, data)
        self.assertEqual(e.reason, reason)
        self.assertIn(text, str(e))
        self.assertTrue(conn.terminated)
        out = b"".join(conn.data_to_send())
        self.assertEqual(out[-15:-4], fr.encode_go_away(reason, 0)[:11])
        # Terminal: more input raises again, commands queue nothing.
        self.assertRaises(ProtocolError, conn.receive_data, b"")
        conn.go_away()
        conn.ping()
        self.assertEqual(conn.data_to_send(), [])

    def test_unknown_frame_type(self) -> None:
        """A frame type outside the table is refused."""
        self.assertViolation(
            raw_root(), fr.header(0x42, 0, 0), Reason.PROTOCOL_ERROR, "unknown frame type"
        )

    def test_flags(self) -> None:
        """Non-zero flags are refused, on DATA too."""
        self.assertViolation(
            raw_root(), fr.header(FrameType.DATA, 1, 0, flags=1), Reason.PROTOCOL_ERROR, "flags"
        )

    def test_data_on_unknown_stream(self) -> None:
        """DATA for a stream that was never opened is refused."""
        self.assertViolation(
            raw_root(),
            fr.header(FrameType.DATA, 3, 1) + b"x",
            Reason.PROTOCOL_ERROR,
            "never opened",
        )

    def test_stream_frame_on_stream_zero(self) -> None:
        """Stream frames need a stream id."""
        self.assertViolation(raw_root(), fr.encode_half_close(0), Reason.PROTOCOL_ERROR, "stream 0")

    def test_connection_frame_on_a_stream(self) -> None:
        """Connection frames must use stream id 0."""
        data = fr.header(FrameType.PING, 1, 8) + bytes(8)
        self.assertViolation(raw_root(), data, Reason.PROTOCOL_ERROR, "PING on stream 1")

    def test_duplicate_stream_id(self) -> None:
        """An OPEN that reuses an id is refused."""
        root = raw_root()
        root.receive_data(fr.encode_open(1, 5030, "169.254.0.1", 1))
        data = fr.encode_open(1, 5030, "169.254.0.1", 2)
        self.assertViolation(root, data, Reason.PROTOCOL_ERROR, "reuses stream id")

    def test_wrong_state(self) -> None:
        """DATA to the inner on a stream still opening is refused (early data is inner -> root)."""
        inner = raw_inner()
        sid = inner.open_stream(5030, "169.254.0.1", 1)
        data = fr.header(FrameType.DATA, sid, 1) + b"x"
        self.assertViolation(inner, data, Reason.PROTOCOL_ERROR, "DATA in state opening")

    def test_early_data_over_window(self) -> None:
        """Early data counts against the root's initial window like any DATA."""
        root = Connection(Role.ROOT, initial_window=4)
        root.receive_data(fr.encode_preface())
        root.receive_data(fr.encode_open(1, 5030, "169.254.0.1", 1))
        data = fr.header(FrameType.DATA, 1, 5) + b"12345"
        self.assertViolation(root, data, Reason.FLOW_CONTROL_ERROR, "exceed window")

    def test_half_close_while_opening(self) -> None:
        """HALF_CLOSE on a stream still opening is refused: only DATA may come early."""
        root = raw_root()
        root.receive_data(fr.encode_open(1, 5030, "169.254.0.1", 1))
        data = fr.encode_half_close(1)
        self.assertViolation(root, data, Reason.PROTOCOL_ERROR, "HALF_CLOSE in state opening")

    def test_half_close_twice(self) -> None:
        """A second HALF_CLOSE on a stream is refused."""
        inner, root = pair()
        sid = opened(inner, root)
        data = fr.encode_half_close(sid) * 2
        e = self.assertRaises(ProtocolError, root.receive_data, data)
        self.assertIn("HALF_CLOSE in state half-closed remote", str(e))

    def test_window_overflow(self) -> None:
        """DATA beyond the granted window is refused."""
        inner, root = pair(window=10)
        sid = opened(inner, root)
        data = fr.header(FrameType.DATA, sid, 11) + bytes(11)
        e = self.assertRaises(ProtocolError, root.receive_data, data)
        self.assertEqual(e.reason, Reason.FLOW_CONTROL_ERROR)

    def test_window_update_overflow(self) -> None:
        """Credit that takes a window past 2**31-1 is refused."""
        inner, root = pair()
        sid = opened(inner, root)
        data = fr.encode_window_update(sid, fr.MAX_WINDOW)
        e = self.assertRaises(ProtocolError, inner.receive_data, data)
        self.assertEqual(e.reason, Reason.FLOW_CONTROL_ERROR)

    def test_oversize_frame(self) -> None:
        """A header announcing more than the maximum payload is refused."""
        self.assertViolation(
            raw_root(), fr.header(FrameType.DATA, 1, 2**32 - 1), Reason.FRAME_TOO_LARGE, "announces"
        )

    def test_bad_preface(self) -> None:
        """A peer that does not start with the preface is refused."""
        root = Connection(Role.ROOT)
        root.data_to_send()
        self.assertViolation(root, b"GET / HTTP/1.1\r\n", Reason.PROTOCOL_ERROR, "magic")

    def test_wrong_version(self) -> None:
        """Another protocol version is refused with its own reason."""
        root = Connection(Role.ROOT)
        root.data_to_send()
        self.assertViolation(
            root, fr.encode_preface(version=2), Reason.UNSUPPORTED_VERSION, "version 2"
        )

    def test_wrong_sender(self) -> None:
        """Frames sent by the wrong role are refused."""
        cases = [
            (raw_inner(), fr.encode_open(1, 1, "169.254.0.1", 1), "OPEN sent to the inner"),
            (raw_inner(), fr.encode_stats(b""), "STATS sent to the inner"),
            (raw_root(), fr.encode_config([1]), "CONFIG sent to the root"),
        ]
        for conn, data, text in cases:
            self.assertViolation(conn, data, Reason.PROTOCOL_ERROR, text)
        inner, root = pair()
        sid = opened(inner, root)
        e = self.assertRaises(
            ProtocolError, root.receive_data, fr.encode_open_result(sid, Reason.OK)
        )
        self.assertIn("OPEN_RESULT sent to the root", str(e))

    def test_bad_payloads(self) -> None:
        """Payloads of the wrong size are refused."""
        self.assertViolation(
            raw_root(), fr.header(FrameType.PING, 0, 3) + b"abc", Reason.PROTOCOL_ERROR, "PING of 3"
        )
        self.assertViolation(
            raw_root(), fr.header(FrameType.PONG, 0, 3) + b"abc", Reason.PROTOCOL_ERROR, "PONG of 3"
        )
        inner, root = pair()
        sid = opened(inner, root)
        e = self.assertRaises(
            ProtocolError, root.receive_data, fr.header(FrameType.HALF_CLOSE, sid, 1) + b"x"
        )
        self.assertIn("HALF_CLOSE with a payload", str(e))

    def test_reset_with_ok(self) -> None:
        """A RESET must carry a failure reason."""
        inner, root = pair()
        sid = opened(inner, root)
        self.assertRaises(ProtocolError, root.receive_data, fr.encode_reset(sid, Reason.OK))

    def test_open_result_twice(self) -> None:
        """A second OPEN_RESULT for an open stream is refused."""
        inner, root = pair()
        sid = opened(inner, root)
        e = self.assertRaises(
            ProtocolError, inner.receive_data, fr.encode_open_result(sid, Reason.OK)
        )
        self.assertIn("OPEN_RESULT in state open", str(e))


class TransitionTableTests(unittest.TestCase):
    """The table holds only what docs/protocol.md allows."""

    def test_nothing_leaves_closed(self) -> None:
        """No input moves a stream out of CLOSED, and only OPEN leaves IDLE."""
        self.assertFalse([k for k in TRANSITIONS if k[0] is StreamState.CLOSED])
        self.assertEqual(
            {k[1].name for k in TRANSITIONS if k[0] is StreamState.IDLE}, {"SEND_OPEN", "RECV_OPEN"}
        )


class SansIOTests(unittest.TestCase):
    """The core stays free of I/O frameworks."""

    def test_no_twisted_import(self) -> None:
        """Importing the protocol package loads no Twisted module (and no socket handling)."""
        import subprocess
        import sys

        code = (
            "import sys, tproxy.protocol, tproxy.protocol.events;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'asyncio')];"
            "print(bad); sys.exit(1 if bad else 0)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
