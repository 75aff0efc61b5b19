"""Logging for the command line and for the daemons, on ``twisted.logger``.

Every module logs through its own ``twisted.logger.Logger``; this module only
provides the *observers* that put those events somewhere:

* ``cli_logging()`` - for ``one-tproxy`` commands: warnings and errors go to
  stderr as one line each, ``one-tproxy: warning: ...``.
* ``DaemonLog`` - for the proxies: ``LOG_DIR/<name>.log`` (``one_tproxy.log``,
  ``one_tproxy_BR.log``), one line per event with time, level, namespace and
  message, tracebacks of ``log.failure`` below it. The level is changed at
  runtime with ``set_level`` (on reload), ``reopen()`` follows logrotate (call
  it on SIGHUP). A log file that cannot be opened or written (missing or
  read-only directory, full disk) is reported ONCE on the process's original
  stderr; the daemon goes on, messages are dropped (and counted) and the file
  is tried again on ``reopen()`` and at most every ``retry_interval`` seconds.
  Logging never raises into the caller.

How the daemons use it (see also docs/configuration.md):

* Inner proxy (a plain process with its own reactor)::

      log = DaemonLog(paths.log_dir, namespace_name(bridge), config.log_level)
      begin_daemon_logging(log)          # globalLogBeginner.beginLoggingTo([log])
      # on SIGHUP / reload:  log.reopen(); log.set_level(new_config.log_level)

* Root proxy under twistd: ``makeService`` builds the ``DaemonLog`` and returns
  a ``DaemonLogRoot`` as the root of the service tree::

      log = DaemonLog(paths.log_dir, "one_tproxy", level)
      root = DaemonLogRoot(log)           # a MultiService
      RootProxyService(...).setServiceParent(root)
      return root

  twistd finds the log as the application's ``ILogObserver`` and logs only to
  it (no ``twistd.log``; ``--logfile`` is then ignored), with the events from
  before logging began replayed once. On SIGHUP: ``root.log.reopen()`` and
  ``root.log.set_level(...)``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import (
    ILogObserver,
    LogBeginner,
    LogEvent,
    LogLevel,
    LogPublisher,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

PROG = "one-tproxy"

_RANK = {level: rank for rank, level in enumerate(LogLevel.iterconstants())}

#: Whether a DEBUG event can reach any log of this process. Hot paths (one
#: stream opened or closed) check it before calling ``Logger.debug``, which
#: otherwise builds and publishes an event that the file then drops (about 4 µs
#: per call, two per connection in each proxy). True unless the process's own
#: daemon log (``DaemonLog.govern_debug_gate``) filters DEBUG out.
debug_enabled = True
_LEVEL_NAME = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARNING",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}


def _at_least(event: LogEvent, level: LogLevel) -> bool:
    event_level = event.get("log_level")
    return event_level is not None and _RANK.get(event_level, 0) >= _RANK[level]


# Twisted's ports announce themselves with legacy ``log.msg`` lines at INFO
# ("_GuestFactory starting on 5030", "(TCP Port 5030 Closed)"); our services log
# the same facts in words an administrator can use ("listening on
# 169.254.16.9:5030"), so those two forms are left out of the daemons' files.
_PORT_CHATTER = re.compile(r"\S+ starting on \S+|\(\w+ Port \S+ Closed\)")


def _port_chatter(event: LogEvent) -> bool:
    """Is ``event`` one of Twisted's own "starting on"/"Port N Closed" lines?"""
    message = event.get("message")
    return (
        event.get("log_namespace") == "log_legacy"
        and not event.get("isError")
        and isinstance(message, tuple)
        and len(message) == 1
        and isinstance(message[0], str)
        and _PORT_CHATTER.fullmatch(message[0]) is not None
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _failure(event: LogEvent) -> Failure | None:
    failure = event.get("log_failure")
    return failure if isinstance(failure, Failure) else None


# -- command line ---------------------------------------------------------------------------


@implementer(ILogObserver)
class CLIObserver:
    """Prints each event at ``level`` or above as one line: ``one-tproxy: warning: ...``."""

    def __init__(self, stream: IO[str], level: LogLevel = LogLevel.warn, prog: str = PROG):
        self.stream = stream
        """Where lines go (stderr)."""
        self.level = level
        """Least level printed."""
        self.prog = prog
        """Prefix of every line."""

    def __call__(self, event: LogEvent) -> None:
        if not _at_least(event, self.level):
            return
        text = formatEvent(event)
        failure = _failure(event)
        if failure is not None:
            kind = failure.type.__name__ if failure.type is not None else "Exception"
            text = f"{text}: {kind}: {failure.getErrorMessage()}"
        level = event["log_level"]
        word = {LogLevel.warn: "warning", LogLevel.info: "info", LogLevel.debug: "debug"}.get(
            level, "error"
        )
        try:
            self.stream.write(f"{self.prog}: {word}: {_one_line(text)}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nowhere left to complain


@contextmanager
def cli_logging(
    stream: IO[str] | None = None,
    level: LogLevel = LogLevel.warn,
    publisher: LogPublisher = globalLogPublisher,
) -> Iterator[CLIObserver]:
    """While inside, warnings and errors of every Logger are printed to ``stream``.

    ``stream`` defaults to the ``sys.stderr`` of the moment of the call.
    """
    observer = CLIObserver(sys.stderr if stream is None else stream, level)
    publisher.addObserver(observer)
    try:
        yield observer
    finally:
        publisher.removeObserver(observer)


# -- daemons --------------------------------------------------------------------------------


def format_event_line(event: LogEvent) -> str:
    """One event as the log file shows it, ending in a newline.

    ``2026-11-26T14:40:01.123+0000 INFO [tproxy.root] message``; a failure's
    traceback follows on its own lines.
    """
    when = event.get("log_time")
    stamp = _timestamp(when if isinstance(when, int | float) else time.time())
    level = _LEVEL_NAME.get(event.get("log_level"), "-")  # type: ignore[arg-type]
    namespace = event.get("log_namespace") or "-"
    if namespace == "log_legacy":
        namespace = event.get("log_system") or namespace
    line = f"{stamp} {level} [{namespace}] {formatEvent(event)}\n"
    failure = _failure(event)
    if failure is not None:
        try:
            line += failure.getTraceback()
        except Exception as e:  # a failure that cannot print itself
            line += f"(traceback unavailable: {e!r})\n"
        if not line.endswith("\n"):
            line += "\n"
    return line


def _timestamp(t: float) -> str:
    local = time.localtime(t)
    millis = int((t - int(t)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{millis:03d}" + time.strftime("%z", local)


@implementer(ILogObserver)
class DaemonLog:
    """The log file ``LOG_DIR/<name>.log`` of one daemon process, as a log observer."""

    def __init__(
        self,
        log_dir: str,
        name: str,
        level: LogLevel = LogLevel.info,
        *,
        complain: IO[str] | None = None,
        retry_interval: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
        prog: str = PROG,
    ) -> None:
        """``complain`` is where the one complaint goes (default: the original stderr)."""
        self.path = os.path.join(log_dir, f"{name}.log")
        """The file."""
        self._level = level
        self._gate = False
        self._complain_to = complain
        self._retry_interval = retry_interval
        self._monotonic = monotonic
        self._prog = prog
        self._file: IO[str] | None = None
        self._next_try = 0.0
        self._complained = False
        self._dropped = 0
        self._busy = False
        self._closed = False
        self._open()

    # -- public API ------------------------------------------------------------------------

    @property
    def level(self) -> LogLevel:
        """Least level written."""
        return self._level

    def set_level(self, level: LogLevel) -> None:
        """Write events at ``level`` and above from now on."""
        self._level = level
        if self._gate:
            self._set_gate()

    def govern_debug_gate(self) -> None:
        """Let this log, the process's only one, set ``debug_enabled`` (now, on ``set_level``)."""
        self._gate = True
        self._set_gate()

    def _set_gate(self) -> None:
        global debug_enabled
        debug_enabled = _RANK[self._level] <= _RANK[LogLevel.debug]

    @property
    def dropped(self) -> int:
        """Events lost since the file last worked."""
        return self._dropped

    @property
    def writing(self) -> bool:
        """Whether the file is open now."""
        return self._file is not None

    def reopen(self) -> None:
        """Close and open the file again (after logrotate moved it; on SIGHUP)."""
        self._closed = False
        self._close_file()
        self._open()

    def close(self) -> None:
        """Close the file; later events are ignored until ``reopen()``."""
        self._closed = True
        self._close_file()

    def install(self, publisher: LogPublisher = globalLogPublisher) -> None:
        """Receive every event of ``publisher`` from now on."""
        publisher.addObserver(self)

    def uninstall(self, publisher: LogPublisher = globalLogPublisher) -> None:
        """Stop receiving events of ``publisher``."""
        publisher.removeObserver(self)

    def __call__(self, event: LogEvent) -> None:
        if self._busy or self._closed or not _at_least(event, self._level):
            return
        if _port_chatter(event):
            return
        self._busy = True
        try:
            self._emit(event)
        except Exception:  # logging must never break the daemon
            self._dropped += 1
        finally:
            self._busy = False

    # -- internals -------------------------------------------------------------------------

    def _emit(self, event: LogEvent) -> None:
        if self._file is None and self._monotonic() >= self._next_try:
            self._open()
        if self._file is None:
            self._dropped += 1
            return
        try:
            if self._dropped:
                self._file.write(_note(f"{self._dropped} log messages were lost before"))
            self._file.write(format_event_line(event))
        except OSError as e:
            self._failed(f"cannot write {self.path}: {e.strerror or e}")
            self._dropped += 1
            return
        self._dropped = 0
        self._complained = False

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._file = os.fdopen(
                fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1
            )
        except OSError as e:
            self._failed(f"cannot open {self.path}: {e.strerror or e}")

    def _failed(self, reason: str) -> None:
        self._close_file()
        self._next_try = self._monotonic() + self._retry_interval
        if self._complained:
            return
        self._complained = True
        stream: Any = self._complain_to if self._complain_to is not None else sys.__stderr__
        try:
            stream.write(
                f"{self._prog}: warning: {reason}; log messages are dropped until it works "
                f"again (next try on reopen or in {self._retry_interval:g} s)\n"
            )
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass  # a full disk can fail the final flush; the file is closed anyway


@implementer(ILogObserver)
class _Discard:
    """An observer that drops every event."""

    def __call__(self, event: LogEvent) -> None:
        pass


def discard_observer() -> ILogObserver:
    """twistd's ``--logger`` for the root proxy: its own log is ``LOG_DIR/one_tproxy.log``.

    Never ``--logfile=/dev/null``: twistd's LogFile rotates at 1 MB by
    *renaming* the file, so the host's ``/dev/null`` became ``/dev/null.1`` and a
    regular file took its place, growing until ``/dev`` was full.
    """
    return _Discard()


def _note(text: str) -> str:
    return format_event_line(
        {
            "log_format": "{text}",
            "text": text,
            "log_level": LogLevel.warn,
            "log_namespace": __name__,
            "log_time": time.time(),
        }
    )


def begin_daemon_logging(
    log: DaemonLog,
    beginner: LogBeginner = globalLogBeginner,
    redirect_stdio: bool = True,
) -> None:
    """Make ``log`` the process's log (inner proxies): events buffered so far included.

    With ``redirect_stdio`` writes to sys.stdout/sys.stderr become log events too.
    """
    beginner.beginLoggingTo([log], discardBuffer=False, redirectStandardIO=redirect_stdio)
    if beginner is globalLogBeginner:
        log.govern_debug_gate()


class DaemonLogRoot(MultiService):
    """Root of a daemon's service tree that owns its DaemonLog (root proxy under twistd).

    When the tree is added to a twistd ``Application`` (``makeService`` returns
    it; twistd calls ``setServiceParent(application)``), the log becomes the
    application's ``ILogObserver``: twistd then logs to it instead of
    ``twistd.log``/stdout - messages from before (``makeService``'s own
    warnings included) are replayed into it once, and stdout/stderr are
    redirected into it. Added to anything else (tests, a plain parent), it
    leaves logging alone; call ``begin_daemon_logging`` or ``install`` then.
    """

    def __init__(self, log: DaemonLog) -> None:
        super().__init__()
        self.log = log
        """The log file observer."""

    def setServiceParent(self, parent: Any) -> Any:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log)
            self._governs = True
        return super().setServiceParent(parent)

    _governs = False

    def startService(self) -> None:
        """Under twistd the log is the process's only observer: it decides ``debug_enabled``."""
        if self._governs:
            self.log.govern_debug_gate()
        super().startService()


__all__ = [
    "CLIObserver",
    "DaemonLog",
    "DaemonLogRoot",
    "begin_daemon_logging",
    "cli_logging",
    "debug_enabled",
    "discard_observer",
    "format_event_line",
]
