"""Tests for tproxy.template that run in-process (the fork loop is covered by integration)."""

from __future__ import annotations

import gc
import io
import os
import sys
import types
from collections.abc import Callable

from twisted.trial import unittest

from tproxy import template


class TemplateTests(unittest.TestCase):
    """Preloading and entry points."""

    def test_resolve_entry(self) -> None:
        """``module:function`` names the child's entry; the default function is main."""
        entry = template.resolve_entry("tproxy.inner:main")
        self.assertIs(entry, template.resolve_entry("tproxy.inner"))

    def test_warm_up_leaves_nothing(self) -> None:
        """The warm-up installs no reactor and leaves no descriptor open."""
        before = set(os.listdir("/proc/self/fd"))
        had_reactor = "twisted.internet.reactor" in sys.modules
        template.warm_up()
        after = set(os.listdir("/proc/self/fd"))
        self.assertEqual(len(after - before), 0, after - before)
        self.assertEqual("twisted.internet.reactor" in sys.modules, had_reactor)

    def test_warm_up_makes_the_legacy_log_lock(self) -> None:
        """After the warm-up, the legacy log publisher has its lock (not made in each child)."""
        from twisted.python import log as legacy_log

        template.warm_up()
        self.assertIn("_threadable_lock", vars(legacy_log.theLogPublisher))

    def test_warm_up_closes_nothing_later(self) -> None:
        """Descriptors opened after the warm-up survive the collection of its reactor."""
        template.warm_up()
        fds = os.pipe()  # the lowest free numbers: those the warm-up gave back
        for fd in fds:
            self.addCleanup(os.close, fd)
        gc.collect()
        for fd in fds:
            os.fstat(fd)  # raises if something closed it

    def test_declare_interfaces(self) -> None:
        """Our classes get their interface declarations before the fork, not in each child."""

        def check() -> bool:
            from tproxy.inner import InnerService
            from tproxy.link import InnerLink

            made = template.declare_interfaces()
            return made > 10 and all(
                "__implemented__" in vars(cls) and "__provides__" in vars(cls)
                for cls in (InnerService, InnerLink)
            )

        self._in_child(check)

    def test_preload_freezes(self) -> None:
        """preload imports what it is told and freezes the collector."""
        self.addCleanup(gc.unfreeze)
        template.preload(("json",), warm=False)
        self.assertIn("json", sys.modules)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_preload_survives_a_failed_relocation(self) -> None:
        """Packing the hot code only saves memory: when it raises, preload says so on
        stderr and still freezes (the template serves without it)."""

        def broken(*args: object, **kwargs: object) -> int:
            raise RuntimeError("relocation bug")

        self.patch(template, "relocate_code", broken)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        template.preload(("json",), warm=False, relocate=True)
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertIn("RuntimeError: relocation bug", err.getvalue())
        self.assertIn("packing the hot code failed; going on without it", err.getvalue())

    def test_preload_empties_the_type_cache(self) -> None:
        """The last thing before the freeze: CPython's type attribute cache is emptied."""
        calls: list[int] = []
        self.patch(sys, "_clear_type_cache", lambda: calls.append(gc.get_freeze_count()))
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        template.preload(("json",), warm=False)
        self.assertEqual(calls, [0])
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_preload_looks_up_libc_once(self) -> None:
        """preload leaves the C library handles the inner proxy uses already made."""
        from tproxy import privileges, runtime

        self.addCleanup(gc.unfreeze)
        template.preload(("json",), warm=False)
        self.assertEqual(len(privileges._process_libc), 1)
        self.assertIs(privileges.process_libc(), privileges._process_libc[0])
        self.assertEqual(len(runtime._libc), 1)
        self.assertIn("tproxy.privileges", template.PRELOAD)

    def test_preload_reads_the_configuration_once(self) -> None:
        """preload fills the configuration cache the inner proxies reuse."""
        from tproxy import runtime

        self.addCleanup(gc.unfreeze)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(":tproxy_debug_level: 3\n")
        os.utime(path, (1, 1))
        before = runtime.CONFIG_CACHE.reads
        template.preload(("json",), warm=False, config=path)
        self.assertEqual(runtime.CONFIG_CACHE(path).debug_level, 3)
        self.assertEqual(runtime.CONFIG_CACHE.reads, before + 1)

    def test_preload_survives_a_broken_configuration(self) -> None:
        """A configuration that cannot be used is left to the inner proxy."""
        self.addCleanup(gc.unfreeze)
        template.preload(("json",), warm=False, config=os.path.abspath(self.mktemp()))

    def test_fork_child(self) -> None:
        """fork() makes a child (without the at-fork hooks when single-threaded)."""
        import threading

        pid, raw = template.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                template.after_raw_fork()
            finally:
                os._exit(7)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 7)
        self.assertEqual(raw, threading.active_count() == 1)

    def test_fork_with_threads_uses_os_fork(self) -> None:
        """With another thread alive, fork() is os.fork() (the hooks run)."""
        import threading

        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        pid, raw = template.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0)
        os.waitpid(pid, 0)
        self.assertFalse(raw)

    def test_allow_page_merging(self) -> None:
        """The KSM opt-in works on kernels that know it and never raises."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (the opt-in is for good)
            try:
                ok = template.allow_page_merging()
                with open("/proc/self/smaps") as f:
                    marked = " mg" in f.read()
                os._exit(0 if ok == marked else 3)
            finally:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

    def _in_child(self, check: Callable[[], bool]) -> None:
        """Run ``check`` in a forked child (what it changes stays there); assert it held."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                code = 0 if check() else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

    def test_fill_pools(self) -> None:
        """fill_pools takes free blocks of the pools in use (what remains is its own churn)."""

        def check() -> bool:
            before = sum(template._free_blocks().values())
            made = template.fill_pools()
            after = sum(template._free_blocks().values())
            return made > 0 and after < before

        self._in_child(check)

    def test_fill_heap(self) -> None:
        """After fill_heap the C heap holds fewer free bytes outside its top."""
        from tproxy.runtime import _load_libc

        libc = _load_libc()
        if libc is None:
            raise unittest.SkipTest("no glibc mallinfo2 here")

        def holes() -> int:
            info = libc.mallinfo2()
            return int(info.fordblks) - int(info.keepcost)

        def check() -> bool:
            import ctypes

            # Make a few holes first: blocks freed between blocks kept.
            keep = [ctypes.create_string_buffer(4000) for _ in range(40)]
            del keep[::2]
            before = holes()
            taken = template.fill_heap()
            return taken > 0 and holes() < before

        self._in_child(check)


def _outer(n: int) -> Callable[[], int]:
    """A function whose nested code makes closures (for the relocation tests)."""

    def inner() -> int:
        return n * 2

    return inner


def _plain(x: int) -> int:
    return x + 1


class HotCodeTests(unittest.TestCase):
    """The hot code list and the relocation of the code objects it names."""

    def test_code_key_names_the_module(self) -> None:
        """A code object's key is its module's name and its qualified name, no file or line."""
        key = template.code_key(_plain.__code__, template._modules_by_file())
        self.assertEqual(key, (__name__, "_plain"))
        self.assertEqual(
            template.code_key(_plain.__code__, {}), (_plain.__code__.co_filename, "_plain")
        )

    def test_load_hot_code(self) -> None:
        """Lines are ``module<TAB>qualname``; comments, blank and broken lines are skipped."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# a comment\tx\n\nm\tA.f\nno tab here\nn\t<lambda>\n")
        self.assertEqual(template.load_hot_code(path), {("m", "A.f"), ("n", "<lambda>")})
        self.assertEqual(template.load_hot_code(self.mktemp()), set())

    def test_shipped_list_still_names_live_code(self) -> None:
        """Most entries of tproxy/template_hot.txt name code of the preloaded modules (else
        regenerate it: ``bench/bench_pages.py --record``)."""
        import importlib

        for name in template.PRELOAD:
            importlib.import_module(name)
        keys = template.load_hot_code()
        self.assertGreater(len(keys), 100)
        by_file = template._modules_by_file()
        live = {
            template.code_key(f.__code__, by_file)
            for f in gc.get_objects()
            if type(f) is types.FunctionType
        }
        found = len(keys & live)
        self.assertGreater(found, 0.8 * len(keys), sorted(keys - live)[:20])

    def test_relocate_moves_hot_code(self) -> None:
        """A hot function gets an equal copy of its code; closures made later use the copy."""

        def check() -> bool:
            old_plain, old_outer = _plain.__code__, _outer.__code__
            hot = {("", "_plain"), ("", "_outer"), ("", "_outer.<locals>.inner")}
            moved = template.relocate_code(lambda co: ("", co.co_qualname) in hot)
            nested = [c for c in _outer.__code__.co_consts if isinstance(c, types.CodeType)]
            return (
                moved == 3
                and _plain.__code__ is not old_plain
                and _plain.__code__ == old_plain
                and _outer.__code__ is not old_outer
                and _outer(4)() == 8
                and _plain(1) == 2
                and _outer(1).__code__ is nested[0]
                and old_plain in template._OLD_CODE
            )

        self._in_child(check)

    def test_relocate_fills_between_plan_and_copies(self) -> None:
        """``fill`` runs once, after the plan and before the first copy."""

        def check() -> bool:
            old = id(_plain.__code__)  # an id: a cell holding the code would pin it
            seen: list[bool] = []
            template.relocate_code(
                lambda co: co.co_qualname == "_plain",
                fill=lambda: seen.append(id(_plain.__code__) == old),
            )
            return seen == [True] and id(_plain.__code__) != old

        self._in_child(check)

    def test_relocate_leaves_code_held_elsewhere(self) -> None:
        """A code object something else holds (a list, say) keeps its place."""

        def check() -> bool:
            held = [_plain.__code__]
            moved = template.relocate_code(lambda co: co.co_qualname == "_plain")
            return moved == 0 and _plain.__code__ is held[0]

        self._in_child(check)

    def test_relocate_nothing_hot(self) -> None:
        """Nothing hot: nothing is copied."""
        self.assertEqual(template.relocate_code(lambda co: False), 0)

    def test_preload_relocates_only_when_asked(self) -> None:
        """preload moves the listed code when it warms up (or is told to), not otherwise."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{__name__}\t_plain\n")
        self.patch(template, "HOT_CODE", path)

        def check(relocate: bool | None, moves: bool) -> Callable[[], bool]:
            def run() -> bool:
                old = _plain.__code__
                template.preload(("json",), warm=False, relocate=relocate)
                gc.unfreeze()
                return (_plain.__code__ is not old) == moves

            return run

        self._in_child(check(None, False))
        self._in_child(check(True, True))

    def test_record_code(self) -> None:
        """record_code appends the key of each code object first called, once."""
        path = self.mktemp()
        template.record_code(path)
        try:
            _plain(1)
            _plain(2)
        finally:
            sys.setprofile(None)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines.count(f"{__name__}\t_plain"), 1)

    def _in_child(self, check: Callable[[], bool]) -> None:
        TemplateTests._in_child(self, check)  # type: ignore[arg-type]
