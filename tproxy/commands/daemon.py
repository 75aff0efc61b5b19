"""``one-tproxy start|stop|restart|reload|status``: mesh control (tproxy.daemonctl).

``status`` alone keeps its exact format (DESIGN.md 2.3); ``status --json``,
``--verbose`` and ``--prometheus`` ask the root proxy's control channel
(``tproxy.control``) for its status document and print it as JSON, for people,
or in the Prometheus text format.
"""

from __future__ import annotations

import argparse
import json
import sys

from tproxy import daemonctl
from tproxy.logs import cli_logging
from tproxy.settings import Paths


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """These commands take only the global options; ``status`` has its output formats."""
    if name != "status":
        return
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="the root proxy's status document as JSON (processes, per-port counters)",
    )
    fmt.add_argument(
        "--verbose",
        "-v",
        dest="format",
        action="store_const",
        const="text",
        help="processes and per-port counters, readable",
    )
    fmt.add_argument(
        "--prometheus",
        dest="format",
        action="store_const",
        const="prometheus",
        help="the counters in the Prometheus text exposition format",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the root proxy's answer (default 5)",
    )


def detailed_status(paths: Paths, fmt: str, timeout: float = 5.0) -> int:
    """Print the status document in ``fmt``; 0, 3 when the root does not run, 1 on error."""
    from tproxy import control, metrics

    try:
        doc = control.query(control.socket_path(paths.run_dir), {"cmd": "stats"}, timeout)
    except control.ControlError as e:
        from tproxy.procs import ProcFinder

        running = ProcFinder().find().root is not None
        if fmt == "prometheus" and not running:
            print("# HELP one_tproxy_up 1 when the root proxy answered.")
            print("# TYPE one_tproxy_up gauge")
            print("one_tproxy_up 0")
        if running:
            print(
                f"one-tproxy status: the root proxy runs but does not answer: {e}", file=sys.stderr
            )
            return 1
        print("one-tproxy status: the root proxy is not running", file=sys.stderr)
        return daemonctl.EXIT_NOT_RUNNING
    if fmt == "json":
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif fmt == "prometheus":
        sys.stdout.write(metrics.render_prometheus(doc))
    else:
        sys.stdout.write(metrics.render_text(doc))
    return 0


def run(name: str, args: argparse.Namespace, paths: Paths) -> int:
    """Run ``name``; warnings and errors of the libraries go to stderr."""
    fmt = getattr(args, "format", None)
    if name == "status" and fmt is not None:
        with cli_logging():
            return detailed_status(paths, fmt, args.timeout)
    command = {
        "start": daemonctl.start,
        "stop": daemonctl.stop,
        "restart": daemonctl.restart,
        "reload": daemonctl.reload,
        "status": daemonctl.status,
    }[name]
    with cli_logging():
        return command(paths)
