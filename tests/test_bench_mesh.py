"""Tests of the mesh benchmark's pure parts: wrk parsing, the table, targets, profiles."""

from __future__ import annotations

import math
import os
import tempfile

from twisted.trial import unittest

from bench import bench_mesh as bm

WRK_OK = """\
Running 8s test @ http://169.254.16.9:8080/small
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms    2.00ms  40.00ms   90.00%
  Latency Distribution
     50%  612.00us
     75%    1.00ms
     90%    2.00ms
     99%    1.50s
  120000 requests in 8.00s, 30.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  15000.50
Transfer/sec:      3.75MB
"""

WRK_NOTHING = """\
Running 3s test @ http://169.254.16.9:8080/small
  1 threads and 4 connections
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 3.01s, 0.00B read
  Socket errors: connect 0, read 0, write 0, timeout 4
Requests/sec:      0.00
"""


class ParseWrkTests(unittest.TestCase):
    """wrk's --latency output becomes numbers in ms."""

    def test_figures(self) -> None:
        """Rate, p50 and p99 in ms (us and s converted), errors summed with non-2xx."""
        r = bm.parse_wrk(WRK_OK)
        self.assertEqual(r.rps, 15000.5)
        self.assertAlmostEqual(r.p50, 0.612)
        self.assertAlmostEqual(r.p99, 1500.0)
        self.assertEqual(r.errors, 7)

    def test_no_reply(self) -> None:
        """A run that got no reply has infinite latencies, not wrk's zeros."""
        r = bm.parse_wrk(WRK_NOTHING)
        self.assertEqual(r.rps, 0.0)
        self.assertTrue(math.isinf(r.p50))
        self.assertTrue(math.isinf(r.p99))

    def test_garbage(self) -> None:
        """Output without the figures is an error naming it."""
        self.assertRaises(ValueError, bm.parse_wrk, "wrk: cannot connect\n")


def _settings() -> bm.Settings:
    return bm.Settings(
        reps=1, iperf_secs=1, wrk_secs=1, held=10, flood=10, flood_deadline=1.0,
        bridges=(1, 10), paths=bm.PATHS, workloads="abcdefgh",
    )


class TableTests(unittest.TestCase):
    """The Markdown table and the targets."""

    results = {
        "direct": {"a_up": [10.0, 8.0, 12.0], "d_bulk_p50": [1.0]},
        "haproxy": {"a_up": [3.0], "f_idle": [2048.0], "d_bulk_p50": [4.0]},
        "one-tproxy": {"a_up": [5.0], "f_idle": [4096.0], "d_bulk_p50": [math.inf]},
    }
    bridges = {"haproxy": {1: 10240, 10: 19456}, "one-tproxy": {1: 20480, 10: 71680}}

    def test_rows(self) -> None:
        """Medians, ratios to direct, n/a where a path has no figure, (h) per bridge."""
        text = bm.table(self.results, self.bridges, _settings())
        lines = text.splitlines()
        self.assertEqual(lines[0], "| workload | direct | haproxy chain | one-tproxy |")
        self.assertIn("| 10.00 | 3.00 (0.30×) | 5.00 (0.50×) |", text)
        self.assertIn("| (f) proxies' PSS idle, MiB | n/a | 2.0 | 4.0 |", text)
        self.assertIn("| no reply |", text)
        self.assertIn("| (h) PSS per extra bridge, MiB | n/a | 1.00 | 5.56 |", text)
        self.assertNotIn("(b)", text)

    def test_starved_is_missed(self) -> None:
        """(d) with a good p50 over a starved rate is MISSED, with the rates shown."""
        results = {
            "haproxy": {"d_bulk_p50": [5.0], "d_bulk_rps": [700.0]},
            "one-tproxy": {"d_bulk_p50": [1.0], "d_bulk_rps": [28.0]},
        }
        out = "\n".join(bm.targets(results, {}))
        self.assertIn("0.20× (but 28 req/s against the chain's 700: starved) - MISSED", out)

    def test_targets(self) -> None:
        """Each target says holds, MISSED or not measured."""
        out = "\n".join(bm.targets(self.results, self.bridges))
        self.assertIn("(a) upload ≥ 0.45× direct: 0.50× - holds", out)
        self.assertIn("(b) ≥ 0.30× direct: not measured", out)
        self.assertIn("(d) p50 with bulk ≤ 1.5× haproxy chain's: inf× - MISSED", out)
        self.assertIn("(h) ≤ 5 MB (4.77 MiB) PSS per extra bridge: 5.56 MiB - MISSED", out)


    def test_limits_are_decimal(self) -> None:
        """The issue's 5 MB and 8 KB are decimal: 4.9 MiB per bridge and 7.9 KiB are over them."""
        results = {"one-tproxy": {"f_per_conn": [7.9]}}
        bridges = {"one-tproxy": {1: 20480, 11: 20480 + 10 * 4.9 * 1024}}
        out = "\n".join(bm.targets(results, bridges))
        self.assertIn("(h) ≤ 5 MB (4.77 MiB) PSS per extra bridge: 4.90 MiB - MISSED", out)
        self.assertIn("(f) ≤ 8 KB (7.81 KiB) per held connection: 7.9 KiB - MISSED", out)


class CountingCostTests(unittest.TestCase):
    """The mesh with and without its counters: the second table and the target line."""

    results = {
        "one-tproxy": {"b_rps": [1000.0, 1100.0, 900.0], "b_cpu_us": [900.0, 950.0, 1000.0],
                       "c_rps": [10000.0], "c_cpu_us": [60.0]},
        "one-tproxy-uncounted": {"b_rps": [1010.0, 1000.0, 1030.0],
                                 "b_cpu_us": [1000.0, 900.0, 920.0],
                                 "c_rps": [10500.0], "c_cpu_us": [50.0]},
    }

    def test_cost(self) -> None:
        """Cost: the median of the repetitions' pairs (the medians' ratio when they do not
        pair up); fewer req/s or more CPU per request with counters is positive."""
        cost = bm.counting_cost(self.results)
        self.assertAlmostEqual(cost[("b", "req/s")], 1.0)  # pairs +1.0, -9.1, +14.4
        self.assertAlmostEqual(cost[("b", "proxy CPU per request")], 100 * (950 / 900 - 1))
        self.assertAlmostEqual(cost[("c", "req/s")], 5.0)
        self.assertAlmostEqual(cost[("c", "proxy CPU per request")], 20.0)
        unpaired = {"one-tproxy": {"b_rps": [1000.0, 1100.0]},
                    "one-tproxy-uncounted": {"b_rps": [990.0]}}
        self.assertAlmostEqual(bm.counting_cost(unpaired)[("b", "req/s")], 100 * (990 / 1050 - 1))

    def test_table_and_targets(self) -> None:
        """A row per figure with each repetition; target lines per basis, holds or MISSED."""
        text = bm.cost_table(self.results)
        self.assertIn("| (b) Connection: close, req/s | 1000 (1000, 1100, 900) | "
                      "1010 (1010, 1000, 1030) | +1.0 % (pairs -9.1 .. +14.4 %) |", text)
        self.assertIn("| (c) proxies' CPU per request, µs | 60.0 | 50.0 | +20.0 % |", text)
        out = bm.targets(self.results, {})
        self.assertIn("- counting cost (b) +1.0 %, (c) +5.0 % from req/s (target < 3 %) - MISSED",
                      out)
        self.assertIn("- counting cost (b) +5.6 %, (c) +20.0 % from proxy CPU per request "
                      "(target < 3 %) - MISSED", out)
        self.assertEqual(bm.cost_table({"one-tproxy": {"a_up": [1.0]}}), "")
        self.assertFalse(any("counting" in line for line in bm.targets({}, {})))

    def test_abba_order(self) -> None:
        """Odd repetitions swap the two meshes; other paths keep their places."""
        paths = ("direct", "one-tproxy", "one-tproxy-uncounted")
        self.assertEqual(bm.run_order(paths, 0), list(paths))
        self.assertEqual(bm.run_order(paths, 1), ["direct", "one-tproxy-uncounted", "one-tproxy"])
        self.assertEqual(bm.run_order(("one-tproxy",), 1), ["one-tproxy"])


class ProfileSummaryTests(unittest.TestCase):
    """py-spy's collapsed stacks become self/inclusive shares."""

    def test_shares(self) -> None:
        """Self time goes to the leaf, inclusive time to every frame once per stack."""
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "w") as f:
            f.write("main (a.py);poll (r.py) 6\n")
            f.write("main (a.py);relay (tproxy/link.py);send (s.py) 3\n")
            f.write("main (a.py);relay (tproxy/link.py) 1\n")
        text = bm.summarize_profile(path)
        self.assertIn("10 samples", text)
        self.assertIn(" 60.0 |  60.0 | poll (r.py)", text)
        self.assertIn(" 10.0 |  40.0 | relay (tproxy/link.py)", text)
        self.assertIn(" 40.0 | relay (tproxy/link.py)", text)
