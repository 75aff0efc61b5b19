"""Private helpers of the driver's integration tests (prefix ``tqd``).

Until the shared ``tests/integration/topology.py`` exists, these make and
remove test network namespaces, run code inside one (in a thread of its own,
since ``setns`` switches only the calling thread) and read the kernel's state
with the ``ip``/``nft`` commands (tests may; the product may not).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.trial.unittest import SkipTest, TestCase

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_counter = itertools.count()


def require_root_netns() -> None:
    """Skip (with the reason) unless we are root with netns, ``ip`` and ``nft``."""
    if os.geteuid() != 0:
        raise SkipTest("needs root to create network namespaces")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            raise SkipTest(f"needs the {tool} command to inspect kernel state")
    if not os.path.exists("/proc/self/ns/net"):
        raise SkipTest("this kernel has no network namespaces")


def unique_name(tag: str) -> str:
    """A short name with our prefix, unique in this machine for this test run."""
    return f"tqd{tag}{os.getpid() % 1000:03d}{next(_counter) % 100:02d}"


def sh(*argv: str, check: bool = True, netns: str | None = None, timeout: float = 20) -> str:
    """Run a command (inside test netns ``netns`` via nsenter if given); return stdout."""
    cmd: list[str] = list(argv)
    if netns is not None:
        cmd = ["nsenter", f"--net={NETNS_DIR}/{netns}", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def add_netns(test: TestCase, name: str) -> str:
    """Create test netns ``name`` (removed at cleanup, with whatever is inside)."""
    sh("ip", "netns", "add", name)
    test.addCleanup(del_netns, name)
    sh("ip", "link", "set", "lo", "up", netns=name)
    return name


def del_netns(name: str) -> None:
    """Remove a namespace if it exists."""
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        sh("ip", "netns", "del", name, check=False)


def in_netns(name: str, fn: Callable[[], T], timeout: float = 30) -> T:
    """Call ``fn`` in a fresh thread switched into netns ``name``; return or raise its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"code in netns {name} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def nft_ruleset(netns: str) -> list[dict[str, Any]]:
    """``nft -j list ruleset`` in a namespace, without the metainfo object and handles."""
    out = json.loads(sh("nft", "-j", "list", "ruleset", netns=netns))["nftables"]
    result = []
    for obj in out:
        if "metainfo" in obj:
            continue
        ((kind, body),) = obj.items()
        result.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return result


def nft_ruleset_raw(netns: str) -> str:
    """``nft -j -a list ruleset`` verbatim (handles included), for unchanged-state checks."""
    return sh("nft", "-j", "-a", "list", "ruleset", netns=netns)


def ip_json(netns: str, *args: str) -> Any:
    """``ip -j ARGS`` inside a namespace, parsed."""
    out = sh("ip", "-j", *args, netns=netns)
    return json.loads(out) if out.strip() else []


def nft_objects(ruleset: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The bodies of every object of one kind in a ruleset listing."""
    return [obj[kind] for obj in ruleset if kind in obj]
