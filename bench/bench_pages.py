"""Which of an inner proxy's pages are copies of the template's, and what was written on them.

Issue 7 (h): an inner proxy forked from the template (``tproxy.template``)
pays for every template page it writes (copy-on-write). This attributes
those copies. It builds a throw-away hypervisor (the integration tests'
fixture, prefix ``tqp``) with N bridges, starts the mesh, lets it settle,
then for each inner proxy:

1. reads ``/proc/PID/pagemap`` of the inner and of the template: a page
   present in both, whose frame differs and which the inner maps
   exclusively, is a *copied* page (the template's own later writes leave
   the inner on the shared original, so they are not counted); a page
   only the inner has is the child's *own* (new memory);
2. reads both copies (``/proc/PID/mem``) and compares them 8 bytes at a
   time: each word that differs is a write of the child (still visible);
3. asks the template (gdb, ``PyRun_SimpleString`` of
   ``bench/template_objects.py``) where each of its objects lies (address,
   size, type, owning module) and where pymalloc's arenas are; libpython's
   symbols (``nm``) name the static data; gdb's ``ptype /o`` names the
   fields of code, type, dict and function objects;
4. prints Markdown tables: copied pages per region (pymalloc arenas, glibc
   heap, libpython .data/.bss, other libraries, stack), and the written
   words and the pages they caused, per object type, per (type, field) and
   per owning module. A page is *blamed* on the categories of the words
   written on it, shared equally; a copied page whose content is identical
   again (a reference count raised and lowered) is listed apart, with the
   objects on it.

Run as root (no benchmark lock needed: no traffic, a few seconds):
``PYTHONPATH=. python bench/bench_pages.py [--bridges 3] [--settle 4] [--top 25]``;
``--pids TEMPLATE,INNER[,INNER...]`` looks at a running mesh instead.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAGE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63
EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1
ARENA_SIZE = 1 << 20
POOL_SIZE = 1 << 14
POOL_HEADER = 48
HERE = os.path.dirname(os.path.abspath(__file__))

#: Python type name -> the C struct gdb names its fields by.
STRUCTS = {
    "code": "PyCodeObject",
    "type": "PyHeapTypeObject",
    "dict": "PyDictObject",
    "function": "PyFunctionObject",
    "module": "PyModuleObject",
    "set": "PySetObject",
    "frozenset": "PySetObject",
    "list": "PyListObject",
    "cell": "PyCellObject",
    "method": "PyMethodObject",
    "builtin_function_or_method": "PyCFunctionObject",
}


class Mapping:
    """One line of ``/proc/PID/maps``."""

    def __init__(self, line: str) -> None:
        parts = line.split(None, 5)
        start, end = parts[0].split("-")
        self.start, self.end = int(start, 16), int(end, 16)
        self.perms = parts[1]
        self.offset = int(parts[2], 16)
        self.path = parts[5].strip() if len(parts) > 5 else ""


def maps(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/maps") as f:
        return [Mapping(line) for line in f]


def pagemap(pid: int, start: int, end: int) -> list[int]:
    """The pagemap entries of ``[start, end)`` (0 where nothing is mapped)."""
    n = (end - start) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read(n * 8)
    return list(struct.unpack(f"{len(data) // 8}Q", data)) + [0] * (n - len(data) // 8)


def read_page(mem: Any, addr: int) -> bytes:
    mem.seek(addr)
    return mem.read(PAGE)  # type: ignore[no-any-return]


class Symbols:
    """Data symbols of libpython (``nm -S``), placed at the library's load address."""

    def __init__(self, path: str, base: int) -> None:
        self.starts: list[int] = []
        self.items: list[tuple[int, int, str]] = []
        try:
            out = subprocess.run(
                ["nm", "-S", "--defined-only", path], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return
        rows = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in "dDbBvV":
                rows.append((base + int(parts[0], 16), int(parts[1], 16), parts[3]))
        rows.sort()
        self.items = rows
        self.starts = [r[0] for r in rows]

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            start, size, name = self.items[i]
            if addr < start + max(size, 1):
                return name
        return None


class Objects:
    """The template's objects, from ``template_objects.py``'s dump, found by address."""

    def __init__(self, path: str) -> None:
        rows = []
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ")
                if len(parts) >= 4:
                    rows.append((int(parts[0]), int(parts[1]), parts[2], parts[3],
                                 parts[4] if len(parts) > 4 else ""))
        rows.sort()
        self.rows = rows
        self.starts = [r[0] for r in rows]

    def at(self, addr: int) -> tuple[int, int, str, str, str] | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        # a block may hold a smaller one (rare): look back a little
        for j in range(i, max(i - 3, -1), -1):
            row = self.rows[j]
            if row[0] <= addr < row[0] + row[1]:
                return row
        return None

    def on_page(self, page: int) -> list[tuple[int, int, str, str, str]]:
        i = max(bisect.bisect_left(self.starts, page) - 1, 0)
        found = []
        while i < len(self.rows) and self.rows[i][0] < page + PAGE:
            row = self.rows[i]
            if row[0] + row[1] > page:
                found.append(row)
            i += 1
        return found


def struct_fields(names: Iterable[str], binary: str) -> dict[str, list[tuple[int, int, str]]]:
    """C struct name -> [(offset, size, field)] of its top-level fields (gdb ``ptype /o``)."""
    args = ["gdb", "-batch", "-nx"]
    for name in names:
        args += ["-ex", f"echo @@{name}\\n", "-ex", f"ptype /o {name}"]
    args.append(binary)
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields: dict[str, list[tuple[int, int, str]]] = {}
    current = None
    depth = 0
    for line in out.splitlines():
        if line.startswith("@@"):
            current, depth = line[2:], 0
            fields[current] = []
            continue
        m = re.match(r"/\*\s+(\d+)(?::\s*\d+)?\s+\|\s+(\d+)\s+\*/\s+(.*)", line.strip())
        if current is not None and m and depth == 1:
            decl = m.group(3).rstrip(";{ ").split()
            field = decl[-1].lstrip("*").split("[")[0] if decl else "?"
            fields[current].append((int(m.group(1)), int(m.group(2)), field))
        depth += line.count("{") - line.count("}")
    return fields


def field_name(kind: str, offset: int, pre: int, fields: dict[str, list[tuple[int, int, str]]]
               ) -> str:
    """Which field of an object of type ``kind`` lies ``offset`` bytes into its block."""
    if offset < pre:
        return "gc header"
    off = offset - pre
    if off < 8:
        return "refcount"
    if off < 16:
        return "ob_type"
    rows = fields.get(STRUCTS.get(kind, ""), [])
    if kind == "code" and rows and off >= rows[-1][0]:
        return "bytecode (quickening, inline caches)"
    for start, size, name in rows:
        if start <= off < start + max(size, 8):
            return name
    return f"+{off}"


def gdb_template(pid: int, script: str) -> str:
    """Run ``script`` in the template under gdb; gdb's output (with its arenas)."""
    cmd = f"exec(compile(open('{script}').read(), '{script}', 'exec'), {{}})"
    args = [
        "gdb", "-p", str(pid), "-batch", "-nx",
        "-ex", "set confirm off",
        "-ex", "call (int)PyGILState_Ensure()",
        "-ex", f'call (int)PyRun_SimpleString("{cmd}")',
        "-ex", "call (void)PyGILState_Release($1)",
        "-ex", "print maxarenas",
        "-ex", "print *arenas@maxarenas",
        "-ex", "detach",
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=300).stdout


def arenas_of(gdb_out: str) -> list[int]:
    return [int(a) for a in re.findall(r"address = (\d+)", gdb_out) if int(a)]


class Region:
    """Names the region of an address: arena, heap, libpython, other libraries, stack."""

    def __init__(self, tmaps: list[Mapping], arenas: list[int], libpython: str) -> None:
        self.arenas = sorted(arenas)
        self.maps = tmaps
        self.starts = [m.start for m in tmaps]
        lib = [m for m in tmaps if m.path == libpython]
        self.lib_range = (min(m.start for m in lib), max(m.end for m in lib)) if lib else (0, 0)
        # libpython's .bss goes on in the anonymous mapping right after it
        for m in tmaps:
            if m.start == self.lib_range[1] and not m.path:
                self.lib_range = (self.lib_range[0], m.end)

    def __call__(self, addr: int) -> str:
        i = bisect.bisect_right(self.arenas, addr) - 1
        if i >= 0 and addr < self.arenas[i] + ARENA_SIZE:
            return "pymalloc arenas"
        if self.lib_range[0] <= addr < self.lib_range[1]:
            return "libpython .data/.bss"
        j = bisect.bisect_right(self.starts, addr) - 1
        m = self.maps[j] if j >= 0 and addr < self.maps[j].end else None
        if m is None:
            return "not in the template"
        if m.path == "[heap]":
            return "glibc heap"
        if m.path == "[stack]":
            return "stack"
        if m.path:
            return "data of " + os.path.basename(m.path)
        return "other anonymous (large blocks, mmap)"


class Analysis:
    """One inner proxy against the template."""

    def __init__(self, template: int, inner: int) -> None:
        self.template, self.inner = template, inner
        self.copied: list[int] = []
        self.own = 0
        self.own_maps = 0

    def scan(self) -> None:
        tmaps = maps(self.template)
        tranges = [(m.start, m.end) for m in tmaps]
        for m in maps(self.inner):
            if "w" not in m.perms or m.perms[3] != "p":
                continue
            ents_i = pagemap(self.inner, m.start, m.end)
            if not any(lo < m.end and m.start < hi for lo, hi in tranges):
                self.own_maps += sum(1 for e in ents_i if e & PRESENT)
                continue
            ents_t = pagemap(self.template, m.start, m.end)
            for k, (ei, et) in enumerate(zip(ents_i, ents_t, strict=True)):
                if not ei & PRESENT or not ei & EXCLUSIVE:
                    continue
                if et & PRESENT and (ei & PFN_MASK) != (et & PFN_MASK):
                    self.copied.append(m.start + k * PAGE)
                else:
                    self.own += 1

    def diffs(self) -> dict[int, list[int]]:
        """Copied page -> the addresses of the 8-byte words that differ from the template's."""
        out: dict[int, list[int]] = {}
        with open(f"/proc/{self.template}/mem", "rb", 0) as tm, \
                open(f"/proc/{self.inner}/mem", "rb", 0) as im:
            for page in self.copied:
                try:
                    a, b = read_page(tm, page), read_page(im, page)
                except OSError:
                    continue
                words = []
                if a != b:
                    wa = struct.unpack(f"{PAGE // 8}Q", a)
                    wb = struct.unpack(f"{PAGE // 8}Q", b)
                    pairs = enumerate(zip(wa, wb, strict=True))
                    words = [page + 8 * i for i, (x, y) in pairs if x != y]
                out[page] = words
        return out


def private_dirty(pid: int) -> int:
    """Private dirty memory of ``pid``, KiB."""
    from bench.bench_mesh_memory import pss_kib

    return pss_kib(pid, "Private_Dirty")


def table(title: str, header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> list[str]:
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return lines


def dump_template(template: int, work: str) -> tuple[Objects, str]:
    """Where the template's objects lie (this perturbs the template only); gdb's output."""
    dump = os.path.join(work, "objects.txt")
    runner = os.path.join(work, "run.py")
    script = os.path.join(HERE, "template_objects.py")
    with open(runner, "w") as f:
        f.write(f"exec(compile(open({script!r}).read(), {script!r}, 'exec'), "
                f"{{'__file__': {script!r}, '_TPROXY_DUMP_PATH': {dump!r}}})\n")
    gdb_out = gdb_template(template, runner)
    if not os.path.exists(dump):
        raise SystemExit(f"the template wrote no object dump; gdb said:\n{gdb_out}")
    return Objects(dump), gdb_out


def report(template: int, inners: list[int], top: int, keep: str | None) -> list[str]:
    work = keep or tempfile.mkdtemp(prefix="bench-pages-")
    analyses = []
    for pid in inners:
        a = Analysis(template, pid)
        a.scan()
        analyses.append(a)
    first = analyses[0]
    diffs = first.diffs()
    objects, gdb_out = dump_template(template, work)
    tmaps = maps(template)
    lib = next((m.path for m in tmaps if "libpython" in os.path.basename(m.path)), "")
    base = min((m.start for m in tmaps if m.path == lib), default=0)
    symbols = Symbols(lib, base) if lib else None
    region = Region(tmaps, arenas_of(gdb_out), lib)
    binary = lib or sys.executable
    fields = struct_fields(sorted(set(STRUCTS.values())), binary)
    def pre_of(kind: str) -> int:
        return _PRE.get(kind, 0)

    lines = [f"# Copied pages of inner proxies (template {template})", ""]
    lines += table("Per inner proxy (KiB)", ("pid", "private dirty", "copied template pages",
                                             "own pages in inherited mappings",
                                             "pages of its own mappings"),
                   ((a.inner, private_dirty(a.inner), a_kib(len(a.copied)), a_kib(a.own),
                     a_kib(a.own_maps)) for a in analyses))
    by_region = collections.Counter(region(p) for p in first.copied)
    lines += table(f"Copied pages of inner {first.inner} by region", ("region", "pages", "KiB"),
                   ((r, n, n * PAGE // 1024) for r, n in by_region.most_common()))

    blame_type: collections.Counter[str] = collections.Counter()
    blame_field: collections.Counter[str] = collections.Counter()
    blame_module: collections.Counter[str] = collections.Counter()
    words_type: collections.Counter[str] = collections.Counter()
    words_field: collections.Counter[str] = collections.Counter()
    pages_type: collections.Counter[str] = collections.Counter()
    pages_field: collections.Counter[str] = collections.Counter()
    refcount_only = 0
    identical = 0
    identical_objects: collections.Counter[str] = collections.Counter()
    region_blame: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    code_pages_bytecode = 0
    written = open(os.path.join(work, "words.txt"), "w")  # noqa: SIM115
    for page, words in diffs.items():
        reg = region(page)
        if not words:
            identical += 1
            objs = objects.on_page(page)
            for on_page in objs:
                identical_objects[on_page[2]] += 1.0 / len(objs)  # type: ignore[assignment]
            if not objs:
                identical_objects["(no known object: " + reg + ")"] += 1
            continue
        cats: set[tuple[str, str, str]] = set()
        for addr in words:
            row = objects.at(addr)
            if row is not None:
                kind, module = row[2], row[3]
                fld = field_name(kind, addr - row[0], pre_of(kind), fields)
                if kind.endswith(".keys") or kind.endswith(".items") or kind.endswith(".table"):
                    fld = "storage"
            else:
                module = "-"
                sym = symbols.lookup(addr) if symbols is not None and reg.startswith(
                    "libpython") else None
                if sym is not None:
                    kind, fld = "libpython static", sym
                elif reg == "pymalloc arenas" and (addr % POOL_SIZE) < POOL_HEADER:
                    kind, fld = "pymalloc pool header", "pool header"
                elif reg == "pymalloc arenas":
                    kind, fld = "pymalloc free block / unlisted object", "-"
                else:
                    kind, fld = f"unlisted ({reg})", "-"
            words_type[kind] += 1
            words_field[f"{kind}: {fld}"] += 1
            written.write(f"{page:x} {addr:x} {kind} {fld.replace(' ', '_')} {module} "
                          f"{row[4] if row is not None else '-'}\n")
            cats.add((kind, f"{kind}: {fld}", module))
        kinds = {c[0] for c in cats}
        flds = {c[1] for c in cats}
        mods = {c[2] for c in cats}
        for k in kinds:
            blame_type[k] += 1.0 / len(kinds)  # type: ignore[assignment]
            pages_type[k] += 1
            region_blame[reg][k] += 1.0 / len(kinds)  # type: ignore[assignment]
        for fl in flds:
            blame_field[fl] += 1.0 / len(flds)  # type: ignore[assignment]
            pages_field[fl] += 1
        for mo in mods:
            blame_module[mo] += 1.0 / len(mods)  # type: ignore[assignment]
        if all(f.endswith(": refcount") for f in flds):
            refcount_only += 1
        if "code: bytecode (quickening, inline caches)" in flds:
            code_pages_bytecode += 1
    written.close()
    lines.append("")
    lines.append(f"Copied pages: {len(diffs)}; with no word different from the template's "
                 f"any more (written and restored): {identical}; whose only differing words "
                 f"are reference counts: {refcount_only}; with a code object's bytecode "
                 f"(quickening, inline caches) written: {code_pages_bytecode}.")
    lines += table("Written words and the pages they copied, by object type "
                   "(pages blamed: shared equally among the types written on a page)",
                   ("type", "pages blamed", "pages with a write", "words written"),
                   ((k, v, pages_type[k], words_type[k]) for k, v in blame_type.most_common(top)))
    lines += table("By type and field", ("type: field", "pages blamed", "pages with a write",
                                         "words"),
                   ((k, v, pages_field[k], words_field[k])
                    for k, v in blame_field.most_common(top)))
    lines += table("By owning module (of the objects written)", ("module", "pages blamed"),
                   blame_module.most_common(top))
    lines += table("By region and type (pages blamed)", ("region", "type", "pages"),
                   ((r, k, v) for r, c in sorted(region_blame.items())
                    for k, v in c.most_common(6)))
    lines += table("Copied pages identical to the template's again: objects on them "
                   "(shared equally)", ("type", "pages"), identical_objects.most_common(top))
    lines.append(f"\n(work files in {work}: objects.txt, the template's objects; words.txt, "
                 "each word written: page, address, type, field, module, name)")
    return lines


#: Bytes before ``id()`` of an object of each type: the GC header (16) and,
#: for types with a managed dict, two more words (CPython 3.11).
_PRE: dict[str, int] = {}


def a_kib(pages: int) -> int:
    return pages * PAGE // 1024


def fill_preheaders() -> None:
    """Kind -> bytes before id(), from this interpreter's types (same version as the mesh)."""
    import gc

    seen = set()
    for obj in gc.get_objects():
        t = type(obj)
        if t in seen:
            continue
        seen.add(t)
        _PRE[t.__name__] = (16 if t.__flags__ & (1 << 14) else 0) + (
            16 if t.__flags__ & (1 << 4) else 0)
    for t in (int, str, bytes, float, type(fill_preheaders.__code__)):
        _PRE[t.__name__] = 0


def run_mesh(bridges: int, settle: float, action: Callable[[int, list[int]], None],
             extra_env: dict[str, str] | None = None) -> None:
    """Start a mesh of ``bridges`` inner proxies, wait ``settle`` s, ``action(template, inners)``.

    The configuration file is dated back a minute, as on a host: the
    template's configuration cache then serves it (a file written in the last
    2 s is read again by every inner proxy).
    """
    from bench.bench_mesh_memory import _Cleanups, mesh_pids, start_mesh

    cleanups = _Cleanups()
    try:
        host, names = start_mesh(cleanups, bridges, prefix="tqp", config_age=60.0,
                                 extra_env=extra_env)
        time.sleep(settle)
        proxies = host.proxies()
        inners = [proxies[n] for n in names]
        template = [p for p in mesh_pids(host) if p not in proxies.values()]
        if not template:
            raise SystemExit("no template process found")
        action(template[0], inners)
    finally:
        cleanups.run()


def record(path: str, bridges: int, settle: float) -> int:
    """Write to ``path`` the code objects that inner proxies ran (see ``--record``)."""
    from tproxy.template import RECORD_ENV

    work = tempfile.mkdtemp(prefix="bench-pages-record-")
    prefix = os.path.join(work, "code")
    run_mesh(bridges, settle, lambda template, inners: None, {RECORD_ENV: prefix})
    keys: set[str] = set()
    for name in os.listdir(work):
        with open(os.path.join(work, name), encoding="utf-8") as f:
            keys.update(line.rstrip("\n") for line in f if "\t" in line)
    with open(path, "w", encoding="utf-8") as f:
        f.write("# module<TAB>qualname of the code an inner proxy runs in its first seconds\n"
                "# (tproxy.template.relocate_code). Made by: "
                "PYTHONPATH=. python bench/bench_pages.py --record tproxy/template_hot.txt\n")
        f.writelines(f"{key}\n" for key in sorted(keys))
    print(f"{len(keys)} code objects from {len(os.listdir(work))} inner proxies -> {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bridges", type=int, default=3)
    parser.add_argument("--settle", type=float, default=4.0,
                        help="seconds between the last inner's start and the reading")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pids", help="TEMPLATE,INNER[,INNER...] of a running mesh")
    parser.add_argument("--keep", help="directory for the work files (object dump)")
    parser.add_argument("--record", metavar="FILE",
                        help="instead: record the code the inner proxies run (profiler hook, "
                        "tproxy.template.RECORD_ENV) and write it to FILE, the template's "
                        "hot code list (tproxy/template_hot.txt)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("skipped: needs root (pagemap frames, /proc/PID/mem, gdb)")
        return 0
    fill_preheaders()

    def act(template: int, inners: list[int]) -> None:
        print("\n".join(report(template, inners, args.top, args.keep)))

    if args.record:
        return record(args.record, args.bridges, args.settle)
    if args.pids:
        pids = [int(p) for p in args.pids.split(",")]
        act(pids[0], pids[1:])
    else:
        run_mesh(args.bridges, args.settle, act)
    return 0


if __name__ == "__main__":
    sys.exit(main())
