"""Tests for tproxy.protocol.frames: encoders, payload parsers and the incremental decoder."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tproxy.protocol import frames as fr
from tproxy.protocol.frames import FrameDecoder, FrameError, FrameType, Reason


def _all_frames() -> list[bytes]:
    """One encoded frame of every type."""
    return [
        fr.header(FrameType.DATA, 7, 5) + b"hello",
        fr.encode_open(1, 5030, "169.254.3.4", 41000),
        fr.encode_open(2, 80, "fe80::1", 1),
        fr.encode_open_result(1, Reason.OK),
        fr.encode_open_result(3, Reason.UNKNOWN_SERVICE),
        fr.encode_window_update(1, 65536),
        fr.encode_half_close(9),
        fr.encode_reset(4, Reason.ABORTED),
        fr.encode_config([1234, 5030, 22]),
        fr.encode_ping(b"12345678"),
        fr.encode_pong(b"abcdefgh"),
        fr.encode_go_away(Reason.SHUTTING_DOWN, 77),
        fr.encode_stats(b"counters"),
    ]


class EncodeTests(unittest.TestCase):
    """Each encoder produces the header and payload of docs/protocol.md."""

    def test_preface(self) -> None:
        """The preface is magic, version 1, zero, initial window."""
        self.assertEqual(fr.encode_preface(1000), b"STRPHONE\x00\x01\x00\x00\x00\x00\x03\xe8")
        self.assertEqual(fr.parse_preface(fr.encode_preface(1000)), 1000)

    def test_header_layout(self) -> None:
        """The header is type, flags, stream id, length in network order."""
        self.assertEqual(
            fr.header(FrameType.RESET, 0x01020304, 1), b"\x05\x00\x01\x02\x03\x04\x00\x00\x00\x01"
        )

    def test_round_trip_every_frame(self) -> None:
        """Every frame type decodes back to what was encoded."""
        dec = FrameDecoder(expect_preface=False)
        got = dec.feed(b"".join(_all_frames()))
        self.assertEqual([f[0] for f in got], [0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        self.assertEqual(got[0], (0, 0, 7, b"hello"))
        self.assertEqual(fr.parse_open(got[1][3]), (5030, "169.254.3.4", 41000))
        self.assertEqual(fr.parse_open(got[2][3]), (80, "fe80::1", 1))
        self.assertEqual(fr.parse_reason(got[3][3], allow_ok=True), Reason.OK)
        self.assertEqual(fr.parse_reason(got[4][3], allow_ok=True), Reason.UNKNOWN_SERVICE)
        self.assertEqual(fr.parse_window_update(got[5][3]), 65536)
        self.assertEqual(got[6], (FrameType.HALF_CLOSE, 0, 9, b""))
        self.assertEqual(fr.parse_reason(got[7][3], allow_ok=False), Reason.ABORTED)
        self.assertEqual(fr.parse_config(got[8][3]), frozenset({22, 1234, 5030}))
        self.assertEqual(got[9][3], b"12345678")
        self.assertEqual(got[10][3], b"abcdefgh")
        self.assertEqual(fr.parse_go_away(got[11][3]), (Reason.SHUTTING_DOWN, 77))
        self.assertEqual(got[12][3], b"counters")
        self.assertEqual(dec.buffered, 0)

    def test_config_too_many_ports(self) -> None:
        """More service ports than fit one payload cannot be encoded."""
        fr.encode_config(range(1, 32769))
        self.assertRaises(ValueError, fr.encode_config, range(1, 40000))


class ParseTests(unittest.TestCase):
    """Malformed payloads and prefaces raise FrameError with the right reason."""

    def assertReason(self, reason: Reason, f, *args) -> None:  # type: ignore[no-untyped-def]
        e = self.assertRaises(FrameError, f, *args)
        self.assertEqual(e.reason, reason)

    def test_preface_errors(self) -> None:
        """Bad magic, version, reserved field or window are refused."""
        self.assertReason(
            Reason.PROTOCOL_ERROR, fr.parse_preface, b"STRPHONX" + b"\0\1\0\0\0\0\0\1"
        )
        self.assertReason(Reason.UNSUPPORTED_VERSION, fr.parse_preface, fr.encode_preface(5, 2))
        self.assertReason(
            Reason.PROTOCOL_ERROR, fr.parse_preface, fr.PREFACE.pack(fr.MAGIC, 1, 1, 10)
        )
        self.assertReason(Reason.FLOW_CONTROL_ERROR, fr.parse_preface, fr.encode_preface(0))
        self.assertReason(Reason.FLOW_CONTROL_ERROR, fr.parse_preface, fr.encode_preface(2**31))

    def test_reason_errors(self) -> None:
        """Reason fields must be one known byte, and not OK where a failure is due."""
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_reason, b"", True)
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_reason, b"\xff", True)
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_reason, b"\x00", False)

    def test_open_errors(self) -> None:
        """OPEN needs 8 or 20 bytes and a non-zero service port."""
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_open, b"\0" * 9)
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_open, b"\0" * 8)

    def test_window_update_errors(self) -> None:
        """WINDOW_UPDATE needs 4 bytes and an increment in 1..2**31-1."""
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_window_update, b"\0")
        self.assertReason(Reason.FLOW_CONTROL_ERROR, fr.parse_window_update, b"\0\0\0\0")
        self.assertReason(Reason.FLOW_CONTROL_ERROR, fr.parse_window_update, b"\x80\0\0\0")

    def test_config_errors(self) -> None:
        """CONFIG ports must be whole u16s, ascending and non-zero."""
        self.assertEqual(fr.parse_config(b""), frozenset())
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_config, b"\0\1\0")
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_config, struct.pack("!2H", 5, 5))
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_config, struct.pack("!H", 0))

    def test_go_away_errors(self) -> None:
        """GO_AWAY needs exactly 5 bytes."""
        self.assertReason(Reason.PROTOCOL_ERROR, fr.parse_go_away, b"\0")


class DecoderTests(unittest.TestCase):
    """The decoder copes with any split and bounds its buffer."""

    def test_byte_by_byte(self) -> None:
        """Fed one byte at a time, the decoder returns every frame exactly once."""
        stream = fr.encode_preface(4096) + b"".join(_all_frames())
        dec = FrameDecoder()
        got = []
        for i in range(len(stream)):
            got.extend(dec.feed(stream[i : i + 1]))
        self.assertEqual(dec.preface_window, 4096)
        self.assertEqual(got, FrameDecoder(expect_preface=False).feed(b"".join(_all_frames())))
        self.assertEqual(dec.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(
        payloads=st.lists(st.binary(max_size=3000), min_size=1, max_size=20),
        cuts=st.lists(st.integers(min_value=0, max_value=70000), max_size=30),
    )
    def test_random_splits(self, payloads: list[bytes], cuts: list[int]) -> None:
        """Any split of the byte stream gives the same frames, payloads intact."""
        stream = fr.encode_preface() + b"".join(
            fr.header(FrameType.DATA, i + 1, len(p)) + p for i, p in enumerate(payloads)
        )
        bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        dec = FrameDecoder()
        got = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            got.extend(dec.feed(stream[a:b]))
        self.assertEqual(got, [(0, 0, i + 1, p) for i, p in enumerate(payloads)])
        self.assertEqual(dec.buffered, 0)

    def test_huge_length_rejected_from_header(self) -> None:
        """A 4 GiB length is refused as soon as its header is complete, nothing allocated."""
        dec = FrameDecoder(expect_preface=False)
        e = self.assertRaises(FrameError, dec.feed, fr.header(FrameType.DATA, 1, 2**32 - 1))
        self.assertEqual(e.reason, Reason.FRAME_TOO_LARGE)
        dec = FrameDecoder(expect_preface=False)
        dec.feed(b"\x00")
        e = self.assertRaises(FrameError, dec.feed, fr.header(FrameType.DATA, 1, 65537)[1:])
        self.assertEqual(e.reason, Reason.FRAME_TOO_LARGE)

    def test_max_payload_accepted(self) -> None:
        """A payload of exactly the maximum size is fine."""
        data = bytes(65536)
        dec = FrameDecoder(expect_preface=False)
        got = dec.feed(fr.header(FrameType.DATA, 1, len(data)) + data)
        self.assertEqual(got, [(0, 0, 1, data)])

    def test_whole_chunk_payload_not_copied(self) -> None:
        """A payload that arrives as its own chunk is passed on as that very object."""
        data = b"y" * 5000
        dec = FrameDecoder(expect_preface=False)
        self.assertEqual(dec.feed(fr.header(FrameType.DATA, 1, len(data))), [])
        got = dec.feed(data)
        self.assertEqual(got, [(0, 0, 1, data)])
        self.assertIs(got[0][3], data)

    def test_buffer_bounded(self) -> None:
        """What the decoder holds never exceeds one header plus one maximum payload."""
        dec = FrameDecoder(expect_preface=False)
        frame = fr.header(FrameType.DATA, 1, 65536) + bytes(65536)
        stream = frame * 4
        for i in range(0, len(stream), 1000):
            dec.feed(stream[i : i + 1000])
            self.assertLessEqual(dec.buffered, fr.HEADER_SIZE + fr.MAX_PAYLOAD)

    def test_empty_feed(self) -> None:
        """Feeding nothing returns nothing."""
        self.assertEqual(FrameDecoder().feed(b""), [])
