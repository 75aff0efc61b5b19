"""The running mesh in real namespaces: root + inner proxies, commands, reload, supervision.

Each test is one simulated hypervisor (its own network namespace, prefix ``tqm``)
whose tproxy state is built BY HAND with ip/nft as DESIGN.md 2.2 shows; the
product runs inside it as ``python -m tproxy start|status|reload|stop``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from twisted.trial import unittest

from tests.integration.topology import (
    SERVICE_ADDRESS,
    Guest,
    Host,
    config_yaml,
    is_alive,
    require_root,
    wait_until,
)

LOCAL = "127.0.0.1"
CHILDREN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_children.py")


def fd_count(pid: int) -> int:
    """How many file descriptors ``pid`` holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class MeshTestCase(unittest.TestCase):
    """Builds a host with one bridge, a guest and the state for the given services."""

    timeout = 120

    def setUp(self) -> None:
        require_root()
        self.host = Host(self, prefix="tqm")

    def bridge_with_guest(self, services: dict[int, tuple[str, int]]) -> tuple[str, Guest]:
        """A bridge with tproxy state for ``services`` and one guest on it."""
        br = self.host.add_bridge()
        guest = self.host.add_guest(br)
        self.host.build_tproxy_state(br, services)
        return br, guest

    def start(self, **settings: object) -> None:
        """Write a config (with ``settings``) and ``one-tproxy start``."""
        self.host.write_config(config_yaml([], debug_level=3, **settings))
        self.host.tproxy("start", check=True)

    def proxies(self) -> dict[str, int]:
        """``one-tproxy status`` as {name: pid}; asserts it exits 0."""
        rc, found = self.host.status()
        self.assertEqual(rc, 0, self.host.logs())
        return found


class ServeTests(MeshTestCase):
    """Serving guests, status and stop."""

    def test_curl_status_stop(self) -> None:
        """A guest's curl gets the service's page; status shows both proxies; stop ends all."""
        self.host.serve_http(5030)
        self.host.serve_http(1234)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030), 1234: (LOCAL, 1234)})
        self.start()
        self.assertEqual(guest.wait_serving(5030), "service 5030\n")
        self.assertEqual(guest.curl(guest.service_url(1234), check=True).stdout, "service 1234\n")
        done = self.host.tproxy("status")
        self.assertEqual(done.returncode, 0)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 2, done.stdout)
        self.assertRegex(lines[0], r"^one_tproxy: [0-9]+$")
        self.assertRegex(lines[1], rf"^one_tproxy_{br}: [0-9]+$")
        root = int(lines[0].split(": ")[1])
        inner = int(lines[1].split(": ")[1])
        self.assertEqual(self.host.tproxy("start").returncode, 0)  # idempotent
        self.assertEqual(self.proxies()["one_tproxy"], root)
        log = self.host.log(f"one_tproxy_{br}")
        self.assertIn(f"listening on {SERVICE_ADDRESS}:5030", log)
        self.host.tproxy("stop", check=True)
        self.assertFalse(is_alive(root))
        self.assertFalse(is_alive(inner))
        done = self.host.tproxy("status")
        self.assertEqual((done.returncode, done.stdout), (3, ""))
        self.assertEqual(self.host.tproxy("stop").returncode, 0)  # nothing runs: still 0

    def test_stop_lets_streams_finish(self) -> None:
        """stop waits for an open download (within the grace period); it completes whole."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start(grace_period=10)
        guest.wait_serving(5030)
        transfer = guest.start_transfer("download", 5030, 2_000_000, rate=1_000_000)
        began = time.monotonic()
        self.host.tproxy("stop", check=True)
        out, _ = transfer.communicate(timeout=30)
        self.assertEqual(transfer.returncode, 0, out)
        self.assertGreater(time.monotonic() - began, 1.0)  # it waited for the stream
        self.assertEqual(self.host.status()[0], 3)
        self.assertNotEqual(guest.curl(guest.service_url(5030), timeout=3).returncode, 0)

    def test_stop_bounded_by_grace(self) -> None:
        """A stream longer than the grace period is cut and stop returns soon after."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start(grace_period=1)
        guest.wait_serving(5030)
        transfer = guest.start_transfer("download", 5030, 50_000_000, rate=1_000_000)
        began = time.monotonic()
        self.host.tproxy("stop", check=True)
        self.assertLess(time.monotonic() - began, 5.0)
        transfer.communicate(timeout=30)
        self.assertNotEqual(transfer.returncode, 0)

    def test_nothing_configured(self) -> None:
        """With no map, start starts nothing and exits 0."""
        self.host.write_config(config_yaml([]))
        self.assertEqual(self.host.tproxy("start").returncode, 0)
        self.assertEqual(self.host.status()[0], 3)

    def test_refusing_remote(self) -> None:
        """A remote that refuses makes the guest's request fail at once, not hang."""
        br, guest = self.bridge_with_guest({5030: (LOCAL, 1)})
        self.start()
        wait_until(lambda: f"one_tproxy_{br}" in self.proxies(), timeout=10)
        wait_until(lambda: "listening on" in self.host.log(f"one_tproxy_{br}"), timeout=10)
        began = time.monotonic()
        done = guest.curl(guest.service_url(5030), timeout=10)
        elapsed = time.monotonic() - began
        self.assertNotEqual(done.returncode, 0)
        self.assertNotEqual(done.returncode, 28, "curl timed out: the guest hung")
        self.assertLess(elapsed, 3.0)
        wait_until(lambda: "127.0.0.1:1" in self.host.log(), timeout=5)


class ReloadTests(MeshTestCase):
    """A reload changes ports and bridges without cutting open streams."""

    def test_reload_keeps_download(self) -> None:
        """Adding a port and removing a bridge while a download runs leaves it whole."""
        self.host.serve_http(5030)
        self.host.serve_http(1234)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        br2, guest2 = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        guest2.wait_serving(5030)
        gone = self.proxies()[f"one_tproxy_{br2}"]
        inner = self.proxies()[f"one_tproxy_{br}"]
        size = 3_000_000
        transfer = guest.start_transfer("download", 5030, size, rate=1_000_000)
        self.host.set_service_map(br, {5030: (LOCAL, 5030), 1234: (LOCAL, 1234)})
        self.host.nft("delete", "map", "ip", "one_tproxy", f"ep_{br2}")
        self.host.tproxy("reload", check=True)
        self.assertEqual(guest.wait_serving(1234), "service 1234\n")
        wait_until(lambda: not is_alive(gone), timeout=15, message="removed bridge's inner")
        out, _ = transfer.communicate(timeout=30)
        self.assertEqual(transfer.returncode, 0, out)
        self.assertIn(b"got 3000000", out)
        self.assertEqual(self.proxies().get(f"one_tproxy_{br}"), inner)
        self.assertNotIn(f"one_tproxy_{br2}", self.proxies())

    def test_reload_reopens_logs(self) -> None:
        """After logrotate moved the logs, a reload makes root and inner write new files."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        for name in ("one_tproxy", f"one_tproxy_{br}"):
            path = os.path.join(self.host.log_dir, name + ".log")
            os.rename(path, path + ".1")
        self.host.write_config(config_yaml([], debug_level=1))
        self.host.tproxy("reload", check=True)
        for name in ("one_tproxy", f"one_tproxy_{br}"):
            path = os.path.join(self.host.log_dir, name + ".log")
            wait_until(lambda p=path: os.path.exists(p), timeout=5, message=path)
        # debug level 1 now: accepted connections (INFO/DEBUG) are no longer logged
        guest.curl(guest.service_url(5030), check=True)
        inner_log = self.host.log(f"one_tproxy_{br}")
        self.assertNotIn("INFO", inner_log.split("reloaded", 1)[-1])

    def test_debug_lines_follow_the_level(self) -> None:
        """Both logs show each stream opened and closed at debug level 3, not at 1, then again."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        guest.curl(guest.service_url(5030), check=True)
        for name in ("one_tproxy", f"one_tproxy_{br}"):
            wait_until(
                lambda n=name: "bytes from it" in self.host.log(n),
                timeout=5,
                message=f"DEBUG stream lines in {name}.log",
            )
            self.assertIn("open: guest", self.host.log(name))
        self.host.write_config(config_yaml([], debug_level=1))
        self.host.tproxy("reload", check=True)
        names = ("one_tproxy", f"one_tproxy_{br}")

        def quiet() -> bool:
            """A request after the reload (it reaches the inner with a forwarded SIGHUP)
            adds no DEBUG line to either log."""
            before = [self.host.log(n).count("bytes from it") for n in names]
            guest.curl(guest.service_url(5030), check=True)
            time.sleep(0.3)
            return [self.host.log(n).count("bytes from it") for n in names] == before

        wait_until(quiet, timeout=10, message="no DEBUG lines at debug level 1")
        self.host.write_config(config_yaml([], debug_level=3))
        self.host.tproxy("reload", check=True)

        wait_until(lambda: not quiet(), timeout=10, message="DEBUG lines again at debug level 3")

    def test_restart(self) -> None:
        """restart really stops, then starts new processes that serve."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        before = self.proxies()
        self.host.tproxy("restart", check=True)
        after = self.proxies()
        self.assertEqual(sorted(after), sorted(before))
        self.assertNotEqual(after["one_tproxy"], before["one_tproxy"])
        self.assertFalse(is_alive(before["one_tproxy"]))
        guest.wait_serving(5030)

    def test_last_bridge_removed(self) -> None:
        """A reload that removes the last bridge ends the mesh."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        found = self.proxies()
        self.host.nft("delete", "map", "ip", "one_tproxy", f"ep_{br}")
        self.host.tproxy("reload", check=True)
        wait_until(
            lambda: not any(is_alive(pid) for pid in found.values()),
            timeout=15,
            message="mesh exit",
        )
        self.assertEqual(self.host.status()[0], 3)


class SupervisionTests(MeshTestCase):
    """Dead inner proxies come back; a dead root leaves no inner behind."""

    def test_killed_inner_back(self) -> None:
        """An inner killed with SIGKILL is serving again within 5 seconds."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        old = self.proxies()[f"one_tproxy_{br}"]
        os.kill(old, signal.SIGKILL)
        began = time.monotonic()

        def back() -> bool:
            pid = self.proxies().get(f"one_tproxy_{br}")
            return pid is not None and pid != old

        wait_until(back, timeout=5, interval=0.05, message="inner restarted")
        guest.wait_serving(5030, timeout=5 - (time.monotonic() - began) + 1)
        self.assertLess(time.monotonic() - began, 5.5)

    def test_root_kill9(self) -> None:
        """After kill -9 of the root its inner proxies exit too."""
        self.host.serve_http(5030)
        br, guest = self.bridge_with_guest({5030: (LOCAL, 5030)})
        self.start()
        guest.wait_serving(5030)
        found = self.proxies()
        os.kill(found["one_tproxy"], signal.SIGKILL)
        wait_until(
            lambda: not is_alive(found[f"one_tproxy_{br}"]),
            timeout=5,
            message="orphaned inner exits",
        )


class LoadTests(MeshTestCase):
    """Many connections at once through one inner proxy."""

    def test_thousand_connections(self) -> None:
        """1,000 concurrent guest connections complete; no fd is left behind afterwards."""
        port = 7007
        self.host.spawn([sys.executable, CHILDREN, "echo", LOCAL, str(port)])
        self.host.wait_tcp(LOCAL, port)
        br, guest = self.bridge_with_guest({port: (LOCAL, port)})
        self.start(max_connections_per_guest=5000)
        wait_until(lambda: "listening on" in self.host.log(f"one_tproxy_{br}"), timeout=10)
        found = self.proxies()
        root, inner = found["one_tproxy"], found[f"one_tproxy_{br}"]
        before = (fd_count(root), fd_count(inner))
        done = guest.run(
            [sys.executable, CHILDREN, "burst", "1000", SERVICE_ADDRESS, str(port)],
            timeout=90,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr + self.host.logs())
        self.assertEqual(done.stdout.strip(), "ok 1000")
        wait_until(
            lambda: (fd_count(root), fd_count(inner)) <= before or None,
            timeout=10,
            message=f"fds back to {before}",
        )
        self.assertLessEqual(fd_count(root), before[0])
        self.assertLessEqual(fd_count(inner), before[1])
