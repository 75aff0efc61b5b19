"""Memory of the mesh per bridge: inner proxies forked from the template vs fresh interpreters.

Builds a throw-away hypervisor namespace (the integration tests' fixture,
prefix ``tqm``) with 1 and then N bridges, starts the root proxy with each
launcher, and reads the proportional set size (PSS, ``/proc/PID/smaps_rollup``)
of every mesh process: the root, the template (when used) and the inner
proxies. The cost of one more bridge is the growth of the total PSS from 1 to
N bridges divided by N-1. Prints a Markdown table. Run as root:
``python bench/bench_mesh_memory.py [N]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration.topology import Host, config_yaml, missing_requirement, wait_until  # noqa: E402
from tproxy import daemonctl  # noqa: E402
from tproxy.settings import Paths  # noqa: E402


class _Cleanups:
    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., object], tuple[Any, ...], dict[str, Any]]] = []

    def addCleanup(self, function: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        self.calls.append((function, args, kwargs))

    def run(self) -> None:
        for function, args, kwargs in reversed(self.calls):
            try:
                function(*args, **kwargs)
            except Exception as e:  # keep cleaning
                print(f"cleanup: {e}", file=sys.stderr)


def pss_kib(pid: int, field: str = "Pss") -> int:
    """PSS of ``pid`` in KiB (or another ``field`` of its smaps_rollup: ``Private_Dirty``)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mesh_pids(host: Host) -> list[int]:
    """Root, template and inners of ``host``."""
    pids = list(host.proxies().values())
    for pid in host.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().rstrip(b"\0") == b"one-tproxy-template":
                    pids.append(pid)
        except OSError:
            pass
    return pids


def start_mesh(
    cleanups: _Cleanups,
    bridges: int,
    spawn: bool = False,
    prefix: str = "tqm",
    config_age: float = 0.0,
    extra_env: dict[str, str] | None = None,
) -> tuple[Host, list[str]]:
    """A throw-away hypervisor with ``bridges`` bridges and the mesh serving them.

    ``config_age``: seconds to date the configuration file back (a file
    written in the last 2 s is read again by every inner proxy, not taken
    from the template's cache). Returns the host and its inner proxies' names.
    """
    host = Host(cleanups, prefix=prefix)
    names = []
    for _ in range(bridges):
        br = host.add_bridge()
        host.build_tproxy_state(br, {5030: ("127.0.0.1", 5030)})
        names.append(f"one_tproxy_{br}")
    host.write_config(config_yaml([], debug_level=2))
    if config_age:
        old = time.time() - config_age
        os.utime(host.config_path, (old, old))
    argv = daemonctl.twistd_argv(Paths(host.config_path, host.log_dir, host.run_dir))
    if spawn:
        argv.insert(argv.index("one-tproxy") + 1, "--spawn")
    env = daemonctl._plugin_pythonpath(host.env)
    env.update(extra_env or {})
    host.used_tproxy = True
    host.run(argv, env=env, check=True)
    wait_until(lambda: set(names) <= set(host.proxies()), timeout=30, message="inners")
    return host, names


def measure(bridges: int, spawn: bool) -> int:
    """Total PSS (KiB) of a mesh serving ``bridges`` bridges."""
    cleanups = _Cleanups()
    try:
        host, _ = start_mesh(cleanups, bridges, spawn)
        time.sleep(1.0)  # let start-up garbage settle
        return sum(pss_kib(pid) for pid in mesh_pids(host))
    finally:
        cleanups.run()


def main() -> int:
    reason = missing_requirement()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    print(f"| launcher | total PSS, 1 bridge | total PSS, {n} bridges | per extra bridge |")
    print("|---|---:|---:|---:|")
    for label, spawn in (("template (default)", False), ("fresh interpreter (--spawn)", True)):
        one = measure(1, spawn)
        many = measure(n, spawn)
        per = (many - one) / (n - 1)
        print(f"| {label} | {one / 1024:.1f} MiB | {many / 1024:.1f} MiB | {per / 1024:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
