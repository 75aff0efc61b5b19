"""Tests for tproxy.observe (the status document) and the inner proxy's listener report."""

from __future__ import annotations

import os
from typing import Any

from attrs import define, field
from twisted.trial import unittest

from tests.test_inner import FakeInnerLink
from tests.test_inner import Harness as InnerHarness
from tproxy.metrics import BridgeStats, PortStats, render_text
from tproxy.model import Destination
from tproxy.observe import status_document


@define
class FakeProcess:
    pid: int | None


@define
class FakeLink:
    counters: dict[int, dict[str, Any]]
    inner_report: dict[str, Any] | None = None
    inner_report_at: float | None = None

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return self.counters


@define
class FakeSupervisor:
    bridge: str
    services: dict[int, Destination] = field(factory=dict)
    starts: int = 1
    process: FakeProcess | None = None
    link: Any = None
    started_at: float = 0.0


class StatusDocumentTests(unittest.TestCase):
    """What ``{"cmd": "stats"}`` answers."""

    def test_running_bridge(self) -> None:
        """Processes, destinations, listener states from the report, and the link's counters."""
        stats = BridgeStats()
        stats.port(5030).accepted = 4
        link = FakeLink(
            stats.snapshot(),
            inner_report={"listening": [5030], "counters": {"accepted": 4}},
            inner_report_at=95.0,
        )
        sup = FakeSupervisor(
            "br0",
            {5030: Destination("10.0.0.1", 80), 1234: Destination("10.0.0.2", 81)},
            starts=3,
            process=FakeProcess(42),
            link=link,
            started_at=40.0,
        )
        doc = status_document([sup], {"br0": stats}, pid=7, started_at=10.0, now=100.0)
        self.assertEqual(doc["root"], {"pid": 7, "uptime": 90.0})
        b = doc["bridges"]["br0"]
        self.assertEqual(
            b["inner"],
            {
                "pid": 42,
                "running": True,
                "uptime": 60.0,
                "restarts": 2,
                "report_age": 5.0,
                "link": {"accepted": 4},
            },
        )
        self.assertEqual(list(b["ports"]), ["1234", "5030"])
        self.assertEqual(b["ports"]["5030"]["accepted"], 4)
        self.assertEqual(b["ports"]["5030"]["listener"], "listening")
        self.assertEqual(b["ports"]["5030"]["destination"], "10.0.0.1:80")
        self.assertEqual(b["ports"]["1234"]["listener"], "not listening")
        self.assertEqual(b["ports"]["1234"]["accepted"], 0)

    def test_counting_off(self) -> None:
        """Counting off: the document says so and has no counter figures, not zeros."""
        link = FakeLink(
            {5030: PortStats().snapshot()},
            inner_report={"listening": [5030], "counters": {"accepted": 4}},
            inner_report_at=95.0,
        )
        sup = FakeSupervisor(
            "br0", {5030: Destination("10.0.0.1", 80)}, process=FakeProcess(42), link=link
        )
        doc = status_document(
            [sup], {"br0": BridgeStats()}, pid=7, started_at=10.0, now=100.0, counting=False
        )
        self.assertIs(doc["counting"], False)
        b = doc["bridges"]["br0"]
        self.assertEqual(
            b["ports"], {"5030": {"destination": "10.0.0.1:80", "listener": "listening"}}
        )
        self.assertNotIn("link", b["inner"])
        on = status_document([sup], {}, pid=7, started_at=10.0, now=100.0)
        self.assertIs(on["counting"], True)
        self.assertEqual(on["bridges"]["br0"]["ports"]["5030"]["accepted"], 0)

    def test_listen_error(self) -> None:
        """A port the inner proxy cannot bind carries the reason it reported."""
        report = {"listening": [], "listen_errors": {"5030": "Address already in use"}}
        link = FakeLink({}, inner_report=report, inner_report_at=1.0)
        sup = FakeSupervisor(
            "br0",
            {5030: Destination("10.0.0.1", 80), 81: Destination("10.0.0.1", 81)},
            process=FakeProcess(42),
            link=link,
        )
        doc = status_document([sup], {}, pid=7, started_at=0.0, now=1.0)
        ports = doc["bridges"]["br0"]["ports"]
        self.assertEqual(ports["5030"]["listener"], "not listening")
        self.assertEqual(ports["5030"]["listen_error"], "Address already in use")
        self.assertNotIn("listen_error", ports["81"])
        self.assertIn(
            "listener not listening (Address already in use; retrying)",
            render_text({"bridges": {"br0": {"inner": {}, "ports": ports}}}),
        )

    def test_inner_down(self) -> None:
        """Between restarts the counters come from the kept stats; listeners are not running."""
        stats = BridgeStats()
        stats.port(9).refuse("UNKNOWN_SERVICE")
        sup = FakeSupervisor("br1", {5030: Destination("10.0.0.1", 80)}, starts=2)
        doc = status_document([sup], {"br1": stats}, pid=7, started_at=0.0, now=1.0)
        b = doc["bridges"]["br1"]
        self.assertFalse(b["inner"]["running"])
        self.assertIsNone(b["inner"]["uptime"])
        self.assertEqual(b["ports"]["9"]["refused"], {"UNKNOWN_SERVICE": 1})
        self.assertIsNone(b["ports"]["9"]["destination"])
        self.assertEqual(b["ports"]["5030"]["listener"], "not running")

    def test_no_report_yet(self) -> None:
        """Before the inner's first STATS report a listener's state is unknown."""
        sup = FakeSupervisor(
            "br2", {80: Destination("10.0.0.1", 80)}, process=FakeProcess(5), link=FakeLink({})
        )
        doc = status_document([sup], {}, pid=7, started_at=0.0, now=1.0)
        self.assertEqual(doc["bridges"]["br2"]["ports"]["80"]["listener"], "unknown")


@define(eq=False)
class ReportingLink(FakeInnerLink):
    """A fake inner link that counts the STATS reports it was asked for."""

    reports: int = 0

    def send_stats(self) -> None:
        self.reports += 1


class InnerListenerReportTests(unittest.TestCase):
    """The inner proxy's part of its STATS report."""

    def test_report_and_notify(self) -> None:
        """Bound and unbound ports (with the reason) are listed; each bind, and a port's
        first failure, ask the link to report now."""
        h = InnerHarness()
        link = ReportingLink()
        h.service.link = link
        h.endpoints.refuse.add(1234)
        h.service.set_ports(frozenset({5030, 1234}))
        self.assertEqual(
            h.service.listener_report(),
            {
                "pid": os.getpid(),
                "listening": [5030],
                "not_listening": [1234],
                "listen_errors": {"1234": "in use"},
            },
        )
        self.assertEqual(link.reports, 2)
        h.clock.advance(1.0)
        self.assertEqual(link.reports, 2, "a retry that fails again is no news")
        self.flushLoggedErrors()
