"""Small child programs the mesh integration tests start.

``python -m tests.integration._children title NETNS TITLE``: enter NETNS (``-``
for none), set the process title, print ``ready`` and sleep.
``... BR --config ...`` (as SpawnLauncher starts it): greet over the socket on
fd 3, echo what comes, exit 0 at EOF.
``... echo ADDR PORT``: asyncio echo server (backlog 4096), prints ``ready``.
``... burst N HOST PORT``: open N connections at once, and only when all are
open send 100 bytes and half-close on each, read the echo to EOF; prints
``ok N`` (exit 0) or what failed (exit 1).
"""

from __future__ import annotations

import socket
import sys
import time


def _title(netns: str, title: str) -> None:
    import setproctitle

    from tproxy.spawn import enter_netns

    if netns != "-":
        enter_netns(netns)
    setproctitle.setproctitle(title)
    print("ready", flush=True)
    time.sleep(120)


def _fd3(bridge: str) -> None:
    sock = socket.socket(fileno=3)
    sock.sendall(f"hello {bridge}\n".encode())
    while True:
        data = sock.recv(4096)
        if not data:
            return
        sock.sendall(data)


def fd3_main(argv: list[str]) -> int:
    """The fd3 program as a template's entry (``--entry tests.integration._children:fd3_main``)."""
    _fd3(argv[0])
    return 0


def _echo(addr: str, port: int) -> None:
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, addr, port, backlog=4096)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    _raise_nofile()
    asyncio.run(serve())


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _burst(count: int, host: str, port: int) -> int:
    import asyncio

    _raise_nofile()
    payload = b"x" * 100

    async def one(opened: asyncio.Event, ready: list[int]) -> str | None:
        reader, writer = await asyncio.open_connection(host, port)
        ready[0] += 1
        if ready[0] == count:
            opened.set()
        await opened.wait()
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        writer.close()
        return None if got == payload else f"got {len(got)} bytes"

    async def run() -> int:
        opened = asyncio.Event()
        ready = [0]
        tasks = [asyncio.ensure_future(one(opened, ready)) for _ in range(count)]
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        errors = [repr(r) for r in done if r is not None]
        if errors:
            print(f"failed {len(errors)} of {count}: {sorted(set(errors))[:5]}", flush=True)
            return 1
        print(f"ok {count}", flush=True)
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    if sys.argv[1] == "title":
        _title(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "echo":
        _echo(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "burst":
        sys.exit(_burst(int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    else:  # started by SpawnLauncher: BR --config ... --log-dir ... --run-dir ...
        _fd3(sys.argv[1])
