"""Hardening end to end: abusive guests, faults and leaks, on the real mesh (prefix ``tqh``).

Each test runs ``one-tproxy up`` and the daemons in its own test hypervisor
namespace (``topology.Host``); the abusive clients are ``guestload.py`` run
inside guest namespaces.  Memory and descriptors are read from ``/proc``; the
numbers are printed for the record, the assertions are generous bounds that an
unbounded buffer or a leak would break by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import SERVICE_ADDRESS, Guest, Host, wait_until
from tproxy.protocol.frames import DEFAULT_WINDOW

GUESTLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guestload.py")
CHILDREN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_children.py")
PAGE = "onegate\n"
MIB = 1024 * 1024


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def stable_fds(*pids: int, timeout: float = 5.0) -> tuple[int, ...]:
    """fd counts once two samples 0.3 s apart agree (a closing connection settles), bounded."""
    last = tuple(fd_count(p) for p in pids)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.3)
        now = tuple(fd_count(p) for p in pids)
        if now == last:
            break
        last = now
    return last


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def settled_rss(pid: int, timeout: float = 15.0) -> int:
    """RSS once it stops growing (three samples 0.3 s apart within 512 KiB), bounded."""
    samples = [rss(pid)]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.3)
        samples.append(rss(pid))
        if len(samples) >= 3 and max(samples[-3:]) - min(samples[-3:]) < 512 * 1024:
            break
    return samples[-1]


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """One line of a spawned client's stdout, bounded in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from pid {proc.pid} in {timeout} s")
    return proc.stdout.readline().decode().strip()


class HardeningTestCase(E2ETestCase):
    """Our prefix, and the pids of a hypervisor's two proxies."""

    prefix = "tqh"

    def pids(self, host: Host, bridge: str) -> tuple[int, int]:
        found = self.wait_proxies(host, {"one_tproxy", f"one_tproxy_{bridge}"})
        return found["one_tproxy"], found[f"one_tproxy_{bridge}"]

    def guestload(self, guest: Guest, *args: str) -> subprocess.Popen[bytes]:
        return guest.spawn(
            [sys.executable, GUESTLOAD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )


class GuestAbuseTests(HardeningTestCase):
    """Caps, slow readers and resets from guests."""

    def test_per_guest_cap_spares_other_guests(self) -> None:
        """A guest at :tproxy_max_connections_per_guest: gets resets for more, while another
        guest on the same bridge is served; once it lets go it is served again."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030)],
            services={5030: PAGE},
            guests=2,
            max_connections_per_guest=5,
        )
        hog, other = hv.guests
        self.assertEqual(hog.wait_serving(5030), PAGE)
        proc = self.guestload(hog, "caps", SERVICE_ADDRESS, "5030", "5", "20")
        result = json.loads(read_line(proc))
        # None of the 20 over the cap is served (each is reset, or fails to connect).
        self.assertEqual((result["held"], result["served"]), (5, 0), result)
        self.assertGreaterEqual(result["reset"], 15, result)
        for _ in range(3):
            self.assertEqual(other.curl(other.service_url(5030), check=True).stdout, PAGE)
        assert proc.stdin is not None
        proc.stdin.close()
        self.assertEqual(proc.wait(timeout=15), 0)
        self.assertEqual(hog.wait_serving(5030), PAGE)
        self.assertIn("TOO_MANY_STREAMS", hv.host.log())

    def test_slow_readers_hold_only_their_windows_and_rst_frees_all(self) -> None:
        """100 guests' downloads that are never read hold at most about their windows in
        the proxies (not the 100 x 200 MB asked for); resetting them frees every fd."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: PAGE}, debug_level=1)
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
        root, inner = self.pids(hv.host, hv.bridge)
        fds = stable_fds(root, inner)
        base = (settled_rss(root), settled_rss(inner))

        proc = self.guestload(hv.guest, "slow", SERVICE_ADDRESS, "5030", "100", str(200 * MIB))
        self.assertEqual(read_line(proc), "open 100")
        time.sleep(1.0)
        held = (settled_rss(root), settled_rss(inner))
        grown = (held[0] - base[0], held[1] - base[1])
        print(
            f"\nslow readers: RSS growth root {grown[0] / MIB:.1f} MiB, "
            f"inner {grown[1] / MIB:.1f} MiB for 100 streams"
        )
        # Windows: one initial window per stream at most in the inner, a read or so in the root.
        self.assertLess(grown[1], 100 * DEFAULT_WINDOW + 24 * MIB)
        self.assertLess(grown[0], 100 * 128 * 1024 + 24 * MIB)
        self.assertGreaterEqual(fd_count(inner), fds[1] + 100)  # every stream is held

        assert proc.stdin is not None
        proc.stdin.write(b"reset\n")
        proc.stdin.flush()
        self.assertEqual(read_line(proc), "reset")
        wait_until(
            lambda: (fd_count(root) <= fds[0] and fd_count(inner) <= fds[1]) or None,
            timeout=15,
            message=f"fds back to {fds}, now {(fd_count(root), fd_count(inner))}",
        )
        self.assertEqual(hv.guest.curl(hv.guest.service_url(5030), check=True).stdout, PAGE)

    def test_no_leaks_after_20000_mixed_connections(self) -> None:
        """20,000 connections (served, refused, reset by the guest, timed out) leave root
        and inner with the same fds as before, and their RSS settled."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 7007), (5031, "127.0.0.1", 5999), (5032, "127.0.0.1", 6000)],
            debug_level=1,
            connect_timeout=1,
            max_connections_per_guest=5000,
        )
        # An asyncio echo service with a deep backlog (the HTTP test server's backlog of 5
        # would refuse bursts itself).
        hv.host.spawn([sys.executable, CHILDREN, "echo", "127.0.0.1", "7007"])
        hv.host.wait_tcp("127.0.0.1", 7007)
        hv.host.nft(
            "-f",
            "-",
            input=(
                "table ip tqh_blackhole {\n"
                "  chain out { type filter hook output priority 0; tcp dport 6000 drop; }\n"
                "}\n"
            ),
        )
        root, inner = self.pids(hv.host, hv.bridge)

        def load(total: int) -> dict[str, float]:
            done = hv.guest.run(
                [
                    sys.executable,
                    GUESTLOAD,
                    "mixed",
                    SERVICE_ADDRESS,
                    str(total),
                    "100",
                    "5030",
                    "5031",
                    "5032",
                ],
                timeout=120,
                check=True,
            )
            return dict(json.loads(done.stdout))

        hv.guest.wait_tcp(SERVICE_ADDRESS, 5030)
        load(2000)  # warm-up: allocator pools, caches
        fds = stable_fds(root, inner)
        base = (settled_rss(root), settled_rss(inner))
        counts = load(20000)
        print(f"\n20,000 mixed: {counts}")
        self.assertEqual(sum(counts[k] for k in ("ok", "failed", "reset")), 20000)
        # 80 % are requests to a working service; 8 % refused, 10 % reset by the guest and
        # 2 % timed out are all resets or failures for the guest.
        self.assertGreaterEqual(counts["ok"], 15800)
        wait_until(
            lambda: (fd_count(root) <= fds[0] and fd_count(inner) <= fds[1]) or None,
            timeout=15,
            message=f"fds back to {fds}, now {(fd_count(root), fd_count(inner))}",
        )
        after = (settled_rss(root), settled_rss(inner))
        print(
            f"RSS root {base[0] / MIB:.1f} -> {after[0] / MIB:.1f} MiB, "
            f"inner {base[1] / MIB:.1f} -> {after[1] / MIB:.1f} MiB"
        )
        self.assertLess(after[0] - base[0], 8 * MIB)
        self.assertLess(after[1] - base[1], 8 * MIB)


class FaultTests(HardeningTestCase):
    """The root restarted under load, a broken configuration, an unwritable log."""

    def test_restart_ends_connections_then_serves(self) -> None:
        """A restart ends the guests' open connections (no hang) and new ones work after."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: PAGE})
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
        proc = hv.guest.start_transfer("download", 5030, 100 * MIB, rate=2 * MIB)
        hv.host.tproxy("restart", check=True)
        proc.communicate(timeout=30)
        self.assertNotEqual(proc.returncode, 0)  # cut, not completed
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)

    def test_broken_or_missing_config_on_reload_keeps_last_state(self) -> None:
        """Reload with invalid YAML (reported: exit 1), then with no file: the same processes
        keep serving (new connections too) and the root's log says why."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: PAGE})
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
        before = self.wait_proxies(hv.host, {"one_tproxy", f"one_tproxy_{hv.bridge}"})
        hv.host.write_config(":tproxy: [ {unclosed\n")
        done = hv.host.tproxy("reload")
        self.assertEqual(done.returncode, 1)  # told at once, not only in the log
        self.assertIn("keeps its last good configuration", done.stderr)
        wait_until(lambda: "OpenNebulaNetwork.conf" in hv.host.log() or None, timeout=10)
        self.assertEqual(hv.guest.curl(hv.guest.service_url(5030), check=True).stdout, PAGE)
        os.unlink(hv.host.config_path)
        hv.host.tproxy("reload", check=True)
        time.sleep(0.5)
        self.assertEqual(hv.guest.curl(hv.guest.service_url(5030), check=True).stdout, PAGE)
        self.assertEqual(hv.host.proxies(), before)

    def test_unwritable_log_dir_keeps_proxying(self) -> None:
        """With a log directory that cannot exist (under a regular file) the mesh still
        starts and serves."""
        host = self.make_host()
        blocker = os.path.join(host.tmp, "not-a-dir")
        with open(blocker, "w") as f:
            f.write("x")
        host.log_dir = os.path.join(blocker, "log")
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: PAGE}, host=host)
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
        code, procs = host.status()
        self.assertEqual(code, 0)
        self.assertIn(f"one_tproxy_{hv.bridge}", procs)
