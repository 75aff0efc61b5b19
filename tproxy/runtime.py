"""What the root and every inner proxy do alike as daemons.

A :class:`DaemonRuntime` raises the open-files limit, reads the configuration
file (falling back to the defaults, with an error in the log, when it cannot be
used), writes ``LOG_DIR/NAME.log`` at the file's ``:tproxy_debug_level:`` and,
on :meth:`DaemonRuntime.reload` (SIGHUP), reopens that file and re-reads the
level.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tproxy.config import Config, ConfigError, Limits, load_config, log_level
from tproxy.logs import DaemonLog, begin_daemon_logging
from tproxy.rlimits import raise_nofile_limit
from tproxy.settings import Paths

log = Logger(namespace="tproxy.runtime")

#: Seconds between looks at the process's memory.
RECLAIM_INTERVAL = 2.0
#: Free bytes in the C heap above which they are given back to the kernel.
TRIM_THRESHOLD = 1 << 20
#: Change of Python's allocated blocks between two looks that counts as a burst.
COLLECT_DELTA = 2000
#: glibc ``mallopt`` parameters (``<malloc.h>``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap, not from an ``mmap`` of their own.
MMAP_THRESHOLD = 4 << 20
#: Free bytes at the heap's top that ``free`` leaves alone (the reclaimer trims).
HEAP_TRIM_THRESHOLD = 8 << 20
#: A dict or set whose table is this many times the size a copy of it needs is
#: replaced by that copy after a burst.
COMPACT_RATIO = 4
#: The reactor's tables of descriptors (``EPollReactor`` and the other
#: ``PosixReactorBase`` reactors), compacted after a burst.
REACTOR_TABLES = ("_reads", "_writes", "_selectables")
#: A link's tables of streams (``tproxy.link``) and of its connection's.
LINK_TABLES = ("_streams", "_per_guest")
CONNECTION_TABLES = ("_streams",)

#: What :func:`compact` looks at: (owner, its attributes).
Tables = Iterable[tuple[object, tuple[str, ...]]]


def link_tables(link: object) -> Tables:
    """The stream tables of ``link`` and of its sans-I/O connection (for the reclaimer)."""
    return ((link, LINK_TABLES), (getattr(link, "conn", None), CONNECTION_TABLES))


def compact(owner: object, attrs: tuple[str, ...], ratio: int = COMPACT_RATIO) -> int:
    """Replace each of ``owner``'s dict/set attributes ``attrs`` that shrank by a fresh copy.

    Why: a dict or set never shrinks its table when entries are deleted; one
    that held 2,000 connections keeps a table for 2,000 (tens of KiB, in the
    C heap) after they closed (issue 7 (f)). A copy gets a table sized for
    what it holds now. Only done between reactor iterations (from a timed
    call), so nothing iterates the container while it is swapped; an
    attribute that is missing or not a plain dict/set is left alone. Returns
    how many were replaced.
    """
    replaced = 0
    for name in attrs:
        table = getattr(owner, name, None)
        if type(table) not in (dict, set):
            continue
        assert isinstance(table, (dict, set))
        copy = type(table)(table)
        if sys.getsizeof(table) >= ratio * sys.getsizeof(copy):
            setattr(owner, name, copy)
            replaced += 1
    return replaced


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


class MemoryReclaimer:
    """Gives memory back after a burst of connections ends (issue 7, workload f).

    Two things kept a proxy bigger once thousands of connections had closed:
    the connections' objects form reference cycles (transport <-> protocol,
    Deferreds) that only a full garbage collection frees, and a quiet process
    allocates nothing, so none runs; and glibc keeps freed memory in its heap.
    Every ``interval`` seconds this looks at Python's allocated blocks
    (``sys.getallocatedblocks``, cheap): when they moved by more than
    ``collect_delta`` since the last collection (connections came or went),
    it runs ``gc.collect()``. (Compared with the last collection, not with the
    last look: 2,000 connections that close over several looks, each moving
    less than ``collect_delta``, still get collected.) Then, when glibc's
    heap holds more than ``threshold`` free bytes (``mallinfo2``), it calls
    ``malloc_trim(0)``. After a collection it also gives the reactor fresh
    copies of its descriptor tables, and ``tables()`` (the links' stream
    tables) fresh copies of theirs, when they shrank (:func:`compact`), so
    that their tables, sized for the burst, are freed before the trim. A
    steady load costs one cheap look per interval; without glibc only the
    collection runs.
    """

    def __init__(
        self,
        reactor: Any,
        interval: float = RECLAIM_INTERVAL,
        threshold: int = TRIM_THRESHOLD,
        collect_delta: int = COLLECT_DELTA,
        libc: Any = None,
        allocated_blocks: Callable[[], int] = sys.getallocatedblocks,
        collect: Callable[[], object] = gc.collect,
        tables: Callable[[], Tables] = tuple,
    ) -> None:
        self.interval = interval
        self.threshold = threshold
        self.collect_delta = collect_delta
        self.trims = 0
        self.collections = 0
        self._libc = libc if libc is not None else _load_libc()
        self._blocks = allocated_blocks
        self._collect = collect
        self._last_blocks = allocated_blocks()
        """Allocated blocks right after the last collection (or at the start)."""
        self._reactor = reactor
        self._tables = tables
        self.compactions = 0
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor

    @property
    def can_trim(self) -> bool:
        """Whether the C library can report and trim its heap."""
        return self._libc is not None

    def free_bytes(self) -> int:
        """Free bytes held in the C heap (0 when unknown)."""
        if self._libc is None:
            return 0
        info: _MallInfo2 = self._libc.mallinfo2()
        return int(info.fordblks)

    def check(self) -> None:
        """One look: collect after a burst, trim a heap with enough free."""
        blocks = self._blocks()
        if abs(blocks - self._last_blocks) > self.collect_delta:
            self._collect()
            self.collections += 1
            self.compactions += compact(self._reactor, REACTOR_TABLES)
            for owner, attrs in self._tables():
                self.compactions += compact(owner, attrs)
            self._last_blocks = self._blocks()
        if self._libc is not None and self.free_bytes() >= self.threshold:
            self._libc.malloc_trim(0)
            self.trims += 1

    def start(self) -> None:
        """Keep the heap steady (``steady_heap``); look every ``interval`` seconds from now on."""
        steady_heap(self._libc)
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop looking."""
        if self._loop.running:
            self._loop.stop()


def freeze_start_up() -> int:
    """Collect once, then leave every object alive now out of later collections.

    Why: a daemon's start-up objects (Twisted, the modules, the
    configuration: ~36,000 tracked objects in the root) live as long as the
    process, yet every full collection walks them all - ``MemoryReclaimer``'s
    ``gc.collect()`` every ``RECLAIM_INTERVAL`` seconds under a steady load,
    and the collector's own generation-2 runs: 6.3 ms each in the root on
    this machine, next to nothing once they are frozen (``gc.freeze``).
    Garbage made before the call is collected first; objects made after it
    (connections, links) are collected as before. Returns how many objects
    were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def steady_heap(libc: Any) -> bool:
    """Make glibc serve the data path's large buffers from its heap (issue 7 (a)).

    Each read of a link (up to 1 MiB) and of a bulk stream (256 KiB) is a new
    ``bytes`` object. glibc's default threshold (128 KiB, raised only to the
    size of a freed mapping, and a read is shrunk to its length before it is
    freed) gave each read its own ``mmap``: 250 page faults, the zeroing of
    every page and a ``munmap`` per megabyte relayed. With these settings
    they are carved from the heap and reused; ``free`` no longer trims the
    heap's top on every large free either: ``MemoryReclaimer`` trims what a
    burst left, every few seconds. False when the C library has no ``mallopt``.
    """
    if libc is None or getattr(libc, "mallopt", None) is None:
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    )


_libc: list[Any] = []


def _load_libc() -> Any:
    """glibc with ``mallinfo2``/``malloc_trim`` typed, or None (looked up once per process tree).

    The template calls this before it forks, so an inner proxy neither
    searches for the library nor copies the pages that doing so touches.
    """
    if not _libc:
        try:
            libc = ctypes.CDLL(None)  # the symbols the process already has: libc's
            mallinfo2 = libc.mallinfo2
            trim = libc.malloc_trim
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _libc.append(None)
        else:
            mallopt.restype = ctypes.c_int
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallinfo2.restype = _MallInfo2
            mallinfo2.argtypes = []
            trim.restype = ctypes.c_int
            trim.argtypes = [ctypes.c_size_t]
            _libc.append(libc)
    return _libc[0]


#: A file modified less than this many seconds ago is never reused unread: a
#: second write within the file system's timestamp granularity could keep the
#: same stamp (git's "racy" files).
RACY_SECONDS = 2.0


def _stamp(path: str) -> tuple[int, ...] | None:
    """What changes when ``path`` is replaced or written (None when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ConfigCache:
    """``load_config`` that reads a file again only when it changed since the last read.

    Why: the template (``tproxy.template``) reads the configuration once
    before it forks, and every inner proxy then reuses that Config instead of
    running the YAML parser and the checks itself - about 0.4 MiB of private
    memory per bridge that parsing copies (see docs/performance.md, "Memory
    per bridge"). A reload (SIGHUP) reads the file again only when its
    device, inode, size, mtime or ctime differ from the last read, or when it
    was modified in the last :data:`RACY_SECONDS`. A file that cannot be used
    is never cached: the error is raised again on every call.
    """

    def __init__(
        self,
        load: Callable[[str], Config] = load_config,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._load = load
        self._clock = clock
        self._entry: tuple[str, tuple[int, ...], Config] | None = None
        self.reads = 0
        """How many times the file was really read (or tried)."""

    def __call__(self, path: str) -> Config:
        stamp = _stamp(path)
        entry = self._entry
        if stamp is not None and entry is not None and entry[:2] == (path, stamp):
            return entry[2]
        self._entry = None
        self.reads += 1
        config = self._load(path)
        if stamp is not None and _stamp(path) == stamp:
            if self._clock() - stamp[3] / 1e9 >= RACY_SECONDS:
                self._entry = (path, stamp, config)
        return config


#: The process's one cache (filled in the template before it forks).
CONFIG_CACHE = ConfigCache()


class DaemonRuntime:
    """Limits, configuration and log file of one proxy process named ``name``."""

    def __init__(
        self,
        name: str,
        paths: Paths,
        load: Callable[[str], Config] = CONFIG_CACHE,
    ) -> None:
        self.name = name
        self.paths = paths
        self._load = load
        self.config = Config(paths.config)
        self.log_file: DaemonLog | None = None

    def limits(self) -> Limits:
        """The limits in force."""
        return self.config.limits

    def load(self) -> Config:
        """Read the configuration file; ConfigError when it cannot be used."""
        self.config = self._load(self.paths.config)
        return self.config

    def _try_load(self) -> None:
        try:
            self.load()
        except ConfigError as e:
            log.error("{error}; using the settings in force", error=e)

    def prepare(self, begin_logging: bool = True, govern_debug_gate: bool = False) -> None:
        """Raise the files limit, read the configuration, start the log file.

        ``begin_logging`` starts twisted.logger's global logging with the file
        (a standalone process, whose file then decides ``logs.debug_enabled``);
        without it the file is added as an observer (under twistd, which began
        logging already), and decides ``logs.debug_enabled`` only with
        ``govern_debug_gate``: the root under twistd, whose own logger discards
        everything (``tproxy.daemonctl``), so the file is the only log.
        """
        _, soft_after = raise_nofile_limit()
        error: ConfigError | None = None
        try:
            self.load()
        except ConfigError as e:
            error = e
        self.log_file = DaemonLog(self.paths.log_dir, self.name, self.config.log_level)
        if begin_logging:
            begin_daemon_logging(self.log_file)
        else:
            self.log_file.install()
            if govern_debug_gate:
                self.log_file.govern_debug_gate()
        if error is not None:
            log.error("{error}; using the default settings", error=error)
        log.info("open-files limit {soft}", soft=soft_after)

    def reload(self) -> None:
        """SIGHUP: reopen the log file, re-read the log level (and limits)."""
        if self.log_file is not None:
            self.log_file.reopen()
        self._try_load()
        if self.log_file is not None:
            self.log_file.set_level(self.config.log_level)
        log.info("reloaded: debug level {debug_level}", debug_level=self.config.debug_level)

    def set_debug_level(self, debug_level: int) -> None:
        """LogControl for the root service."""
        if self.log_file is not None:
            self.log_file.set_level(log_level(debug_level))

    def reopen(self) -> None:
        """LogControl for the root service."""
        if self.log_file is not None:
            self.log_file.reopen()
