"""Finding the mesh's processes through ``/proc`` (the one module that scans it).

The proxies name themselves with setproctitle: the root proxy is ``one_tproxy``,
the inner proxy of bridge BR is ``one_tproxy_BR``. setproctitle overwrites the
original argv area, so ``/proc/PID/cmdline`` then holds the title followed by NUL
(or, in some modes, space) padding; a title is matched after stripping that
padding and only when nothing else is left.

Names alone are not enough: several simulated hypervisors (each its own network
namespace) may run side by side on one machine without PID namespaces. So a
process is scoped by its network namespace too:

* the root proxy of *this* host is a ``one_tproxy`` process whose
  ``/proc/PID/ns/net`` is the caller's own network namespace;
* the inner proxy of bridge BR is a ``one_tproxy_BR`` process whose network
  namespace is the one bound at ``/run/netns/one_tproxy_BR``.

A namespace is identified by the ``(st_dev, st_ino)`` of its nsfs file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from attrs import frozen

from tproxy.model import namespace_name

#: The root proxy's process title.
ROOT_TITLE = "one_tproxy"
_INNER_PREFIX = ROOT_TITLE + "_"

NsId = tuple[int, int]


@frozen
class ProxyProcess:
    """One proxy process found in ``/proc``."""

    pid: int
    """Its process id."""
    bridge: str | None
    """The bridge of an inner proxy; None for the root proxy."""
    ppid: int = 0
    """Its parent's process id (an inner proxy's is its root proxy while that runs)."""

    @property
    def title(self) -> str:
        """The process title, ``one_tproxy`` or ``one_tproxy_BR``."""
        return ROOT_TITLE if self.bridge is None else namespace_name(self.bridge)


@frozen
class Mesh:
    """The proxies of this host, as found by one scan."""

    processes: tuple[ProxyProcess, ...] = ()
    """Roots (ascending PID), then inners (by bridge name, then PID)."""

    @property
    def roots(self) -> tuple[int, ...]:
        """PIDs of ``one_tproxy`` processes in the caller's network namespace, ascending."""
        return tuple(p.pid for p in self.processes if p.bridge is None)

    @property
    def root(self) -> int | None:
        """The root proxy's PID (the lowest if, briefly, there are several), or None."""
        roots = self.roots
        return roots[0] if roots else None

    @property
    def inners(self) -> dict[str, tuple[int, ...]]:
        """Bridge -> PIDs of its inner proxies (in namespace ``one_tproxy_BR``), ascending."""
        found: dict[str, tuple[int, ...]] = {}
        for p in self.processes:
            if p.bridge is not None:
                found[p.bridge] = (*found.get(p.bridge, ()), p.pid)
        return found

    def children_of(self, pid: int) -> list[ProxyProcess]:
        """The inner proxies whose parent is ``pid``."""
        return [p for p in self.processes if p.bridge is not None and p.ppid == pid]

    def all_pids(self) -> list[int]:
        """Every PID, roots first, then inners by bridge name."""
        return [p.pid for p in self.processes]


class ProcessFinder(Protocol):
    """What the daemon commands need from ``/proc`` (tests hand a fake)."""

    def find(self) -> Mesh:
        """The mesh processes of the caller's host, as they are now."""
        ...

    def alive(self, pid: int) -> bool:
        """Whether ``pid`` still runs (and is no zombie)."""
        ...

    def parent(self, pid: int) -> int | None:
        """The parent PID of ``pid``, None when it is gone."""
        ...


def parse_title(cmdline: bytes) -> str | None:
    """The process title in a ``/proc/PID/cmdline``, if it is a proxy's, else None.

    The title must be the whole command line apart from NUL/space padding: a
    process started as ``python one_tproxy ...`` is not a proxy.
    """
    text = cmdline.rstrip(b"\0 ")
    if not text or b"\0" in text:
        return None
    try:
        title = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    if title == ROOT_TITLE or (title.startswith(_INNER_PREFIX) and len(title) > len(_INNER_PREFIX)):
        return title
    return None


def _ns_id(path: str) -> NsId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@frozen
class ProcFinder:
    """The real ``/proc`` scan (roots are configurable for tests)."""

    proc_dir: str = "/proc"
    """Where procfs is mounted."""
    netns_dir: str = "/run/netns"
    """Where ``ip netns`` binds named namespaces."""

    def _candidates(self) -> Iterator[tuple[int, str]]:
        try:
            names = os.listdir(self.proc_dir)
        except OSError:
            return
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.proc_dir, name, "cmdline"), "rb") as f:
                    cmdline = f.read(4096)
            except OSError:  # gone meanwhile, or a kernel thread we may not read
                continue
            title = parse_title(cmdline)
            if title is not None:
                yield int(name), title

    def _pid_ns(self, pid: int) -> NsId | None:
        return _ns_id(os.path.join(self.proc_dir, str(pid), "ns", "net"))

    def find(self) -> Mesh:
        """Scan ``/proc`` once; see the module docstring for the scoping rules."""
        own = _ns_id(os.path.join(self.proc_dir, "self", "ns", "net"))
        found: list[ProxyProcess] = []
        bridge_ns: dict[str, NsId | None] = {}
        for pid, title in self._candidates():
            state = self._stat(pid)
            if state is None or state[0] in ("Z", "X"):
                continue
            ns = self._pid_ns(pid)
            if ns is None:
                continue
            if title == ROOT_TITLE:
                if ns == own:
                    found.append(ProxyProcess(pid, None, state[1]))
                continue
            bridge = title[len(_INNER_PREFIX) :]
            if bridge not in bridge_ns:
                bridge_ns[bridge] = _ns_id(os.path.join(self.netns_dir, title))
            if bridge_ns[bridge] is not None and ns == bridge_ns[bridge]:
                found.append(ProxyProcess(pid, bridge, state[1]))
        found.sort(key=lambda p: (p.bridge is not None, p.bridge or "", p.pid))
        return Mesh(tuple(found))

    def _stat(self, pid: int) -> tuple[str, int] | None:
        """(state letter, parent pid) from ``/proc/PID/stat``, or None when gone."""
        try:
            with open(os.path.join(self.proc_dir, str(pid), "stat"), "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # "PID (comm) STATE PPID ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2:
            return None
        try:
            return fields[0].decode("ascii", "replace"), int(fields[1])
        except ValueError:
            return None

    def parent(self, pid: int) -> int | None:
        """The parent PID of ``pid``, None when it is gone."""
        state = self._stat(pid)
        return None if state is None else state[1]

    def alive(self, pid: int) -> bool:
        """True while ``pid`` exists and is not a zombie."""
        state = self._stat(pid)
        return state is not None and state[0] not in ("Z", "X")


def has_title(pid: int, title: str, proc_dir: str = "/proc") -> bool:
    """Whether process ``pid`` runs now under the process title ``title``."""
    try:
        with open(os.path.join(proc_dir, str(pid), "cmdline"), "rb") as f:
            return parse_title(f.read(4096)) == title
    except OSError:
        return False
