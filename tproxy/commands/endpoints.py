"""``one-tproxy`` subcommands served by this module (not implemented yet)."""

from __future__ import annotations

import argparse
import sys

from tproxy.settings import Paths


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def run(name: str, args: argparse.Namespace, paths: Paths) -> int:
    """Not implemented yet: exit 2."""
    print(f"one-tproxy {name}: not implemented yet", file=sys.stderr)
    return 2
