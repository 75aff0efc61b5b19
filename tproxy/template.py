"""The template process inner proxies are forked from: ``python -m tproxy.template``.

A fresh interpreter with Twisted imported costs ~25-30 MB per inner proxy. The
root instead starts this one process, which imports everything an inner proxy
needs (without installing a reactor), freezes the garbage collector's view of
those objects (``gc.freeze()``, so children do not dirty the shared pages) and
then forks one child per inner proxy. A child shares the template's memory
copy-on-write and only pays for what it changes. For the same reason the
template reads the configuration file once (``tproxy.runtime.CONFIG_CACHE``:
an inner proxy reuses that Config while the file is unchanged) and forks
with the C library's ``fork()`` rather than ``os.fork()`` while it has one
thread (:func:`fork` says why that is safe), works out the interface
declarations of our classes (:func:`declare_interfaces`), fills the free
space of its allocators (:func:`fill_pools`, :func:`fill_heap`), then copies
the code objects an inner proxy runs side by side (:func:`relocate_code`,
listed in ``template_hot.txt``) and marks its memory mergeable for KSM
(:func:`allow_page_merging`). Figures:
docs/performance.md, "Memory per bridge and after close".

Control protocol on fd 3 (a SOCK_SEQPACKET socket pair made by the root), one
message per packet, ASCII:

* root -> template: ``launch SEQ BRIDGE`` with the link's fd attached
  (SCM_RIGHTS);
* template -> root: ``started SEQ PID``, ``failed SEQ REASON``, and for each
  reaped child ``exited PID WAITSTATUS``.

The template keeps no copy of a link fd after the fork, so an inner proxy's
socket pair still ends when the root dies. When the control socket ends (the
root is gone) the template exits; its children then notice the root's death
on their own links. The template runs no reactor and no thread: a child may
install a reactor and enter a namespace as if it were a fresh process.
"""

from __future__ import annotations

import _signal
import argparse
import ctypes
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import threading
import traceback
import types
from collections.abc import Callable, Sequence

CONTROL_FD = 3
LINK_FD = 3
#: The template's process title (deliberately not ``one_tproxy_*``).
TITLE = "one-tproxy-template"

#: Modules an inner proxy needs, imported once in the template.
PRELOAD = (
    "twisted.internet.epollreactor",
    "twisted.internet.base",
    "twisted.internet.tcp",
    "twisted.internet.unix",
    "twisted.internet.defer",
    "twisted.internet.task",
    "twisted.internet.endpoints",
    "twisted.internet.protocol",
    "twisted.application.service",
    "twisted.logger",
    "twisted.python.failure",
    "tproxy.config",
    "tproxy.logs",
    "tproxy.rlimits",
    "tproxy.runtime",
    "tproxy.link",
    "tproxy.link_accept",
    "tproxy.dispatch",
    "tproxy.inner",
    "tproxy.root",
    "tproxy.spawn",
    "tproxy.privileges",
    "setproctitle",
    "yaml",
)


def preload(
    modules: Sequence[str] = PRELOAD,
    warm: bool = True,
    config: str | None = None,
    relocate: bool | None = None,
) -> None:
    """Import ``modules`` (never the global reactor), warm up, collect, then freeze the GC.

    ``config``: the configuration file, read here once into
    ``tproxy.runtime.CONFIG_CACHE`` so that every inner proxy reuses it while
    the file is unchanged (a file that cannot be used is left to the inner
    proxy, which logs why). ``relocate`` (default: as ``warm``) packs the code
    objects an inner proxy runs (:data:`HOT_CODE`) side by side
    (:func:`relocate_code`), once the allocators' free space is filled.
    """
    had_reactor = "twisted.internet.reactor" in sys.modules
    for name in modules:
        importlib.import_module(name)
    if warm:
        warm_up()
        declare_interfaces()
    from tproxy.privileges import RealLibc, process_libc
    from tproxy.runtime import CONFIG_CACHE, _load_libc

    _load_libc()
    process_libc()
    RealLibc().last_cap()
    _fork_function()
    if not hasattr(os, "setns"):  # Python < 3.12: enter_netns goes through ctypes
        from tproxy.spawn import _libc_setns

        _libc_setns()
    if config is not None:
        from tproxy.config import ConfigError

        try:
            CONFIG_CACHE(config)
        except ConfigError:
            pass
        _drop_buffered_log()
    if not had_reactor and "twisted.internet.reactor" in sys.modules:  # pragma: no cover
        raise RuntimeError("the template must not install a reactor")
    if warm if relocate is None else relocate:
        try:
            relocate_code(hot_code_test(load_hot_code()), fill=_fill)
        except Exception:
            # Packing only saves memory: the template serves without it. A
            # relocation stopped half-way is still correct (each copy is the
            # same code). The root logs the template's output.
            traceback.print_exc()
            print(f"{TITLE}: packing the hot code failed; going on without it", file=sys.stderr)
            sys.stderr.flush()
    else:
        _fill()
    # CPython's type attribute cache (4,096 entries) holds a reference to the
    # name of each entry. Left as the imports and the configuration's parsing
    # filled it, every child's first lookups evict those entries, lowering
    # the reference counts of names on template pages nothing else of the
    # child touches (~140 strings); emptied, an eviction touches None.
    # (bench/bench_pages.py: -44 KiB per inner, mean of six paired runs.)
    sys._clear_type_cache()
    gc.freeze()


#: The code an inner proxy runs, one ``module<TAB>qualname`` a line, recorded
#: from real inner proxies by ``bench/bench_pages.py --record``.
HOT_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "template_hot.txt")
#: Environment variable: when set in the template's environment, each child
#: records the code it runs (``record_code``) to ``$ONE_TPROXY_RECORD_CODE.PID``.
RECORD_ENV = "ONE_TPROXY_RECORD_CODE"

CodeKey = tuple[str, str]


def _modules_by_file() -> dict[str, str]:
    """Source file -> module name, for the modules loaded now."""
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            found.setdefault(path, name)
    return found


def code_key(code: types.CodeType, by_file: dict[str, str]) -> CodeKey:
    """``(module, qualified name)`` of a code object: what :data:`HOT_CODE` lists.

    The module rather than the file (paths differ between installations; a
    frozen module's file is ``<frozen NAME>``), and no line number (edits
    move it): two code objects of one module with one qualified name (two
    lambdas of one function) share a key, and are both moved.
    """
    name = code.co_filename
    return (by_file.get(name, name), code.co_qualname)


def load_hot_code(path: str | None = None) -> set[CodeKey]:
    """The keys listed in ``path`` (default :data:`HOT_CODE`); none when it cannot be read."""
    keys: set[CodeKey] = set()
    try:
        with open(path or HOT_CODE, encoding="utf-8") as f:
            for line in f:
                module, sep, qualname = line.rstrip("\n").partition("\t")
                if sep and module and qualname and not module.startswith("#"):
                    keys.add((module, qualname))
    except OSError:
        pass
    return keys


def hot_code_test(keys: set[CodeKey]) -> Callable[[types.CodeType], bool]:
    """Whether a code object is one of ``keys``."""
    by_file = _modules_by_file()
    return lambda code: code_key(code, by_file) in keys


#: The code objects :func:`relocate_code` replaced: kept alive, so that their
#: memory never becomes free space a child's allocations would land in.
_OLD_CODE: list[types.CodeType] = []


def relocate_code(
    hot: Callable[[types.CodeType], bool], fill: Callable[[], object] | None = None
) -> int:
    """Give every function whose code is ``hot`` a fresh copy of it, all copies side by side.

    Why (docs/performance.md, "Memory per bridge and after close", 2026-11-27):
    CPython 3.11 writes the reference count of a function's code object on
    every call (the frame holds it) and its warm-up counter and inline caches
    until it is specialized, so each code object an inner proxy runs copies
    the template's page it lies on. Code objects are made at import, in the
    middle of everything else a module holds: the ~450 an inner proxy runs
    (~180 KB) lay on ~370 pages. Copied here, after ``fill`` took the
    allocators' free space (:func:`_fill`: :func:`fill_pools`,
    :func:`fill_heap`), they come out of fresh pools and the top of the heap,
    packed: each child copies a fraction of those pages. Everything else the
    relocation needs is made before ``fill`` (the plan, and the ``co_code``
    bytes CPython caches on each old code object when it is copied), so that
    nothing lands between the copies. The copy is the same code (``code.replace()``:
    same constants, names, file and lines); a function's ``__code__`` may be
    replaced by one with the same free variables. Nested code objects are
    copied into their copied parent's constants. A code object something
    else holds (a list of code objects, say, compared by identity) is left
    where it is. Returns how many code objects were copied.
    """
    functions = [f for f in gc.get_objects() if type(f) is types.FunctionType]
    candidates = {id(f.__code__): f.__code__ for f in functions if hot(f.__code__)}
    pinned: set[int] = set()
    if candidates:
        for holder in gc.get_objects():
            if type(holder) in (types.FunctionType, tuple):
                continue
            for ref in gc.get_referents(holder):
                if id(ref) in candidates:
                    pinned.add(id(ref))
    # The plan, made before ``fill`` so that nothing but the copies is made after it.
    order: list[types.CodeType] = []  # nested code before the code holding it
    planned: set[int] = set()

    def plan(code: types.CodeType) -> None:
        if id(code) in planned:
            return
        planned.add(id(code))
        for const in code.co_consts:
            if type(const) is types.CodeType and hot(const):
                plan(const)
        order.append(code)

    for code in candidates.values():
        if id(code) not in pinned:
            plan(code)
    for code in order:
        code.co_code  # noqa: B018 - CPython caches these bytes on the code object: now, not between the copies
    users = [f for f in functions if id(f.__code__) in planned]
    new: dict[int, types.CodeType | None] = dict.fromkeys(planned)
    _OLD_CODE.extend(order)
    del functions, candidates
    if fill is not None:
        fill()
    for code in order:
        consts = code.co_consts
        if any(type(c) is types.CodeType and id(c) in planned for c in consts):
            consts = tuple(
                new[id(c)] if type(c) is types.CodeType and id(c) in planned else c
                for c in consts
            )
        new[id(code)] = code.replace(co_consts=consts)
    for f in users:
        f.__code__ = new[id(f.__code__)]  # type: ignore[assignment]
    return len(order)


def record_code(path: str) -> None:
    """From now on append ``module<TAB>qualname`` of each code object first called to ``path``.

    For ``bench/bench_pages.py --record`` (it sets :data:`RECORD_ENV`), which
    makes :data:`HOT_CODE` from what real inner proxies run. A profiler hook:
    slow, for measurements only.
    """
    by_file = _modules_by_file()
    seen: set[int] = set()
    out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the process's life

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and id(frame.f_code) not in seen:
            seen.add(id(frame.f_code))
            module, qualname = code_key(frame.f_code, by_file)
            out.write(f"{module}\t{qualname}\n")

    sys.setprofile(profile)


def _fill() -> None:
    """Collect, then take the free space of the allocators (before the fork)."""
    gc.collect()
    fill_pools()
    fill_heap()


#: Objects that fill the template's allocator pools (see :func:`fill_pools`); kept for good.
_FILLER: list[object] = []


def _free_blocks() -> dict[int, int]:
    """Block size -> free blocks in pools in use, from CPython's ``sys._debugmallocstats()``."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:  # pragma: no cover - not CPython
        return {}
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(out.fileno(), 2)
        try:
            stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    free: dict[int, int] = {}
    for line in text.splitlines():
        words = line.split()
        # "class size num-pools blocks-in-use avail-blocks"
        if len(words) == 5 and all(w.isdigit() for w in words):
            free[int(words[1])] = int(words[4])
    return free


#: Chunks of the C heap taken by :func:`fill_heap`; never freed.
_HEAP_FILLER: list[int] = []


def fill_heap(budget: int = 20000) -> int:
    """Take the free chunks inside the template's C heap; how many were taken.

    Why: the same as :func:`fill_pools`, for glibc's heap (objects above 512
    bytes, dict and list storage). Imports leave ~0.9 MB free in a few
    hundred chunks spread over the template's heap; a child's ``malloc``
    would reuse them and copy each page it lands on. Taken here, the child's
    allocations come from the top of the heap, on pages of their own. Each
    size from 64 KiB down to 32 bytes is taken while ``malloc`` serves it from
    a free chunk (``mallinfo2``: free bytes not at the top shrink); one that
    comes from the top is given back. Nothing is done without glibc.
    """
    from tproxy.runtime import _load_libc

    libc = _load_libc()
    if libc is None:  # pragma: no cover - not glibc
        return 0
    malloc, free = libc.malloc, libc.free
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]

    def holes() -> int:
        info = libc.mallinfo2()
        return int(info.fordblks) - int(info.keepcost)

    taken = 0
    size = 1 << 16
    while size >= 32 and budget > 0:
        budget -= 1
        before = holes()
        pointer = malloc(size - 16)  # a chunk of ``size`` bytes with its header
        if pointer and holes() < before:
            _HEAP_FILLER.append(pointer)
            taken += 1
        else:
            if pointer:
                free(pointer)
            size //= 2
    return taken


def _filler(size: int, i: int) -> object:
    """A new object taking one ``size``-byte block (16, 32, or 48 and more)."""
    if size == 16:
        return object()
    if size == 32:
        return float(i) + 0.5
    return bytes(size - 33)


def fill_pools() -> int:
    """Use up the free blocks of the allocator's pools in use; how many objects that took.

    Why: a child's first allocations of each size would land in those
    partly used pools of the template, and each one copies a whole 4 KiB
    page to store a few dozen bytes. Filled, the child's objects go to pools
    of their own, packed. (pymalloc's block sizes are multiples of 16 up to
    512; a ``bytes`` of length n takes 33 + n bytes, ``object()`` 16 and a
    ``float`` 24.) The filler stays alive and frozen for the template's life.
    """
    made = 0
    for _ in range(3):  # filling frees a few blocks itself (temporaries): again
        free = {size: n for size, n in _free_blocks().items() if n}
        for size, count in sorted(free.items()):
            if size == 16 or size == 32 or size >= 48:
                _FILLER.extend(_filler(size, i) for i in range(count))
                made += count
        if sum(free.values()) < 64:
            break
    return made


def warm_up() -> None:
    """Run the inner proxy's common code once, so children share its specialized bytecode.

    Python 3.11 rewrites a function's bytecode in place the first times it
    runs; done here, before the fork, those pages stay shared. Nothing of it
    survives: the reactor made here is never installed and its descriptors
    are closed.
    """
    from twisted.internet import epollreactor

    from tproxy.config import parse_config
    from tproxy.link import InnerLink, RootLink
    from tproxy.model import Destination

    config = parse_config(
        ":tproxy_debug_level: 2\n:tproxy:\n- :service_port: 5030\n"
        "  :remote_addr: 127.0.0.1\n  :remote_port: 5030\n",
        "<warm-up>",
    )
    reactor = epollreactor.EPollReactor()
    try:
        inner = InnerLink(
            reactor, lambda ports: None, config.limits, ping_interval=None, stats_interval=None
        )
        dest = Destination("127.0.0.1", 1)
        root = RootLink(reactor, "w", lambda port: dest, config.limits, ping_interval=None)
        ti, tr = _WarmTransport(), _WarmTransport()
        inner.makeConnection(ti)
        root.makeConnection(tr)
        for _ in range(3):
            root.push_config([5030])
            inner.dataReceived(tr.value())
            root.dataReceived(ti.value())
            tr.clear()
            ti.clear()
        reactor.callLater(0, reactor.stop)
        reactor.run(installSignalHandlers=False)
        # The first log line: glibc reads the time zone (malloc'd state) and
        # the formatting caches fill - once, here, not in every child.
        from twisted.logger import LogLevel

        from tproxy.logs import format_event_line

        format_event_line({"log_format": "warm {x}", "x": 1, "log_level": LogLevel.info,
                     "log_namespace": "warm", "log_time": 0.0})
        # Twisted's own ports log through the legacy ``twisted.python.log.msg``,
        # whose publisher makes its lock and the thread's context tracker the
        # first time: here, once, rather than in every child. (Buffered only;
        # dropped below.)
        from twisted.python import log as legacy_log

        legacy_log.msg("warm-up")
    finally:
        _drop_buffered_log()
        # Through the epoll object, not os.close of its number: the object
        # would close that number again when the collector frees it, by then
        # perhaps another descriptor (it broke a socket of a later test).
        reactor._poller.close()
        waker: object = getattr(reactor, "waker", None)
        for name in ("i", "o", "fd"):
            fd = getattr(waker, name, None)
            if isinstance(fd, int):
                try:
                    os.close(fd)
                except OSError:
                    pass


def declare_interfaces(prefix: str = "tproxy") -> int:
    """Work out now the interface declarations (zope.interface) of our classes; how many.

    ``implementedBy(cls)`` builds a class's declaration the first time
    anything asks (Twisted does for every protocol and service: logging
    prefixes, ``IService(parent)``) and keeps it on the class. Left to the
    children, each of them builds the same declarations again, runs
    zope.interface's C3 code and subscribes them to their bases'
    (template-owned) dependents: 0.27 MiB of copied pages per inner proxy.
    """
    from zope.interface import implementedBy

    done = 0
    for name, module in list(sys.modules.items()):
        if name != prefix and not name.startswith(prefix + "."):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name:
                try:
                    implementedBy(value)
                except TypeError:  # pragma: no cover - not a class zope can declare
                    continue
                done += 1
    return done


def _drop_buffered_log() -> None:
    """Forget what the template logged: it must not be replayed into a child's log file."""
    from twisted.logger import globalLogBeginner

    buffered = getattr(getattr(globalLogBeginner, "_initialBuffer", None), "_buffer", None)
    if buffered is not None:
        buffered.clear()


_libc_fork: list[Callable[[], int] | None] = []


def _fork_function() -> Callable[[], int] | None:
    """The C library's ``fork()``, called with the GIL held (looked up once), or None."""
    if not _libc_fork:
        try:
            fork = ctypes.PyDLL(None, use_errno=True).fork
        except (OSError, AttributeError):  # pragma: no cover - not glibc-like
            _libc_fork.append(None)
        else:
            fork.restype = ctypes.c_int
            fork.argtypes = []
            _libc_fork.append(fork)
    return _libc_fork[0]


def fork() -> tuple[int, bool]:
    """Fork an inner proxy: ``(pid, hooks_skipped)``.

    ``os.fork()`` runs CPython's at-fork work in the child: the C-level
    re-initialisation of the runtime's locks and the Python hooks of
    ``os.register_at_fork`` (``threading``, ``logging``, ``random``, ...).
    Those hooks run code and touch objects nothing else in an inner proxy
    touches, so each child copies ~0.5 MiB of the template's pages for them
    (measured: a child that only sleeps holds 1.17 MiB of private memory
    after ``os.fork()``, 0.61 MiB after this). So the template calls the C
    library's ``fork()`` directly, through ``ctypes.PyDLL`` (the GIL stays
    held across the call), and the child does itself what of that work it
    needs (:func:`after_raw_fork`).

    Why skipping the rest is safe here, and only here: the template has one
    thread (checked on every call: with any other thread, or without the C
    library's ``fork``, this falls back to ``os.fork()``), it forks from its
    Python loop, never from inside an import, a logging call or a lock, so
    no lock the hooks would re-initialise can be held; the child's one
    thread is the template's main thread with the same ``pthread_self()``,
    so ``threading``'s and the GIL's notion of the main thread stay true; the
    child never returns into the template's loop and ends with
    ``os._exit()``, so no interpreter shutdown runs over the skipped state.
    What is not true in the child - the ``random`` module's state, shared
    with the template and every sibling - is redone by :func:`after_raw_fork`.
    """
    raw = _fork_function()
    if raw is None or threading.active_count() != 1 or len(sys._current_frames()) != 1:
        return os.fork(), False
    pid = raw()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid, True


def after_raw_fork() -> None:
    """In a child of :func:`fork` that skipped the hooks: what must not be shared with siblings."""
    import random

    random.seed()  # a fresh seed from os.urandom: never the template's sequence


class _WarmTransport:
    """A transport that only keeps what is written (the warm-up's; no test modules imported).

    ``twisted.internet.testing.StringTransport`` would pull trial, unittest,
    pdb and doctest into the template: memory every child maps, for nothing.
    """

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self.producer: object = None

    def write(self, data: bytes) -> None:
        self._data.append(bytes(data))

    def writeSequence(self, seq: Sequence[bytes]) -> None:
        self._data.extend(bytes(d) for d in seq)

    def value(self) -> bytes:
        return b"".join(self._data)

    def clear(self) -> None:
        self._data.clear()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        pass

    def loseWriteConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def getPeer(self) -> object:
        return None

    def getHost(self) -> object:
        return None

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


#: prctl(2) option of Linux >= 6.4: make all of the process's anonymous memory
#: (and its children's) mergeable by KSM.
PR_SET_MEMORY_MERGE = 67


def allow_page_merging() -> bool:
    """Let the kernel's same-page merging (KSM) share identical pages of the inner proxies.

    Measured (docs/performance.md, "Memory per bridge and after close"): of
    the ~5.6 MiB an inner proxy copies from the template, ~92 % of the pages
    end up byte-identical in every sibling (and a third identical to the
    template's originals: a reference count raised and lowered again) -
    copy-on-write copies them all the same, since CPython 3.11 writes a
    reference count whenever it touches an object. KSM merges such pages
    back. This only marks the memory (inherited across fork); nothing is
    merged unless the administrator runs KSM (``/sys/kernel/mm/ksm/run``).
    False when the kernel does not know the option (before 6.4) or refuses.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # pragma: no cover - not glibc-like
        return False


def resolve_entry(entry: str) -> Callable[[list[str]], int | None]:
    """``module:function`` -> the function a child runs with the inner's argv."""
    module, _, func = entry.partition(":")
    return getattr(importlib.import_module(module), func or "main")  # type: ignore[no-any-return]


class Template:
    """The fork loop (blocking; no reactor here)."""

    def __init__(
        self,
        control: socket.socket,
        entry: Callable[[list[str]], int | None],
        inner_args: Sequence[str],
    ) -> None:
        self.control = control
        self.entry = entry
        self.inner_args = list(inner_args)
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self.children: set[int] = set()

    def _send(self, text: str) -> None:
        try:
            self.control.send(text.encode("ascii"))
        except OSError:
            pass  # the root is gone; the loop will see EOF

    def serve(self) -> int:
        """Run until the control socket ends; the exit status."""
        signal.set_wakeup_fd(self._wfd)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self._selector.register(self.control, selectors.EVENT_READ, "control")
        self._selector.register(self._rfd, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in self._selector.select():
                if key.data == "signal":
                    try:
                        os.read(self._rfd, 512)
                    except BlockingIOError:
                        pass
                    self._reap()
                elif not self._command():
                    return 0
            self._reap()

    def _command(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, 4096, 4)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        words = data.decode("ascii", "replace").split()
        if len(words) != 3 or words[0] != "launch" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self._send(f"failed {words[1] if len(words) > 1 else '?'} bad request")
            return True
        _, seq, bridge = words
        link_fd = fds[0]
        try:
            pid, raw = fork()
        except OSError as e:
            os.close(link_fd)
            self._send(f"failed {seq} fork: {e.strerror}")
            return True
        if pid == 0:
            self._child(bridge, link_fd, raw)  # never returns
        os.close(link_fd)
        self.children.add(pid)
        self._send(f"started {seq} {pid}")
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._send(f"exited {pid} {status}")

    def _child(self, bridge: str, link_fd: int, raw: bool = False) -> None:
        rc: int | None = 1
        try:
            if raw:
                # A SIGCHLD the template caught just before the fork may still
                # be pending for Python: run its (no-op) handler now, while it
                # is installed (pthread_sigmask checks for pending signals).
                _signal.pthread_sigmask(_signal.SIG_BLOCK, ())
                after_raw_fork()
            # ``_signal``, not ``signal``: the latter's wrappers turn the old
            # handler into an enum member, and that failing lookup (the old
            # handler is a function) runs enum code that costs every child
            # ~0.2 MiB of copied pages.
            _signal.set_wakeup_fd(-1)
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            self._selector.close()
            self.control.close()
            os.close(self._rfd)
            os.close(self._wfd)
            if link_fd != LINK_FD:
                os.dup2(link_fd, LINK_FD)
                os.close(link_fd)
            record = os.environ.get(RECORD_ENV)
            if record:
                record_code(f"{record}.{os.getpid()}")
            rc = self.entry([bridge, *self.inner_args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Preload, then fork inner proxies on the root's requests until it goes away."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m tproxy.template")
    parser.add_argument("--entry", default="tproxy.inner:main")
    parser.add_argument("--config", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    try:
        control = socket.socket(fileno=os.dup(CONTROL_FD))
        os.close(CONTROL_FD)
    except OSError as e:
        print(f"{TITLE}: no control socket on fd {CONTROL_FD}: {e}", file=sys.stderr)
        return 2
    control.setblocking(False)
    import setproctitle

    setproctitle.setproctitle(TITLE)
    allow_page_merging()
    entry = resolve_entry(args.entry)
    preload(config=args.config)
    inner_args = ["--config", args.config, "--log-dir", args.log_dir, "--run-dir", args.run_dir]
    return Template(control, entry, inner_args).serve()


if __name__ == "__main__":
    sys.exit(main())
