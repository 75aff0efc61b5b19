"""The root proxy: one supervised inner proxy per bridge, and the link to each.

Theory of operation. :class:`RootService` is a ``MultiService`` whose children
are one :class:`InnerSupervisor` per bridge that has a non-empty service map in
nftables. A supervisor owns the bridge's *current* service map; the root-side
link (``tproxy.link.RootLink``) it makes for each run of the inner proxy looks
ports up through :meth:`InnerSupervisor.lookup`, which reads that map at the
moment of each open. So two bridges mapping one port to different destinations
each reach their own, and a reload that changes a destination is seen by the
next connection while open streams keep theirs.

Starting an inner proxy: the supervisor makes a socket pair, adopts its end
into the reactor with a fresh link protocol, hands the other end to the
:class:`~tproxy.spawn.Launcher` (it becomes the child's fd 3) and closes its
copy at once, pushes the bridge's service ports and watches the process.

Supervision: when the process ends while the supervisor runs it is started
again after a backoff (``0.1 s`` doubling up to ``5 s``; back to ``0.1 s`` once
a run stayed up for ``STABLE_AFTER`` seconds). Stopping a supervisor (bridge
removed, or the root stopping) tells the link to go away and the process to
terminate (SIGTERM: it stops listening and lets its streams finish), waits for
the process at most the grace period plus a margin, then kills it.

Reload (:meth:`RootService.reload`): the configuration file is read again (log
level, limits for new links), the maps are read again and diffed: new bridges
get a supervisor, removed ones are stopped, changed port sets are pushed, and
every inner proxy gets a SIGHUP (it re-reads its log level and reopens its log).
When no bridge is left the root calls ``on_empty`` (the tap stops the reactor).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from attrs import frozen
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from tproxy.model import Destination, MeshMap, ServiceMap, namespace_name
from tproxy.procs import has_title
from tproxy.spawn import InnerProcess, Launcher

log = Logger(namespace="tproxy.root")

#: First restart delay of a dead inner proxy, the cap of its doubling, and how
#: long a run must last before the delay starts over.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0
#: Extra seconds a stop waits for an inner proxy beyond the grace period before SIGKILL.
KILL_MARGIN = 2.0



#: Socket buffer size asked for on both ends of a link's socket pair (the kernel
#: doubles it and caps it at net.core.wmem_max / rmem_max). The default 208 KiB
#: holds barely three DATA frames; a larger buffer lets the proxies run longer
#: without waking each other.
LINK_SOCKET_BUFFER = 2 << 20


def _size_link_buffers(*socks: socket.socket) -> None:
    """Ask for ``LINK_SOCKET_BUFFER`` send and receive buffers; keep the default if refused."""
    for sock in socks:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, LINK_SOCKET_BUFFER)
            except OSError:
                pass

class LinkLike(Protocol):
    """What the root uses of ``tproxy.link.RootLink`` (besides it being an IProtocol)."""

    closed: Deferred[None]
    limits: Any

    def push_config(self, service_ports: Iterable[int]) -> None:
        """Tell the inner proxy its service ports."""
        ...

    def go_away(self) -> None:
        """Refuse new streams, let the open ones finish."""
        ...


class SettingsLike(Protocol):
    """What the root uses of ``tproxy.config.Config``."""

    @property
    def limits(self) -> Any:
        """``tproxy.config.Limits`` (``grace_period`` is read here)."""
        ...

    @property
    def debug_level(self) -> int:
        """``:tproxy_debug_level:``."""
        ...


#: Builds the root end of a link: (bridge, lookup, limits) -> protocol.
LinkFactory = Callable[[str, Callable[[int], "Destination | None"], Any], LinkLike]
#: Connects an adopted UNIX socket fd (non-blocking, the caller closes it) to a protocol.
Adopt = Callable[[int, IProtocol], None]


class LogControl(Protocol):
    """The root's own log file: level changes and reopening (``tproxy.logs``)."""

    def set_debug_level(self, debug_level: int) -> None:
        """Filter at ``:tproxy_debug_level:``."""
        ...

    def reopen(self) -> None:
        """Reopen the file (logrotate)."""
        ...


@frozen
class Backoff:
    """The restart delay policy of a supervisor."""

    first: float = BACKOFF_FIRST
    maximum: float = BACKOFF_MAX
    stable_after: float = STABLE_AFTER

    def next(self, previous: float | None, uptime: float) -> float:
        """The delay before the next start, given the last delay and how long the run lasted."""
        if previous is None or uptime >= self.stable_after:
            return self.first
        return min(previous * 2, self.maximum)


class InnerSupervisor(Service):
    """Runs, watches and restarts the inner proxy of one bridge."""

    def __init__(
        self,
        reactor: IReactorTime,
        bridge: str,
        services: ServiceMap,
        limits: Callable[[], Any],
        launcher: Launcher,
        make_link: LinkFactory,
        adopt: Adopt,
        backoff: Backoff = Backoff(),
        ready: Callable[[int, str], bool] = has_title,
    ) -> None:
        self.name = bridge
        self._ready = ready
        self.bridge = bridge
        self.services: dict[int, Destination] = dict(services)
        self._reactor = reactor
        self._limits = limits
        self._launcher = launcher
        self._make_link = make_link
        self._adopt = adopt
        self._backoff = backoff
        self._delay: float | None = None
        self._restart: IDelayedCall | None = None
        self.process: InnerProcess | None = None
        self.link: LinkLike | None = None
        self._started_at = 0.0
        self._stopped: Deferred[None] | None = None
        self.starts = 0
        """How many times an inner proxy was started (for tests and logs)."""

    @property
    def started_at(self) -> float:
        """``reactor.seconds()`` when the current (or last) inner proxy was started."""
        return self._started_at

    # -- the map ------------------------------------------------------------
    def lookup(self, service_port: int) -> Destination | None:
        """The destination of ``service_port`` on this bridge now, or None."""
        return self.services.get(service_port)

    def update(self, services: ServiceMap) -> None:
        """Take a reloaded map: new connections use it; changed port sets are pushed."""
        old = self.services
        self.services = dict(services)
        if set(old) != set(self.services):
            log.info(
                "bridge {bridge}: service ports {old} -> {new}",
                bridge=self.bridge,
                old=sorted(old),
                new=sorted(self.services),
            )
            if self.link is not None:
                self.link.push_config(sorted(self.services))
        for port, dest in self.services.items():
            if port in old and old[port] != dest:
                log.info(
                    "bridge {bridge}: service port {port} now goes to {dest} (was {old})",
                    bridge=self.bridge,
                    port=port,
                    dest=str(dest),
                    old=str(old[port]),
                )

    # -- running ------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._start_inner()

    def _start_inner(self) -> None:
        self._restart = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _size_link_buffers(ours, theirs)
        link: LinkLike | None = None
        try:
            link = self._make_link(self.bridge, self.lookup, self._limits())
            ours.setblocking(False)
            self._adopt(ours.fileno(), link)  # type: ignore[arg-type]
            ours.close()
            process = self._launcher.launch(self.bridge, theirs.fileno())
        except Exception:
            log.failure("bridge {bridge}: cannot start the inner proxy", bridge=self.bridge)
            transport = getattr(link, "transport", None)
            if transport is not None:
                transport.loseConnection()
            self._schedule_restart(0.0)
            return
        finally:
            ours.close()
            theirs.close()
        self.starts += 1
        self.link = link
        self.process = process
        self._started_at = self._reactor.seconds()
        log.info(
            "bridge {bridge}: inner proxy one_tproxy_{bridge} started{pid}",
            bridge=self.bridge,
            # A forked inner's pid comes later (the launcher logs it then).
            pid="" if process.pid is None else f" (pid {process.pid})",
        )
        link.push_config(sorted(self.services))
        link.closed.addBoth(self._link_closed, link)
        process.exited.addCallback(self._exited, process, link)

    def _link_closed(self, result: object, link: LinkLike) -> None:
        if link is self.link:
            log.debug("bridge {bridge}: link to the inner proxy closed", bridge=self.bridge)

    def _exited(self, how: str, process: InnerProcess, link: LinkLike) -> None:
        if process is not self.process:
            return
        self.process = None
        self.link = None
        transport = getattr(link, "transport", None)
        if transport is not None:
            transport.loseConnection()
        if self._stopped is not None:
            log.info("bridge {bridge}: inner proxy stopped ({how})", bridge=self.bridge, how=how)
            d, self._stopped = self._stopped, None
            d.callback(None)
            return
        if not self.running:
            return
        uptime = self._reactor.seconds() - self._started_at
        self._schedule_restart(uptime)
        log.warn(
            "bridge {bridge}: inner proxy ended ({how}) after {uptime:.1f} s; "
            "restarting in {delay:.1f} s",
            bridge=self.bridge,
            how=how,
            uptime=uptime,
            delay=self._delay,
        )

    def _schedule_restart(self, uptime: float) -> None:
        self._delay = self._backoff.next(self._delay, uptime)
        self._restart = self._reactor.callLater(self._delay, self._start_inner)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running inner proxy, if any."""
        if self.process is not None:
            self.process.signal(signum)

    def apply_limits(self) -> None:
        """Give the live link the limits in force (a new link gets them when made)."""
        if self.link is not None:
            self.link.limits = self._limits()

    def forward_hup(self) -> None:
        """SIGHUP to the inner proxy once it is ready for one.

        An inner proxy takes its process title only after its SIGHUP handler is
        in place and before it reads the configuration; one still untitled will
        read the configuration anyway, and the signal could kill it.
        """
        process = self.process
        if process is None or process.pid is None:
            return
        if self._ready(process.pid, namespace_name(self.bridge)):
            process.signal(signal.SIGHUP)
        else:
            log.debug("bridge {bridge}: inner proxy still starting; no SIGHUP", bridge=self.bridge)

    def stopService(self) -> Deferred[None]:
        """Graceful: go-away and SIGTERM; SIGKILL after the grace period and a margin."""
        super().stopService()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        if self.process is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._stopped = done
        if self.link is not None:
            self.link.go_away()
        self.process.signal(signal.SIGTERM)
        grace = float(getattr(self._limits(), "grace_period", 10.0))
        process = self.process
        kill = self._reactor.callLater(grace + KILL_MARGIN, self._kill, process)

        def cancel_kill(result: None) -> None:
            if kill.active():
                kill.cancel()

        done.addCallback(cancel_kill)
        return done

    def _kill(self, process: InnerProcess) -> None:
        log.warn(
            "bridge {bridge}: inner proxy did not stop in time; killing it", bridge=self.bridge
        )
        process.signal(signal.SIGKILL)


class RootService(MultiService):
    """The root proxy's service tree: one :class:`InnerSupervisor` per configured bridge."""

    def __init__(
        self,
        reactor: IReactorTime,
        read_maps: Callable[[], MeshMap],
        settings: SettingsLike,
        load_settings: Callable[[], SettingsLike],
        launcher: Launcher,
        make_link: LinkFactory,
        adopt: Adopt,
        on_empty: Callable[[], None],
        log_control: LogControl | None = None,
        backoff: Backoff = Backoff(),
        ready: Callable[[int, str], bool] = has_title,
    ) -> None:
        super().__init__()
        self._ready = ready
        self._reactor = reactor
        self._read_maps = read_maps
        self._load_settings = load_settings
        self._launcher = launcher
        self._make_link = make_link
        self._adopt = adopt
        self._on_empty = on_empty
        self._log_control = log_control
        self._backoff = backoff
        self.settings: SettingsLike = settings
        """The configuration in force (``settings`` at start, then each reload's)."""
        self._leaving: list[Deferred[None]] = []
        self._empty_called = False

    def supervisors(self) -> dict[str, InnerSupervisor]:
        """Bridge -> its supervisor, as configured now."""
        return {s.bridge: s for s in self if isinstance(s, InnerSupervisor)}

    def limits(self) -> Any:
        """The limits of the configuration in force."""
        return self.settings.limits

    def _read_settings(self) -> None:
        try:
            settings = self._load_settings()
        except Exception as e:
            log.error(
                "cannot use the configuration file, keeping the settings in force: {error}",
                error=e,
            )
            return
        if settings.debug_level != self.settings.debug_level:
            log.info("debug level {debug_level}", debug_level=settings.debug_level)
        self.settings = settings
        if self._log_control is not None:
            self._log_control.set_debug_level(settings.debug_level)

    def _read(self) -> dict[str, dict[int, Destination]] | None:
        try:
            maps = self._read_maps()
        except Exception as e:
            log.error("cannot read the service maps from nftables: {error}", error=e)
            return None
        return {bridge: dict(m) for bridge, m in maps.items() if m}

    def startService(self) -> None:
        """Read the maps, start one inner proxy per bridge."""
        super().startService()
        maps = self._read()
        log.info("root proxy started; bridges: {bridges}", bridges=sorted(maps or {}) or "none")
        self._apply(maps or {})

    def _apply(self, maps: Mapping[str, ServiceMap]) -> None:
        current = self.supervisors()
        for bridge in sorted(set(current) - set(maps)):
            log.info("bridge {bridge} removed: stopping its inner proxy", bridge=bridge)
            d = current[bridge].disownServiceParent()
            if d is not None:
                self._leaving.append(d)
                d.addBoth(self._left, d)
        for bridge in sorted(maps):
            if bridge in current:
                current[bridge].update(maps[bridge])
            else:
                log.info(
                    "bridge {bridge}: service map {services}",
                    bridge=bridge,
                    services={p: str(d) for p, d in maps[bridge].items()},
                )
                InnerSupervisor(
                    self._reactor,
                    bridge,
                    maps[bridge],
                    self.limits,
                    self._launcher,
                    self._make_link,
                    self._adopt,
                    self._backoff,
                    self._ready,
                ).setServiceParent(self)
        if not maps:
            self._empty()

    def _left(self, result: object, d: Deferred[None]) -> object:
        if d in self._leaving:
            self._leaving.remove(d)
        return result

    def _empty(self) -> None:
        if self._empty_called:
            return
        self._empty_called = True
        log.info("no bridge is configured: the root proxy exits")
        leaving = list(self._leaving)
        DeferredList(leaving).addCallback(self._exit_if_empty)

    def _exit_if_empty(self, result: object) -> None:
        # `up` of a new bridge may have reloaded us while the old inners drained:
        # its `start` saw this root running, so exiting now would leave it unserved.
        if self.supervisors():
            self._empty_called = False
            log.info("bridges configured again: the root proxy keeps running")
            return
        self._on_empty()

    def reload(self) -> None:
        """SIGHUP's work: settings, logs, maps, inner proxies (DESIGN.md 2.4)."""
        if not self.running:
            return
        log.info("reload")
        if self._log_control is not None:
            self._log_control.reopen()
        self._read_settings()
        maps = self._read()
        if maps is None:
            return
        self._apply(maps)
        for sup in self.supervisors().values():
            sup.apply_limits()
            sup.forward_hup()


class _OneProtocol(Factory):
    """A factory that hands out one protocol instance (for an adopted socket)."""

    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> IProtocol:  # type: ignore[override]
        return self._protocol


def adopt_with(reactor: Any) -> Adopt:
    """The real :data:`Adopt`: ``reactor.adoptStreamConnection`` on a UNIX socket."""

    def adopt(fd: int, protocol: IProtocol) -> None:
        reactor.adoptStreamConnection(fd, socket.AF_UNIX, _OneProtocol(protocol))

    return adopt
