"""``one-tproxy start|stop|restart|reload|status``: mesh control (tproxy.daemonctl)."""

from __future__ import annotations

import argparse

from tproxy import daemonctl
from tproxy.logs import cli_logging
from tproxy.settings import Paths


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """These commands take only the global options."""


def run(name: str, args: argparse.Namespace, paths: Paths) -> int:
    """Run ``name``; warnings and errors of the libraries go to stderr."""
    command = {
        "start": daemonctl.start,
        "stop": daemonctl.stop,
        "restart": daemonctl.restart,
        "reload": daemonctl.reload,
        "status": daemonctl.status,
    }[name]
    with cli_logging():
        return command(paths)
