"""The programs the mesh benchmark measures with and against: nginx, iperf3, haproxy.

Each is started through a :class:`~tests.integration.topology.Namespace` (so it
runs where the benchmark says, and its PID is known), in the foreground, with
its configuration written into a directory of the benchmark's host. Stopping
kills it by PID; the host's cleanup kills anything left in its namespaces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from attrs import define, field

from tests.integration.topology import Namespace

#: The HTTP service port (nginx) and the iperf3 port, the same on every path.
HTTP_PORT = 8080
IPERF_PORT = 5201

#: Size of the small file of workloads (b)-(g), bytes.
SMALL_SIZE = 100
#: Size of the (sparse) large file of workloads (d)-(e): never downloaded to its end.
LARGE_SIZE = 64 << 30


def make_www(directory: str) -> str:
    """A docroot with ``small`` (100 bytes) and ``large`` (64 GiB, sparse); returns it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "small"), "wb") as f:
        f.write(b"x" * (SMALL_SIZE - 1) + b"\n")
    with open(os.path.join(directory, "large"), "wb") as f:
        f.truncate(LARGE_SIZE)
    return directory


@define
class Program:
    """One foreground process started in a namespace."""

    name: str
    """What it is, for messages."""
    namespace: Namespace
    """Where it runs."""
    argv: Sequence[str]
    """Its command line."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    """The running process."""

    def start(self) -> Program:
        """Start it (quiet: its stderr is discarded)."""
        self.proc = self.namespace.spawn(self.argv, stderr=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        """Its PID (it must be running)."""
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def alive(self) -> bool:
        """True while it runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill it by PID and reap it."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3)
                break
        if self.proc in self.namespace.spawned:
            self.namespace.spawned.remove(self.proc)
        self.proc = None


_NGINX = """\
daemon off;
master_process off;
worker_rlimit_nofile 20000;
error_log {dir}/error.log error;
pid {dir}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    client_header_timeout 600s;
    send_timeout 600s;
    server {{
        listen {addr}:{port} backlog=4096;
        root {www};
    }}
}}
"""


def nginx(namespace: Namespace, addr: str, www: str, directory: str) -> Program:
    """nginx (one process, no master) serving ``www`` on addr:HTTP_PORT."""
    os.makedirs(directory, exist_ok=True)
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(_NGINX.format(dir=directory, addr=addr, port=HTTP_PORT, www=www))
    return Program("nginx", namespace, ["nginx", "-c", conf, "-p", directory])


def iperf3(namespace: Namespace, addr: str) -> Program:
    """An iperf3 server on addr:IPERF_PORT."""
    return Program("iperf3", namespace, ["iperf3", "-s", "-B", addr, "-p", str(IPERF_PORT)])


_HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
"""


def haproxy_inner(
    namespace: Namespace, listen: str, sockets: Mapping[int, str], directory: str, maxconn: int
) -> Program:
    """The haproxy in a bridge namespace: listen:PORT -> UNIX socket, for each port."""
    text = _HAPROXY_GLOBAL.format(maxconn=maxconn)
    for port, sock in sockets.items():
        text += (
            f"frontend in{port}\n    bind {listen}:{port} backlog 4096\n"
            f"    default_backend out{port}\n"
            f"backend out{port}\n    server s unix@{sock}\n"
        )
    return _haproxy(namespace, text, directory, f"haproxy_{namespace.name}")


def haproxy_outer(
    namespace: Namespace, sockets: Mapping[str, tuple[str, int]], directory: str, maxconn: int
) -> Program:
    """The haproxy in the hypervisor namespace: UNIX socket -> service, for each socket."""
    text = _HAPROXY_GLOBAL.format(maxconn=maxconn)
    for n, (sock, (addr, port)) in enumerate(sorted(sockets.items())):
        text += (
            f"frontend in{n}\n    bind unix@{sock} mode 600\n    default_backend out{n}\n"
            f"backend out{n}\n    server s {addr}:{port}\n"
        )
    return _haproxy(namespace, text, directory, "haproxy_outer")


def _haproxy(namespace: Namespace, text: str, directory: str, name: str) -> Program:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    conf = os.path.join(directory, f"{name}.cfg")
    with open(conf, "w") as f:
        f.write(text)
    return Program(name, namespace, ["haproxy", "-db", "-q", "-f", conf])
