"""One stream through a real inner + root link pair: throughput and CPU per GB (not a test).

Unlike ``bench_mesh.py`` this needs no namespaces, no root and no services:
a root link and an inner link, each in its own process with its own epoll
reactor, share one UNIX socket pair; the inner listens on a loopback TCP
port (as if it were 169.254.16.9:5201), the root connects each stream to a
sink/source on loopback. The parent is the guest and the service: it pushes
``--megabytes`` through the pair (upload: guest -> service; download: the
service sends, ``-R`` in iperf3's terms) and reports the rate and the CPU
time (user + system, from ``/proc/PID/stat``) each proxy spent per GB. The
figures of one run are comparable with each other; the machine's load is not.

Run: ``PYTHONPATH=. python bench/bench_relay.py [--megabytes N] [--reps R]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import threading
import time
from typing import Any

SERVICE_PORT = 5201
CHUNK = 1 << 17
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[float, int]:
    """User + system seconds and minor page faults of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[7])


def _as_daemon(reactor: Any) -> None:
    """What both daemons do besides their link that bears on the data path."""
    from tproxy import runtime

    if hasattr(runtime, "MemoryReclaimer"):
        runtime.MemoryReclaimer(reactor).start()


def _run_root(fd: int, sink_port: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    from tproxy.config import Limits
    from tproxy.link import RootLink
    from tproxy.model import Destination
    from tproxy.root import adopt_with

    dest = Destination("127.0.0.1", sink_port)
    link = RootLink(reactor, "bench", lambda port: dest, Limits(), ping_interval=None)
    _as_daemon(reactor)
    adopt_with(reactor)(fd, link)
    os.close(fd)
    link.closed.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _run_inner(fd: int, ready: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from tproxy.link import InnerLink
    from tproxy.root import adopt_with

    link = InnerLink(reactor, on_config=lambda ports: None, ping_interval=None, stats_interval=None)
    _as_daemon(reactor)
    adopt_with(reactor)(fd, link)
    os.close(fd)

    def listening(port: Any) -> None:
        os.write(ready, str(port.getHost().port).encode())
        os.close(ready)

    ep = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    ep.listen(link.guest_factory(SERVICE_PORT)).addCallback(listening)
    link.closed.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _fork(target: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        finally:
            os._exit(0)
    return pid


def _pump(sock: socket.socket, total: int) -> None:
    buf = memoryview(bytearray(os.urandom(CHUNK)))
    left = total
    while left:
        left -= sock.send(buf[: min(left, CHUNK)])
    sock.shutdown(socket.SHUT_WR)


def _drain(sock: socket.socket, total: int) -> int:
    buf = bytearray(CHUNK * 2)
    got = 0
    while got < total:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    return got


def _recv_exact(sock: socket.socket, n: int) -> None:
    while n:
        got = len(sock.recv(n))
        if not got:
            raise EOFError
        n -= got


def _requests(guest_port: int, sink: socket.socket, count: int) -> float:
    """``count`` request/response round trips of 100 bytes each way on one connection."""
    guest = socket.create_connection(("127.0.0.1", guest_port))
    service, _ = sink.accept()
    for s in (guest, service):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"r" * 100
    t0 = time.perf_counter()
    for _ in range(count):
        guest.sendall(msg)
        _recv_exact(service, 100)
        service.sendall(msg)
        _recv_exact(guest, 100)
    dt = time.perf_counter() - t0
    guest.close()
    service.close()
    return dt


def _one(guest_port: int, sink: socket.socket, total: int, upload: bool) -> tuple[float, int]:
    guest = socket.create_connection(("127.0.0.1", guest_port))
    service, _ = sink.accept()
    src, dst = (guest, service) if upload else (service, guest)
    t0 = time.perf_counter()
    th = threading.Thread(target=_pump, args=(src, total))
    th.start()
    got = _drain(dst, total)
    dt = time.perf_counter() - t0
    th.join()
    guest.close()
    service.close()
    return dt, got


def in_process(count: int, streams: int = 1) -> float:
    """``count`` round trips of 100 bytes through an inner and a root link in *this* process.

    ``streams`` guests take turns at them, each with one request in flight
    (1: every reactor turn handles one request; more: a turn handles several,
    as under wrk's 32 connections in the mesh's (c)).

    Guest, service and both links share one reactor and real sockets (loopback
    TCP, a UNIX socket pair), so ``valgrind --tool=callgrind`` can count the
    instructions of the whole request path, which the machine's load does not
    move. Returns the seconds it took.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from tproxy.config import Limits
    from tproxy.link import InnerLink, RootLink
    from tproxy.model import Destination
    from tproxy.root import adopt_with

    r: Any = reactor
    _as_daemon(r)  # the daemons' heap settings: no mmap per link read
    msg = b"r" * 100

    class Service(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(msg)  # type: ignore[union-attr]

    running = [streams]

    class Guest(Protocol):
        left = max(1, count // streams)

        def connectionMade(self) -> None:
            self.transport.write(msg)  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            self.left -= 1
            if self.left:
                self.transport.write(msg)  # type: ignore[union-attr]
                return
            running[0] -= 1
            if not running[0]:
                r.stop()

    class One(ClientFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            return Guest()

    service = r.listenTCP(0, Factory.forProtocol(Service), interface="127.0.0.1")
    dest = Destination("127.0.0.1", service.getHost().port)
    root = RootLink(r, "bench", lambda port: dest, Limits(), ping_interval=None)
    inner = InnerLink(r, lambda ports: None, ping_interval=None, stats_interval=None)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s, link in ((a, root), (b, inner)):
        s.setblocking(False)
        adopt_with(r)(s.fileno(), link)
        s.close()
    guests = r.listenTCP(0, inner.guest_factory(SERVICE_PORT), interface="127.0.0.1")
    for _ in range(streams):
        r.connectTCP("127.0.0.1", guests.getHost().port, One())
    t0, c0 = time.perf_counter(), time.process_time()
    r.run()
    print(f"CPU {time.process_time() - c0:.2f} s")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megabytes", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--direction", choices=("up", "down", "both"), default="both")
    ap.add_argument(
        "--requests",
        type=int,
        default=0,
        help="also N keep-alive round trips of 100 bytes: CPU per request (workload c)",
    )
    ap.add_argument(
        "--in-process",
        type=int,
        default=0,
        metavar="N",
        help="only N round trips with everything in this process (for callgrind)",
    )
    ap.add_argument(
        "--streams",
        type=int,
        default=1,
        metavar="K",
        help="with --in-process: K guests, one request in flight each",
    )
    args = ap.parse_args()
    if args.in_process:
        dt = in_process(args.in_process, max(1, args.streams))
        print(f"{args.in_process} round trips in one process: {dt:.2f} s")
        return 0
    total = args.megabytes * 1_000_000

    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # the socket buffers the root gives a link's socket pair
        from tproxy.root import _size_link_buffers

        _size_link_buffers(a, b)
    except ImportError:
        pass
    a.setblocking(False)
    b.setblocking(False)
    r, w = os.pipe()
    root = _fork(_run_root, a.detach(), sink.getsockname()[1])
    inner = _fork(_run_inner, b.detach(), w)
    os.close(w)
    guest_port = int(os.read(r, 16))
    os.close(r)
    dirs = ["up", "down"] if args.direction == "both" else [args.direction]
    print(
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{args.megabytes} MB per run, {args.reps} reps, load {os.getloadavg()[0]:.2f}"
    )
    print(
        "| direction | GB/s (median) | inner CPU s/GB | root CPU s/GB "
        "| inner faults/MB | root faults/MB | runs GB/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    try:
        for d in dirs:
            rates, ci, cr, fi, fr = [], [], [], [], []
            for _ in range(args.reps):
                (i0, if0), (r0, rf0) = _cpu(inner), _cpu(root)
                dt, got = _one(guest_port, sink, total, d == "up")
                if got != total:
                    print(f"short transfer: {got} of {total}", file=sys.stderr)
                    return 1
                gb = got / 1e9
                rates.append(gb / dt)
                (i1, if1), (r1, rf1) = _cpu(inner), _cpu(root)
                ci.append((i1 - i0) / gb)
                cr.append((r1 - r0) / gb)
                fi.append((if1 - if0) / gb / 1000)
                fr.append((rf1 - rf0) / gb / 1000)
                time.sleep(0.2)
            print(
                f"| {d} | {statistics.median(rates):.2f} | {statistics.median(ci):.2f} "
                f"| {statistics.median(cr):.2f} | {statistics.median(fi):.1f} "
                f"| {statistics.median(fr):.1f} | {' '.join(f'{x:.2f}' for x in rates)} |"
            )
        if args.requests:
            print()
            print("| round trips | per second | inner CPU µs/request | root CPU µs/request |")
            print("|---:|---:|---:|---:|")
            for _ in range(args.reps):
                (i0, _f), (r0, _f) = _cpu(inner), _cpu(root)
                dt = _requests(guest_port, sink, args.requests)
                (i1, _f), (r1, _f) = _cpu(inner), _cpu(root)
                k = args.requests
                us_inner, us_root = (i1 - i0) / k * 1e6, (r1 - r0) / k * 1e6
                print(f"| {k} | {k / dt:.0f} | {us_inner:.1f} | {us_root:.1f} |")
    finally:
        for pid in (inner, root):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
