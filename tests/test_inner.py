"""Tests for tproxy.inner.InnerService: port diffs, graceful stop, link end, with fakes."""

from __future__ import annotations

from attrs import define, field
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial import unittest

from tests.logcapture import Captured
from tproxy.config import Limits
from tproxy.inner import InnerService, _Hangups, parse_args


@define(eq=False)
class FakePort:
    """A listening port."""

    number: int
    factory: object
    listening: bool = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return defer.succeed(None)


@define
class Endpoints:
    """Makes fake endpoints and remembers every port bound."""

    ports: list[FakePort] = field(factory=list)
    refuse: set[int] = field(factory=set)
    reason: str = "in use"
    attempts: int = 0

    def make(self, number: int) -> FakeEndpoint:
        return FakeEndpoint(self, number)

    def listening(self) -> list[int]:
        return sorted(p.number for p in self.ports if p.listening)


@define
class FakeEndpoint:
    """A server endpoint for one port."""

    owner: Endpoints
    number: int

    def listen(self, factory: IProtocolFactory) -> Deferred[FakePort]:
        self.owner.attempts += 1
        if self.number in self.owner.refuse:
            error = OSError(self.owner.reason)
            return defer.fail(CannotListenError("169.254.16.9", self.number, error))
        port = FakePort(self.number, factory)
        self.owner.ports.append(port)
        return defer.succeed(port)


@define(eq=False)
class FakeInnerLink:
    """The inner end of a link."""

    closed: Deferred[None] = field(factory=Deferred)
    went_away: bool = False
    streams: int = 0
    factories: dict[int, Factory] = field(factory=dict)
    transport: object = None
    limits: object = None

    def guest_factory(self, service_port: int) -> IProtocolFactory:
        f = Factory()
        self.factories[service_port] = f
        return f

    def go_away(self) -> None:
        self.went_away = True

    def stream_count(self) -> int:
        return self.streams


@define
class FakeTransport:
    """Records loseConnection."""

    lost: int = 0

    def loseConnection(self) -> None:
        self.lost += 1


class Harness:
    """An InnerService on fakes."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.endpoints = Endpoints()
        self.done = 0
        self.service = InnerService(
            self.clock, "br0", self.endpoints.make, lambda: 2.0, self.on_done
        )
        self.link = FakeInnerLink(transport=FakeTransport())
        self.service.attach(self.link)  # type: ignore[arg-type]
        self.service.startService()

    def on_done(self) -> None:
        self.done += 1


class InnerPortsTests(unittest.TestCase):
    """Config pushes become listening services."""

    def test_push_binds(self) -> None:
        """Each pushed port is bound with the link's guest factory for that port."""
        h = Harness()
        h.service.set_ports(frozenset({5030, 1234}))
        self.assertEqual(h.endpoints.listening(), [1234, 5030])
        for port in h.endpoints.ports:
            self.assertIs(port.factory, h.link.factories[port.number])

    def test_diff(self) -> None:
        """A later push unbinds dropped ports, binds new ones, leaves kept ones alone."""
        h = Harness()
        h.service.set_ports(frozenset({5030, 1234}))
        kept = [p for p in h.endpoints.ports if p.number == 5030][0]
        h.service.set_ports(frozenset({5030, 80}))
        self.assertEqual(h.endpoints.listening(), [80, 5030])
        self.assertTrue(kept.listening)
        self.assertEqual(len(h.endpoints.ports), 3)
        h.service.set_ports(frozenset())
        self.assertEqual(h.endpoints.listening(), [])

    def test_bind_failure_logged(self) -> None:
        """A port that cannot be bound is logged and retried; the others listen meanwhile."""
        h = Harness()
        h.endpoints.refuse = {1234}
        h.service.set_ports(frozenset({5030, 1234}))
        self.assertEqual(h.endpoints.listening(), [5030])
        h.endpoints.refuse = set()
        h.clock.advance(1.0)
        self.assertEqual(h.endpoints.listening(), [1234, 5030])

    def test_bind_failure_backs_off(self) -> None:
        """A port that stays busy is retried after 1, 2, 4 ... 60 s, logged once per step."""
        log = Captured(self, "tproxy.inner")
        h = Harness()
        h.endpoints.refuse = {1234}
        h.service.set_ports(frozenset({1234}))
        attempts = [0.0]
        for second in range(1, 200):
            before = h.endpoints.attempts
            h.clock.advance(1.0)
            if h.endpoints.attempts > before:
                attempts.append(float(second))
        self.assertEqual(attempts, [0, 1, 3, 7, 15, 31, 63, 123, 183])
        errors = log.messages(LogLevel.error)
        self.assertEqual(len(errors), 7, errors)
        self.assertIn("cannot listen on 169.254.16.9:1234: in use; retrying in 1 s", errors[0])
        self.assertIn("(7 attempts): in use; retrying in 60 s", errors[-1])
        report = h.service.listener_report()
        self.assertEqual(report["not_listening"], [1234])
        self.assertEqual(report["listen_errors"], {"1234": "in use"})
        h.endpoints.refuse = set()
        h.clock.advance(60.0)
        self.assertEqual(h.endpoints.listening(), [1234])
        self.assertNotIn("listen_errors", h.service.listener_report())
        self.assertIn(
            "listening on 169.254.16.9:1234 (after 9 failed attempts)",
            log.messages(LogLevel.info),
        )

    def test_new_reason_logged(self) -> None:
        """At the longest delay a failure is logged again only when its reason changes."""
        log = Captured(self, "tproxy.inner")
        h = Harness()
        h.endpoints.refuse = {1234}
        h.service.set_ports(frozenset({1234}))
        for _ in range(63):
            h.clock.advance(1.0)
        log.clear()
        h.endpoints.reason = "permission denied"
        for _ in range(120):
            h.clock.advance(1.0)
        errors = log.messages(LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("permission denied; retrying in 60 s", errors[0])
        report = h.service.listener_report()
        self.assertEqual(report["listen_errors"], {"1234": "permission denied"})

    def test_apply_limits(self) -> None:
        """A reload's limits reach the link; the changed ones are logged, unchanged is quiet."""
        log = Captured(self, "tproxy.inner")
        h = Harness()
        h.link.limits = Limits()
        h.service.apply_limits(Limits())
        self.assertEqual(log.messages(LogLevel.info), [])
        new = Limits(grace_period=1.0, stream_window=65536)
        h.service.apply_limits(new)
        self.assertIs(h.link.limits, new)
        self.assertEqual(
            log.messages(LogLevel.info),
            ["limits changed: grace_period 10.0 -> 1.0, stream_window 1048576 -> 65536"],
        )

    def test_retry_stops_with_port(self) -> None:
        """A port dropped while its bind is being retried is not bound later."""
        h = Harness()
        h.endpoints.refuse = {1234}
        h.service.set_ports(frozenset({1234}))
        h.service.set_ports(frozenset())
        h.endpoints.refuse = set()
        h.clock.advance(5.0)
        self.assertEqual(h.endpoints.listening(), [])

    def test_args(self) -> None:
        """The command line carries the bridge and the three paths."""
        args = parse_args(["br0", "--config", "/c", "--log-dir", "/l", "--run-dir", "/r"])
        self.assertEqual(args.bridge, "br0")
        self.assertEqual((args.paths.config, args.paths.log_dir), ("/c", "/l"))


class ParseArgsTests(unittest.TestCase):
    """The inner proxy's command line, in the launchers' fixed form and otherwise."""

    def test_fixed_form_same_as_argparse(self) -> None:
        """The launchers' form is read without argparse, to the same result."""
        fixed = ["br0", "--config", "/c", "--log-dir", "/l", "--run-dir", "/r"]
        reordered = ["br0", "--run-dir", "/r", "--config", "/c", "--log-dir", "/l"]
        a, b = parse_args(fixed), parse_args(reordered)
        self.assertEqual(vars(a), vars(b))
        self.assertEqual((a.bridge, a.paths.config, a.paths.run_dir), ("br0", "/c", "/r"))

    def test_odd_form_still_checked(self) -> None:
        """Anything but the fixed form goes through argparse (and its errors)."""
        with self.assertRaises(SystemExit):
            parse_args(["br0", "--config", "/c", "--log-dir", "/l", "--bogus", "/r"])
        args = parse_args(["br1", "--config", "", "--log-dir", "/l", "--run-dir", "/r"])
        self.assertEqual(args.bridge, "br1")
        self.assertNotEqual(args.paths.config, "")


class InnerStopTests(unittest.TestCase):
    """Ending the inner proxy."""

    def test_link_closed(self) -> None:
        """The end of the link (the root is gone) ends the process."""
        h = Harness()
        h.link.closed.callback(None)
        self.assertEqual(h.done, 1)

    def test_graceful_stop_waits_for_streams(self) -> None:
        """Stop unbinds at once, sends go-away and finishes when the streams are done."""
        h = Harness()
        h.service.set_ports(frozenset({5030}))
        h.link.streams = 2
        d = h.service.stopService()
        self.assertEqual(h.endpoints.listening(), [])
        self.assertTrue(h.link.went_away)
        h.clock.advance(1.0)
        self.assertFalse(d.called)
        h.link.streams = 0
        h.clock.advance(0.1)
        self.assertTrue(d.called)
        self.assertEqual(h.link.transport.lost, 1)  # type: ignore[attr-defined]

    def test_graceful_stop_bounded(self) -> None:
        """Streams that outlive the grace period are closed with the link."""
        h = Harness()
        h.link.streams = 1
        d = h.service.stopService()
        h.clock.advance(1.9)
        self.assertFalse(d.called)
        h.clock.advance(0.2)
        self.assertTrue(d.called)
        self.assertIs(h.service.stopService(), d)

    def test_no_push_after_stop(self) -> None:
        """A push arriving while stopping binds nothing."""
        h = Harness()
        h.service.stopService()
        h.service.set_ports(frozenset({80}))
        self.assertEqual(h.endpoints.listening(), [])

    def test_stop_after_link_closed(self) -> None:
        """Stopping after the link ended finishes at once."""
        h = Harness()
        h.link.closed.callback(None)
        self.assertTrue(h.service.stopService().called)


class HangupTests(unittest.TestCase):
    """SIGHUP before and after the reactor exists."""

    def test_noted_then_run(self) -> None:
        """A SIGHUP before the reactor is run once the reactor runs; later ones each run."""
        from twisted.internet.testing import MemoryReactor

        calls: list[int] = []
        hup = _Hangups()
        hup.signalled(1, None)
        hup.signalled(1, None)
        reactor = MemoryReactor()
        reactor.callFromThread = lambda f, *a: f(*a)  # type: ignore[method-assign]
        hup.attach(reactor, lambda: calls.append(1))
        self.assertEqual(len(reactor.whenRunningHooks), 1)
        reactor.run()
        hup.signalled(1, None)
        self.assertEqual(calls, [1, 1])
