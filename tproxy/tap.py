"""Options and service construction for ``twistd one-tproxy`` (the root proxy).

The plugin file in ``twisted/plugins`` names this module; everything it needs
lives here so the plugin stays one line. :class:`RootDaemon` wires the real
edges into :class:`tproxy.root.RootService`: the nftables reader, the spawn
launcher, ``tproxy.link.RootLink`` and the reactor's ``adoptStreamConnection``.
Its process-wide preparation (process title, open-files limit, log file,
SIGHUP handler) happens in ``privilegedStartService``, after twistd has
daemonized, so only the daemon itself is ever called ``one_tproxy``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from tproxy import control, settings
from tproxy.metrics import COUNTERS_OFF_MESSAGE, BridgeStats, counting_enabled
from tproxy.observe import status_document
from tproxy.procs import ROOT_TITLE
from tproxy.root import RootService, adopt_with
from tproxy.runtime import (
    DaemonRuntime,
    MemoryReclaimer,
    Tables,
    freeze_start_up,
    link_tables,
)
from tproxy.spawn import Launcher, SpawnLauncher, TemplateLauncher

log = Logger(namespace="tproxy.tap")


class Options(usage.Options):
    """Command-line options of ``twistd one-tproxy`` (the same as ``one-tproxy``'s)."""

    optFlags = [["spawn", None, "start inner proxies as fresh interpreters, not from a template"]]

    optParameters = [
        ["config", "c", None, "configuration file"],
        ["log-dir", None, None, "directory of the log files"],
        ["run-dir", None, None, "directory of runtime files"],
    ]

    def postOptions(self) -> None:
        paths = settings.Paths.from_sources(
            config=self["config"], log_dir=self["log-dir"], run_dir=self["run-dir"]
        )
        # Relative paths mean the caller's directory: a daemonized twistd then
        # changes to its --rundir (`one-tproxy start` uses /), as do the inners.
        self.paths = settings.Paths(
            os.path.abspath(paths.config),
            os.path.abspath(paths.log_dir),
            os.path.abspath(paths.run_dir),
        )


class RootDaemon(MultiService):
    """The root proxy process: its runtime (title, limits, log, SIGHUP) and the RootService."""

    def __init__(
        self,
        reactor: Any,
        paths: settings.Paths,
        launcher: Launcher | None = None,
        set_title: bool = True,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._set_title = set_title
        self.runtime = DaemonRuntime(ROOT_TITLE, paths)
        self._nft: Any = None
        if launcher is None:
            launcher = TemplateLauncher(reactor, paths)
        self.launcher = launcher
        self.root = RootService(
            reactor,
            self._read_maps,
            self.runtime.config,
            self.runtime.load,
            launcher,
            self._make_link,
            adopt_with(reactor),
            self._exit,
            self.runtime,
        )
        self.root.setServiceParent(self)
        self.stats: dict[str, BridgeStats] = {}
        """Bridge -> its per-port counters, kept across restarts of its inner proxy."""
        self.counting = counting_enabled()
        """False when ``ONE_TPROXY_COUNTERS=off`` (read once; the inner proxies inherit it)."""
        self.started_at = reactor.seconds()
        control.ControlService(
            reactor,
            control.socket_path(paths.run_dir),
            {"ping": self._ping, "stats": self._status},
        ).setServiceParent(self)

    def _ping(self, request: Any) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    def _status(self, request: Any) -> dict[str, Any]:
        """The status document (``tproxy.observe``) for ``{"cmd": "stats"}``."""
        return status_document(
            self.root.supervisors().values(),
            self.stats,
            os.getpid(),
            self.started_at,
            self._reactor.seconds(),
            counting=self.counting,
        )

    def _read_maps(self) -> Any:
        if self._nft is None:
            from tproxy.nft import Nftables

            self._nft = Nftables()
        return self._nft.read_service_maps()

    def _make_link(self, bridge: str, lookup: Any, limits: Any) -> Any:
        from tproxy.link import RootLink
        from tproxy.protocol.frames import DEFAULT_WINDOW

        # The window is the root's receive window per stream on this new link
        # (:tproxy_stream_window:); links already up keep theirs.
        window = getattr(limits, "stream_window", None) or DEFAULT_WINDOW
        if not self.counting:
            return RootLink(
                self._reactor, bridge, lookup, limits, counting=False, initial_window=window
            )
        metrics = self.stats.setdefault(bridge, BridgeStats())
        return RootLink(
            self._reactor, bridge, lookup, limits, metrics=metrics, initial_window=window
        )

    def _exit(self) -> None:
        def stop() -> None:
            if self._reactor.running:
                self._reactor.stop()

        self._reactor.callLater(0, stop)

    def _hup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.root.reload)

    def _link_tables(self) -> Tables:
        """The stream tables of every bridge's link (compacted after a burst)."""
        return [
            table
            for sup in self.root.supervisors().values()
            if sup.link is not None
            for table in link_tables(sup.link)
        ]

    def privilegedStartService(self) -> None:
        # The handler first: once titled, `one-tproxy reload` may find us and
        # SIGHUP's default action would kill the process.
        signal.signal(signal.SIGHUP, self._hup)
        # The real daemon runs under twistd with --logger=tproxy.logs.discard_observer:
        # its log file is its only log, so the file's level decides whether the
        # per-connection DEBUG lines are built at all (issue 7 (b)).
        self.runtime.prepare(begin_logging=False, govern_debug_gate=self._set_title)
        self.root.settings = self.runtime.config
        MemoryReclaimer(self._reactor, tables=self._link_tables).start()
        if self._set_title:  # the real daemon (tests build it without)
            import setproctitle

            from tproxy import dispatch

            setproctitle.setproctitle(ROOT_TITLE)
            dispatch.install()
        if not self.counting:
            log.warn(COUNTERS_OFF_MESSAGE)
        super().privilegedStartService()
        if self._set_title:  # the real daemon: start-up done, out of later full collections
            freeze_start_up()


    def stopService(self) -> Any:
        """Stop the inner proxies (gracefully), then let the template go."""
        d = super().stopService()

        def release(result: object) -> object:
            close = getattr(self.launcher, "close", None)
            if close is not None:
                close()
            return result

        return d.addBoth(release) if d is not None else release(None)


def makeService(options: Options) -> IService:
    """Build the root proxy's service tree.

    ``--spawn`` starts each inner proxy as a fresh interpreter instead of
    forking it from the template (more memory, nothing shared).
    """
    from twisted.internet import reactor

    launcher = SpawnLauncher(reactor, options.paths) if options["spawn"] else None
    return RootDaemon(reactor, options.paths, launcher=launcher)
