"""Cost of logging and of reading the configuration (prints a Markdown table).

* DaemonLog: events written per second at DEBUG (the per-connection lines of
  DESIGN 2.3), and the cost of an event filtered out by the level (what every
  debug call costs at INFO);
* the configuration: load_config + applicable() of a file with many entries.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.logger import Logger, LogLevel, LogPublisher  # noqa: E402

from tproxy.config import load_config  # noqa: E402
from tproxy.logs import DaemonLog  # noqa: E402


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s ({seconds / n * 1e6:.2f} µs each)"


def bench_log(tmp: str) -> list[tuple[str, str]]:
    publisher = LogPublisher()
    log = Logger(namespace="tproxy.bench", observer=publisher)
    daemon_log = DaemonLog(tmp, "one_tproxy_bench", LogLevel.debug)
    daemon_log.install(publisher)
    n = 100_000
    start = time.perf_counter()
    for i in range(n):
        log.debug(
            "stream {sid} closed: {guest} -> {dest}, {up} bytes up, {down} bytes down",
            sid=i,
            guest="169.254.1.2:40000",
            dest="10.11.12.13:5030",
            up=1234,
            down=56789,
        )
    written = time.perf_counter() - start
    daemon_log.set_level(LogLevel.info)
    start = time.perf_counter()
    for i in range(n):
        log.debug("stream {sid} closed", sid=i)
    filtered = time.perf_counter() - start
    daemon_log.close()
    size = os.path.getsize(daemon_log.path)
    return [
        ("DaemonLog, DEBUG line written", rate(n, written)),
        ("DaemonLog, event below the level", rate(n, filtered)),
        ("bytes per DEBUG line", f"{size / n:.0f}"),
    ]


def bench_config(tmp: str) -> list[tuple[str, str]]:
    path = os.path.join(tmp, "big.conf")
    entries = 2000
    with open(path, "w") as f:
        f.write(":tproxy_debug_level: 2\n:tproxy:\n")
        for i in range(entries):
            f.write(
                f"- :service_port: {1000 + i}\n  :remote_addr: 10.0.{i // 250}.{i % 250 + 1}\n"
                f"  :remote_port: {1000 + i}\n  :networks: [net{i % 10}, {i % 10}]\n"
            )
    start = time.perf_counter()
    cfg = load_config(path)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    service_map = cfg.applicable("net3", "3")
    picked = time.perf_counter() - start
    assert len(service_map) == entries // 10
    return [
        (f"load_config, {entries} entries", f"{loaded * 1000:.0f} ms"),
        (f"applicable(), {entries} entries", f"{picked * 1000:.1f} ms"),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tqc_bench") as tmp:
        rows = bench_log(tmp) + bench_config(tmp)
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
