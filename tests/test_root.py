"""Tests for tproxy.root: supervision, reload diffs and lookups, with fakes for every edge."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial import unittest

from tests.logcapture import Captured
from tproxy.model import Destination
from tproxy.root import Backoff, InnerSupervisor, RootService

A = Destination("127.0.0.1", 8001)
B = Destination("127.0.0.1", 8002)
C = Destination("127.0.0.1", 8003)


@define(eq=False)
class FakeInner:
    """An inner proxy process as the launcher reports it."""

    bridge: str
    pid: int | None
    link_fd: int
    exited: Deferred[str] = field(factory=Deferred)
    signals: list[int] = field(factory=list)

    def signal(self, signum: int) -> None:
        self.signals.append(signum)

    def die(self, how: str = "signal SIGKILL") -> None:
        self.exited.callback(how)


@define
class FakeLauncher:
    """Records launches."""

    started: list[FakeInner] = field(factory=list)
    fail: bool = False
    pid: int | None | bool = True  # True: 1000, 1001, ...; else this pid

    def launch(self, bridge: str, link_fd: int) -> FakeInner:
        if self.fail:
            raise OSError("no such executable")
        pid = 1000 + len(self.started) if self.pid is True else self.pid
        inner = FakeInner(bridge, pid, link_fd)  # type: ignore[arg-type]
        self.started.append(inner)
        return inner

    def running(self, bridge: str) -> list[FakeInner]:
        return [i for i in self.started if i.bridge == bridge and not i.exited.called]


@define(eq=False)
class FakeLink:
    """The root end of a link: records what the root tells it."""

    bridge: str
    lookup: Callable[[int], Destination | None]
    limits: Any
    pushed: list[list[int]] = field(factory=list)
    went_away: bool = False
    closed: Deferred[None] = field(factory=Deferred)
    adopted_fd: int | None = None

    def push_config(self, service_ports: Iterable[int]) -> None:
        self.pushed.append(list(service_ports))

    def go_away(self) -> None:
        self.went_away = True


@define
class FakeSettings:
    """A Config with what the root reads."""

    debug_level: int = 2
    limits: Any = field(factory=lambda: FakeLimits())


@define
class FakeLimits:
    """Limits with a grace period."""

    grace_period: float = 3.0


@define
class FakeLogs:
    """Records log control calls."""

    levels: list[int] = field(factory=list)
    reopens: int = 0

    def set_debug_level(self, debug_level: int) -> None:
        self.levels.append(debug_level)

    def reopen(self) -> None:
        self.reopens += 1


class Harness:
    """A RootService wired to fakes."""

    def __init__(self, maps: dict[str, dict[int, Destination]]) -> None:
        self.clock = Clock()
        self.maps = maps
        self.settings: FakeSettings | Exception = FakeSettings()
        self.launcher = FakeLauncher()
        self.links: list[FakeLink] = []
        self.empty = 0
        self.logs = FakeLogs()
        self.read_error: Exception | None = None
        self.ready = True
        self.root = RootService(
            self.clock,
            self.read_maps,
            FakeSettings(),
            self.load_settings,
            self.launcher,
            self.make_link,
            self.adopt,
            self.on_empty,
            self.logs,
            ready=lambda pid, title: self.ready,
        )

    def read_maps(self) -> dict[str, dict[int, Destination]]:
        if self.read_error is not None:
            raise self.read_error
        return self.maps

    def load_settings(self) -> FakeSettings:
        if isinstance(self.settings, Exception):
            raise self.settings
        return self.settings

    def make_link(self, bridge: str, lookup: Callable[[int], Destination | None], limits: Any):
        link = FakeLink(bridge, lookup, limits)
        self.links.append(link)
        return link

    def adopt(self, fd: int, protocol: IProtocol) -> None:
        assert isinstance(protocol, FakeLink)
        protocol.adopted_fd = fd

    def on_empty(self) -> None:
        self.empty += 1

    def link(self, bridge: str) -> FakeLink:
        """The newest link of ``bridge``."""
        return [lk for lk in self.links if lk.bridge == bridge][-1]


class RootStartTests(unittest.TestCase):
    """Starting the root."""

    def test_one_inner_per_bridge(self) -> None:
        """Each bridge with a non-empty map gets one inner proxy and its ports; empty maps none."""
        h = Harness({"br0": {5030: A, 1234: B}, "br1": {5030: C}, "br2": {}})
        h.root.startService()
        self.assertEqual(sorted(i.bridge for i in h.launcher.started), ["br0", "br1"])
        self.assertEqual(h.link("br0").pushed, [[1234, 5030]])
        self.assertEqual(h.link("br1").pushed, [[5030]])
        self.assertEqual(h.link("br0").limits, h.root.limits())
        self.assertEqual(h.empty, 0)

    def test_start_logged_without_unknown_pid(self) -> None:
        """A launcher that learns the pid later makes no "pid None" in the root's log."""
        captured = Captured(self, "tproxy.root")
        h = Harness({"br0": {5030: A}})
        h.launcher.pid = None
        h.root.startService()
        started = [m for m in captured.messages(LogLevel.info) if "started" in m]
        self.assertEqual(started[-1], "bridge br0: inner proxy one_tproxy_br0 started")
        h.launcher.pid = 7
        h.launcher.running("br0")[0].die()
        h.clock.advance(1)
        started = [m for m in captured.messages(LogLevel.info) if "started" in m]
        self.assertEqual(started[-1], "bridge br0: inner proxy one_tproxy_br0 started (pid 7)")

    def test_same_port_two_bridges(self) -> None:
        """Two bridges mapping one port to different destinations each look up their own."""
        h = Harness({"br0": {5030: A}, "br1": {5030: B}})
        h.root.startService()
        self.assertEqual(h.link("br0").lookup(5030), A)
        self.assertEqual(h.link("br1").lookup(5030), B)
        self.assertIsNone(h.link("br0").lookup(1234))

    def test_link_fd_not_kept(self) -> None:
        """The adopted fd and the child's fd are closed in the root after the launch."""
        import os

        h = Harness({"br0": {5030: A}})
        h.root.startService()
        inner = h.launcher.started[0]
        link = h.link("br0")
        for fd in (inner.link_fd, link.adopted_fd):
            assert fd is not None
            self.assertRaises(OSError, os.fstat, fd)

    def test_no_bridge(self) -> None:
        """With no bridge configured the root asks to exit and starts nothing."""
        h = Harness({"br0": {}})
        h.root.startService()
        self.assertEqual(h.launcher.started, [])
        self.assertEqual(h.empty, 1)

    def test_unreadable_maps(self) -> None:
        """Maps that cannot be read at start count as none (logged)."""
        h = Harness({"br0": {5030: A}})
        h.read_error = RuntimeError("netlink says no")
        h.root.startService()
        self.assertEqual(h.empty, 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_settings_at_start(self) -> None:
        """The settings given at start are in force; the file is read again only on reload."""
        h = Harness({"br0": {5030: A}})
        h.settings = ValueError("broken")
        h.root.startService()
        self.assertEqual(h.root.settings, FakeSettings())
        self.assertEqual(h.root.limits().grace_period, 3.0)

    def test_launch_failure_retried(self) -> None:
        """A launch that raises is logged and retried after the backoff."""
        h = Harness({"br0": {5030: A}})
        h.launcher.fail = True
        h.root.startService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        h.launcher.fail = False
        h.clock.advance(0.1)
        self.assertEqual(len(h.launcher.running("br0")), 1)


class RootReloadTests(unittest.TestCase):
    """What a reload changes, and what it leaves alone."""

    def setUp(self) -> None:
        self.h = Harness({"br0": {5030: A}, "br1": {5030: B}})
        self.h.root.startService()

    def test_destination_changed(self) -> None:
        """A changed destination is what the next lookup returns; nothing is pushed or restarted."""
        h = self.h
        h.maps = {"br0": {5030: C}, "br1": {5030: B}}
        h.root.reload()
        self.assertEqual(h.link("br0").lookup(5030), C)
        self.assertEqual(h.link("br1").lookup(5030), B)
        self.assertEqual(h.link("br0").pushed, [[5030]])
        self.assertEqual(len(h.launcher.started), 2)

    def test_limits_changed(self) -> None:
        """Changed limits apply to the running links' next streams, without a restart."""
        h = self.h
        h.settings = FakeSettings(limits=FakeLimits(grace_period=7.0))
        h.root.reload()
        self.assertEqual(h.link("br0").limits, FakeLimits(grace_period=7.0))
        self.assertEqual(h.link("br1").limits, FakeLimits(grace_period=7.0))
        self.assertEqual(len(h.launcher.started), 2)

    def test_ports_added_and_removed(self) -> None:
        """Changed port sets are pushed to that bridge's inner only."""
        h = self.h
        h.maps = {"br0": {5030: A, 1234: C}, "br1": {5030: B}}
        h.root.reload()
        h.maps = {"br0": {1234: C}, "br1": {5030: B}}
        h.root.reload()
        self.assertEqual(h.link("br0").pushed, [[5030], [1234, 5030], [1234]])
        self.assertEqual(h.link("br1").pushed, [[5030]])
        self.assertIsNone(h.link("br0").lookup(5030))

    def test_bridge_added(self) -> None:
        """A new bridge gets its inner proxy."""
        h = self.h
        h.maps = {"br0": {5030: A}, "br1": {5030: B}, "br2": {80: C}}
        h.root.reload()
        self.assertEqual(len(h.launcher.running("br2")), 1)
        self.assertEqual(h.link("br2").pushed, [[80]])

    def test_bridge_removed(self) -> None:
        """A removed bridge's inner gets go-away and SIGTERM; others are left alone."""
        h = self.h
        h.maps = {"br0": {5030: A}}
        h.root.reload()
        (br1,) = h.launcher.running("br1")
        self.assertTrue(h.link("br1").went_away)
        self.assertEqual(br1.signals, [signal.SIGTERM])
        self.assertFalse(h.link("br0").went_away)
        self.assertNotIn("br1", h.root.supervisors())
        br1.die("exit code 0")
        h.clock.advance(60)
        self.assertEqual(h.launcher.running("br1"), [])

    def test_removed_inner_killed_after_grace(self) -> None:
        """An inner that ignores SIGTERM is killed after the grace period and a margin."""
        h = self.h
        h.maps = {"br0": {5030: A}}
        h.root.reload()
        (br1,) = h.launcher.running("br1")
        h.clock.advance(3.0 + 1.9)
        self.assertEqual(br1.signals, [signal.SIGTERM])
        h.clock.advance(0.2)
        self.assertEqual(br1.signals, [signal.SIGTERM, signal.SIGKILL])

    def test_last_bridge_removed(self) -> None:
        """When the last bridge goes the root exits, after the inners are gone."""
        h = self.h
        h.maps = {}
        h.root.reload()
        self.assertEqual(h.empty, 0)
        for inner in h.launcher.running("br0") + h.launcher.running("br1"):
            inner.die("exit code 0")
        self.assertEqual(h.empty, 1)

    def test_bridge_added_while_exiting(self) -> None:
        """A bridge added while the last old one drains keeps the root running and serving it."""
        h = self.h
        h.maps = {}
        h.root.reload()
        h.maps = {"br2": {5030: C}}
        h.root.reload()
        for inner in h.launcher.running("br0") + h.launcher.running("br1"):
            inner.die("exit code 0")
        self.assertEqual(h.empty, 0)
        self.assertEqual([i.bridge for i in h.launcher.running("br2")], ["br2"])
        h.maps = {}
        h.root.reload()
        h.launcher.running("br2")[0].die("exit code 0")
        self.assertEqual(h.empty, 1)

    def test_sighup_forwarded_and_logs(self) -> None:
        """A reload reopens the log, re-reads the level, and SIGHUPs every inner."""
        h = self.h
        h.settings = FakeSettings(debug_level=3)
        h.ready = False
        h.root.reload()
        for inner in h.launcher.started:
            self.assertEqual(inner.signals, [])  # not titled yet: reads the config anyway
        h.ready = True
        h.root.reload()
        self.assertEqual(h.logs.levels, [3, 3])
        self.assertEqual(h.logs.reopens, 2)
        for inner in h.launcher.started:
            self.assertEqual(inner.signals, [signal.SIGHUP])

    def test_bad_config_on_reload(self) -> None:
        """A broken configuration on reload keeps the settings in force; maps still apply."""
        h = self.h
        before = h.root.settings
        h.settings = ValueError("broken")
        h.maps = {"br0": {5030: C}, "br1": {5030: B}}
        h.root.reload()
        self.assertIs(h.root.settings, before)
        self.assertEqual(h.link("br0").lookup(5030), C)

    def test_unreadable_maps_on_reload(self) -> None:
        """Maps that cannot be read on reload change nothing."""
        h = self.h
        h.read_error = RuntimeError("nope")
        h.root.reload()
        self.assertEqual(len(h.launcher.running("br0")), 1)
        self.assertEqual(h.empty, 0)

    def test_stop_all(self) -> None:
        """Stopping the root stops every inner gracefully and waits for them."""
        h = self.h
        d = h.root.stopService()
        fired: list[object] = []
        d.addCallback(fired.append)
        self.assertEqual(fired, [])
        for inner in h.launcher.started:
            self.assertEqual(inner.signals, [signal.SIGTERM])
            inner.die("exit code 0")
        self.assertEqual(len(fired), 1)
        h.clock.advance(100)
        self.assertEqual(len(h.launcher.started), 2)

    def test_reload_when_stopped(self) -> None:
        """A reload of a stopped root does nothing."""
        h = self.h
        h.root.stopService()
        h.maps = {"br9": {1: A}}
        h.root.reload()
        self.assertNotIn("br9", h.root.supervisors())


class SupervisionTests(unittest.TestCase):
    """Restarting dead inner proxies with backoff."""

    def test_backoff_policy(self) -> None:
        """Delays double from 0.1 s to at most 5 s and start over after a stable run."""
        b = Backoff()
        delays = []
        d = None
        for _ in range(8):
            d = b.next(d, uptime=0.5)
            delays.append(d)
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
        self.assertEqual(b.next(5.0, uptime=31), 0.1)

    def test_restart_after_death(self) -> None:
        """A killed inner is started again after 0.1 s with a fresh link and its ports."""
        h = Harness({"br0": {5030: A, 80: B}})
        h.root.startService()
        first = h.launcher.running("br0")[0]
        h.clock.advance(100)
        first.die()
        self.assertEqual(h.launcher.running("br0"), [])
        h.clock.advance(0.1)
        (second,) = h.launcher.running("br0")
        self.assertIsNot(second, first)
        self.assertEqual(h.link("br0").pushed, [[80, 5030]])
        self.assertEqual(len(h.links), 2)

    def test_crash_loop_backs_off(self) -> None:
        """An inner that keeps dying at once is restarted ever more slowly."""
        h = Harness({"br0": {5030: A}})
        h.root.startService()
        times = []
        for _ in range(5):
            h.launcher.running("br0")[0].die("exit code 1")
            (call,) = h.clock.getDelayedCalls()
            delay = call.getTime() - h.clock.seconds()
            times.append(round(delay, 3))
            h.clock.advance(delay)
            self.assertEqual(len(h.launcher.running("br0")), 1)
        self.assertEqual(times, [0.1, 0.2, 0.4, 0.8, 1.6])

    def test_restart_when_link_closed(self) -> None:
        """A closed link alone does not start a second inner (its process still runs)."""
        h = Harness({"br0": {5030: A}})
        h.root.startService()
        h.link("br0").closed.callback(None)
        h.clock.advance(10)
        self.assertEqual(len(h.launcher.started), 1)

    def test_supervisor_alone(self) -> None:
        """A supervisor stopped before its process started does nothing more."""
        launcher = FakeLauncher()
        sup = InnerSupervisor(
            Clock(), "br0", {1: A}, lambda: None, launcher, lambda *a: FakeLink(*a),
            lambda fd, p: None,
        )
        self.assertEqual(sup.lookup(1), A)
        d = sup.stopService()
        self.assertTrue(d.called)
