"""Small helpers of the driver's integration tests, on top of the shared ``topology``.

``topology.Host`` makes the test hypervisors (prefix ``tqd``) and cleans them
up; these add what only the driver's tests need: running code of the edges in
a thread inside a namespace (``setns`` switches only the calling thread), and
listings of the kernel's state without what changes by itself.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tests.integration.topology import NETNS_DIR, Namespace

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PREFIX = "tqd"


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


def nft_ruleset(ns: Namespace) -> list[dict[str, Any]]:
    """``nft -j list ruleset`` of a namespace, without the metainfo object and handles."""
    result = []
    for obj in ns.nft_json():
        if "metainfo" in obj:
            continue
        ((kind, body),) = obj.items()
        result.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return result


def nft_ruleset_raw(ns: Namespace) -> str:
    """``nft -j -a list ruleset`` verbatim (handles included), for unchanged-state checks."""
    return ns.nft("-j", "-a", "list", "ruleset").stdout


def nft_objects(ruleset: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The bodies of every object of one kind in a ruleset listing."""
    return [obj[kind] for obj in ruleset if kind in obj]


def links(ns: Namespace) -> list[dict[str, Any]]:
    """Links with their IPv4 addresses, without what changes by itself (timers, DAD, stats)."""
    keep = ("ifindex", "ifname", "flags", "mtu", "master", "link_type", "address", "link_index")
    result = []
    for link in ns.ip_json("-d", "address"):
        item = {k: link.get(k) for k in keep}
        item["kind"] = link.get("linkinfo", {}).get("info_kind")
        item["inet"] = [
            (i["local"], i["prefixlen"], i.get("scope"))
            for i in link.get("addr_info", [])
            if i.get("family") == "inet"
        ]
        result.append(item)
    return result
