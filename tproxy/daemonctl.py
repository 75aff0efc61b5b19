"""Control of the running mesh from the command line: start, stop, restart, reload, status.

Processes are found through ``/proc`` (:mod:`tproxy.procs`), never through a
pid file, so nothing stale can stop a start. The root proxy of this host is
the ``one_tproxy`` process in the caller's network namespace; its inner
proxies are the ``one_tproxy_BR`` processes it started (their parent), plus,
when no root runs, those of the bridges that this host's nftables maps name
(orphans, which normally exit by themselves).

``start`` runs ``twistd one-tproxy`` (no pid file, twistd's own log
discarded: the daemon writes ``LOG_DIR/one_tproxy.log``) and waits, bounded,
until the root and an inner proxy per mapped bridge are up. ``stop`` sends
SIGTERM and really waits until the processes are gone (OpenNebula's restart
did not), killing what outlives the grace period. The driver
(``one-tproxy up/down``) calls ``start`` and ``reload``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager

from attrs import define, field

from tproxy.model import MeshMap
from tproxy.procs import Mesh, ProcessFinder, ProcFinder, ProxyProcess
from tproxy.settings import Paths

#: Exit status of ``status`` when the root proxy does not run (LSB).
EXIT_NOT_RUNNING = 3
#: Seconds ``start`` waits for the root and its inner proxies.
START_TIMEOUT = 15.0
#: Seconds ``stop`` waits beyond the grace period before it kills.
STOP_MARGIN = 5.0
#: Seconds to wait for killed processes to disappear.
KILL_WAIT = 3.0
POLL = 0.05
#: Seconds a command waits for another one holding the control lock.
LOCK_TIMEOUT = 60.0


class LockTimeoutError(Exception):
    """Another ``one-tproxy`` command held the control lock too long."""


@contextlib.contextmanager
def control_lock(paths: Paths, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """``RUN_DIR/one_tproxy.lock``, held while a command starts or stops the mesh.

    Two ``one-tproxy up`` for different bridges at once must not start two
    root proxies. The lock file is never inherited by the daemon (close-on-exec).
    """
    os.makedirs(paths.run_dir, exist_ok=True)
    fd = os.open(
        os.path.join(paths.run_dir, "one_tproxy.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"another one-tproxy command holds {paths.run_dir}/one_tproxy.lock"
                    ) from None
                time.sleep(POLL)
        yield
    finally:
        os.close(fd)


def _read_maps() -> MeshMap:
    from tproxy.nft import Nftables

    return Nftables().read_service_maps()


def _grace_period(paths: Paths) -> float:
    from tproxy.config import ConfigError, Limits, load_config

    try:
        return float(load_config(paths.config).limits.grace_period)
    except ConfigError:
        return float(Limits().grace_period)


def _config_problem(paths: Paths) -> str | None:
    """Why the configuration file cannot be used, or None (a missing file is no problem:
    the daemons then run on defaults and the nftables maps)."""
    from tproxy.config import ConfigError, load_config

    if not os.path.exists(paths.config):
        return None
    try:
        load_config(paths.config)
    except ConfigError as e:
        return str(e)
    return None


def _make_log_dir(paths: Paths) -> str | None:
    """Create the log directory if missing; why it cannot be, or None."""
    try:
        os.makedirs(paths.log_dir, mode=0o755, exist_ok=True)
    except OSError as e:
        return f"cannot create the log directory {paths.log_dir}: {e.strerror or e}"
    return None


def _plugin_pythonpath(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for twistd, with the directory of our twistd plugin on the path."""
    import tproxy

    env = dict(environ)
    top = os.path.dirname(os.path.dirname(os.path.abspath(tproxy.__file__)))
    if os.path.exists(os.path.join(top, "twisted", "plugins", "one_tproxy.py")):
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if top not in parts:
            env["PYTHONPATH"] = os.pathsep.join([top, *parts])
    return env


def twistd_argv(paths: Paths, executable: str = sys.executable) -> list[str]:
    """The command line that starts the root proxy as a daemon."""
    return [
        executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--pidfile=",
        "--logger=tproxy.logs.discard_observer",
        "--rundir=/",
        "--umask=0022",
        "one-tproxy",
        "--config",
        paths.config,
        "--log-dir",
        paths.log_dir,
        "--run-dir",
        paths.run_dir,
    ]


def _run_twistd(argv: Sequence[str]) -> tuple[int, str]:
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_plugin_pythonpath(os.environ),
        timeout=START_TIMEOUT * 2,
        check=False,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@define
class MeshControl:
    """The commands, with every edge a parameter (tests hand fakes)."""

    paths: Paths
    finder: ProcessFinder = field(factory=ProcFinder)
    read_maps: Callable[[], MeshMap] = _read_maps
    run_twistd: Callable[[Sequence[str]], tuple[int, str]] = _run_twistd
    kill: Callable[[int, int], None] = _kill
    grace_period: Callable[[Paths], float] = _grace_period
    config_problem: Callable[[Paths], str | None] = _config_problem
    make_log_dir: Callable[[Paths], str | None] = _make_log_dir
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    lock: Callable[[Paths], AbstractContextManager[None]] = control_lock
    out: Callable[[str], None] = print
    err: Callable[[str], None] = lambda text: print(text, file=sys.stderr)

    # -- looking --------------------------------------------------------------
    def _maps(self) -> dict[str, dict[int, object]] | None:
        try:
            maps = self.read_maps()
        except Exception as e:
            self.err(f"one-tproxy: cannot read the service maps from nftables: {e}")
            return None
        return {bridge: dict(m) for bridge, m in maps.items() if m}

    def _root_of(self, p: ProxyProcess, roots: set[int]) -> int | None:
        """The root that started inner ``p``: its parent, or its parent's parent (template)."""
        if p.ppid in roots:
            return p.ppid
        grand = self.finder.parent(p.ppid) if p.ppid > 1 else None
        return grand if grand in roots else None

    def ours(self, mesh: Mesh, maps: Mapping[str, object] | None = None) -> list[ProxyProcess]:
        """The processes of this host: its roots, their inners, orphans of our bridges."""
        roots = [p for p in mesh.processes if p.bridge is None]
        root_pids = {p.pid for p in roots}
        inners = [
            p
            for p in mesh.processes
            if p.bridge is not None and self._root_of(p, root_pids) is not None
        ]
        if maps is not None:
            inners += [p for p in mesh.processes if p.bridge in maps and p not in inners]
        inners.sort(key=lambda p: (p.bridge or "", p.pid))
        return roots + inners

    def _bridges_of(self, mesh: Mesh, root: int) -> set[str]:
        return {
            p.bridge
            for p in mesh.processes
            if p.bridge is not None and self._root_of(p, {root}) == root
        }

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = self.monotonic() + timeout
        while True:
            if done():
                return True
            if self.monotonic() >= deadline:
                return False
            self.sleep(POLL)

    # -- commands -------------------------------------------------------------
    def status(self) -> int:
        """Print ``one_tproxy: PID`` then ``one_tproxy_BR: PID`` lines; 0 if the root runs."""
        mesh = self.finder.find()
        maps = None if mesh.root is not None else self._maps()
        for p in self.ours(mesh, maps):
            self.out(f"{p.title}: {p.pid}")
        return 0 if mesh.root is not None else EXIT_NOT_RUNNING

    def _locked(self, command: Callable[[], int]) -> int:
        try:
            with self.lock(self.paths):
                return command()
        except LockTimeoutError as e:
            self.err(f"one-tproxy: {e}")
            return 1

    def start(self) -> int:
        """Start the mesh unless it runs (exit 0); with no endpoints start nothing."""
        return self._locked(self._start)

    def stop(self) -> int:
        """SIGTERM to the root (and to orphans); wait until all are gone, kill leftovers."""
        return self._locked(self._stop)

    def restart(self) -> int:
        """Stop (really waiting), then start."""
        return self._locked(self._restart)

    def reload(self) -> int:
        """SIGHUP to the root proxy; start it when it does not run."""
        return self._locked(self._reload)

    def _start(self) -> int:
        if self.finder.find().root is not None:
            return 0
        maps = self._maps()
        if maps is None:
            return 1
        if not maps:
            return 0
        problem = self.make_log_dir(self.paths)
        if problem is not None:
            # The daemons run without their log files rather than not at all.
            self.err(f"one-tproxy start: warning: {problem}")
        rc, output = self.run_twistd(twistd_argv(self.paths))
        if rc != 0:
            self.err(f"one-tproxy start: twistd failed (exit {rc}): {output.strip()}")
            return 1

        def up() -> bool:
            mesh = self.finder.find()
            if mesh.root is None:
                return False
            return set(maps) <= self._bridges_of(mesh, mesh.root)

        if not self._wait(up, START_TIMEOUT):
            mesh = self.finder.find()
            if mesh.root is None:
                self.err(
                    "one-tproxy start: the root proxy did not come up; see "
                    f"{os.path.join(self.paths.log_dir, 'one_tproxy.log')}"
                )
                return 1
            missing = sorted(set(maps) - self._bridges_of(mesh, mesh.root))
            self.err(
                "one-tproxy start: inner proxies not up yet for "
                + ", ".join(missing)
                + f"; see their logs in {self.paths.log_dir}"
            )
        return 0

    def _stop(self) -> int:
        mesh = self.finder.find()
        maps = self._maps() or {}
        targets = self.ours(mesh, maps)
        if not targets:
            return 0
        root = mesh.root
        for p in targets:
            if p.bridge is None or root is None or self._root_of(p, {root}) != root:
                self.kill(p.pid, signal.SIGTERM)
        pids = [p.pid for p in targets]

        def gone() -> bool:
            return not any(self.finder.alive(pid) for pid in pids)

        if self._wait(gone, self.grace_period(self.paths) + STOP_MARGIN):
            return 0
        left = [pid for pid in pids if self.finder.alive(pid)]
        self.err(f"one-tproxy stop: killing processes that did not stop: {left}")
        for pid in left:
            self.kill(pid, signal.SIGKILL)
        if self._wait(gone, KILL_WAIT):
            return 0
        self.err(
            "one-tproxy stop: processes still running: "
            f"{[pid for pid in pids if self.finder.alive(pid)]}"
        )
        return 1

    def _restart(self) -> int:
        rc = self._stop()
        if rc != 0:
            return rc
        return self._start()

    def _reload(self) -> int:
        problem = self.config_problem(self.paths)
        if problem is not None:
            # The mesh keeps its last good settings; the maps are re-read all the same.
            self.err(
                f"one-tproxy reload: {problem}; the running mesh keeps its last good configuration"
            )
        rc = self._signal_reload()
        return rc if problem is None else (rc or 1)

    def _signal_reload(self) -> int:
        root = self.finder.find().root
        if root is None:
            return self._start()
        self.kill(root, signal.SIGHUP)
        maps = self._maps()
        if not maps:
            return 0

        # A root that was already shutting down (its last bridge had gone) ignores
        # the SIGHUP: wait until it serves every mapped bridge, or has gone.
        def settled() -> bool:
            mesh = self.finder.find()
            return mesh.root != root or set(maps) <= self._bridges_of(mesh, root)

        self._wait(settled, START_TIMEOUT)
        if self.finder.find().root is None:
            return self._start()
        return 0


def start(paths: Paths) -> int:
    """Start the mesh unless it runs; exit status."""
    return MeshControl(paths).start()


def stop(paths: Paths) -> int:
    """Stop every proxy process, waiting (bounded) until they are gone; exit status."""
    return MeshControl(paths).stop()


def restart(paths: Paths) -> int:
    """Stop, then start; exit status."""
    return MeshControl(paths).restart()


def reload(paths: Paths) -> int:
    """SIGHUP to the root proxy (start it if it does not run); exit status."""
    return MeshControl(paths).reload()


def status(paths: Paths) -> int:
    """Print ``one_tproxy: PID`` and ``one_tproxy_BR: PID`` lines; 0 if the root runs, else 3."""
    return MeshControl(paths).status()
