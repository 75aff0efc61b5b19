"""What the per-port counters cost the link (issue 9: under 3 %), not a test; prints Markdown.

Both link ends (``RootLink`` + ``InnerLink``) run in memory, joined by fake
UNIX transports, their TCP sides on fake TCP transports (``tests/test_link``'s
harness), so the figures are pure Python cost per connection and per request,
with no kernel time to dilute a difference (the real mesh spends more per
request in system calls, so its relative cost is lower still).

Two workloads, each with the counting link (this tree's ``tproxy/link.py``)
and the link before the counters (``tproxy/link.py`` of git revision
``--baseline``, default ``main``), interleaved in rotating order, best of
``--repeat`` runs,
timed in CPU seconds of this process (``time.process_time``: other load on
the machine then disturbs the figures less):

* *new connection*: guest connects, 100-byte request, 100-byte response,
  both sides close (HTTP/1.0 style);
* *keep-alive*: one stream, 100-byte request / 100-byte response exchanges.

Run: ``PYTHONPATH=. python bench/bench_metrics.py [--baseline REV] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import tests.test_link as harness_module  # noqa: E402

REQUEST = b"G" * 100
RESPONSE = b"R" * 100


def load_link(text: bytes, name: str) -> ModuleType:
    """A ``tproxy/link.py`` source imported as module ``name`` (both variants load alike)."""
    tmp = tempfile.NamedTemporaryFile("wb", suffix=f"_{name}.py", delete=False)
    with tmp:
        tmp.write(text)
    spec = importlib.util.spec_from_file_location(name, tmp.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    os.unlink(tmp.name)
    return module


def load_baseline(rev: str, name: str = "link_baseline") -> ModuleType:
    """``tproxy/link.py`` as it was at git revision ``rev``."""
    text = subprocess.run(
        ["git", "-C", REPO, "show", f"{rev}:tproxy/link.py"],
        check=True,
        capture_output=True,
    ).stdout
    return load_link(text, name)


def load_current() -> ModuleType:
    """This tree's ``tproxy/link.py`` (with the counters), loaded like the baseline."""
    with open(os.path.join(REPO, "tproxy", "link.py"), "rb") as f:
        return load_link(f.read(), "link_counting")


def harness(link: ModuleType) -> Any:
    """A fresh in-memory root+inner pair built from ``link``'s classes."""
    harness_module.RootLink = link.RootLink  # type: ignore[attr-defined]
    harness_module.InnerLink = link.InnerLink  # type: ignore[attr-defined]
    return harness_module.Harness()


def new_connections(link: ModuleType, seconds: float) -> float:
    """Connections per second (open, request, response, close)."""
    h = harness(link)
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


def keep_alive(link: ModuleType, seconds: float) -> float:
    """Request/response exchanges per second on one stream."""
    h = harness(link)
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


def added_work(repeat: int) -> float:
    """Microseconds of the counting a root link adds to one connection, timed alone.

    The same operations as ``RootLink._open``/``_tcp_connected``/``_forget`` do
    for a stream that opens, connects and ends, on a real clock.
    """
    import timeit

    from twisted.internet.task import Clock

    from tproxy.metrics import BridgeStats

    metrics = BridgeStats()
    clock = Clock()

    class Stream:
        stats = None
        opened_at = 0.0
        sent = 100
        received = 100

    def one() -> None:
        s = Stream()
        stats = metrics.ports.get(5030) or metrics.port(5030)
        stats.requested += 1
        s.stats = stats  # type: ignore[assignment]
        s.opened_at = clock.seconds()
        stats.streams_open += 1
        stats.accepted += 1
        stats.latency.record(clock.seconds() - s.opened_at)
        stats.streams_open -= 1
        stats.bytes_to_service += s.received
        stats.bytes_to_guest += s.sent

    def bare() -> None:
        Stream()

    n = 100_000
    with_counts = min(timeit.repeat(one, number=n, repeat=repeat)) / n
    without = min(timeit.repeat(bare, number=n, repeat=repeat)) / n
    return (with_counts - without) * 1e6


def best(
    fn: Callable[[ModuleType, float], float], link: ModuleType, seconds: float, repeat: int
) -> float:
    return max(fn(link, seconds) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision without the counters")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (best is kept)")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline)
    again = load_baseline(args.baseline, "link_again")  # the same code again: the noise floor
    counting = load_current()
    if hasattr(baseline.RootLink, "snapshot"):
        print(f"warning: {args.baseline}'s link already counts per port", file=sys.stderr)
    print(f"Python {sys.version.split()[0]}, {args.repeat} x {args.seconds:g} s, best run\n")
    print("| workload | without counters | with counters | cost | noise (same code twice) |")
    print("|---|---|---|---|---|")
    for name, fn, unit in (
        ("new connection (100 B each way)", new_connections, "conn/s"),
        ("keep-alive request/response (100 B)", keep_alive, "req/s"),
    ):
        variants = [baseline, counting, again]
        bests = [0.0, 0.0, 0.0]
        for i in range(args.repeat):  # interleaved, the order rotating: drift hits all alike
            for k in range(3):
                j = (i + k) % 3
                bests[j] = max(bests[j], fn(variants[j], args.seconds))
        a, b, c = bests
        cost = (a - b) / a * 100
        noise = (a - c) / a * 100
        print(f"| {name} | {a:,.0f} {unit} | {b:,.0f} {unit} | {cost:+.1f} % | {noise:+.1f} % |")
        if fn is new_connections:
            per_conn = 1e6 / a
    extra = added_work(args.repeat)
    print(
        f"\nThe counting alone: {extra:.2f} µs per connection, "
        f"{extra / per_conn * 100:.2f} % of the {per_conn:.0f} µs one costs here without it."
    )


if __name__ == "__main__":
    main()
