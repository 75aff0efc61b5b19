"""The inner proxy of one bridge: ``python -m tproxy.inner BR`` (process ``one_tproxy_BR``).

Theory of operation. The root proxy starts this program with its end of a
socket pair as fd 3. :func:`main` first enters network namespace
``one_tproxy_BR`` (before any thread or reactor exists, and without ever
creating it), names the process, raises its open-files limit, opens its log
``LOG_DIR/one_tproxy_BR.log``, drops every capability but
CAP_NET_BIND_SERVICE (``tproxy.privileges``), installs the epoll reactor and
adopts fd 3 as its one link to the root (``tproxy.link.InnerLink``).

:class:`InnerService` keeps one listening endpoint service on
``169.254.16.9:PORT`` per service port that the root pushes, and diffs each
push: new ports are bound, dropped ports unbound; connections already accepted
are not touched by either. Every accepted guest connection becomes a stream on
the link (``InnerLink.guest_factory``).

It exits when the link ends (the root is gone, even after ``kill -9``: the
socket pair reads EOF) and on SIGTERM/SIGINT: it stops listening, sends
go-away, lets open streams finish for at most the grace period, then closes
the link. SIGHUP re-reads the log level from the configuration file and
reopens the log file. This process never reads nftables and never opens a TCP
connection.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from tproxy.model import SERVICE_ADDRESS, namespace_name

log = Logger(namespace="tproxy.inner")

#: How often a stopping inner proxy looks whether its streams are done.
DRAIN_POLL = 0.05
#: Seconds before the first new attempt to bind a port that could not be bound;
#: the delay doubles after each failed attempt, up to :data:`REBIND_MAX`.
REBIND_DELAY = 1.0
#: The longest delay between two attempts to bind a port.
REBIND_MAX = 60.0
#: Listen backlog of the guests' ports (Twisted's default of 50 drops bursts of SYNs).
BACKLOG = 1024


class InnerLinkLike(Protocol):
    """What the inner proxy uses of ``tproxy.link.InnerLink`` (besides being an IProtocol)."""

    closed: Deferred[None]

    def guest_factory(self, service_port: int) -> IProtocolFactory:
        """The factory whose protocols carry accepted guest connections as streams."""
        ...

    def go_away(self) -> None:
        """Open no more streams; let the open ones finish."""
        ...


class _Listener(Service):
    """The listening service of one service port: binds, logs, retries a failed bind.

    (Like ``StreamServerEndpointService``, plus retries: a port may still be
    held for a moment by a stopping predecessor, or for good by another
    program.) A failed bind is tried again after ``REBIND_DELAY`` seconds, the
    delay doubling up to ``REBIND_MAX``; it is logged at ERROR the first time,
    then only when the delay grows or the reason changes - never every second.
    Meanwhile :attr:`error` holds the reason, for the STATS report.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        port: int,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
    ) -> None:
        self.service_port = port
        self.name = str(port)
        self._reactor = reactor
        self._endpoint = endpoint
        self._factory = factory
        self._listening: IListeningPort | None = None
        self._retry: IDelayedCall | None = None
        self._delay = REBIND_DELAY
        self._failures = 0
        self._logged: tuple[str, float] | None = None
        self.error: str | None = None
        """Why the last bind failed, while the port is not bound."""

    @property
    def bound(self) -> bool:
        """Whether the port listens now."""
        return self._listening is not None

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        self._retry = None
        self._endpoint.listen(self._factory).addCallbacks(self._bound, self._failed)

    def _bound(self, listening: IListeningPort) -> object:
        if not self.running:
            return listening.stopListening()
        self._listening = listening
        if self._failures:
            log.info(
                "listening on {addr}:{port} (after {n} failed attempts)",
                addr=SERVICE_ADDRESS,
                port=self.service_port,
                n=self._failures,
            )
        else:
            log.info("listening on {addr}:{port}", addr=SERVICE_ADDRESS, port=self.service_port)
        self.error = None
        self._failures = 0
        self._delay = REBIND_DELAY
        self._logged = None
        self._changed()
        return None

    def _changed(self) -> None:
        changed = getattr(self.parent, "listeners_changed", None)
        if changed is not None:
            changed()

    def _failed(self, failure: Failure) -> None:
        reason = _bind_error(failure)
        first = self.error is None
        self.error = reason
        self._failures += 1
        if not self.running:
            return
        delay = self._delay
        if self._logged is None:
            log.error(
                "cannot listen on {addr}:{port}: {error}; retrying in {delay:g} s "
                "(backing off to {most:g} s)",
                addr=SERVICE_ADDRESS,
                port=self.service_port,
                error=reason,
                delay=delay,
                most=REBIND_MAX,
            )
            self._logged = (reason, delay)
        elif reason != self._logged[0] or delay > self._logged[1]:
            log.error(
                "still cannot listen on {addr}:{port} ({n} attempts): {error}; "
                "retrying in {delay:g} s",
                addr=SERVICE_ADDRESS,
                port=self.service_port,
                n=self._failures,
                error=reason,
                delay=delay,
            )
            self._logged = (reason, delay)
        self._retry = self._reactor.callLater(delay, self._listen)
        self._delay = min(delay * 2, REBIND_MAX)
        if first:
            self._changed()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        log.info("stopped listening on {addr}:{port}", addr=SERVICE_ADDRESS, port=self.service_port)
        return listening.stopListening()  # type: ignore[no-any-return]


def _bind_error(failure: Failure) -> str:
    """Why a bind failed, in words (``Address already in use``), without the address."""
    err = getattr(failure.value, "socketError", None) or failure.value
    text = getattr(err, "strerror", None) or str(err) or failure.getErrorMessage()
    return str(text)


class InnerService(MultiService):
    """The inner proxy's service tree: one listening service per pushed service port."""

    def __init__(
        self,
        reactor: IReactorTime,
        bridge: str,
        make_endpoint: Callable[[int], IStreamServerEndpoint],
        grace_period: Callable[[], float],
        on_done: Callable[[], None],
    ) -> None:
        super().__init__()
        self.bridge = bridge
        self._reactor = reactor
        self._make_endpoint = make_endpoint
        self._grace = grace_period
        self._on_done = on_done
        self.link: InnerLinkLike | None = None
        self.ports: frozenset[int] = frozenset()
        self._stopping: Deferred[None] | None = None

    def attach(self, link: InnerLinkLike) -> None:
        """Use ``link`` (connected to the root); its end ends this process."""
        self.link = link
        link.closed.addBoth(self._link_closed)

    def _link_closed(self, result: object) -> None:
        if self._stopping is None:
            log.info("link to the root proxy closed: exiting")
        self._on_done()

    def apply_limits(self, limits: Any) -> None:
        """A reload's limits: the link holds them from now on; what changed is logged.

        (The grace period is read when a stop begins; the stream window is
        the link's preface, so a new one takes effect with the next link,
        i.e. when this proxy is restarted.)
        """
        link = self.link
        old = getattr(link, "limits", None)
        if link is not None and hasattr(link, "limits"):
            link.limits = limits
        if old is None or old == limits:
            return
        import attrs

        before, after = attrs.asdict(old), attrs.asdict(limits)
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v]
        log.info("limits changed: {changes}", changes=", ".join(changed))

    def listeners(self) -> dict[int, _Listener]:
        """Service port -> its listening service."""
        return {s.service_port: s for s in self if isinstance(s, _Listener)}

    def listener_report(self) -> dict[str, object]:
        """This process and its listeners, for the link's STATS reports (docs/protocol.md)."""
        current = self.listeners()
        report: dict[str, object] = {
            "pid": os.getpid(),
            "listening": sorted(p for p, s in current.items() if s.bound),
            "not_listening": sorted(p for p, s in current.items() if not s.bound),
        }
        errors = {
            str(p): s.error for p, s in sorted(current.items()) if not s.bound and s.error
        }
        if errors:
            report["listen_errors"] = errors
        return report

    def listeners_changed(self) -> None:
        """A port was bound: report to the root now rather than at the next interval."""
        send = getattr(self.link, "send_stats", None)
        if send is not None:
            send()

    def set_ports(self, ports: frozenset[int]) -> None:
        """The root's config push: bind the new ports, unbind the dropped ones."""
        if self._stopping is not None or self.link is None:
            return
        ports = frozenset(ports)
        if ports != self.ports:
            log.info("service ports {old} -> {new}", old=sorted(self.ports), new=sorted(ports))
        self.ports = ports
        current = self.listeners()
        for port in sorted(set(current) - ports):
            current[port].disownServiceParent()
        for port in sorted(ports - set(current)):
            factory = self.link.guest_factory(port)
            _Listener(self._reactor, port, self._make_endpoint(port), factory).setServiceParent(
                self
            )

    def stopService(self) -> Deferred[None]:
        """Graceful: unbind, go-away, wait (bounded) for streams to end, close the link."""
        if self._stopping is not None:
            return self._stopping
        done: Deferred[None] = Deferred()
        self._stopping = done
        super().stopService()
        link = self.link
        if link is None or link.closed.called:
            done.callback(None)
            return done
        log.info("stopping: no new connections, waiting for open ones")
        link.go_away()
        deadline = self._reactor.seconds() + self._grace()

        def finish() -> None:
            if not done.called:
                transport = getattr(link, "transport", None)
                if transport is not None:
                    transport.loseConnection()
                done.callback(None)

        def poll() -> None:
            if done.called:
                return
            count = _stream_count(link)
            if link.closed.called or count == 0:
                finish()
            elif self._reactor.seconds() >= deadline:
                log.warn(
                    "grace period over: closing {count} open stream(s)",
                    count="the" if count is None else count,
                )
                finish()
            else:
                self._reactor.callLater(DRAIN_POLL, poll)

        poll()
        return done


def _stream_count(link: object) -> int | None:
    """How many streams the link has open, if it says."""
    count = getattr(link, "stream_count", None)
    if callable(count):
        count = count()
    return count if isinstance(count, int) else None


# -- the program ------------------------------------------------------------


#: The exact option order the template and the spawner pass.
_FIXED_OPTIONS = ("--config", "--log-dir", "--run-dir")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``BR --config PATH --log-dir DIR --run-dir DIR``."""
    from tproxy import settings

    # The launchers' own fixed form is read without argparse: in a child forked
    # from the template, building a parser would copy ~1.3 MB of shared pages
    # (refcounts of the code it runs).
    if argv is not None and len(argv) == 7 and tuple(argv[1::2]) == _FIXED_OPTIONS:
        bridge, _, config, _, log_dir, _, run_dir = argv
        if bridge and not bridge.startswith("-") and config and log_dir and run_dir:
            paths = settings.Paths(config=config, log_dir=log_dir, run_dir=run_dir)
            return argparse.Namespace(
                bridge=bridge, config=config, log_dir=log_dir, run_dir=run_dir, paths=paths
            )
    parser = argparse.ArgumentParser(prog="python -m tproxy.inner")
    parser.add_argument("bridge")
    parser.add_argument("--config", default=None)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args(argv)
    args.paths = settings.Paths.from_sources(
        config=args.config, log_dir=args.log_dir, run_dir=args.run_dir
    )
    return args


LINK_FD = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the inner proxy; the exit status."""
    # The root forwards its SIGHUPs; until our handler is in place, ignore them
    # (the default action would kill the process).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = parse_args(argv)
    from tproxy.model import InvalidBridgeNameError, check_bridge_name
    from tproxy.spawn import NamespaceError, enter_netns

    try:
        bridge = check_bridge_name(args.bridge)
    except InvalidBridgeNameError as e:
        print(f"one_tproxy inner: {e}", file=sys.stderr)
        return 2
    title = namespace_name(bridge)
    try:
        os.fstat(LINK_FD)
    except OSError:
        print(f"{title}: no link to the root proxy on fd {LINK_FD}", file=sys.stderr)
        return 2
    try:
        enter_netns(os.path.join("/run/netns", title))
    except NamespaceError as e:
        print(f"{title}: {e}", file=sys.stderr)
        return 2
    # Order matters (the root forwards SIGHUP only to a titled inner proxy):
    # handler, then title, then the configuration is read. A SIGHUP the root
    # held back came before our title, so before we read the configuration.
    hup = _Hangups()
    signal.signal(signal.SIGHUP, hup.signalled)
    import setproctitle

    setproctitle.setproctitle(title)
    return _run(bridge, args.paths, hup)


class _Hangups:
    """SIGHUP handling that works before the reactor exists (then it only notes it)."""

    def __init__(self) -> None:
        self.pending = False
        self.reactor: Any = None
        self.action: Callable[[], None] | None = None

    def signalled(self, signum: int, frame: object) -> None:
        if self.reactor is not None and self.action is not None:
            self.reactor.callFromThread(self.action)
        else:
            self.pending = True

    def attach(self, reactor: Any, action: Callable[[], None]) -> None:
        """From now on each SIGHUP runs ``action`` in the reactor; one noted before, too."""
        self.reactor = reactor
        self.action = action
        if self.pending:
            self.pending = False
            reactor.callWhenRunning(action)


def _drop_privileges() -> None:
    """Keep only CAP_NET_BIND_SERVICE from here on (``tproxy.privileges``, docs/security.md)."""
    from tproxy.privileges import PrivilegeError, drop_capabilities

    try:
        drop_capabilities()
    except PrivilegeError as e:
        log.error("could not drop capabilities ({error}); going on with those in force", error=e)
        return
    log.info("capabilities dropped but CAP_NET_BIND_SERVICE; no_new_privs set")


def _run(bridge: str, paths: Any, hup: _Hangups) -> int:
    from tproxy import runtime

    title = namespace_name(bridge)
    daemon = runtime.DaemonRuntime(title, paths)
    daemon.prepare()
    _drop_privileges()

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor as _reactor

    from tproxy import dispatch

    dispatch.install()

    reactor: Any = _reactor
    from tproxy.link import InnerLink
    from tproxy.link_accept import GuestEndpoint
    from tproxy.metrics import COUNTERS_OFF_MESSAGE, counting_enabled

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    service = InnerService(
        reactor,
        bridge,
        lambda port: GuestEndpoint(reactor, port, backlog=BACKLOG, interface=SERVICE_ADDRESS),
        lambda: float(daemon.limits().grace_period),
        stop,
    )
    link = InnerLink(
        reactor,
        on_config=service.set_ports,
        limits=daemon.limits(),
        bridge=bridge,
        stats_source=service.listener_report,
        counting=counting_enabled(),
        initial_window=daemon.limits().stream_window,
    )
    if not link.counting:
        log.warn(COUNTERS_OFF_MESSAGE)
    os.set_blocking(LINK_FD, False)
    from tproxy.root import adopt_with

    adopt_with(reactor)(LINK_FD, link)
    os.close(LINK_FD)
    service.attach(link)

    def reload() -> None:
        daemon.reload()
        service.apply_limits(daemon.limits())

    hup.attach(reactor, reload)
    runtime.MemoryReclaimer(reactor, tables=lambda: runtime.link_tables(link)).start()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(service.startService)
    log.info(
        "inner proxy {title} started (pid {pid}, stream window {kib} KiB)",
        title=title,
        pid=os.getpid(),
        kib=link.conn.initial_window // 1024,
    )
    reactor.run()
    log.info("inner proxy {title} exits", title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
