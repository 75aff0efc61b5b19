"""The driver: build and remove one bridge's host state (DESIGN.md 2.2).

``up`` and ``down`` take their two system edges as parameters (a
:class:`tproxy.netlink.NetEdge` and a :class:`tproxy.nft.NftEdge`), so the
step-by-step logic is tested with fakes and the edges with the real kernel.

Theory of operation:

* Everything happens under one exclusive lock (``flock`` on
  ``RUN_DIR/one_tproxy.driver.lock``), for every bridge: steps of different
  bridges share the nftables tables (``down`` deletes a table its removal left
  empty), so they must not interleave. Each ``up``/``down`` takes a fraction of
  a second, so serialising them costs little.
* ``up`` first *inspects* everything and refuses, changing nothing, when the
  state is one it cannot fix (no such bridge, ``BRb`` not a veth, a veth pair
  that is not ours, ...). Then it performs only the steps whose result is not
  already there, in the order of DESIGN.md 2.2 / issue 5, and returns the list
  of what it changed: a second ``up`` returns ``[]`` and changes nothing.
  When a step fails, the veth pair and the namespace that this ``up`` created
  are removed again (best effort), so a failed first ``up`` leaves no
  half-built bridge; what existed before is left as it was.
* ``down`` removes, each only if present: map ``ep_BR``, chain ``ch_BR``
  (and ``guard_BR``), ``BRb`` from ``tproxy_veths``, the veth pair, the
  namespace; tables its removal leaves empty go too. On a clean host it does
  nothing and succeeds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from twisted.logger import Logger

from tproxy.model import (
    SERVICE_ADDRESS,
    Destination,
    InvalidBridgeNameError,
    check_bridge_name,
    namespace_name,
)
from tproxy.netlink import Link, NetEdge, NetlinkError
from tproxy.nft import NftEdge, NftError

log = Logger(namespace="tproxy.driver")

LOCK_NAME = "one_tproxy.driver.lock"
#: How long ``up``/``down`` wait for another one to finish before giving up.
LOCK_TIMEOUT = 60.0
#: Sysctls set to 0 inside the namespace *before* ``BRa`` moves in.
ARP_SYSCTLS = ("net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.default.arp_ignore")
SERVICE_PREFIXLEN = 32
_RT_SCOPE_LINK = 253


class DriverError(Exception):
    """``up``/``down`` cannot do their job; the message says why, for an administrator."""


def veth_names(bridge: str) -> tuple[str, str]:
    """(``BRa``, ``BRb``): the namespace end and the bridge-port end of the veth pair."""
    return bridge + "a", bridge + "b"


@contextmanager
def driver_lock(
    run_dir: str,
    timeout: float = LOCK_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold the driver's exclusive lock (``flock``) for the duration of the block."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DriverError(f"cannot open the driver lock {path}: {e.strerror or e}")
    try:
        deadline = clock() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DriverError(f"cannot lock {path}: {e.strerror or e}")
                if clock() >= deadline:
                    raise DriverError(
                        f"another one-tproxy up/down has held {path} for {timeout:g}s; gave up"
                    )
                sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_name(bridge: str) -> None:
    try:
        check_bridge_name(bridge)
    except InvalidBridgeNameError as e:
        raise DriverError(str(e))


def _is_veth(link: Link | None) -> bool:
    return link is not None and link.kind == "veth"


def _inspect_up(net: NetEdge, bridge: str) -> tuple[Link, Link | None, Link | None, Link | None]:
    """Check that ``up`` can reach its state; return (bridge, BRb, BRa here, BRa in ns)."""
    a_name, b_name = veth_names(bridge)
    ns = namespace_name(bridge)
    br = net.link(bridge)
    if br is None:
        raise DriverError(f"bridge {bridge} does not exist")
    if br.kind != "bridge":
        raise DriverError(f"{bridge} is not a bridge (its kind is {br.kind or 'none'})")
    b = net.link(b_name)
    a_here = net.link(a_name)
    a_ns = net.link(a_name, ns) if net.namespace_exists(ns) else None
    for link, where in ((b, ""), (a_here, ""), (a_ns, f" in namespace {ns}")):
        if link is not None and link.kind != "veth":
            raise DriverError(
                f"{link.name}{where} exists but is not a veth (kind {link.kind or 'none'}); "
                "remove it first"
            )
    if b is not None:
        if b.master not in (None, br.index):
            raise DriverError(f"{b_name} is a port of another bridge; remove it first")
        a_peer = a_here if a_here is not None else a_ns
        if a_peer is None or a_peer.peer != b.index or (a_here is not None and a_ns is not None):
            raise DriverError(
                f"{b_name} exists but its veth peer is not {a_name} (here or in {ns}); "
                f"remove {b_name} first"
            )
        if a_here is not None and b.peer != a_here.index:
            raise DriverError(f"{b_name} and {a_name} are not one veth pair; remove them first")
    elif a_here is not None or a_ns is not None:
        raise DriverError(
            f"{a_name} exists without {b_name}; remove it first (or run one-tproxy down {bridge})"
        )
    return br, b, a_here, a_ns


def up(
    bridge: str,
    service_map: Mapping[int, Destination],
    net: NetEdge,
    nft: NftEdge,
    run_dir: str,
) -> list[str]:
    """Build bridge BR's host state for ``service_map``; return the changes made, in order.

    Raises :class:`DriverError` (nothing changed) when the bridge does not
    exist, the name is not usable, or the links/namespace are in a state it
    cannot fix; a kernel failure midway raises DriverError saying which step.
    """
    _check_name(bridge)
    with driver_lock(run_dir):
        undo: list[tuple[str, Callable[[], None]]] = []
        try:
            return _up(bridge, service_map, net, nft, undo)
        except (NetlinkError, NftError, DriverError) as e:
            _roll_back(bridge, undo)
            if isinstance(e, DriverError):
                raise
            raise DriverError(f"up {bridge}: {e}")


def _roll_back(bridge: str, undo: list[tuple[str, Callable[[], None]]]) -> None:
    """After a failed ``up``, remove what that ``up`` created, best effort.

    In creation order: the veth pair goes before the namespace, as in ``down``.
    """
    for what, fn in undo:
        try:
            fn()
            log.info("up {bridge} failed: removed {what} again", bridge=bridge, what=what)
        except Exception as e:
            log.warn(
                "up {bridge} failed, and removing {what} again failed too: {error}",
                bridge=bridge,
                what=what,
                error=e,
            )


def _up(
    bridge: str,
    service_map: Mapping[int, Destination],
    net: NetEdge,
    nft: NftEdge,
    undo: list[tuple[str, Callable[[], None]]],
) -> list[str]:
    a_name, b_name = veth_names(bridge)
    ns = namespace_name(bridge)
    changes: list[str] = []

    def did(what: str) -> None:
        log.info("up {bridge}: {what}", bridge=bridge, what=what)
        changes.append(what)

    br, b, a_here, a_ns = _inspect_up(net, bridge)

    # 1. The veth pair, BRb a port of the bridge, up.
    if b is None:
        net.create_veth(b_name, a_name)
        did(f"created veth pair {b_name}/{a_name}")
        undo.append((f"veth pair {b_name}/{a_name}", lambda: _delete_pair(net, bridge)))
        b = net.link(b_name)
        a_here = net.link(a_name)
        if b is None or a_here is None:
            raise DriverError(f"up {bridge}: veth pair {b_name}/{a_name} did not appear")
    if b.master != br.index:
        net.set_master(b_name, bridge)
        did(f"attached {b_name} to bridge {bridge}")
    if not b.up:
        net.set_up(b_name)
        did(f"set {b_name} up")

    # 2. The namespace, with arp_ignore=0 before BRa moves in.
    if not net.namespace_exists(ns):
        net.create_namespace(ns)
        did(f"created namespace {ns}")
        undo.append((f"namespace {ns}", lambda: net.remove_namespace(ns)))
    for key in ARP_SYSCTLS:
        if net.get_sysctl(ns, key) != "0":
            net.set_sysctl(ns, key, "0")
            did(f"set {key}=0 in {ns}")
    if a_ns is None:
        net.move_to_namespace(a_name, ns)
        did(f"moved {a_name} into {ns}")
        a_ns = net.link(a_name, ns)
        if a_ns is None:
            raise DriverError(f"up {bridge}: {a_name} did not appear in {ns}")

    # 3. BRa: its address, up, the default route through it.
    if (SERVICE_ADDRESS, SERVICE_PREFIXLEN) not in net.addresses(a_name, ns):
        net.add_address(a_name, SERVICE_ADDRESS, SERVICE_PREFIXLEN, ns)
        did(f"added {SERVICE_ADDRESS}/{SERVICE_PREFIXLEN} to {a_name}")
    if not a_ns.up:
        net.set_up(a_name, ns)
        did(f"set {a_name} up")
    if net.default_routes(ns) != [(a_ns.index, _RT_SCOPE_LINK)]:
        net.replace_default_route(a_name, ns)
        did(f"set route default dev {a_name} scope link in {ns}")

    # 4. nftables: the ARP rule, then the service map.
    form, changed = nft.write_arp_rule(bridge)
    if changed:
        did(f"wrote the ARP rule of chain bridge one_tproxy ch_{bridge} ({form.value} form)")
    if nft.write_guard(bridge, form, a_ns.address):
        did(
            f"wrote the anti-spoofing rules of chain bridge one_tproxy guard_{bridge} "
            f"({form.value} form; {a_name} is {a_ns.address})"
        )
    if nft.write_service_map(bridge, service_map):
        listing = ", ".join(f"{p} : {d.addr} . {d.port}" for p, d in service_map.items())
        did(f"wrote map ip one_tproxy ep_{bridge} {{ {listing} }}")
    return changes


def _delete_pair(net: NetEdge, bridge: str) -> None:
    """Delete the veth pair wherever its ``BRb`` end (or else its ``BRa`` end) is."""
    a_name, b_name = veth_names(bridge)
    ns = namespace_name(bridge)
    if net.link(b_name) is not None:
        net.delete_link(b_name)
    elif net.link(a_name) is not None:
        net.delete_link(a_name)
    elif net.namespace_exists(ns) and net.link(a_name, ns) is not None:
        net.delete_link(a_name, ns)


def down(bridge: str, net: NetEdge, nft: NftEdge, run_dir: str) -> list[str]:
    """Remove bridge BR's host state (each part only if present); return what was removed."""
    _check_name(bridge)
    with driver_lock(run_dir):
        try:
            return _down(bridge, net, nft)
        except (NetlinkError, NftError) as e:
            raise DriverError(f"down {bridge}: {e}")


def _down(bridge: str, net: NetEdge, nft: NftEdge) -> list[str]:
    a_name, b_name = veth_names(bridge)
    ns = namespace_name(bridge)
    changes: list[str] = []

    def did(what: str) -> None:
        log.info("down {bridge}: {what}", bridge=bridge, what=what)
        changes.append(what)

    if nft.remove_bridge(bridge):
        did(f"removed map ep_{bridge} and chains ch_{bridge}, guard_{bridge} from nftables")
    # Delete BRb before the namespace: a process still inside the namespace
    # keeps it (and BRa with it) alive after the unmount.
    ns_exists = net.namespace_exists(ns)
    targets: list[tuple[str, str | None]] = [(b_name, None), (a_name, None)]
    if ns_exists:
        targets.append((a_name, ns))
    for name, where in targets:
        link = net.link(name, where)
        if link is None:
            continue
        if not _is_veth(link):
            log.warn(
                "down {bridge}: {name} is not a veth, so not ours: left alone",
                bridge=bridge,
                name=name,
            )
            continue
        net.delete_link(name, where)
        did(f"deleted veth {name}" + (f" in {where}" if where else ""))
    if ns_exists:
        net.remove_namespace(ns)
        did(f"removed namespace {ns}")
    return changes
