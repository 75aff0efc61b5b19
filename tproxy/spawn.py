"""Starting inner proxies (the one module that makes processes).

The root proxy takes a :class:`Launcher` as a parameter and asks it to
``launch(bridge, link_fd)``: the launcher starts ``one_tproxy_BR`` with
``link_fd`` (the child's end of a socket pair the root made) as the child's
fd 3 and returns an :class:`InnerProcess` whose ``exited`` Deferred fires when
the process is gone. The root closes its copy of ``link_fd`` right after the
call, so the socket pair's only other holder is the child: when the root dies,
even by ``kill -9``, the inner proxy reads EOF and exits.

:class:`SpawnLauncher` runs ``python -m tproxy.inner BR ...`` through
``reactor.spawnProcess`` (Twisted closes every other descriptor in the child).
A pre-forked template launcher (cheaper per bridge) can replace it without
touching the root.

:func:`enter_netns` is the ``setns(2)`` the inner proxy does first of all.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from attrs import define, field
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tproxy.settings import Paths

CLONE_NEWNET = 0x40000000
#: Seconds the root waits for the template's exit report once a pidfd fired.
EXIT_REPORT_WAIT = 0.2

_log = Logger(namespace="tproxy.spawn")


class NamespaceError(OSError):
    """A network namespace that cannot be entered (missing, or not a namespace)."""


def enter_netns(path: str) -> None:
    """Move the calling thread into the network namespace bound at ``path``.

    Never creates a namespace: a missing one raises :class:`NamespaceError`.
    Call it before any thread exists (``setns`` switches only the calling thread).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NamespaceError(e.errno, f"cannot open network namespace {path}: {e.strerror}")
    try:
        setns = getattr(os, "setns", None)
        if setns is not None:  # Python >= 3.12
            try:
                setns(fd, CLONE_NEWNET)
            except OSError as e:
                raise NamespaceError(e.errno, f"cannot enter network namespace {path}: {e}")
        else:
            if _libc_setns()(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NamespaceError(
                    err, f"cannot enter network namespace {path}: {os.strerror(err)}"
                )
    finally:
        os.close(fd)


_setns: list[Any] = []


def _libc_setns() -> Any:
    """The C library's ``setns`` (Python 3.11 has no ``os.setns``), looked up once.

    The template (``tproxy.template.preload``) looks it up before it forks:
    making a ``ctypes.CDLL`` in every inner proxy copied ~0.3 MiB of shared
    pages into each of them.
    """
    if not _setns:
        setns = ctypes.CDLL(None, use_errno=True).setns
        setns.restype = ctypes.c_int
        setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _setns.append(setns)
    return _setns[0]


class InnerProcess(Protocol):
    """A started inner proxy, as the root sees it."""

    @property
    def bridge(self) -> str:
        """The bridge this inner proxy serves."""
        ...

    @property
    def pid(self) -> int | None:
        """Its process id while known."""
        ...

    exited: Deferred[str]
    """Fires once, when the process is gone, with a description of how it ended."""

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process; nothing if it is already gone."""
        ...


class Launcher(Protocol):
    """Starts inner proxies; the root takes one as a parameter."""

    def launch(self, bridge: str, link_fd: int) -> InnerProcess:
        """Start ``one_tproxy_BR`` with ``link_fd`` as its fd 3.

        The caller keeps ownership of ``link_fd`` and closes it after this returns.
        """
        ...


def describe_exit(reason: Failure) -> str:
    """A short text for a process's end: ``exit code N`` or ``signal NAME``."""
    value = reason.value
    if isinstance(value, error.ProcessDone):
        return "exit code 0"
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"signal {name}"
        return f"exit code {value.exitCode}"
    return str(value)


@define(eq=False)
class _SpawnedInner(protocol.ProcessProtocol):
    """ProcessProtocol of one spawned inner proxy; also its InnerProcess handle."""

    bridge: str
    exited: Deferred[str] = field(factory=Deferred)
    _partial: dict[int, bytes] = field(factory=dict)

    @property
    def pid(self) -> int | None:
        transport: Any = self.transport
        return None if transport is None else transport.pid

    def signal(self, signum: int) -> None:
        transport: Any = self.transport
        if transport is None or transport.pid is None:
            return
        try:
            transport.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # The inner logs to its own file; what reaches its stdout/stderr is
        # mostly a crash before logging was set up. Keep it, line by line.
        buf = self._partial.get(childFD, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[childFD] = rest[-4096:]
        for line in lines:
            _log.warn(
                "one_tproxy_{bridge} (fd {fd}): {line}",
                bridge=self.bridge,
                fd=childFD,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._partial.items()):
            if rest:
                self.childDataReceived(fd, b"\n")
        self.exited.callback(describe_exit(reason))


@define
class SpawnLauncher:
    """Starts each inner proxy as ``python -m tproxy.inner BR`` with reactor.spawnProcess."""

    reactor: IReactorProcess
    paths: Paths
    """Passed on to the inner proxy (config for the log level and limits, log dir)."""
    executable: str = sys.executable
    module: str = "tproxy.inner"
    extra_args: Sequence[str] = ()

    def argv(self, bridge: str) -> list[str]:
        """The inner proxy's command line."""
        return [
            self.executable,
            "-m",
            self.module,
            bridge,
            "--config",
            self.paths.config,
            "--log-dir",
            self.paths.log_dir,
            "--run-dir",
            self.paths.run_dir,
            *self.extra_args,
        ]

    def launch(self, bridge: str, link_fd: int) -> InnerProcess:
        """Spawn the inner proxy of ``bridge`` with ``link_fd`` as its fd 3."""
        proto = _SpawnedInner(bridge)
        self.reactor.spawnProcess(
            proto,
            self.executable,
            self.argv(bridge),
            env=None,  # inherit (PYTHONPATH and friends)
            childFDs={0: "w", 1: "r", 2: "r", 3: link_fd},
        )
        return proto


# -- the template launcher ----------------------------------------------------


@implementer(IReadDescriptor)
class _FdReader:
    """Calls ``on_read`` whenever ``fd`` is readable (a pidfd or the control socket)."""

    def __init__(self, fd: int, on_read: Callable[[], None], prefix: str) -> None:
        self.fd = fd
        self._on_read = on_read
        self._prefix = prefix

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self._on_read()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return self._prefix


@define(eq=False)
class _ForkedInner:
    """An inner proxy forked by the template, as the root sees it."""

    bridge: str
    _launcher: TemplateLauncher
    exited: Deferred[str] = field(factory=Deferred)
    pid: int | None = None
    _pending_signals: list[int] = field(factory=list)
    _watch: _FdReader | None = None
    _report: Any = None

    def signal(self, signum: int) -> None:
        if self.exited.called:
            return
        if self.pid is None:
            self._pending_signals.append(signum)
            return
        try:
            os.kill(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def started(self, pid: int) -> None:
        """The template forked us as ``pid``: watch it through a pidfd."""
        self.pid = pid
        _log.info("inner proxy one_tproxy_{bridge} forked (pid {pid})", bridge=self.bridge, pid=pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.ended("exit (gone before it was watched)")
            return
        self._watch = _FdReader(fd, self._gone, f"one_tproxy_{self.bridge}")
        self._launcher.reactor.addReader(self._watch)  # type: ignore[attr-defined]
        for signum in self._pending_signals:
            self.signal(signum)
        self._pending_signals.clear()

    def _gone(self) -> None:
        # The pidfd says the process ended; give the template's report (with
        # the exit status) a moment to arrive first.
        self._unwatch()
        self._report = self._launcher.reactor.callLater(EXIT_REPORT_WAIT, self.ended, "ended")

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._launcher.reactor.removeReader(self._watch)
            os.close(self._watch.fd)
            self._watch = None

    def ended(self, how: str) -> None:
        """The process is gone (the template reaped it, or its pidfd said so)."""
        self._unwatch()
        if self._report is not None and self._report.active():
            self._report.cancel()
        if self._watch is not None:
            self._launcher.reactor.removeReader(self._watch)  # type: ignore[attr-defined]
            os.close(self._watch.fd)
            self._watch = None
        if not self.exited.called:
            self.exited.callback(how)


@define(eq=False)
class _TemplateProcess(protocol.ProcessProtocol):
    """The template's process: its output is logged, its end noted."""

    launcher: TemplateLauncher
    ended: Deferred[str] = field(factory=Deferred)
    """Fires when the template process is gone."""
    _lines: _SpawnedInner = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._lines = _SpawnedInner("template")

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._lines.childDataReceived(childFD, data)

    def processEnded(self, reason: Failure) -> None:
        how = describe_exit(reason)
        self.launcher._template_ended(self, how)
        self.ended.callback(how)


@define(eq=False)
class TemplateLauncher:
    """Forks inner proxies from one pre-imported template process (``tproxy.template``).

    Each inner then costs a few MB instead of a whole interpreter. The template
    is started on the first launch and again after it died. Exit notification
    comes from a pidfd per inner proxy (the template is their parent, not the
    root), with the template's ``exited`` reports as a second source.
    """

    reactor: Any
    paths: Paths
    executable: str = sys.executable
    module: str = "tproxy.template"
    entry: str | None = None
    _control: socket.socket | None = None
    _reader: _FdReader | None = None
    _process: _TemplateProcess | None = None
    _seq: int = 0
    _pending: dict[int, _ForkedInner] = field(factory=dict)
    _by_pid: dict[int, _ForkedInner] = field(factory=dict)
    _buffer: bytes = b""

    def argv(self) -> list[str]:
        """The template's command line."""
        argv = [self.executable, "-m", self.module]
        if self.entry is not None:
            argv += ["--entry", self.entry]
        return argv + [
            "--config",
            self.paths.config,
            "--log-dir",
            self.paths.log_dir,
            "--run-dir",
            self.paths.run_dir,
        ]

    @property
    def template_pid(self) -> int | None:
        """The template's PID while it runs."""
        transport: Any = None if self._process is None else self._process.transport
        return None if transport is None else transport.pid

    def _ensure_template(self) -> socket.socket:
        if self._control is not None:
            return self._control
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = _TemplateProcess(self)
            self.reactor.spawnProcess(
                process,
                self.executable,
                self.argv(),
                env=None,
                childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._process = process
        self._control = ours
        self._reader = _FdReader(ours.fileno(), self._readable, "one-tproxy-template")
        self.reactor.addReader(self._reader)
        _log.info("inner proxy template started (pid {pid})", pid=self.template_pid)
        return ours

    def launch(self, bridge: str, link_fd: int) -> InnerProcess:
        """Ask the template to fork the inner proxy of ``bridge`` with ``link_fd`` as fd 3."""
        control = self._ensure_template()
        self._seq += 1
        handle = _ForkedInner(bridge, self)
        socket.send_fds(control, [f"launch {self._seq} {bridge}".encode("ascii")], [link_fd])
        self._pending[self._seq] = handle
        return handle

    def _readable(self) -> None:
        control = self._control
        if control is None:
            return
        while True:
            try:
                data = control.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close_control()
                return
            self._message(data.decode("ascii", "replace").split())

    def _message(self, words: list[str]) -> None:
        try:
            if words[0] == "started":
                handle = self._pending.pop(int(words[1]))
                pid = int(words[2])
                self._by_pid[pid] = handle
                handle.started(pid)
            elif words[0] == "failed":
                handle = self._pending.pop(int(words[1]))
                handle.ended("not started: " + " ".join(words[2:]))
            elif words[0] == "exited":
                pid, status = int(words[1]), int(words[2])
                found = self._by_pid.pop(pid, None)
                if found is not None:
                    code = os.waitstatus_to_exitcode(status)
                    found.ended(
                        f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    )
            else:
                raise ValueError(words[0])
        except (IndexError, KeyError, ValueError) as e:
            _log.warn("odd message from the template: {words!r} ({error})", words=words, error=e)

    def _close_control(self) -> None:
        if self._reader is not None:
            self.reactor.removeReader(self._reader)
            self._reader = None
        if self._control is not None:
            self._control.close()
            self._control = None
        for handle in self._pending.values():
            handle.ended("not started: the template is gone")
        self._pending.clear()

    def _template_ended(self, process: _TemplateProcess, how: str) -> None:
        if process is self._process:
            self._process = None
            self._close_control()
            _log.warn("inner proxy template ended ({how})", how=how)

    def close(self) -> Deferred[str] | None:
        """Let the template go (it exits at EOF); running inner proxies are not touched.

        Returns a Deferred that fires when the template process is gone (None
        when none runs).
        """
        process = self._process
        self._close_control()
        return None if process is None or process.ended.called else process.ended
