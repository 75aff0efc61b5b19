"""The one shared fixture for integration tests: simulated hypervisors, guests, services.

Theory of operation
-------------------
Every simulated hypervisor is a :class:`Host`: a network namespace of its own
(``ip netns add``), entered with ``nsenter --net=/run/netns/NAME`` (never
``ip netns exec``, whose private mount namespace would swallow the
``/run/netns/one_tproxy_BR`` mounts the driver makes, DESIGN.md 4). Bridges,
the tproxy state (DESIGN.md 2.2), the HTTP services on 127.0.0.1 and the
``one-tproxy`` commands all live inside it, so the machine's root network
namespace is never touched. A :class:`Guest` is one more namespace with a veth
into a bridge of its host and a link-local address in 169.254.0.0/16.

Names carry the caller's prefix (``tqe`` for e2e, ``tqd`` driver, ``tqm``
mesh) plus the PID and a counter, so tests of several helpers and several
runs never collide; bridge names stay within 14 characters.

Everything a host makes is undone by :meth:`Host.cleanup`, registered with
``testcase.addCleanup`` when the host is made, unconditional and ordered:
``one-tproxy stop`` (bounded), every spawned process killed by PID, every
process still living in a namespace the test made killed by PID (they are
ours), then the ``one_tproxy_<bridge>`` namespaces of the host's bridges, the
guests' namespaces and the host's namespace deleted. Links and nft tables go
with their namespaces. ``cleanup()`` is idempotent and can be called early by
a test that wants to check there is nothing left.

Typical use::

    class FooTests(unittest.TestCase):
        def setUp(self) -> None:
            require_root()

        def test_it(self) -> None:
            host = Host(self, prefix="tqm")
            br = host.add_bridge()
            guest = host.add_guest(br)
            host.serve_http(5030)
            # Either the state by hand, as OpenNebula's Ruby driver makes it ...
            host.build_tproxy_state(br, {5030: ("127.0.0.1", 5030)})
            host.tproxy("start", check=True)
            # ... or through the real driver:
            #   host.write_config(config_yaml([(5030, "127.0.0.1", 5030)]))
            #   host.up(br)
            self.assertEqual(guest.wait_serving(5030), "service 5030\\n")
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from attrs import define, field, frozen
from twisted.trial.unittest import SkipTest

#: The address every hypervisor answers its guests at (DESIGN.md 1).
SERVICE_ADDRESS = "169.254.16.9"

#: Commands the integration tests need on the machine.
REQUIRED_COMMANDS = ("ip", "nft", "nsenter", "curl")

#: The directory where ``ip netns add`` keeps its namespaces.
NETNS_DIR = "/run/netns"

#: Seconds any single command may take unless the caller says otherwise.
DEFAULT_TIMEOUT = 30.0

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))

#: The stdlib-only test services/clients script (see its docstring).
SERVICES = os.path.join(_HERE, "services.py")

_counter = itertools.count(1)
_guest_counter = itertools.count(1)
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


class TestCaseLike(Protocol):
    """The part of a trial/unittest TestCase a Host needs."""

    def addCleanup(self, function: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        """Register ``function`` to run after the test, also when it fails."""


class CommandError(AssertionError):
    """A command run by the fixture failed; the message carries its argv and output."""


@frozen
class Completed:
    """The outcome of one command run to completion."""

    argv: tuple[str, ...]
    """What was run (with the nsenter prefix, if any)."""
    returncode: int
    """Its exit status (-N: killed by signal N; 124: timed out)."""
    stdout: str
    """Everything it wrote to stdout (decoded, errors replaced)."""
    stderr: str
    """Everything it wrote to stderr (decoded, errors replaced)."""

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def check(self) -> Completed:
        """Return self when the command exited 0, else raise CommandError with its output."""
        if self.returncode != 0:
            raise CommandError(
                f"command {' '.join(self.argv)!r} exited {self.returncode}\n"
                f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"
            )
        return self

    def json(self) -> Any:
        """stdout parsed as JSON."""
        return json.loads(self.stdout)


# --------------------------------------------------------------------------- checks


def missing_requirement() -> str | None:
    """Why integration tests cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "integration tests need Linux network namespaces"
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, bridges, nftables)"
    for cmd in REQUIRED_COMMANDS:
        if shutil.which(cmd) is None:
            return f"integration tests need the {cmd!r} command, which is not installed"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespace support (/proc/self/ns/net missing)"
    return None


def require_root() -> None:
    """Raise SkipTest, with the reason, unless root, netns support and the tools are here."""
    reason = missing_requirement()
    if reason is not None:
        raise SkipTest(reason)


# --------------------------------------------------------------------------- commands


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = False,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Completed:
    """Run ``argv`` to completion (killed after ``timeout`` s, returncode 124) and return it."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(data, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = 124
        err = err + f"\n[topology] killed after {timeout} s\n".encode()
    done = Completed(tuple(argv), code, _decode(out), _decode(err))
    return done.check() if check else done


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something true (returned); raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(path: str) -> list[int]:
    """PIDs of every process whose network namespace is the one bound at ``path``."""
    target = _netns_id(path)
    if target is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if _netns_id(f"/proc/{entry}/ns/net") == target:
            found.append(int(entry))
    return sorted(found)


def process_name(pid: int) -> str | None:
    """``/proc/PID/cmdline`` as one string, NULs as spaces, padding stripped (None: gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").strip().decode("utf-8", "replace")


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_pids(pids: Iterable[int], grace: float = 2.0) -> None:
    """SIGTERM each PID, wait up to ``grace`` s, then SIGKILL the survivors."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(is_alive(p) for p in pids):
            time.sleep(0.02)
        pids = [p for p in pids if is_alive(p)]
        if not pids:
            return


def netns_names() -> list[str]:
    """The names of ``ip netns list`` (what ``/run/netns`` holds)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _base36(n: int, width: int) -> str:
    digits = []
    for _ in range(width):
        n, r = divmod(n, 36)
        digits.append(_ALPHABET[r])
    return "".join(reversed(digits))


def unique_tag(prefix: str) -> str:
    """A short name unique to this process and call: prefix + 4 chars of PID + counter."""
    if not prefix.isalnum() or len(prefix) > 4:
        raise ValueError(f"prefix {prefix!r} must be 1-4 letters/digits")
    n = next(_counter)
    count = _base36(n, 1 if n < 36 else 2)
    return f"{prefix}{_base36(os.getpid(), 4)}{count}"


def tproxy_namespace(bridge: str) -> str:
    """The inner namespace (and inner proxy's process name) of a bridge: one_tproxy_BR."""
    return f"one_tproxy_{bridge}"


def config_yaml(
    endpoints: Iterable[tuple[int, str, int] | tuple[int, str, int, Sequence[str]]],
    debug_level: int = 3,
    **settings: object,
) -> str:
    """A DESIGN.md 2.1 config file: ``(service_port, remote_addr, remote_port[, networks])``
    per entry; ``settings`` become top-level ``:tproxy_KEY:`` lines (e.g. grace_period=1)."""
    lines = [f":tproxy_debug_level: {debug_level}"]
    lines += [f":tproxy_{key}: {value}" for key, value in settings.items()]
    lines.append(":tproxy:")
    for entry in endpoints:
        port, addr, remote_port = entry[0], entry[1], entry[2]
        lines += [
            f"- :service_port: {port}",
            f"  :remote_addr: {addr}",
            f"  :remote_port: {remote_port}",
        ]
        if len(entry) > 3:
            nets = ", ".join(str(n) for n in entry[3])  # type: ignore[misc]
            lines.append(f"  :networks: [{nets}]")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- namespaces


@define
class Namespace:
    """A network namespace under /run/netns that commands can run in (through nsenter)."""

    name: str
    """Its name in ``ip netns list``."""
    spawned: list[subprocess.Popen[bytes]] = field(factory=list, repr=False)
    """Long-running processes started in it, killed by PID at cleanup."""
    created: bool = field(default=False, repr=False)
    """True once this fixture made it (only then does a host's cleanup delete it)."""

    @property
    def path(self) -> str:
        """The bind mount that names it."""
        return os.path.join(NETNS_DIR, self.name)

    def exists(self) -> bool:
        """True while ``/run/netns/NAME`` is there."""
        return os.path.exists(self.path)

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in this namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = False,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        """Run ``argv`` in this namespace to completion; see :func:`run`."""
        return run(self.enter(argv), timeout=timeout, check=check, input=input, env=env)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | Any = subprocess.DEVNULL,
        stderr: int | Any = subprocess.DEVNULL,
        stdin: int | Any = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this namespace; its PID is the process itself (nsenter execs)."""
        proc = subprocess.Popen(
            self.enter(argv),
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        self.spawned.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> Completed:
        """``ip ARGS`` in this namespace."""
        return self.run(["ip", *args], check=check)

    def ip_json(self, *args: str) -> Any:
        """``ip -j ARGS`` in this namespace, parsed."""
        return self.run(["ip", "-j", *args], check=True).json()

    def nft(self, *args: str, check: bool = True, input: str | None = None) -> Completed:
        """``nft ARGS`` in this namespace (``input`` with ``-f -``)."""
        return self.run(["nft", *args], check=check, input=input)

    def nft_json(self) -> list[dict[str, Any]]:
        """``nft -j list ruleset`` in this namespace: the list under ``"nftables"``."""
        data = self.run(["nft", "-j", "list", "ruleset"], check=True).json()
        return list(data.get("nftables", []))

    def sysctl(self, key: str) -> str:
        """A sysctl value read in this namespace (``net.ipv4.conf.all.arp_ignore`` form)."""
        path = "/proc/sys/" + key.replace(".", "/")
        return self.run(["cat", path], check=True).stdout.strip()

    def pids(self) -> list[int]:
        """Every process living in this namespace."""
        return pids_in_netns(self.path)

    def wait_tcp(self, addr: str, port: int, timeout: float = 10.0) -> None:
        """Wait (bounded) until something accepts TCP connections on addr:port in here."""
        script = (
            "import socket,sys,time\n"
            f"end=time.monotonic()+{timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        socket.create_connection(({addr!r},{port}),timeout=1).close(); sys.exit(0)\n"
            "    except OSError as e:\n"
            "        if time.monotonic()>end: print(e); sys.exit(1)\n"
            "        time.sleep(0.02)\n"
        )
        self.run([sys.executable, "-c", script], timeout=timeout + 5, check=True)

    def kill_spawned(self) -> None:
        """Kill every process this namespace spawned (by PID) and reap it."""
        procs = [p for p in self.spawned if p.poll() is None]
        _kill_pids([p.pid for p in procs])
        for p in self.spawned:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        self.spawned.clear()

    def kill_all(self) -> None:
        """Kill every process still living in this namespace (they are the test's)."""
        _kill_pids(self.pids())

    def delete(self) -> None:
        """Kill what is inside, then ``ip netns delete`` (no error when already gone)."""
        self.kill_spawned()
        if not self.exists():
            return
        self.kill_all()
        run(["ip", "netns", "delete", self.name], check=False)
        if self.exists():  # a half-made namespace: the file without the mount
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _add_netns(ns: Namespace) -> None:
    """``ip netns add`` + lo up; the caller has already registered ``ns`` for cleanup."""
    if ns.exists():
        raise CommandError(f"namespace {ns.name} already exists: refusing to reuse it")
    run(["ip", "netns", "add", ns.name], check=True)
    ns.created = True
    ns.ip("link", "set", "lo", "up")


@define
class Guest(Namespace):
    """A guest VM: its own namespace, veth ``eth0`` into a bridge of its host."""

    host: Host | None = field(default=None, repr=False)
    """The hypervisor it is plugged into."""
    bridge: str = ""
    """The bridge its veth is a port of."""
    addr: str = ""
    """Its address in 169.254.0.0/16 (on ``eth0``, prefix /16)."""
    port: str = ""
    """The name of its veth's end in the host namespace (the bridge port)."""

    def curl(
        self,
        url: str,
        *args: str,
        timeout: float = 10.0,
        check: bool = False,
        input: bytes | str | None = None,
    ) -> Completed:
        """``curl -sS --max-time T [ARGS] URL`` from this guest (no proxy from the env)."""
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", f"{timeout:g}", *args, url]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return self.run(argv, timeout=timeout + 5, check=check, input=input, env=env)

    def client_argv(self, mode: str, port: int, size: int, rate: float = 0.0) -> list[str]:
        """``services.py upload|download`` via 169.254.16.9:PORT (``rate`` in bytes/s)."""
        target = [SERVICE_ADDRESS, str(port)] if mode == "upload" else [self.service_url(port)]
        return [sys.executable, SERVICES, mode, *target, str(size), "--rate", str(rate)]

    def upload(self, port: int, size: int, rate: float = 0.0, timeout: float = 60.0) -> Completed:
        """Send SIZE pattern bytes to 169.254.16.9:PORT, half-close, read the ``COUNT SHA256``
        reply of a sink; exit 0 only if it matches what was sent."""
        return self.run(self.client_argv("upload", port, size, rate), timeout=timeout)

    def download(self, port: int, size: int, rate: float = 0.0, timeout: float = 60.0) -> Completed:
        """GET /bytes/SIZE via 169.254.16.9:PORT; exit 0 only if count and sha256 match."""
        return self.run(self.client_argv("download", port, size, rate), timeout=timeout)

    def start_transfer(
        self, mode: str, port: int, size: int, rate: float = 0.0
    ) -> subprocess.Popen[bytes]:
        """Start an upload/download in the background; returns once it is connected
        (killed at cleanup). Collect it with ``proc.communicate(timeout=...)``."""
        proc = self.spawn(self.client_argv(mode, port, size, rate), stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"started":
            out = line + proc.stdout.read()
            raise AssertionError(f"{mode} via port {port} did not start: {out!r}")
        return proc

    def wait_serving(
        self, port: int, path: str = "/", expect: str = "", timeout: float = 15.0
    ) -> str:
        """Poll (bounded) until ``GET 169.254.16.9:PORT/PATH`` succeeds (and holds
        ``expect``); returns the body. The mesh applies ``up``/``reload`` asynchronously."""
        last: list[Completed] = []

        def fetch() -> str | None:
            done = self.curl(self.service_url(port, path), timeout=3)
            last[:] = [done]
            return done.stdout if done.ok and expect in done.stdout else None

        try:
            return str(wait_until(fetch, timeout=timeout, interval=0.1, message=f"port {port}"))
        except AssertionError:
            detail = f"{last[0].returncode} {last[0].stdout!r} {last[0].stderr!r}" if last else ""
            logs = self.host.logs() if self.host is not None else ""
            raise AssertionError(
                f"{self.name}: {SERVICE_ADDRESS}:{port}{path} not served in {timeout} s: "
                f"{detail}\n{logs}"
            ) from None

    def service_url(self, port: int, path: str = "/") -> str:
        """``http://169.254.16.9:PORT/PATH``."""
        return f"http://{SERVICE_ADDRESS}:{port}{path}"


# --------------------------------------------------------------------------- services


@define
class Server:
    """A test service (``services.py http`` or ``sink``) started in a namespace."""

    namespace: Namespace
    """Where it runs."""
    addr: str
    """Address it binds."""
    port: int
    """Port it listens on."""
    mode: str = "http"
    """``http`` (files, ``/bytes/N``, ``POST /sha256``) or ``sink`` (raw, half-close)."""
    root_dir: str = "."
    """Directory an ``http`` server serves."""
    proc: subprocess.Popen[bytes] | None = None
    """Its process while running."""

    @property
    def pid(self) -> int | None:
        """Its PID while running."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def argv(self) -> list[str]:
        """The command line that runs it."""
        argv = [sys.executable, SERVICES, self.mode, "--bind", self.addr, "--port", str(self.port)]
        return argv + (["--dir", self.root_dir] if self.mode == "http" else [])

    def start(self, timeout: float = 10.0) -> Server:
        """Start it (again) and wait (bounded) until it accepts connections."""
        if self.pid is not None:
            return self
        self.proc = self.namespace.spawn(self.argv())
        self.namespace.wait_tcp(self.addr, self.port, timeout=timeout)
        return self

    def stop(self) -> None:
        """Kill it (by PID) and wait until it is gone."""
        if self.proc is not None:
            _kill_pids([self.proc.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self.proc = None


#: Old name, kept for callers written against the first version.
HttpServer = Server


# --------------------------------------------------------------------------- hosts


class Host(Namespace):
    """A simulated hypervisor: its own network namespace, temp config/log/run dirs."""

    def __init__(self, testcase: TestCaseLike, prefix: str = "tqe") -> None:
        """Create the namespace and register its cleanup on ``testcase`` at once."""
        self.tag = unique_tag(prefix)
        super().__init__(self.tag + "h")
        self.guests: list[Guest] = []
        self.bridges: list[str] = []
        self.tmp = tempfile.mkdtemp(prefix=f"{self.tag}-")
        self.config_path = os.path.join(self.tmp, "OpenNebulaNetwork.conf")
        self.log_dir = os.path.join(self.tmp, "log")
        self.run_dir = os.path.join(self.tmp, "run")
        os.makedirs(self.log_dir)
        os.makedirs(self.run_dir)
        self.used_tproxy = False
        self.keep_tmp = False
        self._cleaned = False
        self._links = itertools.count(1)
        self._inners: dict[str, Namespace] = {}
        testcase.addCleanup(self.cleanup)
        _add_netns(self)

    # ----------------------------------------------------------------- building

    def new_bridge_name(self) -> str:
        """A fresh bridge name (prefix + tag + ``b`` + n, at most 14 characters)."""
        name = f"{self.tag}b{len(self.bridges) + 1}"
        assert len(name) <= 14, name
        return name

    def add_bridge(self, name: str | None = None) -> str:
        """Create a Linux bridge (up) in this host; returns its name."""
        name = name or self.new_bridge_name()
        if len(name) > 14:
            raise ValueError(f"bridge name {name!r} is longer than 14 characters")
        self.bridges.append(name)
        self.ip("link", "add", name, "type", "bridge")
        self.ip("link", "set", name, "up")
        return name

    def add_guest(self, bridge: str, addr: str | None = None, name: str | None = None) -> Guest:
        """A guest namespace, ``eth0`` on ``bridge`` with ``addr``/16 (default: a fresh
        169.254.x.y)."""
        if addr is None:
            n = next(_guest_counter)
            addr = f"169.254.{100 + n // 250}.{n % 250 + 1}"
        name = name or f"{self.tag}g{len(self.guests) + 1}"
        port = f"{self.tag}v{next(self._links)}"
        guest = Guest(name, host=self, bridge=bridge, addr=addr, port=port)
        self.guests.append(guest)
        _add_netns(guest)
        self.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", guest.name)
        self.ip("link", "set", port, "master", bridge)
        self.ip("link", "set", port, "up")
        guest.ip("address", "add", f"{addr}/16", "dev", "eth0")
        guest.ip("link", "set", "eth0", "up")
        return guest

    def trunk(self, bridge: str, other: Host, other_bridge: str) -> str:
        """Link ``bridge`` here and ``other_bridge`` on ``other`` with a veth; returns its name."""
        mine = f"{self.tag}t{next(self._links)}"
        theirs = f"{other.tag}t{next(other._links)}"
        self.ip("link", "add", mine, "type", "veth", "peer", "name", theirs, "netns", other.name)
        self.ip("link", "set", mine, "master", bridge)
        self.ip("link", "set", mine, "up")
        other.ip("link", "set", theirs, "master", other_bridge)
        other.ip("link", "set", theirs, "up")
        return mine

    def serve_http(
        self,
        port: int,
        root_dir: str | None = None,
        addr: str = "127.0.0.1",
        files: Mapping[str, bytes | str] | None = None,
        namespace: Namespace | None = None,
    ) -> Server:
        """An HTTP server (``services.py http``) on addr:port in this host (or in
        ``namespace``), serving ``root_dir`` (default: a temp dir holding ``files``, or
        an ``index.html`` naming the port); waits until it accepts. Killed at cleanup."""
        if root_dir is None:
            root_dir = tempfile.mkdtemp(prefix=f"www{port}-", dir=self.tmp)
            content = files if files is not None else {"index.html": f"service {port}\n"}
            for rel, data in content.items():
                path = os.path.join(root_dir, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data.encode() if isinstance(data, str) else data)
        return Server(namespace or self, addr, port, "http", root_dir).start()

    def serve_sink(
        self, port: int, addr: str = "127.0.0.1", namespace: Namespace | None = None
    ) -> Server:
        """A raw TCP sink (``services.py sink``): reads to EOF, answers ``COUNT SHA256``."""
        return Server(namespace or self, addr, port, "sink").start()

    def inner(self, bridge: str) -> Namespace:
        """The ``one_tproxy_BR`` namespace of a bridge (global; may not exist yet)."""
        if bridge not in self._inners:
            self._inners[bridge] = Namespace(tproxy_namespace(bridge))
        return self._inners[bridge]

    def build_tproxy_state(self, bridge: str, services: Mapping[int, tuple[str, int]]) -> str:
        """DESIGN.md 2.2 for ``bridge`` built BY HAND with ip/nft, as OpenNebula's Ruby
        driver would. Returns the ARP rule form the kernel took: ``"ibrname"`` or
        ``"veths"`` (the ``tproxy_veths`` fallback when ``meta ibrname`` is refused)."""
        inner = self.inner(bridge)
        if not inner.exists():
            run(["ip", "netns", "add", inner.name], check=True)
        for key in ("all", "default"):
            inner.run(["sysctl", "-q", "-w", f"net.ipv4.conf.{key}.arp_ignore=0"], check=True)
        a, b = f"{bridge}a", f"{bridge}b"
        self.ip("link", "add", b, "type", "veth", "peer", "name", a)
        self.ip("link", "set", a, "netns", inner.name)
        self.ip("link", "set", b, "master", bridge)
        self.ip("link", "set", b, "up")
        inner.ip("address", "add", f"{SERVICE_ADDRESS}/32", "dev", a)
        inner.ip("link", "set", a, "up")
        inner.ip("route", "replace", "default", "dev", a, "scope", "link")
        self.set_service_map(bridge, services)
        return self._add_arp_rule(bridge)

    def set_service_map(self, bridge: str, services: Mapping[int, tuple[str, int]]) -> None:
        """(Re)write map ``ep_BR`` of table ``ip one_tproxy`` to hold exactly ``services``."""
        elements = ", ".join(f"{p} : {a} . {rp}" for p, (a, rp) in services.items())
        script = (
            "add table ip one_tproxy\n"
            f"add map ip one_tproxy ep_{bridge} "
            "{ type inet_service : ipv4_addr . inet_service; }\n"
            f"flush map ip one_tproxy ep_{bridge}\n"
        )
        if elements:
            script += f"add element ip one_tproxy ep_{bridge} {{ {elements} }}\n"
        self.nft("-f", "-", input=script)

    def _add_arp_rule(self, bridge: str) -> str:
        chain = (
            "add table bridge one_tproxy\n"
            f"add chain bridge one_tproxy ch_{bridge} "
            "{ type filter hook forward priority filter; policy accept; }\n"
        )
        first = chain + (
            f'add rule bridge one_tproxy ch_{bridge} meta ibrname "{bridge}" '
            f'oifname != "{bridge}b" arp operation request arp daddr ip {SERVICE_ADDRESS} drop\n'
        )
        if self.nft("-f", "-", input=first, check=False).ok:
            return "ibrname"
        fallback = chain + (
            "add set bridge one_tproxy tproxy_veths { type ifname; }\n"
            f'add element bridge one_tproxy tproxy_veths {{ "{bridge}b" }}\n'
            f"add rule bridge one_tproxy ch_{bridge} oifname != @tproxy_veths "
            f"arp operation request arp daddr ip {SERVICE_ADDRESS} drop\n"
        )
        self.nft("-f", "-", input=fallback)
        return "veths"

    def remove_tproxy_state(self, bridge: str) -> None:
        """Undo :meth:`build_tproxy_state` by hand (each piece only if present)."""
        self.nft("delete", "map", "ip", "one_tproxy", f"ep_{bridge}", check=False)
        self.nft("delete", "chain", "bridge", "one_tproxy", f"ch_{bridge}", check=False)
        self.nft(
            "delete",
            "element",
            "bridge",
            "one_tproxy",
            "tproxy_veths",
            f'{{ "{bridge}b" }}',
            check=False,
        )
        self.ip("link", "delete", f"{bridge}b", check=False)
        self.inner(bridge).delete()

    # ----------------------------------------------------------------- the product

    @property
    def env(self) -> dict[str, str]:
        """The environment for ``one-tproxy`` here: ours (PYTHONPATH kept) + ONE_TPROXY_*."""
        env = dict(os.environ)
        env["ONE_TPROXY_CONFIG"] = self.config_path
        env["ONE_TPROXY_LOG_DIR"] = self.log_dir
        env["ONE_TPROXY_RUN_DIR"] = self.run_dir
        if "PYTHONPATH" not in env and os.path.isdir(os.path.join(_REPO, "tproxy")):
            env["PYTHONPATH"] = _REPO
        return env

    def write_config(self, text: str) -> str:
        """Write the config file this host's ``one-tproxy`` reads; returns its path."""
        with open(self.config_path, "w") as f:
            f.write(text)
        return self.config_path

    def tproxy_argv(self, *argv: str) -> list[str]:
        """``[python, -m, tproxy, *argv]``."""
        return [sys.executable, "-m", "tproxy", *argv]

    def tproxy(self, *argv: str, timeout: float = 60.0, check: bool = False) -> Completed:
        """Run ``one-tproxy ARGV`` in this host (env from :attr:`env`) to completion."""
        self.used_tproxy = True
        return self.run(self.tproxy_argv(*argv), timeout=timeout, check=check, env=self.env)

    def up(
        self,
        bridge: str,
        network: str | None = None,
        network_id: str | None = None,
        check: bool = True,
    ) -> Completed:
        """``one-tproxy up BR [--network N] [--network-id I]`` here (the real driver)."""
        if bridge not in self.bridges:
            self.bridges.append(bridge)  # so cleanup removes its one_tproxy_BR namespace
        argv = ["up", bridge]
        if network is not None:
            argv += ["--network", network]
        if network_id is not None:
            argv += ["--network-id", network_id]
        return self._checked(self.tproxy(*argv), check)

    def down(self, bridge: str, check: bool = True) -> Completed:
        """``one-tproxy down BR`` here (the real driver)."""
        return self._checked(self.tproxy("down", bridge), check)

    def status(self) -> tuple[int, dict[str, int]]:
        """``one-tproxy status`` here: its exit status and ``{process name: PID}``."""
        done = self.tproxy("status")
        found = {}
        for line in done.stdout.splitlines():
            name, _, pid = line.partition(": ")
            if pid.strip().isdigit():
                found[name] = int(pid)
        return done.returncode, found

    def _checked(self, done: Completed, check: bool) -> Completed:
        if check and not done.ok:
            raise CommandError(
                f"{done.argv[-2:]} failed:\n{done.stdout}{done.stderr}\n{self.logs()}"
            )
        return done

    def log(self, name: str = "one_tproxy") -> str:
        """The text of ``LOG_DIR/NAME.log`` ("" when absent)."""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        """Every log of this host, each headed by its file name (for failure messages)."""
        parts = []
        for entry in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            parts.append(f"--- {entry}\n{self.log(entry.removesuffix('.log'))}")
        return "\n".join(parts)

    def proxies(self) -> dict[str, int]:
        """Proxy processes of this host: ``{"one_tproxy": PID, "one_tproxy_BR": PID, ...}``,
        found as the product finds them (cmdline, scoped by network namespace)."""
        found: dict[str, int] = {}
        for pid in self.pids():
            if process_name(pid) == "one_tproxy" and is_alive(pid):
                found["one_tproxy"] = pid
        for bridge in self.bridges:
            name = tproxy_namespace(bridge)
            for pid in self.inner(bridge).pids():
                if process_name(pid) == name and is_alive(pid):
                    found[name] = pid
        return found

    def product_pids(self) -> list[int]:
        """Every live process in this host's namespace and its bridges' inner namespaces
        that the fixture did not spawn itself: the proxies and whatever they started."""
        ours = {p.pid for ns in (self, *self.guests, *self._inners.values()) for p in ns.spawned}
        namespaces = [self, *(self.inner(b) for b in self.bridges)]
        return sorted(
            pid for ns in namespaces for pid in ns.pids() if pid not in ours and is_alive(pid)
        )

    # ----------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """Undo everything (ordered, every step attempted); idempotent. Raises at the
        end if something could not be removed."""
        if self._cleaned:
            return
        self._cleaned = True
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # every step runs whatever the others did
                errors.append(f"{what}: {e}")

        if self.used_tproxy and self.created and self.exists():
            step("one-tproxy stop", lambda: self.tproxy("stop", timeout=20))
        # Inner namespaces carry our unique bridge names: ours whoever made them.
        inners = [self.inner(b) for b in self.bridges]
        made = [ns for ns in (self, *self.guests) if ns.created]
        everyone: list[Namespace] = [*made, *inners]
        for ns in everyone:
            step(f"kill spawned in {ns.name}", ns.kill_spawned)
        for ns in everyone:
            step(f"kill processes in {ns.name}", ns.kill_all)
        for ns in [*inners, *reversed(made)]:
            step(f"delete {ns.name}", ns.delete)
        for ns in everyone:
            if ns.exists():
                errors.append(f"namespace {ns.name} is still there")
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise CommandError("cleanup of " + self.name + " failed:\n" + "\n".join(errors))


__all__ = [
    "SERVICE_ADDRESS",
    "CommandError",
    "Completed",
    "Guest",
    "Host",
    "HttpServer",
    "Namespace",
    "SERVICES",
    "Server",
    "config_yaml",
    "is_alive",
    "missing_requirement",
    "netns_names",
    "pids_in_netns",
    "process_name",
    "require_root",
    "run",
    "tproxy_namespace",
    "unique_tag",
    "wait_until",
]
