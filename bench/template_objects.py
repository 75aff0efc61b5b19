"""Run inside the template (through gdb, by ``bench_pages.py``): dump its objects' addresses.

Executed with ``exec`` (in globals of its own, with ``__file__`` and
``_TPROXY_DUMP_PATH`` set) in the template while it waits in its
fork loop, long after the children were forked: their pages are compared
with the template's first, this only says which object sits where. Writes
one line per object (or per separately allocated buffer of one: a dict's
keys, a list's items, a set's table) to the path in ``_TPROXY_DUMP_PATH``:

    ADDRESS SIZE KIND OWNER-MODULE NAME

``ADDRESS`` is where the memory block starts (the object's GC header and
managed-dict words before ``id()`` included), ``SIZE`` its length in bytes.
Objects are found from ``sys.modules`` and the thread's frames (the
frozen objects are not in ``gc.get_objects()``: hence the walk),
following ``gc.get_referents`` and, for code objects (not GC-tracked), their
constants and names. ``OWNER-MODULE`` is the module of a function, code
object, class or module, and for anything else the owner of the object it
was first reached from.
"""

import ctypes as _ct
import gc as _gc
import sys as _sys


def _tproxy_dump(path):  # noqa: C901 - one walk, kept in one place
    gc_flag = 1 << 14
    managed_dict = 1 << 4
    by_file = {}
    for name, mod in list(_sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str):
            by_file[f] = name
    seen = set()
    out = open(path, "w")
    queue = []

    def pre(tp):
        flags = tp.__flags__
        return (16 if flags & gc_flag else 0) + (16 if flags & managed_dict else 0)

    def own(obj, owner):
        t = type(obj)
        if t is type(_sys):
            return obj.__name__, obj.__name__
        if isinstance(obj, type):
            # "class:QUALNAME:ID": bench_pages.py reads the class's version tag at ID
            module = type.__dict__["__module__"].__get__(obj)
            return str(module), f"class:{obj.__qualname__}:{id(obj)}"
        if t.__name__ == "function":
            return str(getattr(obj, "__module__", owner)), obj.__qualname__
        if t.__name__ == "code":
            return by_file.get(obj.co_filename, owner), f"{obj.co_qualname}@{obj.co_firstlineno}"
        if t.__name__ in ("builtin_function_or_method", "method_descriptor",
                          "wrapper_descriptor", "getset_descriptor", "member_descriptor"):
            return owner, getattr(obj, "__qualname__", "")
        if t is str:
            return owner, repr(obj[:40]).replace(" ", "_").replace("\n", "_")
        return owner, ""

    def push(obj, owner):
        i = id(obj)
        if i in seen:
            return
        seen.add(i)
        queue.append((obj, owner))

    for name, mod in sorted(_sys.modules.items()):
        push(mod, name)
    # the template's own frames, below this script's (whose objects, like
    # everything made after the fork, are no template object: not listed)
    for frame in _sys._current_frames().values():
        while frame is not None and frame.f_code.co_filename in (__file__, "<string>"):
            frame = frame.f_back  # type: ignore[assignment]
        if frame is not None:
            push(frame, "<frames>")
    code_type = type(_tproxy_dump.__code__)
    read = _ct.c_void_p.from_address
    while queue:
        obj, owner = queue.pop()
        t = type(obj)
        owner, name = own(obj, owner)
        try:
            size = _sys.getsizeof(obj)
        except Exception:
            size = t.__basicsize__
        p = pre(t)
        start = id(obj) - p
        out.write(f"{start} {size} {t.__name__} {owner} {name.replace(' ', '_')}\n")
        # buffers allocated apart from the object itself
        try:
            if t is dict:
                keys = read(id(obj) + 32).value
                extra = size - p - t.__basicsize__
                if keys and extra > 0:
                    out.write(f"{keys} {extra} dict.keys {owner} \n")
            elif t is list:
                items = read(id(obj) + 24).value
                extra = size - p - t.__basicsize__
                if items and extra > 0:
                    out.write(f"{items} {extra} list.items {owner} \n")
            elif t in (set, frozenset):
                table = read(id(obj) + 40).value
                extra = size - p - t.__basicsize__
                if table and extra > 0 and table != id(obj) + 64:
                    out.write(f"{table} {extra} set.table {owner} \n")
        except Exception:
            pass
        push(t, owner)
        if t is code_type:
            for ref in (obj.co_consts, obj.co_names, obj.co_exceptiontable,
                        obj.co_filename, obj.co_name, obj.co_qualname, obj.co_linetable):
                push(ref, owner)
            # co_localsplusnames, co_localspluskinds, _co_code: not attributes
            # in 3.11 (co_varnames makes a new tuple), read from the struct
            for offset in (96, 104, 152):
                ptr = read(id(obj) + offset).value
                if ptr:
                    push(_ct.cast(_ct.c_void_p(ptr), _ct.py_object).value, owner)
            for c in obj.co_consts:
                push(c, owner)
        else:
            for ref in _gc.get_referents(obj):
                push(ref, owner)
    out.close()
    return len(seen)


_tproxy_dump(_TPROXY_DUMP_PATH)  # type: ignore[name-defined]  # noqa: F821
