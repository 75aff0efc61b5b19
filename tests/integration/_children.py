"""Small child programs the mesh integration tests start.

``python -m tests.integration._children title NETNS TITLE``: enter NETNS (``-``
for none), set the process title, print ``ready`` and sleep.
``... BR --config ...`` (as SpawnLauncher starts it): greet over the socket on
fd 3, echo what comes, exit 0 at EOF.
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


if __name__ == "__main__":
    if sys.argv[1] == "title":
        _title(sys.argv[2], sys.argv[3])
    else:  # started by SpawnLauncher: BR --config ... --log-dir ... --run-dir ...
        _fd3(sys.argv[1])
