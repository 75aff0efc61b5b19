"""Tests for tproxy.daemonctl with a fake /proc, fake nftables, fake twistd and a fake clock."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence

from attrs import define, field
from twisted.trial import unittest

from tproxy.daemonctl import (
    EXIT_NOT_RUNNING,
    LockTimeoutError,
    MeshControl,
    control_lock,
    twistd_argv,
)
from tproxy.model import Destination
from tproxy.procs import Mesh, ProxyProcess
from tproxy.settings import Paths

D = Destination("127.0.0.1", 80)
PATHS = Paths("/etc/x.conf", "/logs", "/run")


@define
class World:
    """Processes, maps and time, all fake; signals act on the processes."""

    procs: list[ProxyProcess] = field(factory=list)
    maps: dict[str, dict[int, Destination]] = field(factory=dict)
    now: float = 0.0
    signals: list[tuple[int, int]] = field(factory=list)
    twistd_calls: list[list[str]] = field(factory=list)
    twistd_rc: int = 0
    obey_term: bool = True
    spawn_inners: bool = True
    out: list[str] = field(factory=list)
    err: list[str] = field(factory=list)
    locked: int = 0
    templates: dict[int, int] = field(factory=dict)
    config_problem: str | None = None
    log_dir_problem: str | None = None
    log_dirs_made: int = 0
    hup_kills_root: bool = False

    def find(self) -> Mesh:
        return Mesh(
            tuple(sorted(self.procs, key=lambda p: (p.bridge is not None, p.bridge or "", p.pid)))
        )

    def alive(self, pid: int) -> bool:
        return any(p.pid == pid for p in self.procs)

    def parent(self, pid: int) -> int | None:
        if pid in self.templates:
            return self.templates[pid]
        return next((p.ppid for p in self.procs if p.pid == pid), None)

    def kill(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))
        if signum == signal.SIGHUP and self.hup_kills_root:
            # A root already shutting down: it exits instead of reloading.
            self.procs = [p for p in self.procs if p.pid != pid and p.ppid != pid]
            return
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and self.obey_term):
            victim = [p for p in self.procs if p.pid == pid]
            self.procs = [p for p in self.procs if p.pid != pid]
            if victim and victim[0].bridge is None and signum == signal.SIGTERM:
                self.procs = [p for p in self.procs if p.ppid != pid]

    def run_twistd(self, argv: Sequence[str]) -> tuple[int, str]:
        self.twistd_calls.append(list(argv))
        if self.twistd_rc == 0:
            self.procs.append(ProxyProcess(500, None, 1))
            if self.spawn_inners:
                for i, bridge in enumerate(sorted(self.maps)):
                    if self.maps[bridge]:
                        self.procs.append(ProxyProcess(600 + i, bridge, 500))
        return self.twistd_rc, "boom" if self.twistd_rc else ""

    @contextlib.contextmanager
    def lock(self, paths: Paths) -> Iterator[None]:
        self.locked += 1
        yield

    def make_log_dir(self, paths: Paths) -> str | None:
        self.log_dirs_made += 1
        return self.log_dir_problem

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def control(self) -> MeshControl:
        return MeshControl(
            PATHS,
            finder=self,  # type: ignore[arg-type]
            read_maps=lambda: self.maps,
            run_twistd=self.run_twistd,
            kill=self.kill,
            grace_period=lambda paths: 10.0,
            config_problem=lambda paths: self.config_problem,
            make_log_dir=self.make_log_dir,
            sleep=self.sleep,
            monotonic=lambda: self.now,
            lock=self.lock,
            out=self.out.append,
            err=self.err.append,
        )


class StatusTests(unittest.TestCase):
    """``one-tproxy status``."""

    def test_running(self) -> None:
        """The root line, then one line per inner sorted by bridge; exit 0."""
        w = World(
            procs=[
                ProxyProcess(7, "br1", 5),
                ProxyProcess(5, None, 1),
                ProxyProcess(6, "br0", 5),
                ProxyProcess(9, "brX", 77),
            ]
        )
        self.assertEqual(w.control().status(), 0)
        self.assertEqual(w.out, ["one_tproxy: 5", "one_tproxy_br0: 6", "one_tproxy_br1: 7"])

    def test_inners_of_the_template(self) -> None:
        """Inners forked by the root's template process are the root's."""
        w = World(
            procs=[ProxyProcess(5, None, 1), ProxyProcess(8, "br0", 6), ProxyProcess(9, "br1", 7)],
            templates={6: 5, 7: 99},
        )
        self.assertEqual(w.control().status(), 0)
        self.assertEqual(w.out, ["one_tproxy: 5", "one_tproxy_br0: 8"])

    def test_not_running(self) -> None:
        """No root: exit 3; orphans of this host's bridges are still shown."""
        w = World(
            procs=[ProxyProcess(9, "br0", 1), ProxyProcess(10, "other", 1)], maps={"br0": {1: D}}
        )
        self.assertEqual(w.control().status(), EXIT_NOT_RUNNING)
        self.assertEqual(w.out, ["one_tproxy_br0: 9"])


class StartTests(unittest.TestCase):
    """``one-tproxy start``."""

    def test_nothing_configured(self) -> None:
        """No (non-empty) map: nothing is started, exit 0."""
        w = World(maps={"br0": {}})
        self.assertEqual(w.control().start(), 0)
        self.assertEqual(w.twistd_calls, [])

    def test_log_dir_made_or_warned(self) -> None:
        """start makes the log directory; one it cannot make is a warning, not a failure."""
        w = World(maps={"br0": {1: D}}, log_dir_problem="cannot create the log directory /l: EROFS")
        self.assertEqual(w.control().start(), 0)
        self.assertEqual(w.log_dirs_made, 1)
        self.assertEqual(len(w.twistd_calls), 1)
        self.assertIn("warning: cannot create the log directory /l", w.err[0])

    def test_starts_and_waits(self) -> None:
        """twistd runs once with our options, and start returns once inners are up."""
        w = World(maps={"br0": {1: D}})
        self.assertEqual(w.control().start(), 0)
        self.assertEqual(w.twistd_calls, [twistd_argv(PATHS)])
        self.assertIn("--pidfile=", w.twistd_calls[0])
        self.assertEqual(
            w.twistd_calls[0][-7:],
            ["one-tproxy", "--config", "/etc/x.conf", "--log-dir", "/logs", "--run-dir", "/run"],
        )

    def test_idempotent(self) -> None:
        """A running root means exit 0 without running twistd."""
        w = World(procs=[ProxyProcess(5, None, 1)], maps={"br0": {1: D}})
        self.assertEqual(w.control().start(), 0)
        self.assertEqual(w.twistd_calls, [])

    def test_twistd_fails(self) -> None:
        """A failing twistd is exit 1 with its output."""
        w = World(maps={"br0": {1: D}}, twistd_rc=1)
        self.assertEqual(w.control().start(), 1)
        self.assertIn("boom", w.err[0])

    def test_inners_late(self) -> None:
        """Inners that do not come up in time are reported; the root runs, so exit 0."""
        w = World(maps={"br0": {1: D}}, spawn_inners=False)
        self.assertEqual(w.control().start(), 0)
        self.assertIn("br0", w.err[0])
        self.assertGreaterEqual(w.now, 15.0)

    def test_unreadable_maps(self) -> None:
        """Maps that cannot be read: exit 1 with the reason."""
        w = World()
        control = w.control()

        def broken() -> dict[str, dict[int, Destination]]:
            raise OSError("no netlink")

        control.read_maps = broken
        self.assertEqual(control.start(), 1)
        self.assertIn("no netlink", w.err[0])


class StopTests(unittest.TestCase):
    """``one-tproxy stop``, ``restart`` and ``reload``."""

    def test_nothing_running(self) -> None:
        """Nothing runs: exit 0, no signal."""
        w = World()
        self.assertEqual(w.control().stop(), 0)
        self.assertEqual(w.signals, [])

    def test_stop_waits(self) -> None:
        """SIGTERM goes to the root only; stop returns when root and inners are gone."""
        w = World(procs=[ProxyProcess(5, None, 1), ProxyProcess(6, "br0", 5)])
        self.assertEqual(w.control().stop(), 0)
        self.assertEqual(w.signals, [(5, signal.SIGTERM)])
        self.assertEqual(w.procs, [])

    def test_orphans_terminated(self) -> None:
        """Orphan inners of this host's bridges get SIGTERM too."""
        w = World(procs=[ProxyProcess(6, "br0", 1)], maps={"br0": {1: D}})
        self.assertEqual(w.control().stop(), 0)
        self.assertEqual(w.signals, [(6, signal.SIGTERM)])

    def test_stubborn_killed(self) -> None:
        """What outlives grace period + margin is killed."""
        w = World(procs=[ProxyProcess(5, None, 1)], obey_term=False)
        self.assertEqual(w.control().stop(), 0)
        self.assertEqual(w.signals, [(5, signal.SIGTERM), (5, signal.SIGKILL)])
        self.assertGreaterEqual(w.now, 15.0)

    def test_restart(self) -> None:
        """Restart stops (waiting) and starts again."""
        w = World(procs=[ProxyProcess(5, None, 1)], maps={"br0": {1: D}})
        self.assertEqual(w.control().restart(), 0)
        self.assertEqual(len(w.twistd_calls), 1)
        self.assertEqual(w.find().root, 500)

    def test_reload(self) -> None:
        """Reload is SIGHUP to a running root; without one it starts the mesh."""
        w = World(procs=[ProxyProcess(5, None, 1)])
        self.assertEqual(w.control().reload(), 0)
        self.assertEqual(w.signals, [(5, signal.SIGHUP)])
        w2 = World(maps={"br0": {1: D}})
        self.assertEqual(w2.control().reload(), 0)
        self.assertEqual(len(w2.twistd_calls), 1)

    def test_reload_waits_for_new_bridges(self) -> None:
        """After SIGHUP, reload returns once the root serves every mapped bridge."""
        w = World(procs=[ProxyProcess(5, None, 1), ProxyProcess(6, "br0", 5)], maps={"br0": {1: D}})
        self.assertEqual(w.control().reload(), 0)
        self.assertEqual(w.signals, [(5, signal.SIGHUP)])
        self.assertEqual(w.now, 0.0)

    def test_reload_of_a_root_shutting_down(self) -> None:
        """A root that exits instead of reloading (it had lost its last bridge) is replaced."""
        w = World(procs=[ProxyProcess(5, None, 1)], maps={"br1": {1: D}}, hup_kills_root=True)
        self.assertEqual(w.control().reload(), 0)
        self.assertEqual(len(w.twistd_calls), 1)
        self.assertEqual(w.find().root, 500)
        self.assertEqual(sorted(w.find().inners), ["br1"])

    def test_reload_with_a_broken_config(self) -> None:
        """A broken config file is reported and exits 1, but the maps are still reloaded."""
        w = World(procs=[ProxyProcess(5, None, 1)], config_problem="/c.conf, line 3: not YAML")
        self.assertEqual(w.control().reload(), 1)
        self.assertEqual(w.signals, [(5, signal.SIGHUP)])
        self.assertIn("/c.conf, line 3: not YAML", w.err[0])
        self.assertIn("keeps its last good configuration", w.err[0])


class LockTests(unittest.TestCase):
    """The control lock serializes commands."""

    def test_commands_take_the_lock(self) -> None:
        """start, stop, restart and reload each hold the lock once (status does not)."""
        w = World(maps={"br0": {1: D}})
        c = w.control()
        c.start(), c.reload(), c.restart(), c.stop(), c.status()
        self.assertEqual(w.locked, 4)

    def test_real_lock_excludes(self) -> None:
        """A second holder waits, and gives up after the timeout with an error."""
        paths = Paths("/c", "/l", os.path.abspath(self.mktemp()))
        with control_lock(paths):
            with self.assertRaises(LockTimeoutError):
                with control_lock(paths, timeout=0.1):
                    pass
        with control_lock(paths, timeout=0.1):
            pass

    def test_lock_timeout_is_exit_1(self) -> None:
        """A command that cannot get the lock exits 1 and says why."""
        w = World()
        c = w.control()

        @contextlib.contextmanager
        def busy(paths: Paths) -> Iterator[None]:
            raise LockTimeoutError("held")
            yield

        c.lock = busy
        self.assertEqual(c.stop(), 1)
        self.assertIn("held", w.err[0])


class TwistdArgvTests(unittest.TestCase):
    """The command line ``start`` gives twistd, as twistd itself reads it."""

    def test_no_log_file_rotation(self) -> None:
        """twistd's own log goes to a discarding observer, never to a (rotated) file.

        With ``--logfile=/dev/null`` twistd's LogFile renamed the host's /dev/null
        away at 1 MB and wrote a regular file in its place.
        """
        from twisted.application.app import AppLogger
        from twisted.logger import ILogObserver
        from twisted.scripts._twistd_unix import ServerOptions

        argv = twistd_argv(PATHS)
        self.assertEqual(argv[1:3], ["-c", "from twisted.scripts.twistd import run; run()"])
        options = ServerOptions()
        options.parseOptions(argv[3:])
        self.assertEqual(options.subCommand, "one-tproxy")
        self.assertEqual(options.subOptions.paths, PATHS)
        self.assertIsNotNone(options["logger"])
        observer = options["logger"]()
        self.assertTrue(ILogObserver.providedBy(observer))
        observer({"log_format": "dropped", "log_level": None})
        # twistd opens its --logfile only when no --logger factory is given.
        self.assertIs(AppLogger(options)._observerFactory, options["logger"])
