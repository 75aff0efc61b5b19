"""End to end bulk transfers: 100 MB each way, checked by sha256 at the far end; half-close."""

from __future__ import annotations

import time

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import SERVICE_ADDRESS


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


MB = 2**20


class TransferTests(E2ETestCase):
    """Bytes arrive intact, in order, and a FIN travels on its own."""

    def test_100mb_each_way(self) -> None:
        """100 MB down (sha256 checked by the guest) and 100 MB up (checked by the
        service, which sees the client's half-close) run at once and arrive intact."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (1234, "127.0.0.1", 9000)],
            services={5030: "ok\n"},
        )
        hv.host.serve_sink(9000)
        hv.guest.wait_serving(5030)
        hv.guest.wait_tcp(SERVICE_ADDRESS, 1234)
        down = hv.guest.start_transfer("download", 5030, 100 * MB)
        up = hv.guest.start_transfer("upload", 1234, 100 * MB)
        out_down, _ = down.communicate(timeout=120)
        out_up, _ = up.communicate(timeout=120)
        self.assertEqual(down.returncode, 0, out_down)
        self.assertEqual(up.returncode, 0, out_up)
        self.assertIn(f"got {100 * MB} ", out_down.decode())
        self.assertIn(f"reply {100 * MB} ", out_up.decode())

    def test_half_close_then_read_reply(self) -> None:
        """A client that shuts down its write side still reads the service's reply,
        which the service only sends after it saw that FIN."""
        hv = self.hypervisor([(1234, "127.0.0.1", 9000)])
        hv.host.serve_sink(9000)
        hv.guest.wait_tcp(SERVICE_ADDRESS, 1234)
        for size in (0, 1, 300_000):
            done = hv.guest.upload(1234, size)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertIn(f"reply {size} ", done.stdout)

    def test_slow_reader_stalls_only_itself(self) -> None:
        """A guest reading 100 MB at 64 KB/s holds back only its own stream: another
        guest's 30 MB download on the same bridge completes meanwhile, and the proxies
        do not buffer the slow stream's backlog (memory grows by far less than it)."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: "ok\n"}, guests=2)
        slow_guest, fast_guest = hv.guests
        fast_guest.wait_serving(5030)
        procs = self.wait_proxies(hv.host, {"one_tproxy", f"one_tproxy_{hv.bridge}"})
        before = {name: rss_kib(pid) for name, pid in procs.items()}

        slow = slow_guest.start_transfer("download", 5030, 100 * MB, rate=64 * 1024)
        time.sleep(1)  # the service writes as fast as it can; only flow control holds it
        fast = fast_guest.download(5030, 30 * MB, timeout=60)
        self.assertEqual(fast.returncode, 0, fast.stdout + fast.stderr)
        self.assertIsNone(slow.poll(), "the slow download should still be running")

        grown = {name: rss_kib(pid) - before[name] for name, pid in procs.items()}
        for name, kib in grown.items():
            # Without per-stream flow control the backlog (~100 MB) would sit here.
            self.assertLess(kib, 40 * 1024, f"{name} grew by {kib} KiB: {grown}")
