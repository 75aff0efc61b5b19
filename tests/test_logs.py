"""Tests for tproxy.logs: the CLI observer and the daemons' log files."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import types
from contextlib import redirect_stderr

from twisted.application.service import Application, IServiceCollection, MultiService
from twisted.logger import ILogObserver, LogBeginner, Logger, LogLevel, LogPublisher
from twisted.trial import unittest

from tproxy import logs
from tproxy.logs import (
    CLIObserver,
    DaemonLog,
    DaemonLogRoot,
    begin_daemon_logging,
    cli_logging,
    format_event_line,
)

LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} (?P<level>[A-Z]+) "
    r"\[(?P<ns>[^\]]+)\] (?P<msg>.*)$"
)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def boom() -> None:
    """Raise a recognisable error."""
    raise RuntimeError("kaboom")


class CLIObserverTests(unittest.TestCase):
    """Warnings and errors of the CLI on stderr, one line each."""

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.publisher = LogPublisher()
        self.log = Logger(namespace="tproxy.test", observer=self.publisher)

    def test_warning_line(self) -> None:
        """A warning prints as ``one-tproxy: warning: MESSAGE``."""
        self.publisher.addObserver(CLIObserver(self.out))
        self.log.warn("port {port} is odd", port=80)
        self.assertEqual(self.out.getvalue(), "one-tproxy: warning: port 80 is odd\n")

    def test_levels(self) -> None:
        """Info and debug are not printed; error and critical print as ``error``."""
        self.publisher.addObserver(CLIObserver(self.out))
        self.log.debug("d")
        self.log.info("i")
        self.log.error("e")
        self.log.critical("c")
        self.assertEqual(self.out.getvalue(), "one-tproxy: error: e\none-tproxy: error: c\n")

    def test_lower_level(self) -> None:
        """The least level printed can be lowered."""
        self.publisher.addObserver(CLIObserver(self.out, LogLevel.info))
        self.log.info("hello")
        self.log.debug("no")
        self.assertEqual(self.out.getvalue(), "one-tproxy: info: hello\n")

    def test_one_line(self) -> None:
        """A multi-line message is folded into one line."""
        self.publisher.addObserver(CLIObserver(self.out))
        self.log.warn("a\nb\n   c")
        self.assertEqual(self.out.getvalue(), "one-tproxy: warning: a b c\n")

    def test_failure(self) -> None:
        """A logged failure prints its message and the exception, without traceback."""
        self.publisher.addObserver(CLIObserver(self.out))
        try:
            boom()
        except RuntimeError:
            self.log.failure("step failed")
        self.assertEqual(
            self.out.getvalue(), "one-tproxy: error: step failed: RuntimeError: kaboom\n"
        )

    def test_closed_stream(self) -> None:
        """A closed stderr does not make logging raise."""
        self.publisher.addObserver(CLIObserver(self.out))
        self.out.close()
        self.log.warn("nobody hears this")

    def test_cli_logging_context(self) -> None:
        """cli_logging prints only while inside, to the stderr of the moment."""
        with redirect_stderr(self.out), cli_logging(publisher=self.publisher):
            self.log.warn("inside")
        self.log.warn("outside")
        self.assertEqual(self.out.getvalue(), "one-tproxy: warning: inside\n")

    def test_cli_logging_global(self) -> None:
        """By default cli_logging observes the global publisher every Logger uses."""
        with cli_logging(self.out):
            Logger(namespace="tproxy.test").warn("global")
        self.assertEqual(self.out.getvalue(), "one-tproxy: warning: global\n")


class FormatTests(unittest.TestCase):
    """The line format of the log files."""

    def test_line(self) -> None:
        """Time, level, namespace and message on one line."""
        line = format_event_line(
            {
                "log_format": "bound {port}",
                "port": 5030,
                "log_level": LogLevel.info,
                "log_namespace": "tproxy.inner",
                "log_time": 0.25,
            }
        )
        m = LINE_RE.match(line.rstrip("\n"))
        assert m is not None, line
        self.assertEqual(m.group("level", "ns", "msg"), ("INFO", "tproxy.inner", "bound 5030"))
        self.assertIn(".250", line)
        self.assertTrue(line.endswith("\n"))

    def test_legacy_event(self) -> None:
        """Events of twisted.python.log show their system instead of ``log_legacy``."""
        line = format_event_line(
            {
                "log_format": "{msg}",
                "msg": "x",
                "log_level": LogLevel.warn,
                "log_namespace": "log_legacy",
                "log_system": "UNIXServer,0",
                "log_time": 1.0,
            }
        )
        self.assertIn(" WARNING [UNIXServer,0] x\n", line)

    def test_broken_format(self) -> None:
        """A bad format string still gives a line."""
        line = format_event_line(
            {"log_format": "{missing}", "log_level": LogLevel.error, "log_namespace": "n"}
        )
        self.assertIn(" ERROR [n] Unable to format event", line)


class DaemonLogTests(unittest.TestCase):
    """LOG_DIR/NAME.log for the daemons."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.publisher = LogPublisher()
        self.log = Logger(namespace="tproxy.test", observer=self.publisher)
        self.complaints = io.StringIO()
        self.clock = FakeClock()

    def make(self, log_dir: str | None = None, level: LogLevel = LogLevel.info) -> DaemonLog:
        daemon_log = DaemonLog(
            self.dir if log_dir is None else log_dir,
            "one_tproxy_tqc0",
            level,
            complain=self.complaints,
            monotonic=self.clock,
            retry_interval=30,
        )
        self.addCleanup(daemon_log.close)
        daemon_log.install(self.publisher)
        return daemon_log

    def lines(self, path: str | None = None) -> list[str]:
        with open(path or os.path.join(self.dir, "one_tproxy_tqc0.log")) as f:
            return f.read().splitlines()

    def messages(self, path: str | None = None) -> list[tuple[str, str]]:
        out = []
        for line in self.lines(path):
            m = LINE_RE.match(line)
            if m:
                out.append((m.group("level"), m.group("msg")))
        return out

    def test_writes_named_file(self) -> None:
        """Events go to LOG_DIR/NAME.log, one parseable line each, written at once."""
        d = self.make()
        self.assertEqual(d.path, os.path.join(self.dir, "one_tproxy_tqc0.log"))
        self.log.info("listening on {port}", port=5030)
        self.log.warn("careful")
        # Line buffered: visible without close.
        self.assertEqual(self.messages(), [("INFO", "listening on 5030"), ("WARNING", "careful")])
        self.assertTrue(all(LINE_RE.match(line) for line in self.lines()))
        self.assertIn("[tproxy.test]", self.lines()[0])
        self.assertEqual(self.complaints.getvalue(), "")

    def test_twisted_port_chatter_left_out(self) -> None:
        """Twisted's "X starting on N" / "(TCP Port N Closed)" lines stay out of the file."""
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory
        from twisted.logger import globalLogPublisher
        from twisted.python import log as legacy_log

        d = self.make()
        d.install(globalLogPublisher)
        self.addCleanup(d.uninstall, globalLogPublisher)
        factory = Factory()
        factory.noisy = False  # its "Starting factory" lines are another matter
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        legacy_log.msg("an ordinary legacy line")
        stopped = port.stopListening()

        def check(_: object) -> None:
            self.assertEqual(self.messages(), [("INFO", "an ordinary legacy line")])

        return stopped.addCallback(check)

    def test_appends(self) -> None:
        """An existing file is appended to, not truncated."""
        with open(os.path.join(self.dir, "one_tproxy_tqc0.log"), "w") as f:
            f.write("old line\n")
        self.make()
        self.log.info("new")
        self.assertEqual(self.lines()[0], "old line")
        self.assertEqual(len(self.lines()), 2)

    def test_level_filter_and_set_level(self) -> None:
        """Events below the level are dropped; set_level changes it at runtime."""
        d = self.make(level=LogLevel.warn)
        self.log.info("hidden")
        self.log.debug("hidden")
        self.log.error("shown")
        d.set_level(LogLevel.debug)
        self.assertEqual(d.level, LogLevel.debug)
        self.log.debug("now shown")
        d.set_level(LogLevel.error)
        self.log.warn("hidden again")
        self.assertEqual(self.messages(), [("ERROR", "shown"), ("DEBUG", "now shown")])

    def test_failure_traceback(self) -> None:
        """log.failure writes the message and the traceback below it."""
        self.make(level=LogLevel.error)
        try:
            boom()
        except RuntimeError:
            self.log.failure("unexpected")
        text = "\n".join(self.lines())
        self.assertEqual(self.messages()[0], ("CRITICAL", "unexpected"))
        self.assertIn("Traceback", text)
        self.assertIn("in boom", text)
        self.assertIn("RuntimeError: kaboom", text)

    def test_reopen_after_rotation(self) -> None:
        """After logrotate renames the file, reopen() starts a new one."""
        d = self.make()
        self.log.info("before")
        rotated = d.path + ".1"
        os.rename(d.path, rotated)
        self.log.info("still old")
        d.reopen()
        self.log.info("after")
        self.assertEqual([m for _, m in self.messages(rotated)], ["before", "still old"])
        self.assertEqual([m for _, m in self.messages()], ["after"])

    def test_missing_dir_complains_once_and_recovers(self) -> None:
        """A missing log dir: one complaint, no exception, dropped count, retry later."""
        log_dir = os.path.join(self.dir, "later")
        d = self.make(log_dir)
        self.assertFalse(d.writing)
        for i in range(5):
            self.log.info("lost {i}", i=i)
        self.assertEqual(d.dropped, 5)
        complaint = self.complaints.getvalue()
        self.assertEqual(complaint.count("\n"), 1, complaint)
        self.assertTrue(complaint.startswith("one-tproxy: warning: cannot open "), complaint)
        self.assertIn("No such file or directory", complaint)
        self.assertIn(log_dir, complaint)
        os.mkdir(log_dir)
        self.log.info("before retry interval")  # not tried yet: dropped
        self.assertFalse(d.writing)
        self.clock.now += 31
        self.log.info("back")
        self.assertTrue(d.writing)
        self.assertEqual(d.dropped, 0)
        msgs = self.messages(d.path)
        self.assertEqual(msgs[0], ("WARNING", "6 log messages were lost before"))
        self.assertEqual(msgs[1:], [("INFO", "back")])
        self.assertEqual(self.complaints.getvalue().count("\n"), 1)

    def test_reopen_retries_at_once(self) -> None:
        """reopen() tries the file immediately, whatever the retry interval."""
        log_dir = os.path.join(self.dir, "later")
        d = self.make(log_dir)
        os.mkdir(log_dir)
        d.reopen()
        self.assertTrue(d.writing)

    def test_not_a_directory(self) -> None:
        """A log dir that is a file is reported once and logging goes on."""
        not_dir = os.path.join(self.dir, "file")
        open(not_dir, "w").close()
        d = self.make(not_dir)
        self.log.error("x")
        self.clock.now += 100
        self.log.error("y")
        self.assertEqual(d.dropped, 2)
        self.assertEqual(self.complaints.getvalue().count("\n"), 1)
        self.assertIn("Not a directory", self.complaints.getvalue())

    def test_full_disk(self) -> None:
        """Writes failing with ENOSPC (/dev/full) complain once and never raise."""
        if not os.path.exists("/dev/full"):
            raise unittest.SkipTest("no /dev/full on this system")
        os.symlink("/dev/full", os.path.join(self.dir, "one_tproxy_tqc0.log"))
        d = self.make()
        self.assertTrue(d.writing)
        self.log.info("first")
        self.assertFalse(d.writing)
        for _ in range(3):
            self.log.info("more")
        self.clock.now += 31
        self.log.info("retried")  # reopens /dev/full, fails again, no second complaint
        self.assertEqual(d.dropped, 5)
        complaint = self.complaints.getvalue()
        self.assertEqual(complaint.count("\n"), 1, complaint)
        self.assertIn("No space left on device", complaint)

    def test_close_and_uninstall(self) -> None:
        """After uninstall nothing more is written; after close events are ignored."""
        d = self.make()
        self.log.info("one")
        d.uninstall(self.publisher)
        self.log.info("two")
        d.install(self.publisher)
        d.close()
        self.assertFalse(d.writing)
        self.log.info("three")
        self.assertEqual(d.dropped, 0)
        self.assertEqual([m for _, m in self.messages()], ["one"])

    def test_default_complaint_goes_to_original_stderr(self) -> None:
        """Without ``complain`` the complaint goes to sys.__stderr__ (not a redirected one)."""
        fake = io.StringIO()
        self.patch(sys, "__stderr__", fake)
        DaemonLog(os.path.join(self.dir, "missing"), "x")
        self.assertIn("cannot open", fake.getvalue())

    def test_file_mode(self) -> None:
        """The file is created with mode 0640 (before the umask)."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        d = self.make()
        self.assertEqual(os.stat(d.path).st_mode & 0o777, 0o640)


class DebugGateTests(unittest.TestCase):
    """``tproxy.logs.debug_enabled``: whether DEBUG can reach the process's log."""

    def setUp(self) -> None:
        was = logs.debug_enabled

        def restore() -> None:
            logs.debug_enabled = was

        self.addCleanup(restore)

    def _log(self, level: LogLevel) -> DaemonLog:
        d = DaemonLog(self.mktemp(), "x", level, complain=io.StringIO())
        self.addCleanup(d.close)
        return d

    def test_follows_the_governing_log(self) -> None:
        """The governing log sets the gate from its level, now and on each set_level."""
        d = self._log(LogLevel.warn)
        d.govern_debug_gate()
        self.assertFalse(logs.debug_enabled)
        d.set_level(LogLevel.debug)
        self.assertTrue(logs.debug_enabled)
        d.set_level(LogLevel.info)
        self.assertFalse(logs.debug_enabled)

    def test_other_logs_leave_it_alone(self) -> None:
        """A log that does not govern (tests, a custom beginner) never changes the gate."""
        logs.debug_enabled = True
        d = self._log(LogLevel.error)
        d.set_level(LogLevel.warn)
        stdio = types.SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
        warnings = types.SimpleNamespace(showwarning=None)
        beginner = LogBeginner(LogPublisher(), io.StringIO(), stdio, warnings)
        begin_daemon_logging(d, beginner=beginner, redirect_stdio=False)
        DaemonLogRoot(d).setServiceParent(MultiService())
        self.assertTrue(logs.debug_enabled)

    def test_twistd_root_governs_when_started(self) -> None:
        """Under a twistd Application the DaemonLogRoot's log governs once started."""
        logs.debug_enabled = True
        root = DaemonLogRoot(self._log(LogLevel.info))
        root.setServiceParent(Application("one-tproxy"))
        self.assertTrue(logs.debug_enabled)
        root.startService()
        self.addCleanup(root.stopService)
        self.assertFalse(logs.debug_enabled)


class BeginTests(unittest.TestCase):
    """Starting a process's logging."""

    def test_begin_daemon_logging_replays_buffer(self) -> None:
        """Events logged before begin_daemon_logging reach the file too."""
        log_dir = self.mktemp()
        os.mkdir(log_dir)
        publisher = LogPublisher()
        stdio = types.SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
        warnings = types.SimpleNamespace(showwarning=None)
        beginner = LogBeginner(publisher, io.StringIO(), stdio, warnings)
        log = Logger(namespace="tproxy.test", observer=publisher)
        log.info("early")
        d = DaemonLog(log_dir, "one_tproxy_tqc1")
        self.addCleanup(d.close)
        begin_daemon_logging(d, beginner=beginner)
        log.info("late")
        print("printed", file=stdio.stdout)
        with open(d.path) as f:
            text = f.read()
        self.assertIn("[tproxy.test] early\n", text)
        self.assertIn("[tproxy.test] late\n", text)
        self.assertIn("printed", text)

    def test_root_becomes_application_observer(self) -> None:
        """Added to a twistd Application, DaemonLogRoot makes its log the ILogObserver."""
        log_dir = self.mktemp()
        os.mkdir(log_dir)
        d = DaemonLog(log_dir, "one_tproxy")
        self.addCleanup(d.close)
        application = Application("one-tproxy")
        root = DaemonLogRoot(d)
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), d)
        self.assertIn(root, list(IServiceCollection(application)))

    def test_root_under_plain_parent(self) -> None:
        """Under an ordinary MultiService, DaemonLogRoot leaves logging alone."""
        parent = MultiService()
        d = DaemonLog(self.mktemp(), "x", complain=io.StringIO())
        DaemonLogRoot(d).setServiceParent(parent)
        self.assertEqual(len(list(parent)), 1)


TAC = """\
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.logger import Logger, LogLevel
from tproxy.logs import DaemonLog, DaemonLogRoot

Logger(namespace="tac").warn("built before logging began")
application = Application("one-tproxy")
DaemonLogRoot(DaemonLog({log_dir!r}, "one_tproxy", LogLevel.info)).setServiceParent(application)

def fail():
    raise RuntimeError("boom in a timed call")

def later():
    print("printed on stdout")
    Logger(namespace="tac").debug("filtered out")
    reactor.callLater(0, fail)
    reactor.callLater(0.1, reactor.stop)

reactor.callWhenRunning(later)
"""


class TwistdTests(unittest.TestCase):
    """The root proxy's logging under a real twistd."""

    def test_twistd_logs_to_file(self) -> None:
        """twistd logs only to LOG_DIR/one_tproxy.log: each early event once, stdout, failures."""
        work = os.path.abspath(self.mktemp())
        os.mkdir(work)
        tac = os.path.join(work, "app.tac")
        with open(tac, "w") as f:
            f.write(TAC.format(log_dir=work))
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "-y",
                tac,
            ],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(sorted(os.listdir(work)), ["app.tac", "one_tproxy.log"])
        with open(os.path.join(work, "one_tproxy.log")) as f:
            text = f.read()
        self.assertEqual(text.count("built before logging began"), 1, text)
        self.assertIn(" WARNING [tac] built before logging began\n", text)
        self.assertIn("twistd", text)
        self.assertIn("printed on stdout", text)
        self.assertIn("builtins.RuntimeError: boom in a timed call", text)
        self.assertIn("Traceback", text)
        self.assertNotIn("filtered out", text)
        self.assertEqual(proc.stdout, "")
