"""``one-tproxy check [BR]``: verify every bridge's state, processes and destinations (read only).

The logic is ``tproxy.diagnose``; this module builds its real edges (netlink,
nftables, ``/proc``, TCP) and prints one line per finding. Exit 0 when all
pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from tproxy.settings import Paths


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """An optional bridge and the destination connect timeout."""
    parser.add_argument("bridge", nargs="?", metavar="BR", help="check only this bridge")
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long each destination connection may take (default 3)",
    )


def listen_errors_from(paths: Paths, timeout: float = 2.0) -> Callable[[str], Mapping[int, str]]:
    """Bridge -> port -> bind error, from the root's status document (asked once, lazily)."""
    from tproxy import control, diagnose

    docs: list[Mapping[str, Any]] = []

    def errors(bridge: str) -> Mapping[int, str]:
        if not docs:
            try:
                docs.append(
                    control.query(control.socket_path(paths.run_dir), {"cmd": "stats"}, timeout)
                )
            except control.ControlError:
                docs.append({})
        return diagnose.status_listen_errors(docs[0], bridge)

    return errors


def real_edges(paths: Paths | None = None) -> Any:
    """The edges of this host: pyroute2, libnftables, /proc, TCP (and the control channel)."""
    from tproxy import diagnose
    from tproxy.netlink import Netlink
    from tproxy.nft import Nftables
    from tproxy.procs import ProcFinder

    finder = ProcFinder()
    edges = diagnose.Edges(
        net=Netlink(),
        nft=Nftables(),
        root_pid=lambda: finder.find().root,
        inner_pids=lambda: finder.find().inners,
        listeners=diagnose.proc_listeners,
        connect=diagnose.tcp_connect,
    )
    if paths is not None:
        edges = attrs.evolve(edges, listen_errors=listen_errors_from(paths))
    return edges


def run(name: str, args: argparse.Namespace, paths: Paths) -> int:
    """Print the findings; 0 when all pass, 1 otherwise."""
    from tproxy import diagnose
    from tproxy.model import InvalidBridgeNameError, check_bridge_name

    if args.bridge is not None:
        try:
            check_bridge_name(args.bridge)
        except InvalidBridgeNameError as e:
            print(f"one-tproxy check: {e}", file=sys.stderr)
            return 1
    edges = real_edges(paths)
    try:
        ok = diagnose.report(
            diagnose.diagnose(edges, args.bridge, args.timeout),
            lambda line: print(line, flush=True),
        )
    finally:
        close = getattr(edges.net, "close", None)
        if close is not None:
            close()
    return 0 if ok else 1
