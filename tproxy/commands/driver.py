"""``one-tproxy up BR`` and ``one-tproxy down BR``: the driver on the command line.

``up`` computes the endpoints that apply to the network (``--network``,
``--network-id``) from the configuration file; when none applies it changes
nothing and exits 0. Otherwise it builds the bridge's host state
(:func:`tproxy.driver.up`), then starts and reloads the mesh. ``down`` removes
the bridge's state (:func:`tproxy.driver.down`), then reloads the mesh.

Exit status: 0 done; 1 the state could not be built or removed (bad name,
missing bridge, invalid configuration, a state it cannot fix: the message
says which, on stderr); otherwise the exit status of the mesh command
(``start``/``reload``) that failed after the state was in place.
``--state-only`` changes the host state without touching the mesh.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from twisted.logger import Logger, LogLevel

from tproxy import daemonctl
from tproxy.config import ConfigError, load_config
from tproxy.driver import DriverError, down, up
from tproxy.logs import cli_logging
from tproxy.model import InvalidBridgeNameError, check_bridge_name
from tproxy.netlink import NetEdge, Netlink
from tproxy.nft import Nftables, NftEdge
from tproxy.settings import Paths

log = Logger(namespace="tproxy.commands.driver")

EXIT_OK = 0
EXIT_FAILED = 1


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """``up BR [--network NAME] [--network-id ID]``, ``down BR``; ``--state-only``, ``-v``."""
    parser.add_argument("bridge", metavar="BRIDGE", help="the Linux bridge of the virtual network")
    if name == "up":
        parser.add_argument(
            "--network", metavar="NAME", help="virtual network name (selects :networks: entries)"
        )
        parser.add_argument(
            "--network-id", metavar="ID", help="virtual network id (selects :networks: entries)"
        )
    parser.add_argument(
        "--state-only",
        action="store_true",
        help="change the host state only; do not start or reload the mesh",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print each change made on stderr"
    )


def run(name: str, args: argparse.Namespace, paths: Paths) -> int:
    """Run ``up`` or ``down``; exit status (see the module doc)."""
    level = LogLevel.info if args.verbose else LogLevel.warn
    with cli_logging(level=level):
        try:
            check_bridge_name(args.bridge)
        except InvalidBridgeNameError as e:
            return _fail(name, str(e))
        if name == "up":
            return _up(args, paths)
        return _down(args, paths)


def _fail(name: str, message: str) -> int:
    print(f"one-tproxy {name}: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _edges() -> tuple[NetEdge, NftEdge]:
    """The real edges, acting on the namespace this command runs in."""
    return Netlink(), Nftables()


def _up(args: argparse.Namespace, paths: Paths) -> int:
    try:
        config = load_config(paths.config)
    except ConfigError as e:
        return _fail("up", str(e))
    service_map = config.applicable(args.network, args.network_id)
    if not service_map:
        log.info(
            "up {bridge}: no endpoint of {path} applies to network {network}: nothing to do",
            bridge=args.bridge,
            path=paths.config,
            network=args.network or args.network_id or "(none given)",
        )
        return EXIT_OK
    net, nft = _edges()
    try:
        up(args.bridge, service_map, net, nft, paths.run_dir)
    except DriverError as e:
        return _fail("up", str(e))
    finally:
        net.close()
    if args.state_only:
        return EXIT_OK
    return _mesh(paths, daemonctl.start, daemonctl.reload)


def _down(args: argparse.Namespace, paths: Paths) -> int:
    net, nft = _edges()
    try:
        down(args.bridge, net, nft, paths.run_dir)
    except DriverError as e:
        return _fail("down", str(e))
    finally:
        net.close()
    if args.state_only:
        return EXIT_OK
    return _mesh(paths, daemonctl.reload)


def _mesh(paths: Paths, *steps: Callable[[Paths], int]) -> int:
    """Run the mesh commands in order; stop at (and return) the first failure."""
    for step in steps:
        rc = step(paths)
        if rc != 0:
            return rc
    return EXIT_OK
