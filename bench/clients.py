"""Load clients that the mesh benchmark runs inside its guest namespace (stdlib only).

``hold`` opens many TCP connections to one address and keeps them open until
told to close them; it is what workloads (e), (f) and (g) of bench_mesh.py use:

* ``--mode request``: each connection sends one keep-alive ``GET PATH`` and reads
  the whole response (Content-Length), then stays open and idle. A connection
  counts as a success when its response arrived before the deadline.
* ``--mode stall``: each connection sends ``GET PATH`` (a large file) and then
  never reads again: a stalled reader. It counts as a success once the request
  is written.

Protocol with the parent (line based, so it works through ``nsenter``): when
every connection has succeeded or failed, or ``--deadline`` seconds have
passed, one JSON line ``{"ok": N, "failed": N, "elapsed": S, "errors": {...}}``
is printed on stdout; then the client waits for a line (or EOF) on stdin,
closes every connection, prints ``closed`` and exits. Every wait is bounded:
the client exits by itself ``--linger`` seconds after its report.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import sys
import time


def raise_nofile() -> int:
    """Raise the open-files soft limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Hold:
    """Opens ``count`` connections with at most ``parallel`` handshakes in flight."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sources: list[str] = args.sources.split(",") if args.sources else [""]
        self.request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: bench\r\n\r\n"
        ).encode()
        self.writers: list[asyncio.StreamWriter] = []
        self.ok = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()

    async def one(self, index: int, gate: asyncio.Semaphore) -> None:
        """One connection: connect, request, (read the response,) keep it."""
        src = self.sources[index % len(self.sources)]
        local = (src, 0) if src else None
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(
                    self.args.host, self.args.port, local_addr=local
                )
            except OSError as e:
                self.failed += 1
                self.errors[f"connect: {e.strerror or type(e).__name__}"] += 1
                return
            self.writers.append(writer)
            try:
                writer.write(self.request)
                await writer.drain()
                if self.args.mode == "request":
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise ValueError("status " + head.split(b"\r\n", 1)[0].decode())
                    await reader.readexactly(length)
            except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                self.failed += 1
                self.errors[f"request: {type(e).__name__}"] += 1
                return
            self.ok += 1

    async def run(self) -> None:
        """Open everything (bounded by the deadline), report, wait for the word, close."""
        gate = asyncio.Semaphore(self.args.parallel)
        start = time.monotonic()
        tasks = [asyncio.ensure_future(self.one(i, gate)) for i in range(self.args.count)]
        _, pending = await asyncio.wait(tasks, timeout=self.args.deadline)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
            self.errors["deadline"] += len(pending)
        elapsed = time.monotonic() - start
        report = {
            "ok": self.ok,
            "failed": self.args.count - self.ok,
            "elapsed": round(elapsed, 3),
            "errors": dict(self.errors),
        }
        print(json.dumps(report), flush=True)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                loop.run_in_executor(None, sys.stdin.readline), timeout=self.args.linger
            )
        for writer in self.writers:
            writer.transport.abort() if self.args.abort else writer.close()
        await asyncio.sleep(0)
        print("closed", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``clients.py hold ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    hold = sub.add_parser("hold", help="open and hold many connections")
    hold.add_argument("--host", required=True)
    hold.add_argument("--port", type=int, required=True)
    hold.add_argument("--path", default="/small")
    hold.add_argument("--count", type=int, default=100)
    hold.add_argument("--mode", choices=("request", "stall"), default="request")
    hold.add_argument("--sources", default="", help="comma-separated local addresses")
    hold.add_argument("--parallel", type=int, default=500, help="handshakes in flight")
    hold.add_argument("--deadline", type=float, default=30.0)
    hold.add_argument("--linger", type=float, default=300.0)
    hold.add_argument("--abort", action="store_true", help="close with RST instead of FIN")
    args = parser.parse_args(argv)
    raise_nofile()
    asyncio.run(Hold(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
