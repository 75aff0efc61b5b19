"""Abusive guest clients for the hardening tests (stdlib only, run inside a guest namespace).

``python guestload.py caps ADDR PORT HOLD EXTRA``
    Opens HOLD connections and keeps them open (a request line sent, never
    finished), then EXTRA more that each send a whole request; prints one JSON
    line ``{"held": n, "served": n, "reset": n}`` and keeps holding until stdin
    closes.
``python guestload.py slow ADDR PORT N SIZE``
    N connections each ``GET /bytes/SIZE`` and never read; prints ``open N``;
    on a line on stdin resets every one (RST: SO_LINGER 0), prints ``reset``
    and exits.
``python guestload.py mixed ADDR TOTAL CONCURRENCY OK_PORT REFUSED_PORT SILENT_PORT``
    TOTAL connections, CONCURRENCY at a time, in the proportions 80 % a whole
    request (half-closed; an HTTP or an echo service answers it) on OK_PORT,
    8 % to REFUSED_PORT (no remote listens), 10 % reset by the guest right
    after connecting, 2 % to SILENT_PORT (remote drops SYNs);
    prints ``{"ok": n, "failed": n, "reset": n, "seconds": s}``.

Every loop is bounded (counts and timeouts); nothing is sent anywhere but ADDR.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time

REQUEST = b"GET / HTTP/1.0\r\nHost: onegate\r\n\r\n"
TIMEOUT = 10.0


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _request(addr: str, port: int, request: bytes = REQUEST) -> str:
    """One request: 'ok' (a response), 'reset' (RST or EOF with nothing), 'failed'."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), TIMEOUT)
    except (TimeoutError, OSError):
        return "failed"
    try:
        writer.write(request)
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
        return "ok" if data.startswith(b"HTTP/") or data == request else "reset"
    except (TimeoutError, OSError):
        # OSError: a RST may arrive before write_eof(), whose shutdown() then fails
        # with ENOTCONN (not a ConnectionError).
        return "reset"
    finally:
        writer.close()


async def caps(addr: str, port: int, hold: int, extra: int) -> None:
    held = []
    for _ in range(hold):
        reader, writer = await asyncio.open_connection(addr, port)
        writer.write(b"GET / HTTP/1.0\r\n")  # never finished: the stream stays open
        held.append(writer)
    await asyncio.sleep(0.5)  # every held stream is open at the root before the extras
    results = [await _request(addr, port) for _ in range(extra)]
    print(
        json.dumps(
            {"held": len(held), "served": results.count("ok"), "reset": results.count("reset")}
        ),
        flush=True,
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in held:
        _rst(w)


async def slow(addr: str, port: int, n: int, size: int) -> None:
    writers = []
    for _ in range(n):
        _reader, writer = await asyncio.open_connection(addr, port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.transport.pause_reading()  # never read
        writer.write(f"GET /bytes/{size} HTTP/1.0\r\n\r\n".encode())
        writers.append(writer)
    print(f"open {len(writers)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in writers:
        _rst(w)
    await asyncio.sleep(0.2)
    print("reset", flush=True)


async def _reset_right_away(addr: str, port: int) -> str:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), TIMEOUT)
    except (TimeoutError, OSError):
        return "failed"
    writer.write(b"GET / HT")
    _rst(writer)
    return "reset"


async def mixed(
    addr: str, total: int, concurrency: int, ok_port: int, refused: int, silent: int
) -> None:
    counts = {"ok": 0, "failed": 0, "reset": 0}
    sem = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one(i: int) -> None:
        kind = i % 50
        async with sem:
            if kind < 40:
                result = await _request(addr, ok_port)
            elif kind < 44:
                result = await _request(addr, refused)
            elif kind < 49:
                result = await _reset_right_away(addr, ok_port)
            else:
                result = await _request(addr, silent)
            counts[result] += 1

    await asyncio.gather(*(one(i) for i in range(total)))
    counts["seconds"] = round(time.monotonic() - start, 1)  # type: ignore[assignment]
    print(json.dumps(counts), flush=True)


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "caps":
        asyncio.run(caps(args[0], int(args[1]), min(int(args[2]), 5000), min(int(args[3]), 5000)))
    elif mode == "slow":
        asyncio.run(slow(args[0], int(args[1]), min(int(args[2]), 2000), int(args[3])))
    elif mode == "mixed":
        asyncio.run(mixed(args[0], min(int(args[1]), 100000), int(args[2]), *map(int, args[3:6])))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
