"""What one new guest connection costs the proxies (issue 7 (b)), not a test; prints Markdown.

A real root link and a real inner link, each in its own process with its own
epoll reactor, a ``DaemonLog`` at WARNING (``:tproxy_debug_level: 1``, as
``bench_mesh.py`` runs the mesh) and the daemons' heap settings, joined by a
UNIX socket pair; the inner listens on 127.0.0.1, the root connects every
stream to a small service on 127.0.0.1 in this process. Client threads here
open ``--conns`` guest connections, each one 100-byte request and 100-byte response, the service
closing first (HTTP with ``Connection: close``, as wrk against nginx in (b)).

Reported per connection, for each proxy: CPU (user + system, from
``/proc/PID/stat``, after a warm-up), and with ``--strace`` system calls
(``strace -c -f`` attached to both proxies for the measured connections), with
``--callgrind`` instructions (both proxies under ``valgrind --tool=callgrind``,
counters zeroed after the warm-up with ``callgrind_control -z`` and dumped
at the end: load on the machine does not move them). Also printed: the
guests' time from connect to the response's end (mean, p50, p99), i.e. the
reactor turns and process hand-offs on a connection's critical path.

Run: ``PYTHONPATH=. python bench/bench_setup.py [--conns N] [--concurrency C]
[--strace] [--callgrind]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

REQUEST = b"G" * 100
RESPONSE = b"R" * 100
SERVICE_PORT = 8080
_TICK = os.sysconf("SC_CLK_TCK")


# -- the two proxies (child processes) --------------------------------------------------


def _child(role: str, fd: int, port: int, service: int, log_dir: str) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor as _reactor
    from twisted.logger import LogLevel

    from tproxy.config import Limits
    from tproxy.logs import DaemonLog, begin_daemon_logging
    from tproxy.model import Destination
    from tproxy.root import adopt_with

    reactor: Any = _reactor
    from tproxy import dispatch

    dispatch.install()  # as both daemons do
    from tproxy import runtime

    # The daemons' heap settings (MemoryReclaimer.start): without them every
    # 1 MiB link read is an mmap + mremap + munmap that the daemons never make.
    runtime.steady_heap(runtime._load_libc())
    log = DaemonLog(log_dir, f"bench_{role}", LogLevel.warn)
    begin_daemon_logging(log, redirect_stdio=False)
    link: Any
    if role == "root":
        from tproxy.link import RootLink

        dest = Destination("127.0.0.1", service)
        link = RootLink(reactor, "bench", lambda p: dest, Limits())
    else:
        from tproxy.link import InnerLink

        link = InnerLink(reactor, on_config=lambda ports: None, limits=Limits(), bridge="bench")
        from tproxy.link_accept import GuestEndpoint

        GuestEndpoint(reactor, port, 1024, "127.0.0.1").listen(link.guest_factory(SERVICE_PORT))
    os.set_blocking(fd, False)
    adopt_with(reactor)(fd, link)
    os.close(fd)
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    profile = os.environ.get("BENCH_SETUP_PROFILE")
    if profile:  # cProfile of the whole run, warm-up included
        import cProfile

        cProfile.runctx(
            "reactor.run(installSignalHandlers=False)",
            globals(),
            {"reactor": reactor},
            os.path.join(profile, f"{role}.prof"),
        )
    else:
        reactor.run(installSignalHandlers=False)


# -- the service and the guests (this process) -------------------------------------------


def _serve(listener: socket.socket, stop: threading.Event) -> None:
    """Read the request, send the response, close (the service closes first)."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            c, _ = listener.accept()
        except TimeoutError:
            continue
        c.settimeout(5)
        try:
            got = 0
            while got < len(REQUEST):
                b = c.recv(4096)
                if not b:
                    break
                got += len(b)
            c.sendall(RESPONSE)
        except OSError:
            pass
        c.close()


def _guests(port: int, n: int, errors: list[str], times: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(REQUEST)
                got = b""
                while True:
                    b = s.recv(4096)
                    if not b:
                        break
                    got += b
            if got != RESPONSE:
                errors.append(f"short response: {len(got)} bytes")
            times.append(time.perf_counter() - t0)
        except OSError as e:
            errors.append(str(e))


def _run_guests(
    port: int, n: int, concurrency: int, times: list[float] | None = None
) -> tuple[float, list[str]]:
    errors: list[str] = []
    each = max(1, n // concurrency)
    if times is None:
        times = []
    threads = [
        threading.Thread(target=_guests, args=(port, each, errors, times))
        for _ in range(concurrency)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, errors


def _latency(times: list[float]) -> str:
    """Mean, p50 and p99 of the guests' connection times, in ms."""
    if not times:
        return "-"
    ts = sorted(times)
    mean = sum(ts) / len(ts)

    def pct(q: float) -> float:
        return ts[min(len(ts) - 1, int(q * len(ts)))]

    return (
        f"mean {mean * 1e3:.3f} ms, p50 {pct(0.5) * 1e3:.3f} ms, p99 {pct(0.99) * 1e3:.3f} ms"
    )


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process and its threads so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the inner proxy exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the inner proxy did not listen in time")


_STRACE_TOTAL = re.compile(r"^-+\s+-+.*\n\s*100\.00\s+\S+\s+\S+\s+(\d+)\s+(\d+)?", re.M)


def _strace_calls(path: str) -> tuple[int, dict[str, int]]:
    """Total calls and calls per system call from an ``strace -c`` summary."""
    per: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0].replace(".", "").isdigit():
                name = parts[-1]
                calls = int(parts[3])
                if name == "total":
                    total = calls
                else:
                    per[name] = calls
    return total, per


def _callgrind_total(path: str) -> int:
    """The instruction count (``summary:`` or ``totals:``) of a callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=4000, help="measured connections")
    parser.add_argument("--warmup", type=int, default=300, help="connections before measuring")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--strace", action="store_true", help="count system calls")
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--child", choices=("root", "inner"), help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--service", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.fd, args.port, args.service, args.log_dir)
        return

    tmp = os.environ.get("BENCH_SETUP_TMP") or tempfile.mkdtemp(prefix="bench_setup.")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    service = listener.getsockname()[1]
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(listener, stop), daemon=True)
    server.start()
    port = _free_port()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, PYTHONPATH=REPO)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for role, sock in (("root", a), ("inner", b)):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            role,
            "--fd",
            str(sock.fileno()),
        ]
        cmd += ["--port", str(port), "--service", str(service), "--log-dir", tmp]
        if args.callgrind:
            out = os.path.join(tmp, f"callgrind.{role}")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *cmd]
        procs[role] = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), env=env)
    a.close()
    b.close()
    try:
        _wait_listening(port, procs["inner"], 300 if args.callgrind else 30)
        _, errors = _run_guests(port, args.warmup, args.concurrency)
        if errors:
            raise SystemExit(f"warm-up failed: {errors[:3]}")
        tracers: dict[str, subprocess.Popen[bytes]] = {}
        if args.strace:
            for role, p in procs.items():
                tracers[role] = subprocess.Popen(
                    [
                        "strace",
                        *(["-f"] if os.environ.get("BENCH_SETUP_TRACE") else ["-c", "-f"]),
                        "-o",
                        os.path.join(tmp, f"strace.{role}"),
                        "-p",
                        str(p.pid),
                    ],
                    stderr=subprocess.DEVNULL,
                )
            time.sleep(1.0)
        if args.callgrind:
            for p in procs.values():
                subprocess.run(
                    ["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True
                )
        before = {role: _cpu(p.pid) for role, p in procs.items()}
        times: list[float] = []
        wall, errors = _run_guests(port, args.conns, args.concurrency, times)
        after = {role: _cpu(p.pid) for role, p in procs.items()}
        n = max(1, args.conns // args.concurrency) * args.concurrency
        if args.callgrind:
            for p in procs.values():
                subprocess.run(
                    ["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True
                )
        for t in tracers.values():
            t.send_signal(signal.SIGINT)
            t.wait(30)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        stop.set()
        server.join(2)
        listener.close()

    print(
        f"{n} connections, {args.concurrency} at a time, {n / wall:.0f} conn/s"
        f"{' (under strace)' if args.strace else ''}"
        f"{' (under callgrind)' if args.callgrind else ''};"
        f" errors: {len(errors)}"
    )
    print(f"latency, guest connect to response's end: {_latency(times)}\n")
    print("| proxy | CPU µs/conn (user + sys) | syscalls/conn | instructions/conn |")
    print("|---|---|---|---|")
    for role in ("inner", "root"):
        (u0, s0), (u1, s1) = before[role], after[role]
        user, system = (u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6
        cpu = f"{user + system:.0f} ({user:.0f} + {system:.0f})"
        calls = instr = "-"
        if args.strace:
            total, per = _strace_calls(os.path.join(tmp, f"strace.{role}"))
            top = ", ".join(
                f"{k} {v / n:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])
            )
            calls = f"{total / n:.1f} ({top})"
        if args.callgrind:
            files = [
                f
                for f in glob.glob(os.path.join(tmp, f"callgrind.{role}.*"))
                if re.search(r"\.\d+\.\d+$", f)
            ]
            total = sum(_callgrind_total(f) for f in files)
            instr = f"{total / n:,.0f}"
        print(f"| {role} | {cpu} | {calls} | {instr} |")
    if not os.environ.get("BENCH_SETUP_TMP"):  # a directory given is kept (traces, profiles)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
