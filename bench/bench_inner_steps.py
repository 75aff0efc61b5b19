"""The inner proxy's work per new connection, in lock step: instruction counts that do not move.

``bench_setup.py --callgrind`` counts move by several per cent between runs of
the same code, with how connections fall into reactor turns. Here one process
holds a real ``InnerLink`` (epoll reactor, a ``GuestEndpoint`` on 127.0.0.1,
the link on a UNIX socket pair) and plays guest and root itself (the root is a
sans-I/O ``Connection``), one connection at a time and a fixed number of
reactor turns per step, as in (b): accept and early data, the root's OK, the
answer with its FIN, the guest's FIN. Every step waits for loopback, which
delivers synchronously, so the same code runs the same instructions.

Run it twice under callgrind and subtract (start-up cancels out):

    for n in 100 600; do PYTHONHASHSEED=0 PYTHONPATH=. valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/steps.$n python bench/bench_inner_steps.py $n; done

instructions per connection = (total(600) - total(100)) / 500 (the
sans-I/O root's share included: it is the same for every version of the
inner). Without valgrind it prints the CPU time per connection.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

REQUEST = b"G" * 100
RESPONSE = b"R" * 100


def main(n: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor as _reactor

    from tproxy import dispatch, logs
    from tproxy.config import Limits
    from tproxy.link import InnerLink
    from tproxy.link_accept import GuestEndpoint
    from tproxy.protocol import events as ev
    from tproxy.protocol.connection import Connection, Role
    from tproxy.root import adopt_with

    dispatch.install()  # as both daemons do
    logs.debug_enabled = (
        False  # the daemons' log at WARNING (bench_setup.py) builds no DEBUG events
    )
    reactor: object = _reactor
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = InnerLink(
        reactor,  # type: ignore[arg-type]
        lambda ports: None,
        Limits(),
        bridge="bench",
        ping_interval=None,
        stats_interval=None,
    )
    a.setblocking(False)
    adopt_with(reactor)(a.fileno(), link)
    a.close()
    b.setblocking(False)
    root = Connection(Role.ROOT)
    port = GuestEndpoint(reactor, 0, interface="127.0.0.1")._listen(link.guest_factory(80))
    addr = ("127.0.0.1", port.getHost().port)  # type: ignore[attr-defined]

    def turns(k: int) -> None:
        for _ in range(k):
            reactor.runUntilCurrent()  # type: ignore[attr-defined]
            reactor.doIteration(0)  # type: ignore[attr-defined]

    def root_io() -> list[ev.Event]:
        out = root.data_to_send()
        if out:
            b.sendall(b"".join(out))
        try:
            data = b.recv(1 << 20)
        except BlockingIOError:
            return []
        return root.receive_data(data)

    root_io()
    turns(3)
    root_io()
    gc.collect()
    gc.freeze()  # start-up objects out of the collections' way
    start = time.process_time()
    for _ in range(n):
        c = socket.socket()
        c.connect(addr)
        c.sendall(REQUEST)
        turns(3)  # accept + early data; the OPEN leaves at the end of the turn
        [sid] = [e.stream_id for e in root_io() if isinstance(e, ev.OpenRequested)]
        root.accept(sid)
        root_io()
        turns(2)  # the OK: the guest is read from now on
        root.send_data(sid, RESPONSE)
        root.half_close(sid)
        root_io()
        turns(2)  # the answer and its FIN to the guest
        got = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got == RESPONSE, got
        c.close()
        turns(3)  # the guest's FIN: HALF_CLOSE to the root, the socket closed
        root_io()
    assert not link.stream_count, link.stream_count
    cpu = time.process_time() - start
    print(f"{n} connections: {cpu / n * 1e6:.0f} µs CPU per connection (guest and root included)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
