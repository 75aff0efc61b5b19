"""Cost of the driver (prints a Markdown table); needs root.

Everything happens inside a throw-away network namespace ``tqdbench<pid>``
(the simulated hypervisor) and is removed at the end, also on failure:

* ``one-tproxy up/down --state-only`` as a command (interpreter start included):
  first ``up`` of a bridge, ``up`` with nothing to change, ``down``;
* the same steps in-process (``tproxy.driver.up/down`` with the real edges);
* ``up`` of many bridges one after the other (how the cost grows);
* writing a service map with many endpoints (one nftables transaction).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tproxy.driver import down, up  # noqa: E402
from tproxy.model import Destination, namespace_name  # noqa: E402
from tproxy.netlink import Netlink  # noqa: E402
from tproxy.nft import Nftables  # noqa: E402

HV = f"tqdbench{os.getpid() % 100000}"
CLONE_NEWNET = 0x40000000
CONFIG = ":tproxy:\n- :service_port: 5030\n  :remote_addr: 10.11.12.13\n  :remote_port: 5030\n"
SMAP = {5030: Destination("10.11.12.13", 5030)}


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def in_hv(fn: Callable[[], Any]) -> Any:
    """Run fn in a thread inside the bench hypervisor namespace."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{HV}", os.O_RDONLY)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


def cli(tmp: str, *args: str) -> float:
    cmd = [
        "nsenter",
        f"--net=/run/netns/{HV}",
        sys.executable,
        "-m",
        "tproxy",
        "--config",
        os.path.join(tmp, "c.conf"),
        "--run-dir",
        tmp,
        *args,
        "--state-only",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - start


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms (median of {len(values)})"


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_driver needs root (network namespaces)")
    bridges: list[str] = []
    sh("ip", "netns", "add", HV)
    tmp = tempfile.mkdtemp(prefix="tqdbench")
    with open(os.path.join(tmp, "c.conf"), "w") as f:
        f.write(CONFIG)
    rows: list[tuple[str, str]] = []
    try:

        def bridge(i: int) -> str:
            name = f"tqdB{i}"
            bridges.append(name)
            sh("nsenter", f"--net=/run/netns/{HV}", "ip", "link", "add", name, "type", "bridge")
            return name

        first, again, gone = [], [], []
        for i in range(5):
            br = bridge(i)
            first.append(cli(tmp, "up", br))
            again.append(cli(tmp, "up", br))
            gone.append(cli(tmp, "down", br))
        rows += [
            ("`one-tproxy up` (command), new bridge", ms(first)),
            ("`one-tproxy up` (command), nothing to change", ms(again)),
            ("`one-tproxy down` (command)", ms(gone)),
        ]

        def library(n: int) -> tuple[list[float], list[float], list[float]]:
            net, nft = Netlink(), Nftables()
            a, b, c = [], [], []
            try:
                for i in range(n):
                    br = f"tqdL{i}"
                    bridges.append(br)
                    sh(
                        "nsenter",
                        f"--net=/run/netns/{HV}",
                        "ip",
                        "link",
                        "add",
                        br,
                        "type",
                        "bridge",
                    )
                    for out in (a, b):
                        t = time.perf_counter()
                        up(br, SMAP, net, nft, tmp)
                        out.append(time.perf_counter() - t)
                for i in range(n):
                    t = time.perf_counter()
                    down(f"tqdL{i}", net, nft, tmp)
                    c.append(time.perf_counter() - t)
            finally:
                net.close()
            return a, b, c

        a, b, c = in_hv(lambda: library(40))
        rows += [
            ("`driver.up` in-process, new bridge", ms(a)),
            ("`driver.up` in-process, nothing to change", ms(b)),
            ("`driver.down` in-process", ms(c)),
            (
                "`driver.up` of bridges 1-10 vs 31-40 (median)",
                f"{statistics.median(a[:10]) * 1000:.0f} ms vs "
                f"{statistics.median(a[-10:]) * 1000:.0f} ms",
            ),
        ]

        def big_map() -> tuple[float, float, float]:
            nft = Nftables()
            smap = {p: Destination("10.0.0.1", p) for p in range(1000, 3000)}
            t0 = time.perf_counter()
            nft.write_service_map("tqdM", smap)
            t1 = time.perf_counter()
            nft.write_service_map("tqdM", {p: Destination("10.0.0.2", p) for p in smap})
            t2 = time.perf_counter()
            read = nft.read_service_maps()
            t3 = time.perf_counter()
            assert len(read["tqdM"]) == 2000
            nft.remove_bridge("tqdM")
            return t1 - t0, t2 - t1, t3 - t2

        create, refill, read = in_hv(big_map)
        rows += [
            ("map of 2000 endpoints: create", f"{create * 1000:.0f} ms"),
            ("map of 2000 endpoints: flush + refill", f"{refill * 1000:.0f} ms"),
            ("map of 2000 endpoints: read_service_maps", f"{read * 1000:.0f} ms"),
        ]
    finally:
        for br in bridges:
            if os.path.exists(f"/run/netns/{namespace_name(br)}"):
                subprocess.run(["ip", "netns", "del", namespace_name(br)], check=False)
        subprocess.run(["ip", "netns", "del", HV], check=False)
    print("| driver | cost |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
