"""Tests for tproxy.metrics: counters, latency window, renderings, the link's hooks."""

from __future__ import annotations

import json
import math

from twisted.internet import error
from twisted.trial import unittest

from tests.test_link import Harness
from tproxy.link import LinkCounters
from tproxy.metrics import (
    COUNTER_METRICS,
    BridgeStats,
    LatencyWindow,
    PortStats,
    counting_enabled,
    render_prometheus,
    render_text,
)
from tproxy.model import Destination


class LatencyWindowTests(unittest.TestCase):
    """The ring of recent connect latencies."""

    def test_empty(self) -> None:
        """An empty window has no percentiles."""
        w = LatencyWindow(4)
        self.assertIsNone(w.percentile(0.5))
        self.assertIsNone(w.percentile(0.99))

    def test_percentiles_nearest_rank(self) -> None:
        """p50 and p99 are nearest-rank quantiles of the samples."""
        w = LatencyWindow(100)
        for i in range(1, 101):
            w.record(i / 1000)
        self.assertEqual(w.percentile(0.5), 0.05)
        self.assertEqual(w.percentile(0.99), 0.099)
        self.assertEqual(w.percentile(1.0), 0.1)

    def test_ring_keeps_only_recent(self) -> None:
        """Past its size the window forgets the oldest samples; count and sum keep all."""
        w = LatencyWindow(3)
        for v in (10.0, 20.0, 1.0, 2.0, 3.0):
            w.record(v)
        self.assertEqual(sorted(w.recent()), [1.0, 2.0, 3.0])
        self.assertEqual(w.count, 5)
        self.assertEqual(w.total, 36.0)
        self.assertEqual(w.percentile(0.99), 3.0)

    def test_samples_are_not_objects(self) -> None:
        """Samples are kept as C doubles: the ring holds no Python object."""
        from array import array

        w = LatencyWindow(8)
        for i in range(10):
            w.record(i / 7)
        self.assertIsInstance(w._samples, array)
        self.assertEqual(w._samples.typecode, "d")
        self.assertEqual(sorted(w.recent()), [i / 7 for i in range(2, 10)])

    def test_size_must_be_positive(self) -> None:
        """A window of no sample is refused."""
        self.assertRaises(ValueError, LatencyWindow, 0)


class PortStatsTests(unittest.TestCase):
    """Counters of one service port and their snapshot."""

    def test_snapshot_adds_live_bytes(self) -> None:
        """Ended streams' bytes are totals; a snapshot adds the bytes of open streams."""
        p = PortStats()
        p.streams_open = 2
        p.ended(10, 20)
        p.refuse("REFUSED")
        p.refuse("REFUSED")
        p.reset("ABORTED")
        snap = p.snapshot(live_to_service=5, live_to_guest=7)
        self.assertEqual(snap["streams_open"], 1)
        self.assertEqual((snap["bytes_to_service"], snap["bytes_to_guest"]), (15, 27))
        self.assertEqual(snap["refused"], {"REFUSED": 2})
        self.assertEqual(snap["resets"], {"ABORTED": 1})
        self.assertEqual(p.bytes_to_service, 10, "a snapshot changes nothing")

    def test_counters_are_not_objects(self) -> None:
        """The int counters live in one preallocated array: a bump leaves no int object behind."""
        import sys

        p = PortStats()
        cells = p._cells
        for _ in range(1000):
            p.requested += 1
            p.bytes_to_service += 70_000
        p.latency.record(0.5)
        p.latency.record(0.25)
        self.assertIs(p._cells, cells)
        self.assertEqual((p.requested, p.bytes_to_service), (1000, 70_000_000))
        self.assertEqual((p.latency.count, p.latency.total), (2, 0.75))
        value = p.bytes_to_service
        self.assertEqual(sys.getrefcount(value), 2, "a fresh int per read, held by no one")

    def test_bridge_snapshot_sums_live_per_port(self) -> None:
        """Live bytes are summed per port and only known ports are reported."""
        b = BridgeStats()
        b.port(80)
        b.port(5030)
        snap = b.snapshot([(80, 1, 2), (80, 3, 4), (5030, 10, 0)])
        self.assertEqual(list(snap), [80, 5030])
        self.assertEqual(snap[80]["bytes_to_service"], 4)
        self.assertEqual(snap[80]["bytes_to_guest"], 6)
        self.assertEqual(snap[5030]["bytes_to_service"], 10)


def _status() -> dict[str, object]:
    p = PortStats()
    p.requested = 4
    p.accepted = 3
    p.streams_open = 2  # one ends below
    p.refuse("REFUSED")
    p.reset("IDLE_TIMEOUT")
    p.ended(100, 2000)
    p.latency.record(0.002)
    port = p.snapshot()
    port.update(destination="127.0.0.1:8080", listener="listening")
    idle = PortStats().snapshot()
    idle.update(destination="127.0.0.1:81", listener="failed")
    return json.loads(
        json.dumps(
            {
                "version": 1,
                "root": {"pid": 10, "uptime": 3.5},
                "bridges": {
                    "br0": {
                        "inner": {"pid": 11, "uptime": 3.0, "restarts": 2, "running": True},
                        "ports": {"5030": port, "81": idle},
                    }
                },
            }
        )
    )


class PrometheusTests(unittest.TestCase):
    """The text exposition format."""

    def test_families_and_samples(self) -> None:
        """Each family has HELP and TYPE, samples carry bridge/port/reason labels."""
        text = render_prometheus(_status())
        lines = text.splitlines()
        self.assertIn("# TYPE one_tproxy_streams_open gauge", lines)
        self.assertIn("# TYPE one_tproxy_streams_accepted_total counter", lines)
        self.assertIn('one_tproxy_streams_open{bridge="br0",port="5030"} 1', lines)
        self.assertIn('one_tproxy_streams_accepted_total{bridge="br0",port="5030"} 3', lines)
        self.assertIn(
            'one_tproxy_streams_refused_total{bridge="br0",port="5030",reason="REFUSED"} 1',
            lines,
        )
        self.assertIn(
            'one_tproxy_streams_reset_total{bridge="br0",port="5030",reason="IDLE_TIMEOUT"} 1',
            lines,
        )
        self.assertIn('one_tproxy_bytes_to_service_total{bridge="br0",port="5030"} 100', lines)
        self.assertIn('one_tproxy_bytes_to_guest_total{bridge="br0",port="5030"} 2000', lines)
        self.assertIn(
            'one_tproxy_connect_latency_seconds{bridge="br0",port="5030",quantile="0.5"} 0.002',
            lines,
        )
        self.assertIn('one_tproxy_connect_latency_seconds_count{bridge="br0",port="5030"} 1', lines)
        self.assertIn('one_tproxy_listener_up{bridge="br0",port="81"} 0', lines)
        self.assertIn('one_tproxy_inner_restarts_total{bridge="br0"} 2', lines)
        self.assertIn(
            'one_tproxy_connect_latency_seconds{bridge="br0",port="81",quantile="0.99"} NaN',
            lines,
        )
        self.assertTrue(text.endswith("\n"))

    def test_every_sample_line_parses(self) -> None:
        """Every sample line is NAME{labels} FLOAT, each family declared once."""
        text = render_prometheus(_status())
        seen_types: list[str] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                seen_types.append(line.split()[2])
                continue
            if line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            float(value)
            name = name_labels.split("{", 1)[0]
            self.assertTrue(any(name.startswith(t) for t in seen_types), line)
        self.assertEqual(len(seen_types), len(set(seen_types)))

    def test_label_escaping(self) -> None:
        """Quotes, backslashes and newlines in label values are escaped."""
        status = {"bridges": {'b"r\\\n': {"inner": {}, "ports": {}}}}
        self.assertIn('bridge="b\\"r\\\\\\n"', render_prometheus(status))


class TextTests(unittest.TestCase):
    """The readable rendering of ``status --verbose``."""

    def test_readable(self) -> None:
        """Processes, ports, destinations, counters and latencies appear in words."""
        text = render_text(_status())
        self.assertIn("one_tproxy: pid 10, up 3.5s", text)
        self.assertIn("one_tproxy_br0: pid 11, up 3.0s, restarts 2", text)
        self.assertIn("port 5030 -> 127.0.0.1:8080: listener listening", text)
        self.assertIn("1 open, 3 accepted, refused 1 (refused 1), reset 1 (idle_timeout 1)", text)
        self.assertIn("connect p50 2.0 ms, p99 2.0 ms", text)
        self.assertIn("listener failed", text)


def _known_workload(case: unittest.TestCase, h: Harness) -> None:
    """Two streams (10 and 11 bytes up, 100 down), one refused, one to an unknown port."""
    for i in range(2):
        g, s = h.stream()
        g.protocol.dataReceived(b"x" * (10 + i))
        h.pump()
        case.assertEqual(s.take(), b"x" * (10 + i))
        s.protocol.dataReceived(b"y" * 100)
        h.pump()
        case.assertEqual(g.take(), b"y" * 100)
        g.peer_eof()
        s.peer_eof()
        h.pump()
    h.guest(gport=5)
    h.service_fails(error.ConnectionRefusedError())
    h.guest(port=9999)


class LinkMetricsTests(unittest.TestCase):
    """RootLink counts per service port; InnerLink reports over STATS."""

    def test_known_workload(self) -> None:
        """Two streams with known bytes, one refused and one unknown port give exact figures."""
        h = Harness(services={5030: Destination("10.0.0.1", 80)})
        _known_workload(self, h)
        snap = h.root.snapshot()
        p = snap[5030]
        self.assertEqual(p["requested"], 3)
        self.assertEqual(p["accepted"], 2)
        self.assertEqual(p["streams_open"], 0)
        self.assertEqual(p["refused"], {"REFUSED": 1})
        self.assertEqual(p["resets"], {})
        self.assertEqual((p["bytes_to_service"], p["bytes_to_guest"]), (21, 200))
        self.assertEqual(p["connect_latency"]["count"], 2)
        self.assertEqual(snap[9999]["refused"], {"UNKNOWN_SERVICE": 1})

    def test_open_stream_bytes_and_latency(self) -> None:
        """An open stream counts as open with its bytes so far; latency is the connect time."""
        h = Harness()
        g = h.guest()
        h.reactor.advance(0.25)
        s = h.service()
        g.protocol.dataReceived(b"abc")
        s.protocol.dataReceived(b"defgh")
        h.pump()
        p = h.root.snapshot()[5030]
        self.assertEqual(p["streams_open"], 1)
        self.assertEqual((p["bytes_to_service"], p["bytes_to_guest"]), (3, 5))
        self.assertEqual(p["connect_latency"]["p50"], 0.25)

    def test_resets_by_reason(self) -> None:
        """A guest reset and a service reset are counted as ABORTED resets."""
        h = Harness()
        g, s = h.stream()
        g.peer_reset()
        h.pump()
        g2, s2 = h.stream()
        s2.peer_reset()
        h.pump()
        self.assertEqual(h.root.snapshot()[5030]["resets"], {"ABORTED": 2})
        self.assertEqual(h.root.snapshot()[5030]["streams_open"], 0)

    def test_metrics_survive_a_new_link(self) -> None:
        """A BridgeStats handed to the next link keeps counting from where it was."""
        h = Harness()
        h.stream()
        h2 = Harness()
        h2.root.metrics = h.root.metrics
        h2.stream()
        self.assertEqual(h2.root.snapshot()[5030]["accepted"], 2)

    def test_stats_report_reaches_root(self) -> None:
        """The inner's periodic STATS carries its counters and source keys to the root."""
        h = Harness()
        h.inner.stats_source = lambda: {"listening": [5030]}
        h.stream()
        h.reactor.advance(2.0)
        h.pump()
        report = h.root.inner_report
        assert report is not None
        self.assertEqual(report["listening"], [5030])
        self.assertEqual(report["counters"]["accepted"], 1)
        self.assertEqual(report["streams"], 1)
        self.assertEqual(h.root.inner_report_at, 2.0)
        h.reactor.advance(2.0)
        h.pump()
        self.assertEqual(h.root.inner_report_at, 4.0, "sent again every interval")

    def test_malformed_stats_ignored(self) -> None:
        """A STATS payload that is not a JSON object is logged and leaves the link up."""
        h = Harness()
        h.inner.conn.send_stats(b"[1, 2")
        h.inner.flush()
        h.pump()
        self.assertIsNone(h.root.inner_report)
        self.assertFalse(h.rt.disconnecting)
        g, s = h.stream()
        self.assertFalse(g.aborted)

    def test_stats_source_failure(self) -> None:
        """A failing stats source still sends the counters and logs the failure."""
        h = Harness()

        def broken() -> dict[str, object]:
            raise RuntimeError("no listeners")

        h.inner.stats_source = broken
        h.inner.send_stats()
        h.pump()
        assert h.root.inner_report is not None
        self.assertIn("counters", h.root.inner_report)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nan_for_empty_latency(self) -> None:
        """A port without any accepted stream renders NaN quantiles, not zero."""
        text = render_prometheus(
            {"bridges": {"b": {"inner": {}, "ports": {"1": PortStats().snapshot()}}}}
        )
        line = [x for x in text.splitlines() if 'quantile="0.5"' in x][0]
        self.assertTrue(math.isnan(float(line.rsplit(" ", 1)[1])))


def _uncounted_status() -> dict[str, object]:
    """A status document of a mesh started with ONE_TPROXY_COUNTERS=off."""
    return {
        "version": 1,
        "counting": False,
        "root": {"pid": 10, "uptime": 3.5},
        "bridges": {
            "br0": {
                "inner": {"pid": 11, "uptime": 3.0, "restarts": 0, "running": True},
                "ports": {"5030": {"destination": "127.0.0.1:8080", "listener": "listening"}},
            }
        },
    }


class CountersOffTests(unittest.TestCase):
    """``ONE_TPROXY_COUNTERS=off``: no counting work, and the outputs say so."""

    def test_environment_switch(self) -> None:
        """Only off/0/no/false (any case, spaces ignored) switch the counters off."""
        for value in ("off", "OFF", " 0 ", "no", "false"):
            self.assertFalse(counting_enabled({"ONE_TPROXY_COUNTERS": value}), value)
        for value in ("", "on", "1", "yes"):
            self.assertTrue(counting_enabled({"ONE_TPROXY_COUNTERS": value}), value)
        self.assertTrue(counting_enabled({}))

    def test_links_count_nothing(self) -> None:
        """With counting off both links relay as before but keep no counter at all."""
        h = Harness(services={5030: Destination("10.0.0.1", 80)})
        h.root.counting = h.inner.counting = False
        h.inner.stats_source = lambda: {"listening": [5030]}
        _known_workload(self, h)
        g2, s2 = h.stream()
        g2.peer_reset()
        h.pump()
        self.assertEqual(h.root.metrics.ports, {})
        self.assertEqual(h.root.snapshot(), {})
        self.assertEqual(h.root.counters, LinkCounters())
        self.assertEqual(h.inner.counters, LinkCounters())
        h.reactor.advance(2.0)
        h.pump()
        self.assertEqual(h.root.inner_report, {"streams": 0, "listening": [5030]})

    def test_link_bytes_taken_at_stream_end(self) -> None:
        """Counting on, the link's byte counters take a stream's bytes once, when it ends."""
        h = Harness()
        g, s = h.stream()
        g.protocol.dataReceived(b"abc")
        s.protocol.dataReceived(b"defgh")
        h.pump()
        self.assertEqual((h.inner.counters.bytes_to_link, h.inner.counters.bytes_from_link), (0, 0))
        live = h.inner.link_counters()
        self.assertEqual((live["bytes_to_link"], live["bytes_from_link"]), (3, 5))
        g.peer_eof()
        s.peer_eof()
        h.pump()
        self.assertEqual((h.inner.counters.bytes_to_link, h.inner.counters.bytes_from_link), (3, 5))
        self.assertEqual((h.root.counters.bytes_to_link, h.root.counters.bytes_from_link), (5, 3))
        done = h.inner.link_counters()
        self.assertEqual((done["bytes_to_link"], done["bytes_from_link"]), (3, 5))

    def test_prometheus_without_counters(self) -> None:
        """Off: processes and listeners are exported, no counter family (not zeros)."""
        text = render_prometheus(_uncounted_status())
        self.assertIn('one_tproxy_listener_up{bridge="br0",port="5030"} 1', text.splitlines())
        self.assertIn('one_tproxy_inner_up{bridge="br0"} 1', text.splitlines())
        for name in COUNTER_METRICS:
            self.assertNotIn(name, text)
        self.assertIn("one_tproxy_streams_open", render_prometheus(_status()))

    def test_text_says_off(self) -> None:
        """Off: ``status --verbose`` says the counters are off and shows listeners only."""
        text = render_text(_uncounted_status())
        self.assertIn("counters off (ONE_TPROXY_COUNTERS=off)", text.splitlines()[0])
        self.assertIn("port 5030 -> 127.0.0.1:8080: listener listening", text)
        self.assertNotIn("streams:", text)
        self.assertNotIn("counters off", render_text(_status()))
