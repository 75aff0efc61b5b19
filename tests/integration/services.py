"""Test services and clients, run as a script inside test namespaces (stdlib only).

``python services.py http --bind ADDR --port P --dir DIR``
    An HTTP server: files under DIR; ``GET /bytes/N`` streams N bytes of the
    deterministic test pattern; ``POST /sha256`` answers ``COUNT SHA256`` of the
    body. Unlike ``python -m http.server`` it never looks its address up in DNS.
``python services.py sink --bind ADDR --port P``
    Raw TCP: reads until the client half-closes, then answers ``COUNT SHA256\\n``
    and closes (proves half-close: the reply travels after the client's FIN).
``python services.py upload HOST PORT SIZE [--rate BYTES_PER_S]``
    Client: sends SIZE pattern bytes, shuts its write side, reads the reply,
    prints ``sent COUNT SHA256`` and the reply; exit 0 only if they agree.
``python services.py download URL SIZE [--rate BYTES_PER_S]``
    Client: ``GET`` of ``/bytes/SIZE`` through a raw socket; prints
    ``got COUNT SHA256`` and exits 0 only if it is the pattern's.

Clients print ``started`` once connected; ``--rate`` paces them (to keep a
transfer in flight while a test changes something).

Every server prints ``ready`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator

CHUNK = 65536


def pattern(size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The deterministic test bytes: position-dependent, so loss or reordering shows."""
    sent, i = 0, 0
    while sent < size:
        n = min(chunk, size - sent)
        yield hashlib.shake_128(b"one-tproxy:%d" % i).digest(chunk)[:n]
        sent += n
        i += 1


def pattern_digest(size: int) -> str:
    """sha256 of the first ``size`` pattern bytes."""
    h = hashlib.sha256()
    for block in pattern(size):
        h.update(block)
    return h.hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/bytes/"):
            size = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for block in pattern(size):
                self.wfile.write(block)
            return
        super().do_GET()

    def do_POST(self) -> None:
        h = hashlib.sha256()
        count = 0
        length = self.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        while remaining is None or remaining > 0:
            data = self.rfile.read1(CHUNK if remaining is None else min(CHUNK, remaining))
            if not data:
                break
            h.update(data)
            count += len(data)
            if remaining is not None:
                remaining -= len(data)
        body = f"{count} {h.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn: no DNS from a test netns
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        h = hashlib.sha256()
        count = 0
        while True:
            data = self.request.recv(CHUNK)
            if not data:
                break
            h.update(data)
            count += len(data)
        self.request.sendall(f"{count} {h.hexdigest()}\n".encode())


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(server: socketserver.BaseServer) -> int:
    print("ready", flush=True)
    server.serve_forever()
    return 0


class _Pacer:
    """Sleeps so that ``count`` bytes take at least ``count / rate`` seconds."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def pace(self, count: int) -> None:
        if self.rate > 0:
            ahead = count / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def _upload(host: str, port: int, size: int, rate: float) -> int:
    h = hashlib.sha256()
    count = 0
    with socket.create_connection((host, port), timeout=30) as s:
        print("started", flush=True)
        pacer = _Pacer(rate)
        for block in pattern(size):
            s.sendall(block)
            h.update(block)
            count += len(block)
            pacer.pace(count)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            data = s.recv(CHUNK)
            if not data:
                break
            reply += data
    mine = f"{count} {h.hexdigest()}"
    print(f"sent {mine}")
    print(f"reply {reply.decode(errors='replace').strip()}")
    return 0 if reply.decode(errors="replace").strip() == mine else 1


def _download(url: str, size: int, rate: float) -> int:
    parts = urllib.parse.urlsplit(url)
    h = hashlib.sha256()
    pacer = _Pacer(rate)
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=30) as s:
        print("started", flush=True)
        s.sendall(f"GET /bytes/{size} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(CHUNK)
            if not data:
                print("connection closed in the headers")
                return 1
            buf += data
        head, body = buf.split(b"\r\n\r\n", 1)
        count = len(body)
        h.update(body)
        while True:
            data = s.recv(CHUNK)
            if not data:
                break
            h.update(data)
            count += len(data)
            pacer.pace(count)
    got = h.hexdigest()
    print(f"got {count} {got}")
    return 0 if count == size and got == pattern_digest(size) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the mode named by the first argument."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("http")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", default=".")
    p = sub.add_parser("sink")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("upload")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int)
    p.add_argument("--rate", type=float, default=0.0)
    p = sub.add_parser("download")
    p.add_argument("url")
    p.add_argument("size", type=int)
    p.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.mode == "http":
        directory = args.dir

        class Handler(_Handler):
            def __init__(self, *a: object, **k: object) -> None:
                super().__init__(*a, directory=directory, **k)  # type: ignore[arg-type]

        return _serve(_HTTPServer((args.bind, args.port), Handler))
    if args.mode == "sink":
        return _serve(_TCPServer((args.bind, args.port), _Sink))
    if args.mode == "upload":
        return _upload(args.host, args.port, args.size, args.rate)
    return _download(args.url, args.size, args.rate)


if __name__ == "__main__":
    threading.current_thread().name = "main"
    sys.exit(main())
