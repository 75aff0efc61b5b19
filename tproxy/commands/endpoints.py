"""``one-tproxy endpoints``: the endpoints that apply to a network, as JSON (DESIGN.md 2.3).

Output: one line, ``json.dumps`` of a list of objects in file order, each
``{"service_port": 5030, "remote_addr": "10.11.12.13", "remote_port": 5030}``
with host names resolved to IPv4. Warnings (skipped or duplicate entries) go
to stderr through the CLI log observer; an unusable file prints
``one-tproxy: error: FILE...: REASON`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TextIO

from tproxy.config import ConfigError, load_config, resolve_ipv4
from tproxy.model import ServiceMap
from tproxy.settings import Paths

EXIT_OK = 0
EXIT_INVALID_CONFIG = 1


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """``--network NAME`` and ``--network-id ID``."""
    parser.add_argument(
        "--network",
        metavar="NAME",
        help="virtual network name; entries listing it in :networks: apply",
    )
    parser.add_argument(
        "--network-id",
        metavar="ID",
        help="virtual network id; entries listing it in :networks: apply "
        "(without --network and --network-id only entries without :networks: apply)",
    )


def render(service_map: ServiceMap) -> str:
    """The JSON line printed for a service map (in its order), with its newline."""
    return (
        json.dumps(
            [
                {"service_port": port, "remote_addr": dest.addr, "remote_port": dest.port}
                for port, dest in service_map.items()
            ]
        )
        + "\n"
    )


def run(
    name: str,
    args: argparse.Namespace,
    paths: Paths,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    resolve: Callable[[str], str] = resolve_ipv4,
) -> int:
    """Print the applicable endpoints; 1 when the configuration file cannot be used."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        config = load_config(paths.config)
    except ConfigError as e:
        err.write(f"one-tproxy: error: {e}\n")
        return EXIT_INVALID_CONFIG
    service_map = config.applicable(args.network, args.network_id, resolve=resolve)
    out.write(render(service_map))
    out.flush()
    return EXIT_OK
