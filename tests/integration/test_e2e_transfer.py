"""End to end bulk transfers: 100 MB each way, checked by sha256 at the far end; half-close."""

from __future__ import annotations

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import SERVICE_ADDRESS

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
