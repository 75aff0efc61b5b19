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
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from attrs import define, field
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure

from tproxy.settings import Paths

CLONE_NEWNET = 0x40000000

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
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NamespaceError(
                    err, f"cannot enter network namespace {path}: {os.strerror(err)}"
                )
    finally:
        os.close(fd)


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
