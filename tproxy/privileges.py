"""Least privilege for the inner proxy: every capability dropped but CAP_NET_BIND_SERVICE.

The inner proxy is the one process that guests talk to directly, so it is
the one a hostile guest would try to take over.  Once it is in its namespace
with its log open and its open-files limit raised, it keeps nothing it does not
need: the only privileged thing it still does is binding service ports, which
may be below 1024 and change on any reload.  So, with ``prctl`` and
``capset`` through ctypes (no extra dependency):

* every capability but ``CAP_NET_BIND_SERVICE`` leaves the bounding set (no
  ``execve`` can ever bring one back);
* the ambient set is cleared, and effective and permitted hold only
  ``CAP_NET_BIND_SERVICE``; inheritable is empty;
* ``no_new_privs`` is set: no set-uid or file-capability program it could
  execute gains anything.

Why keep uid 0 rather than switch to an unprivileged user: the log file in
``LOG_DIR`` (``/var/log``, owned by root) must be reopened after log rotation,
and the configuration file is re-read on reload; an unprivileged uid could do
neither.  The price (written down in ``docs/security.md``): a taken-over inner
still owns, as uid 0, the files that root owns with owner-write permission.
Without ``CAP_DAC_OVERRIDE``/``CAP_DAC_READ_SEARCH``/``CAP_FOWNER`` it cannot
touch files of other users or root's unreadable ones (``/etc/shadow``), without
``CAP_SYS_ADMIN``/``CAP_NET_ADMIN``/``CAP_SYS_PTRACE`` it cannot leave its
namespace, change the network, or touch other processes, and without
``CAP_KILL`` it cannot signal processes of other users.

This module is a system edge (libc); :func:`drop_capabilities` takes the libc
calls as a parameter so its sequencing is unit-tested with a fake.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from typing import Protocol

#: ``CAP_NET_BIND_SERVICE`` (linux/capability.h).
CAP_NET_BIND_SERVICE = 10
#: ``CAP_SETPCAP``: needed (and dropped last) to shrink the bounding set.
CAP_SETPCAP = 8

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(OSError):
    """A capability could not be dropped (the process keeps running; the caller logs it)."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


#: ``capset``'s data argument: one ``_CapData`` per 32 capabilities. Made here,
#: at import (in the template), not at the call: ctypes makes a new array type
#: the first time ``_CapData * 2`` is evaluated, which in every inner proxy
#: copied the template's pages its type machinery touches.
_CapDataPair = _CapData * 2


class Libc(Protocol):
    """The calls :func:`drop_capabilities` makes (the real libc, or a fake in tests)."""

    def prctl(self, option: int, arg2: int) -> None:
        """``prctl(option, arg2, 0, 0, 0)``; raises OSError on failure."""
        ...

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        """``capset(2)`` for this process (64-bit masks); raises OSError on failure."""
        ...

    def last_cap(self) -> int:
        """The highest capability number the kernel knows."""
        ...


_process_libc: list[ctypes.CDLL] = []


def process_libc() -> ctypes.CDLL:
    """The C library as ctypes sees it, looked up once per process tree.

    ``find_library`` runs ``ldconfig``; the inner proxy template calls this
    before it forks, so an inner proxy neither repeats that nor copies the
    template's pages that doing so would touch.
    """
    if not _process_libc:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # CDLL makes a function object the first time a name is looked up and
        # keeps it on itself: done here, not in each child.
        lib.prctl, lib.capset  # noqa: B018
        _process_libc.append(lib)
    return _process_libc[0]


#: ``RealLibc.last_cap``'s reading (the template makes it before it forks).
_last_cap: list[int] = []


class RealLibc:
    """The process's own libc, through ctypes."""

    def __init__(self) -> None:
        self._libc = process_libc()

    def prctl(self, option: int, arg2: int) -> None:
        ul = ctypes.c_ulong
        if self._libc.prctl(option, ul(arg2), ul(0), ul(0), ul(0)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"prctl({option}, {arg2}): {os.strerror(e)}")

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = _CapDataPair()
        for i in range(2):
            shift = 32 * i
            data[i].effective = (effective >> shift) & 0xFFFFFFFF
            data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
            data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
        if self._libc.capset(ctypes.byref(header), data) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"capset: {os.strerror(e)}")

    def last_cap(self) -> int:
        """The highest capability number of the running kernel (read once per process tree)."""
        if not _last_cap:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                _last_cap.append(int(f.read()))
        return _last_cap[0]


def mask(caps: Iterable[int]) -> int:
    """The 64-bit capability mask of ``caps``."""
    m = 0
    for c in caps:
        m |= 1 << c
    return m


def drop_capabilities(
    keep: Iterable[int] = (CAP_NET_BIND_SERVICE,), libc: Libc | None = None
) -> None:
    """Keep only ``keep``: bounding set, ambient, effective/permitted/inheritable; set NNP.

    The bounding set is shrunk first (that needs ``CAP_SETPCAP``, which the
    final ``capset`` then drops).  A bounding-set drop refused with EPERM (a
    process that never had ``CAP_SETPCAP``) is not an error as such: the
    ``capset`` that follows still leaves nothing but ``keep``, and no_new_privs
    keeps ``execve`` from adding anything.  Raises :class:`PrivilegeError` when
    the effective/permitted sets or no_new_privs cannot be set.
    """
    libc = libc or RealLibc()
    keep = set(keep)
    keep_mask = mask(keep)
    for cap in range(libc.last_cap() + 1):
        if cap in keep:
            continue
        try:
            libc.prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL):
                raise PrivilegeError(e.errno, f"dropping capability {cap}: {e}") from e
    try:
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as e:
        if e.errno != errno.EINVAL:  # kernels before 4.3 have no ambient set
            raise PrivilegeError(e.errno, f"clearing the ambient set: {e}") from e
    try:
        libc.capset(keep_mask, keep_mask, 0)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as e:
        raise PrivilegeError(e.errno, str(e)) from e


def capability_status(pid: int | str = "self") -> dict[str, int]:
    """``CapInh``, ``CapPrm``, ``CapEff``, ``CapBnd``, ``CapAmb`` (masks) and ``NoNewPrivs``
    of a process, from ``/proc/PID/status``."""
    wanted = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"}
    result: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                value = value.strip()
                result[key] = int(value, 16) if key.startswith("Cap") else int(value)
    return result
