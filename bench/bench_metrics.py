"""What the per-port counters cost the link (issue 9: under 3 %), not a test; prints Markdown.

Both link ends (``RootLink`` + ``InnerLink``) run in memory, joined by fake
UNIX transports, their TCP sides on fake TCP transports (``tests/test_link``'s
harness), so the figures are pure Python cost per connection and per request,
with no kernel time to dilute a difference (the real mesh spends more per
request in system calls, so its relative cost is lower still).

Two workloads, each run with the links counting and with ``counting=False``
(what ``ONE_TPROXY_COUNTERS=off`` gives the real proxies: no counting work
at all), and counting a second time (the noise floor), interleaved in
rotating order, best of ``--repeat`` runs, timed in CPU seconds of this
process (``time.process_time``: other load on the machine then disturbs the
figures less):

* *new connection*: guest connects, 100-byte request, 100-byte response,
  both sides close (HTTP/1.0 style);
* *keep-alive*: one stream, 100-byte request / 100-byte response exchanges.

Run: ``PYTHONPATH=. python bench/bench_metrics.py [--seconds S] [--repeat N]``.
The mesh-level figure is ``bench/bench_mesh.py``'s ``one-tproxy-uncounted``
path (``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import tests.test_link as harness_module  # noqa: E402

REQUEST = b"G" * 100
RESPONSE = b"R" * 100


def harness(counting: bool) -> Any:
    """A fresh in-memory root+inner pair, counting or not."""
    h = harness_module.Harness()
    h.root.counting = h.inner.counting = counting
    return h


def new_connections(counting: bool, seconds: float) -> float:
    """Connections per second (open, request, response, close)."""
    h = harness(counting)
    done = 0
    t0 = time.process_time()
    deadline = t0 + seconds
    while True:
        g = h.guest(gport=done % 60000 + 1)
        s = h.service()
        g.protocol.dataReceived(REQUEST)
        h.pump()
        s.protocol.dataReceived(RESPONSE)
        h.pump()
        g.peer_eof()
        s.peer_eof()
        h.pump()
        h.transports[:] = [h.rt, h.it]
        h.reactor.tcpClients.clear()
        h.reactor.connectors.clear()
        done += 1
        if done % 64 == 0 and time.process_time() >= deadline:
            break
    return done / (time.process_time() - t0)


def keep_alive(counting: bool, seconds: float) -> float:
    """Request/response exchanges per second on one stream."""
    h = harness(counting)
    g, s = h.stream()
    done = 0
    t0 = time.process_time()
    deadline = t0 + seconds
    while True:
        g.protocol.dataReceived(REQUEST)
        h.pump()
        s.take()
        s.protocol.dataReceived(RESPONSE)
        h.pump()
        g.take()
        done += 1
        if done % 256 == 0 and time.process_time() >= deadline:
            break
    return done / (time.process_time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one run")
    parser.add_argument("--repeat", type=int, default=9, help="runs per figure (best is kept)")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {args.repeat} x {args.seconds:g} s, best run\n")
    print("| workload | counters off | counters on | cost | noise (counters on twice) |")
    print("|---|---|---|---|---|")
    workloads: tuple[tuple[str, Callable[[bool, float], float], str], ...] = (
        ("new connection (100 B each way)", new_connections, "conn"),
        ("keep-alive request/response (100 B)", keep_alive, "req"),
    )
    for name, fn, unit in workloads:
        variants = [False, True, True]
        bests = [0.0, 0.0, 0.0]
        for i in range(args.repeat):  # interleaved, the order rotating: drift hits all alike
            for k in range(3):
                j = (i + k) % 3
                bests[j] = max(bests[j], fn(variants[j], args.seconds))
        off, on, again = (1e6 / b for b in bests)  # CPU µs per connection / request
        print(
            f"| {name} | {off:.2f} µs/{unit} | {on:.2f} µs/{unit} | "
            f"{(on / off - 1) * 100:+.1f} % | {(again / on - 1) * 100:+.1f} % |"
        )


if __name__ == "__main__":
    main()
