"""The netlink edge: the only module that imports pyroute2.

A narrow, synchronous interface over links, addresses, routes, network
namespaces and per-namespace sysctls, for the command-line driver
(``one-tproxy up/down``). pyroute2 0.9's sync API runs its own asyncio loop
and checks the calling thread, so this is meant for the CLI (or one dedicated
thread), never for a running Twisted reactor's callbacks.

Every operation names its namespace: ``netns=None`` is the caller's own (the
hypervisor's), a string is a named namespace under ``/run/netns``. Named
namespaces are *never* created implicitly (pyroute2 would by default). Kernel
errors come out as :class:`NetlinkError` subclasses chosen by errno, each
saying what was being done.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from attrs import frozen

T = TypeVar("T")

NETNS_DIR = "/run/netns"
#: RTPROT_BOOT: what ``ip route add`` uses (and so what ``ip route`` does not print).
RTPROT_BOOT = 3
RT_SCOPE_LINK = 253
IFF_UP = 1

_SYSCTL_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


class NetlinkError(Exception):
    """A netlink (or namespace) operation failed; ``errno`` is the kernel's error number."""

    def __init__(self, what: str, err: int | None = None, detail: str | None = None) -> None:
        self.errno = err
        self.what = what
        reason = detail or (os.strerror(err) if err else "failed")
        super().__init__(f"{what}: {reason}")


class NotFoundError(NetlinkError):
    """The link, namespace or address named does not exist (ENODEV/ENOENT)."""


class ExistsError(NetlinkError):
    """The object to create exists already (EEXIST)."""


class BusyError(NetlinkError):
    """The object is in use (EBUSY)."""


class NotPermittedError(NetlinkError):
    """Not allowed (EPERM/EACCES): the driver must run as root."""


class NotSupportedError(NetlinkError):
    """The kernel does not support the operation (EOPNOTSUPP)."""


_ERRNO_CLASSES: dict[int, type[NetlinkError]] = {
    errno.ENODEV: NotFoundError,
    errno.ENOENT: NotFoundError,
    errno.EADDRNOTAVAIL: NotFoundError,
    errno.ESRCH: NotFoundError,
    errno.EEXIST: ExistsError,
    errno.EBUSY: BusyError,
    errno.EPERM: NotPermittedError,
    errno.EACCES: NotPermittedError,
    errno.EOPNOTSUPP: NotSupportedError,
}


def error_for(what: str, err: int | None, detail: str | None = None) -> NetlinkError:
    """The exception class of an errno, carrying what was being done."""
    cls = _ERRNO_CLASSES.get(err or 0, NetlinkError)
    return cls(what, err, detail)


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn pyroute2's and the OS's errors into ours."""
    from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

    try:
        yield
    except NetlinkError:
        raise
    except PyrNetlinkError as e:
        raise error_for(what, e.code, None) from e
    except OSError as e:
        raise error_for(what, e.errno, e.strerror) from e


@frozen
class Link:
    """What the driver needs to know about one network interface."""

    index: int
    """ifindex in its namespace."""
    name: str
    """Interface name."""
    kind: str | None
    """Link kind (``veth``, ``bridge``, ...), None for a plain device."""
    up: bool
    """Administratively up (IFF_UP)."""
    master: int | None
    """ifindex of the bridge it is a port of, if any."""
    peer: int | None
    """For a veth: the ifindex of its peer (in the peer's namespace)."""
    address: str | None = None
    """Its MAC address (``aa:bb:...``), when it has one."""


class NetEdge(Protocol):
    """What the driver needs from netlink; :class:`Netlink` is the real one."""

    def namespace_exists(self, name: str) -> bool: ...

    def create_namespace(self, name: str) -> None: ...

    def remove_namespace(self, name: str) -> None: ...

    def link(self, name: str, netns: str | None = None) -> Link | None: ...

    def create_veth(self, name: str, peer: str) -> None: ...

    def delete_link(self, name: str, netns: str | None = None) -> None: ...

    def set_master(self, name: str, master: str) -> None: ...

    def set_up(self, name: str, netns: str | None = None) -> None: ...

    def move_to_namespace(self, name: str, netns: str) -> None: ...

    def addresses(self, name: str, netns: str | None = None) -> list[tuple[str, int]]: ...

    def add_address(
        self, name: str, address: str, prefixlen: int, netns: str | None = None
    ) -> None: ...

    def default_routes(self, netns: str | None = None) -> list[tuple[int, int]]: ...

    def replace_default_route(self, name: str, netns: str | None = None) -> None: ...

    def get_sysctl(self, netns: str, key: str) -> str: ...

    def set_sysctl(self, netns: str, key: str, value: str) -> None: ...

    def close(self) -> None: ...


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"{name!r} cannot name a network namespace")
    return name


def sysctl_path(key: str) -> str:
    """``net.ipv4.conf.all.arp_ignore`` -> ``/proc/sys/net/ipv4/conf/all/arp_ignore``."""
    if not _SYSCTL_RE.match(key):
        raise ValueError(f"{key!r} is not a sysctl key")
    return "/proc/sys/" + key.replace(".", "/")


def run_in_netns(name: str, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Call ``fn`` in a short-lived thread switched into namespace ``name``.

    ``setns(2)`` switches only the calling thread, so the caller's own
    namespace is never touched. The namespace must exist (never created here).
    """
    from pyroute2 import netns as pyr_netns

    _check_name(name)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            pyr_netns.setns(name, flags=0)
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NetlinkError(f"work inside namespace {name}", errno.ETIMEDOUT)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class Netlink:
    """The real netlink edge (pyroute2 ``IPRoute`` sockets, one per namespace used)."""

    def __init__(self) -> None:
        self._sockets: dict[str | None, Any] = {}

    # -- plumbing

    def _ipr(self, netns: str | None) -> Any:
        sock = self._sockets.get(netns)
        if sock is None:
            from pyroute2 import IPRoute

            if netns is None:
                with _mapped("open a netlink socket"):
                    sock = IPRoute()
            else:
                _check_name(netns)
                if not self.namespace_exists(netns):
                    raise NotFoundError(f"namespace {netns}", errno.ENOENT)
                with _mapped(f"open a netlink socket in namespace {netns}"):
                    sock = IPRoute(netns=netns, flags=0)
            self._sockets[netns] = sock
        return sock

    def _index(self, name: str, netns: str | None) -> int:
        link = self.link(name, netns)
        if link is None:
            raise NotFoundError(f"link {name}{_where(netns)}", errno.ENODEV)
        return link.index

    def close(self) -> None:
        """Close every netlink socket opened so far."""
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def _forget(self, netns: str) -> None:
        sock = self._sockets.pop(netns, None)
        if sock is not None:
            sock.close()

    # -- namespaces

    def namespace_exists(self, name: str) -> bool:
        """Whether ``/run/netns/NAME`` is a namespace (a bind mount, not a stale file)."""
        return os.path.ismount(os.path.join(NETNS_DIR, _check_name(name)))

    def create_namespace(self, name: str) -> None:
        """Create ``/run/netns/NAME`` as ``ip netns add`` does; ExistsError if it exists.

        A stale file of that name (what a crash between creating the mount point
        and mounting it leaves) names no namespace: it is removed first.
        """
        from pyroute2 import netns as pyr_netns

        if self.namespace_exists(name):
            raise ExistsError(f"create namespace {name}", errno.EEXIST)
        path = os.path.join(NETNS_DIR, name)
        with _mapped(f"create namespace {name}"):
            if os.path.lexists(path):
                os.unlink(path)
            pyr_netns.create(name)
        if not self.namespace_exists(name):
            raise NetlinkError(f"create namespace {name}", None, "it did not appear")

    def remove_namespace(self, name: str) -> None:
        """Unmount and remove ``/run/netns/NAME`` (its links go with the namespace)."""
        from pyroute2 import netns as pyr_netns

        _check_name(name)
        self._forget(name)
        with _mapped(f"remove namespace {name}"):
            pyr_netns.remove(name)

    # -- links

    def link(self, name: str, netns: str | None = None) -> Link | None:
        """The link called ``name`` in that namespace, or None."""
        ipr = self._ipr(netns)
        with _mapped(f"look up link {name}{_where(netns)}"):
            found = ipr.link_lookup(ifname=name)
            if not found:
                return None
            (msg,) = ipr.get_links(found[0])
        info = msg.get("IFLA_LINKINFO")
        return Link(
            index=msg["index"],
            name=msg.get("IFLA_IFNAME"),
            kind=info.get("IFLA_INFO_KIND") if info is not None else None,
            up=bool(msg["flags"] & IFF_UP),
            master=msg.get("IFLA_MASTER"),
            peer=msg.get("IFLA_LINK"),
            address=msg.get("IFLA_ADDRESS"),
        )

    def create_veth(self, name: str, peer: str) -> None:
        """Create veth ``name`` with its peer ``peer``, both in the caller's namespace."""
        ipr = self._ipr(None)
        with _mapped(f"create veth pair {name}/{peer}"):
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})

    def delete_link(self, name: str, netns: str | None = None) -> None:
        """Delete a link (a veth takes its peer along)."""
        index = self._index(name, netns)
        with _mapped(f"delete link {name}{_where(netns)}"):
            self._ipr(netns).link("del", index=index)

    def set_master(self, name: str, master: str) -> None:
        """Make ``name`` a port of bridge ``master`` (caller's namespace)."""
        index = self._index(name, None)
        bridge = self._index(master, None)
        with _mapped(f"attach {name} to bridge {master}"):
            self._ipr(None).link("set", index=index, master=bridge)

    def set_up(self, name: str, netns: str | None = None) -> None:
        """Set a link administratively up."""
        index = self._index(name, netns)
        with _mapped(f"set link {name}{_where(netns)} up"):
            self._ipr(netns).link("set", index=index, state="up")

    def move_to_namespace(self, name: str, netns: str) -> None:
        """Move a link of the caller's namespace into namespace ``netns``."""
        index = self._index(name, None)
        if not self.namespace_exists(netns):
            raise NotFoundError(f"namespace {netns}", errno.ENOENT)
        with _mapped(f"move link {name} into namespace {netns}"):
            self._ipr(None).link("set", index=index, net_ns_fd=netns)

    # -- addresses and routes

    def addresses(self, name: str, netns: str | None = None) -> list[tuple[str, int]]:
        """The IPv4 addresses of a link as (address, prefix length)."""
        index = self._index(name, netns)
        with _mapped(f"list addresses of {name}{_where(netns)}"):
            msgs = self._ipr(netns).get_addr(family=2, index=index)
        return [(m.get("IFA_ADDRESS"), m["prefixlen"]) for m in msgs]

    def add_address(
        self, name: str, address: str, prefixlen: int, netns: str | None = None
    ) -> None:
        """Add an IPv4 address to a link."""
        index = self._index(name, netns)
        with _mapped(f"add address {address}/{prefixlen} to {name}{_where(netns)}"):
            self._ipr(netns).addr("add", index=index, address=address, prefixlen=prefixlen)

    def default_routes(self, netns: str | None = None) -> list[tuple[int, int]]:
        """IPv4 default routes of the main table as (output ifindex, scope)."""
        with _mapped(f"list routes{_where(netns)}"):
            msgs = self._ipr(netns).get_routes(family=2, table=254)
        return [(m.get("RTA_OIF"), m["scope"]) for m in msgs if m["dst_len"] == 0]

    def replace_default_route(self, name: str, netns: str | None = None) -> None:
        """``ip route replace default dev NAME`` (scope link, protocol boot)."""
        index = self._index(name, netns)
        with _mapped(f"set the default route via {name}{_where(netns)}"):
            self._ipr(netns).route(
                "replace",
                dst="0.0.0.0/0",
                oif=index,
                scope=RT_SCOPE_LINK,
                proto=RTPROT_BOOT,
            )

    # -- sysctls inside a namespace

    def get_sysctl(self, netns: str, key: str) -> str:
        """Read a sysctl as seen from inside namespace ``netns``."""
        path = sysctl_path(key)

        def read() -> str:
            with open(path) as f:
                return f.read().strip()

        with _mapped(f"read {key} in namespace {netns}"):
            return run_in_netns(netns, read)

    def set_sysctl(self, netns: str, key: str, value: str) -> None:
        """Write a sysctl inside namespace ``netns`` (from a thread that entered it)."""
        path = sysctl_path(key)

        def write() -> None:
            with open(path, "w") as f:
                f.write(value)

        with _mapped(f"set {key}={value} in namespace {netns}"):
            run_in_netns(netns, write)


def _where(netns: str | None) -> str:
    return f" in namespace {netns}" if netns else ""
