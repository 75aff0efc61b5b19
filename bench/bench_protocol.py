"""Throughput and memory of the sans-I/O String-Phone core (not a test; prints Markdown).

Bytes go inner -> root through ``Connection.send_data`` / ``data_to_send``
(encoder), a simulated UNIX socket that hands the root reads of at most 64 KiB
regardless of frame boundaries, and ``Connection.receive_data`` (decoder and
state machine); the root consumes every byte (credit goes back as
WINDOW_UPDATEs, which the inner decodes).  Memory: tracemalloc over 10,000
idle open streams on each side.

Run: ``PYTHONPATH=. python bench/bench_protocol.py [--seconds S]``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import tracemalloc

from tproxy.protocol.connection import Connection, Role
from tproxy.protocol.events import DataReceived, OpenRequested

READ_SIZE = 65536


def _pair(n_streams: int) -> tuple[Connection, Connection, list[int]]:
    inner = Connection(Role.INNER)
    root = Connection(Role.ROOT, max_streams=n_streams + 1)
    root.receive_data(b"".join(inner.data_to_send()))
    inner.receive_data(b"".join(root.data_to_send()))
    sids = [inner.open_stream(5030, "169.254.3.4", 40000 + i % 20000) for i in range(n_streams)]
    for e in root.receive_data(b"".join(inner.data_to_send())):
        assert isinstance(e, OpenRequested)
        root.accept(e.stream_id)
    inner.receive_data(b"".join(root.data_to_send()))
    return inner, root, sids


def throughput(n_streams: int, write_size: int, seconds: float) -> float:
    """Bytes per second delivered to the root's events."""
    inner, root, sids = _pair(n_streams)
    payload = bytes(write_size)
    # Enough writes per round that one round is ~1 MiB of data.
    per_round = max(1, (1 << 20) // write_size)
    delivered = 0
    rounds = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    while True:
        # Like the link: a stream with data waiting for window is paused (not written to).
        for _ in range(per_round):
            sid = sids[i]
            i += 1
            if i == n_streams:
                i = 0
            if not inner.buffered(sid):
                inner.send_data(sid, payload)
        wire = b"".join(inner.data_to_send())
        for pos in range(0, len(wire), READ_SIZE):
            for ev in root.receive_data(wire[pos : pos + READ_SIZE]):
                if type(ev) is DataReceived:
                    n = len(ev.data)
                    delivered += n
                    root.consumed(ev.stream_id, n)
        back = root.data_to_send()
        if back:
            inner.receive_data(b"".join(back))
        rounds += 1
        if rounds % 4 == 0 and time.perf_counter() > deadline:
            break
    dt = time.perf_counter() - t0
    return delivered / dt


def memory_per_stream(n: int = 10000) -> tuple[float, float]:
    """Bytes allocated per idle open stream, (inner side, root side)."""
    gc.collect()
    tracemalloc.start()
    inner = Connection(Role.INNER)
    root = Connection(Role.ROOT, max_streams=n + 1)
    root.receive_data(b"".join(inner.data_to_send()))
    inner.receive_data(b"".join(root.data_to_send()))
    base_inner = tracemalloc.get_traced_memory()[0]
    sids = [inner.open_stream(5030, "169.254.3.4", 40000 + i % 20000) for i in range(n)]
    chunks = inner.data_to_send()
    queued = sys.getsizeof(chunks) + sum(sys.getsizeof(c) for c in chunks)
    queued += sys.getsizeof(sids) + sum(sys.getsizeof(s) for s in sids)
    inner_mem = tracemalloc.get_traced_memory()[0] - base_inner - queued
    wire = b"".join(chunks)
    del chunks
    del sids
    before = tracemalloc.get_traced_memory()[0]
    events = root.receive_data(wire)
    del wire
    for e in events:
        assert isinstance(e, OpenRequested)
        root.accept(e.stream_id)
    del events, e
    root.data_to_send()
    gc.collect()
    root_mem = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # Sanity: the streams really are open and idle.
    assert root.stream_count == n and inner.stream_count == n
    return inner_mem / n, root_mem / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args()
    uname = platform.uname()
    print(
        f"Machine: {uname.system} {uname.release} {uname.machine}, "
        f"Python {platform.python_version()}"
    )
    print()
    print("| streams | write size | throughput |")
    print("|---:|---:|---:|")
    for n_streams in (1, 100):
        for size in (1024, 65536):
            bps = throughput(n_streams, size, args.seconds)
            print(f"| {n_streams} | {size // 1024} KiB | {bps / 1e9:.2f} GB/s |")
    inner_b, root_b = memory_per_stream()
    print()
    print("| memory per idle open stream (10,000 streams) | bytes |")
    print("|---|---:|")
    print(f"| inner side | {inner_b:.0f} |")
    print(f"| root side | {root_b:.0f} |")


if __name__ == "__main__":
    main()
