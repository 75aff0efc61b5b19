"""Tests for tproxy.runtime: configuration fallback, log file, reload."""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest

from tproxy.config import Config, ConfigError, load_config
from tproxy.runtime import (
    RACY_SECONDS,
    REACTOR_TABLES,
    ConfigCache,
    DaemonRuntime,
    MemoryReclaimer,
    _load_libc,
    _MallInfo2,
    compact,
    freeze_start_up,
    link_tables,
)
from tproxy.settings import Paths

log = Logger(namespace="tests.runtime")


class ConfigCacheTests(unittest.TestCase):
    """The configuration file is read again only when it changed."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "one.conf")
        self.now = 1_000_000.0
        self.cache = ConfigCache(load_config, clock=lambda: self.now)

    def write(self, text: str, age: float = 10.0) -> None:
        """Write the file as modified ``age`` seconds before the cache's clock."""
        with open(self.path, "w") as f:
            f.write(text)
        os.utime(self.path, (self.now - age, self.now - age))

    def test_unchanged_file_is_not_read_again(self) -> None:
        """The same Config comes back while the file is untouched."""
        self.write(":tproxy_debug_level: 1\n")
        first = self.cache(self.path)
        self.assertIs(self.cache(self.path), first)
        self.assertEqual((first.debug_level, self.cache.reads), (1, 1))

    def test_changed_file_is_read(self) -> None:
        """A new content (another size or time) is read."""
        self.write(":tproxy_debug_level: 1\n")
        self.cache(self.path)
        self.write(":tproxy_debug_level: 3\n", age=5.0)
        self.assertEqual(self.cache(self.path).debug_level, 3)
        self.assertEqual(self.cache.reads, 2)

    def test_recent_file_is_always_read(self) -> None:
        """A file modified within RACY_SECONDS is read on every call."""
        self.write(":tproxy_debug_level: 1\n", age=RACY_SECONDS / 2)
        self.cache(self.path)
        self.cache(self.path)
        self.assertEqual(self.cache.reads, 2)

    def test_errors_are_not_cached(self) -> None:
        """A file that cannot be used raises on every call; a missing one too."""
        self.write(":tproxy: 3\n")
        self.assertRaises(ConfigError, self.cache, self.path)
        self.assertRaises(ConfigError, self.cache, self.path)
        os.remove(self.path)
        self.assertRaises(ConfigError, self.cache, self.path)
        self.assertEqual(self.cache.reads, 3)

    def test_other_path_is_read(self) -> None:
        """The cache holds one file: another path is read."""
        loaded: list[str] = []

        def load(path: str) -> Config:
            loaded.append(path)
            return Config(path)

        cache = ConfigCache(load, clock=lambda: self.now)
        self.write("")
        other = os.path.join(self.dir, "other.conf")
        with open(other, "w"):
            pass
        os.utime(other, (self.now - 10, self.now - 10))
        cache(self.path)
        cache(other)
        cache(self.path)
        self.assertEqual(loaded, [self.path, other, self.path])


class DaemonRuntimeTests(unittest.TestCase):
    """One daemon's limits, configuration and log file."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "one.conf")
        self.paths = Paths(self.config, self.dir, self.dir)

    def write(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write(text)

    def runtime(self) -> DaemonRuntime:
        rt = DaemonRuntime("one_tproxy_x", self.paths)
        rt.prepare(begin_logging=False)
        assert rt.log_file is not None
        self.addCleanup(rt.log_file.close)
        self.addCleanup(rt.log_file.uninstall)
        return rt

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "one_tproxy_x.log")) as f:
            return f.read()

    def test_level_and_limits_from_file(self) -> None:
        """The file's debug level filters the log; its limits are in force."""
        self.write(":tproxy_debug_level: 1\n:tproxy_grace_period: 3\n:tproxy: []\n")
        rt = self.runtime()
        self.assertEqual(rt.limits().grace_period, 3)
        log.info("not written")
        log.warn("written")
        text = self.log_text()
        self.assertIn("written", text)
        self.assertNotIn("not written", text)

    def test_debug_gate(self) -> None:
        """Under twistd the log file decides whether DEBUG events are built only when told
        to govern (the root daemon); else the gate is left alone."""
        from tproxy import logs

        self.addCleanup(setattr, logs, "debug_enabled", logs.debug_enabled)
        self.write(":tproxy_debug_level: 1\n:tproxy: []\n")
        logs.debug_enabled = True
        self.runtime()
        self.assertTrue(logs.debug_enabled)
        rt = DaemonRuntime("one_tproxy_x", self.paths)
        rt.prepare(begin_logging=False, govern_debug_gate=True)
        assert rt.log_file is not None
        self.addCleanup(rt.log_file.close)
        self.addCleanup(rt.log_file.uninstall)
        self.assertFalse(logs.debug_enabled)
        self.write(":tproxy_debug_level: 3\n:tproxy: []\n")
        rt.reload()
        self.assertTrue(logs.debug_enabled)

    def test_missing_file_defaults(self) -> None:
        """A missing configuration file means the defaults, with an error in the log."""
        rt = self.runtime()
        self.assertEqual(rt.config.debug_level, 2)
        self.assertIn("cannot read", self.log_text())

    def test_reload(self) -> None:
        """Reload reopens the (rotated) file and applies the new level; a broken file keeps it."""
        self.write(":tproxy_debug_level: 2\n:tproxy: []\n")
        rt = self.runtime()
        path = os.path.join(self.dir, "one_tproxy_x.log")
        os.rename(path, path + ".1")
        self.write(":tproxy_debug_level: 3\n:tproxy: []\n")
        rt.reload()
        self.assertTrue(os.path.exists(path))
        log.debug("debug now")
        self.assertIn("debug now", self.log_text())
        self.write(":tproxy: {not a list\n")
        rt.reload()
        self.assertEqual(rt.config.debug_level, 3)
        rt.set_debug_level(0)
        log.warn("filtered")
        self.assertNotIn("filtered", self.log_text())
        rt.reopen()


class FakeLibc:
    """mallinfo2/malloc_trim of a heap whose free bytes the test sets."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.trimmed: list[int] = []

    def mallinfo2(self) -> _MallInfo2:
        info = _MallInfo2()
        info.fordblks = self.free
        return info

    def malloc_trim(self, pad: int) -> int:
        self.trimmed.append(pad)
        self.free = 0
        return 1


class CompactTests(unittest.TestCase):
    """Dicts and sets that shrank after a burst are replaced by right-sized copies."""

    def test_shrunk_tables_replaced(self) -> None:
        """A table grown for 2,000 entries and emptied is copied; a full one is left."""

        class Reactor:
            pass

        r = Reactor()
        r._reads = set(range(2000))  # type: ignore[attr-defined]
        r._writes = set()  # type: ignore[attr-defined]
        r._selectables = {i: object() for i in range(2000)}  # type: ignore[attr-defined]
        for i in range(1990):
            r._reads.discard(i)  # type: ignore[attr-defined]
            del r._selectables[i]  # type: ignore[attr-defined]
        before = r._selectables  # type: ignore[attr-defined]
        self.assertEqual(compact(r, REACTOR_TABLES), 2)
        self.assertIsNot(r._selectables, before)  # type: ignore[attr-defined]
        self.assertEqual(r._selectables, before)  # type: ignore[attr-defined]
        self.assertEqual(r._reads, set(range(1990, 2000)))  # type: ignore[attr-defined]
        self.assertEqual(compact(r, REACTOR_TABLES), 0, "right-sized now")

    def test_other_objects_left_alone(self) -> None:
        """A missing attribute or a non-dict/set one is not touched."""
        clock = Clock()
        self.assertEqual(compact(clock, ("_reads", "calls")), 0)


class MemoryReclaimerTests(unittest.TestCase):
    """Garbage is collected and free C-heap memory given back after bursts, and only then."""

    def reclaimer(
        self, libc: FakeLibc | None, blocks: list[int], **kwargs: Any
    ) -> tuple[MemoryReclaimer, Clock, list[int]]:
        clock = Clock()
        collected: list[int] = []

        def collect() -> int:
            collected.append(blocks[0])
            blocks[0] -= 100
            return 0

        r = MemoryReclaimer(
            clock, libc=libc, allocated_blocks=lambda: blocks[0], collect=collect, **kwargs
        )
        return r, clock, collected

    def test_trims_above_threshold(self) -> None:
        """A look trims when more than the threshold is free, not below it."""
        libc = FakeLibc(free=100)
        r, _, _ = self.reclaimer(libc, [1000], threshold=1000)
        r.check()
        self.assertEqual(libc.trimmed, [])
        libc.free = 5000
        r.check()
        self.assertEqual((libc.trimmed, r.trims), ([0], 1))
        r.check()
        self.assertEqual(r.trims, 1)

    def test_collects_after_a_burst_only(self) -> None:
        """A full collection runs when the allocated blocks moved a lot, either way."""
        blocks = [10_000]
        r, _, collected = self.reclaimer(None, blocks, collect_delta=500)
        r.check()
        blocks[0] += 400  # steady load: small moves
        r.check()
        self.assertEqual(collected, [])
        blocks[0] += 5_000  # connections came
        r.check()
        blocks[0] -= 3_000  # and went
        r.check()
        r.check()
        self.assertEqual(collected, [15_400, 12_300])
        self.assertEqual(r.collections, 2)

    def test_collects_after_a_slow_decline(self) -> None:
        """Connections that close over several looks, each moving little, are collected."""
        blocks = [10_000]
        r, _, collected = self.reclaimer(None, blocks, collect_delta=500)
        for _ in range(3):
            blocks[0] -= 300
            r.check()
        self.assertEqual(collected, [9_400])
        r.check()
        self.assertEqual(collected, [9_400])

    def test_compacts_tables_after_a_collection(self) -> None:
        """After a burst's collection, the link tables it is given that shrank are copied."""

        class Link:
            def __init__(self) -> None:
                self._streams = {i: None for i in range(2000)}
                self._per_guest: dict[str, int] = {}
                self.conn = self

        link = Link()
        blocks = [10_000]
        r, _, collected = self.reclaimer(
            None, blocks, collect_delta=500, tables=lambda: link_tables(link)
        )
        for i in range(2000):  # deleted one by one, as streams end (clear() would free the table)
            del link._streams[i]
        before = link._streams
        r.check()
        self.assertIs(link._streams, before, "no burst seen: nothing touched")
        blocks[0] += 5_000
        r.check()
        self.assertEqual(len(collected), 1)
        self.assertIsNot(link._streams, before)
        self.assertEqual(link._streams, {})
        self.assertEqual(r.compactions, 1, "the same table seen as the connection's is right-sized")

    def test_periodic(self) -> None:
        """Started, it looks every interval; stopped, never again."""
        libc = FakeLibc(free=5000)
        r, clock, _ = self.reclaimer(libc, [0], interval=2.0, threshold=1000)
        r.start()
        clock.advance(1.0)
        self.assertEqual(libc.trimmed, [])
        clock.advance(1.0)
        self.assertEqual(libc.trimmed, [0])
        r.stop()
        libc.free = 5000
        clock.advance(10.0)
        self.assertEqual(libc.trimmed, [0])

    def test_real_process(self) -> None:
        """With this interpreter's gc and this machine's glibc, a burst's garbage is freed."""
        if _load_libc() is None:
            raise unittest.SkipTest("no glibc mallinfo2/malloc_trim here")
        r = MemoryReclaimer(Clock(), threshold=0, collect_delta=1000)
        self.assertTrue(r.can_trim)

        class Node:
            other: object = None

        garbage = [Node() for _ in range(5000)]
        for i, node in enumerate(garbage):  # one ring: only a collection frees it
            node.other = garbage[i - 1]
        probe = weakref.ref(garbage[0])
        del garbage, node
        r.check()
        self.assertIsNone(probe())
        self.assertEqual((r.collections, r.trims), (1, 1))


class FreezeStartUpTests(unittest.TestCase):
    def test_collects_then_freezes(self) -> None:
        """Garbage made before is collected, what is alive is frozen, later objects are not."""
        self.addCleanup(gc.unfreeze)

        class Cycle:
            pass

        a = Cycle()
        a.me = a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        del a
        kept = Cycle()
        frozen = freeze_start_up()
        self.assertIsNone(gone())
        self.assertEqual(frozen, gc.get_freeze_count())
        self.assertGreater(frozen, 0)
        self.assertNotIn(kept, gc.get_objects())  # frozen: out of the collector's view
        later = Cycle()
        self.assertIn(later, gc.get_objects())
