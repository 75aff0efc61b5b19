"""The ``one-tproxy`` command: argument parsing and dispatch to one module per job.

Each subcommand's work lives in its own module (``tproxy.commands.*``); this
module only parses arguments and maps the outcome to an exit status, so that
``--help`` is complete even while a subcommand's module is being written.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tproxy import __version__, logs, settings

#: Subcommand name -> (module under tproxy.commands, one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "start": ("daemon", "start the proxy mesh if it is not running"),
    "stop": ("daemon", "stop every proxy process gracefully"),
    "restart": ("daemon", "stop, then start the proxy mesh"),
    "reload": ("daemon", "make the running mesh re-read nftables and the config file"),
    "status": ("daemon", "one line per proxy process; exit 3 when the root proxy is not running"),
    "up": ("driver", "build a bridge's host state, then start and reload the mesh"),
    "down": ("driver", "remove a bridge's host state, then reload the mesh"),
    "endpoints": ("endpoints", "print the endpoints that apply to a network as JSON"),
    "check": ("check", "verify each bridge's state, proxies and destinations; exit 1 on a fault"),
}

EXIT_NOT_IMPLEMENTED = 2


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with the global options of DESIGN.md 2.3 and every subcommand."""
    parser = argparse.ArgumentParser(
        prog="one-tproxy",
        description=(
            "OpenNebula transparent proxies: guests reach host services at "
            "169.254.16.9 on the configured service ports."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Global options are accepted after the subcommand too.
        _add_global_options(p, defaults=False)
        _load(module).add_arguments(name, p)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    default = None if defaults else argparse.SUPPRESS
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help=f"configuration file (env {settings.ENV_CONFIG}; default {settings.DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        default=default,
        help=f"log directory (env {settings.ENV_LOG_DIR}; default {settings.DEFAULT_LOG_DIR})",
    )
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        default=default,
        help=f"runtime directory (env {settings.ENV_RUN_DIR}; default {settings.DEFAULT_RUN_DIR})",
    )


def _load(module: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"tproxy.commands.{module}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = settings.Paths.from_sources(
        config=args.config, log_dir=args.log_dir, run_dir=args.run_dir
    )
    module, _ = SUBCOMMANDS[args.command]
    # Warnings and errors of every module reach the user as "one-tproxy: warning: ...".
    with logs.cli_logging():
        return int(_load(module).run(args.command, args, paths))


def console() -> None:
    """``one-tproxy`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
