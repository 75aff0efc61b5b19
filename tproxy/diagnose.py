"""``one-tproxy check``: why can't a guest reach its service? One verdict per thing that must hold.

Theory of operation. :func:`diagnose` walks, for every bridge that has a map
``ep_BR`` (or the one bridge asked for), what DESIGN.md 2.2 and 2.4 require,
in the order a packet needs it, and yields one :class:`Finding` per check:

1. the root proxy runs (in this network namespace);
2. namespace ``one_tproxy_BR`` exists;
3. ``BRb`` is a veth, a port of bridge ``BR``, and up;
4. ``BRa`` is a veth in the namespace, up, with ``169.254.16.9/32``;
5. the namespace's default route is ``dev BRa scope link``;
6. ``arp_ignore`` is 0 in the namespace (``all`` and ``default``);
7. chain ``ch_BR`` of table ``bridge one_tproxy`` holds the ARP rule;
8. the inner proxy ``one_tproxy_BR`` runs in that namespace;

and for each service port of the bridge's map:

9. the inner proxy listens on ``169.254.16.9:PORT`` (its ``/proc/PID/net/tcp``);
10. a TCP connection to the mapped destination succeeds now, from this
    namespace (where the root proxy connects from), with the time it took.

Every edge is a parameter (:class:`Edges`): netlink, the nftables reader, the
process finder, the listening-socket reader and the connector; nothing here
changes anything.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Protocol

from attrs import frozen

from tproxy.model import SERVICE_ADDRESS, Destination, namespace_name

RT_SCOPE_LINK = 253
#: Seconds the destination check waits for a TCP connection.
CONNECT_TIMEOUT = 3.0

OK_MARK = "\u2713"
FAIL_MARK = "\u2717"


@frozen
class Finding:
    """One verdict of ``check``."""

    ok: bool
    """Whether this requirement holds."""
    what: str
    """What was checked, e.g. ``namespace one_tproxy_br0``."""
    detail: str = ""
    """Why it failed, or a measure when it passed (e.g. the connect time)."""
    bridge: str | None = None
    """The bridge it concerns (None: the host)."""
    port: int | None = None
    """The service port it concerns, if any."""

    def line(self) -> str:
        """``BR port P: ✓ what: detail`` (one line)."""
        where = ""
        if self.bridge is not None:
            where = self.bridge + (f" port {self.port}" if self.port is not None else "") + ": "
        mark = OK_MARK if self.ok else FAIL_MARK
        tail = f": {self.detail}" if self.detail else ""
        return f"{where}{mark} {self.what}{tail}"


class LinkInfo(Protocol):
    """What is read of a network interface (``tproxy.netlink.Link``)."""

    @property
    def index(self) -> int: ...
    @property
    def kind(self) -> str | None: ...
    @property
    def up(self) -> bool: ...
    @property
    def master(self) -> int | None: ...


class NetReader(Protocol):
    """The read side of ``tproxy.netlink.NetEdge``."""

    def namespace_exists(self, name: str) -> bool: ...
    def link(self, name: str, netns: str | None = None) -> LinkInfo | None: ...
    def addresses(self, name: str, netns: str | None = None) -> list[tuple[str, int]]: ...
    def default_routes(self, netns: str | None = None) -> list[tuple[int, int]]: ...
    def get_sysctl(self, netns: str, key: str) -> str: ...


class NftReader(Protocol):
    """The read side of ``tproxy.nft.Nftables``."""

    def read_service_maps(self) -> Mapping[str, Mapping[int, Destination]]: ...
    def arp_rule_state(self, bridge: str) -> tuple[object | None, bool]: ...


@frozen
class ConnectResult:
    """The outcome of one TCP connection attempt."""

    ok: bool
    seconds: float
    error: str = ""


@frozen
class Edges:
    """Everything ``check`` reads the world through (tests hand fakes)."""

    net: NetReader
    nft: NftReader
    root_pid: Callable[[], int | None]
    """The root proxy of this host, or None."""
    inner_pids: Callable[[], Mapping[str, tuple[int, ...]]]
    """Bridge -> PIDs of its inner proxies (in its namespace)."""
    listeners: Callable[[int], set[tuple[str, int]]]
    """PID -> (IPv4 address, port) of the TCP sockets listening in its namespace."""
    connect: Callable[[Destination, float], ConnectResult]
    """Try a TCP connection now with a timeout."""
    listen_errors: Callable[[str], Mapping[int, str]] = lambda bridge: {}  # noqa: E731
    """Bridge -> port -> why its inner proxy cannot bind it (from the root's status)."""


# ---------------------------------------------------------------- the real edges


def parse_proc_net_tcp(
    text: str, inodes: Collection[int] | None = None
) -> set[tuple[str, int]]:
    """(address, port) of every LISTEN socket in a ``/proc/.../net/tcp`` text
    (only the sockets with one of ``inodes``, when given)."""
    found: set[tuple[str, int]] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":
            continue
        try:
            if inodes is not None and (len(fields) < 10 or int(fields[9]) not in inodes):
                continue
            addr_hex, port_hex = fields[1].split(":")
            packed = int(addr_hex, 16).to_bytes(4, "little")
            found.add((socket.inet_ntoa(packed), int(port_hex, 16)))
        except (ValueError, OSError):
            continue
    return found


def socket_inodes(pid: int, proc_dir: str = "/proc") -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    fd_dir = f"{proc_dir}/{pid}/fd"
    found: set[int] = set()
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target.endswith("]"):
            found.add(int(target[8:-1]))
    return found


def proc_listeners(pid: int, proc_dir: str = "/proc") -> set[tuple[str, int]]:
    """The listening IPv4 TCP sockets that process ``pid`` itself holds (read in its
    network namespace's table, no setns needed; another program's listener there
    does not count)."""
    inodes = socket_inodes(pid, proc_dir)
    with open(f"{proc_dir}/{pid}/net/tcp") as f:
        return parse_proc_net_tcp(f.read(), inodes)


def describe_os_error(err: int | None, fallback: str = "") -> str:
    """The words ``check`` uses for a failed connect."""
    if err == errno.ECONNREFUSED:
        return "connection refused (is the service running?)"
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to the destination"
    if err == errno.ETIMEDOUT:
        return "timed out"
    return fallback or (errno.errorcode.get(err or 0, "error"))


def tcp_connect(dest: Destination, timeout: float) -> ConnectResult:
    """Open (and close) a TCP connection to ``dest`` from this namespace."""
    start = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((dest.addr, dest.port))
    except TimeoutError:
        return ConnectResult(False, time.monotonic() - start, f"timed out after {timeout:g} s")
    except OSError as e:
        return ConnectResult(
            False, time.monotonic() - start, describe_os_error(e.errno, e.strerror or str(e))
        )
    finally:
        sock.close()
    return ConnectResult(True, time.monotonic() - start)


# ---------------------------------------------------------------- the checks


def _try(what: str, bridge: str | None, fn: Callable[[], Finding]) -> Finding:
    try:
        return fn()
    except Exception as e:
        return Finding(False, what, f"cannot tell: {e}", bridge)


def _bridge_checks(bridge: str, edges: Edges) -> Iterator[Finding]:
    net = edges.net
    ns = namespace_name(bridge)
    a_name, b_name = f"{bridge}a", f"{bridge}b"

    def namespace() -> Finding:
        ok = net.namespace_exists(ns)
        return Finding(ok, f"namespace {ns}", "" if ok else "missing (run one-tproxy up)", bridge)

    f = _try(f"namespace {ns}", bridge, namespace)
    yield f
    have_ns = f.ok

    def outer() -> Finding:
        what = f"veth {b_name} on bridge {bridge}"
        br = net.link(bridge)
        b = net.link(b_name)
        if br is None:
            return Finding(False, what, f"bridge {bridge} does not exist", bridge)
        if b is None:
            return Finding(False, what, f"{b_name} is missing", bridge)
        if b.kind != "veth":
            return Finding(False, what, f"{b_name} is not a veth (kind {b.kind})", bridge)
        if b.master != br.index:
            return Finding(False, what, f"{b_name} is not a port of {bridge}", bridge)
        if not b.up:
            return Finding(False, what, f"{b_name} is down", bridge)
        return Finding(True, what, "port of the bridge, up", bridge)

    yield _try(f"veth {b_name}", bridge, outer)

    def inner_veth() -> Finding:
        what = f"veth {a_name} in {ns}"
        a = net.link(a_name, ns)
        if a is None:
            return Finding(False, what, f"{a_name} is missing in {ns}", bridge)
        if not a.up:
            return Finding(False, what, f"{a_name} is down", bridge)
        addrs = net.addresses(a_name, ns)
        if (SERVICE_ADDRESS, 32) not in addrs:
            have = ", ".join(f"{x}/{n}" for x, n in addrs) or "none"
            return Finding(False, what, f"{a_name} lacks {SERVICE_ADDRESS}/32 (has {have})", bridge)
        return Finding(True, what, f"up, {SERVICE_ADDRESS}/32", bridge)

    def route() -> Finding:
        what = f"route default dev {a_name} scope link in {ns}"
        a = net.link(a_name, ns)
        routes = net.default_routes(ns)
        if a is not None and (a.index, RT_SCOPE_LINK) in routes:
            return Finding(True, what, "", bridge)
        if not routes:
            return Finding(False, what, "no default route", bridge)
        return Finding(False, what, f"the default route is not via {a_name} scope link", bridge)

    def arp_ignore() -> Finding:
        what = f"arp_ignore 0 in {ns}"
        bad = []
        for key in ("net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.default.arp_ignore"):
            value = net.get_sysctl(ns, key).strip()
            if value != "0":
                bad.append(f"{key}={value}")
        return Finding(not bad, what, ", ".join(bad), bridge)

    if have_ns:
        yield _try(f"veth {a_name} in {ns}", bridge, inner_veth)
        yield _try(f"route in {ns}", bridge, route)
        yield _try(f"arp_ignore in {ns}", bridge, arp_ignore)
    else:
        for what in (f"veth {a_name} in {ns}", f"route in {ns}", f"arp_ignore in {ns}"):
            yield Finding(False, what, f"namespace {ns} is missing", bridge)

    def arp_rule() -> Finding:
        what = f"ARP rule in bridge one_tproxy chain ch_{bridge}"
        form, in_set = edges.nft.arp_rule_state(bridge)
        value = getattr(form, "value", form)
        if value is None:
            return Finding(False, what, "missing (or not exactly our one rule)", bridge)
        if value == "fallback" and not in_set:
            return Finding(
                False, what, f"fallback rule, but {b_name} not in set tproxy_veths", bridge
            )
        return Finding(True, what, f"{value} form", bridge)

    yield _try(f"ARP rule ch_{bridge}", bridge, arp_rule)


def _port_checks(
    bridge: str,
    services: Mapping[int, Destination],
    inner_pid: int | None,
    edges: Edges,
    timeout: float,
) -> Iterator[Finding]:
    listening: set[tuple[str, int]] | None = None
    listen_error = ""
    if inner_pid is not None:
        try:
            listening = edges.listeners(inner_pid)
        except OSError as e:
            listen_error = f"cannot read its sockets: {e.strerror or e}"
    for port in sorted(services):
        dest = services[port]
        what = f"listening on {SERVICE_ADDRESS}:{port}"
        if inner_pid is None:
            yield Finding(False, what, "the inner proxy does not run", bridge, port)
        elif listening is None:
            yield Finding(False, what, listen_error, bridge, port)
        elif (SERVICE_ADDRESS, port) in listening or ("0.0.0.0", port) in listening:
            yield Finding(True, what, f"pid {inner_pid}", bridge, port)
        else:
            why = "the inner proxy does not listen on it"
            try:
                error = edges.listen_errors(bridge).get(port)
            except Exception:
                error = None
            if error:
                why += f" (cannot bind: {error}; it keeps retrying)"
            yield Finding(False, what, why, bridge, port)
        what = f"destination {dest}"
        try:
            result = edges.connect(dest, timeout)
        except Exception as e:
            yield Finding(False, what, f"cannot tell: {e}", bridge, port)
            continue
        ms = f"{result.seconds * 1000:.1f} ms"
        if result.ok:
            yield Finding(True, what, f"connected in {ms}", bridge, port)
        else:
            yield Finding(False, what, result.error, bridge, port)


def status_listen_errors(status: Mapping[str, Any], bridge: str) -> dict[int, str]:
    """Port -> the bind error the status document reports for ``bridge`` (``listen_error``)."""
    ports = ((status.get("bridges") or {}).get(bridge) or {}).get("ports") or {}
    return {
        int(port): str(entry["listen_error"])
        for port, entry in ports.items()
        if isinstance(entry, Mapping) and entry.get("listen_error")
    }


def diagnose(
    edges: Edges, bridge: str | None = None, timeout: float = CONNECT_TIMEOUT
) -> Iterator[Finding]:
    """Every finding of ``check`` for ``bridge`` (or every bridge with a map), in order."""
    root = edges.root_pid()
    yield Finding(
        root is not None,
        "root proxy one_tproxy",
        f"runs (pid {root})" if root is not None else "not running (one-tproxy start)",
    )
    try:
        maps = edges.nft.read_service_maps()
    except Exception as e:
        yield Finding(False, "service maps in table ip one_tproxy", f"cannot read: {e}")
        return
    if bridge is not None:
        bridges: Iterable[str] = [bridge]
        if bridge not in maps:
            yield Finding(
                False,
                f"map ep_{bridge} in table ip one_tproxy",
                "missing (run one-tproxy up)",
                bridge,
            )
    else:
        bridges = sorted(maps)
        if not maps:
            yield Finding(False, "service maps in table ip one_tproxy", "none: no bridge is set up")
            return
    try:
        inners = edges.inner_pids()
    except Exception as e:
        inners = {}
        yield Finding(False, "inner proxies", f"cannot list them: {e}")
    for br in bridges:
        yield from _bridge_checks(br, edges)
        pids = inners.get(br, ())
        ns = namespace_name(br)
        if pids:
            yield Finding(True, f"inner proxy {ns}", f"runs (pid {pids[0]})", br)
        else:
            yield Finding(False, f"inner proxy {ns}", "not running", br)
        yield from _port_checks(br, maps.get(br, {}), pids[0] if pids else None, edges, timeout)


def report(findings: Iterable[Finding], out: Callable[[str], None]) -> bool:
    """Print one line per finding; True when every one passed."""
    ok = True
    for f in findings:
        out(f.line())
        ok = ok and f.ok
    return ok
