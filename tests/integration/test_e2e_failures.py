"""End to end failures: a remote service down, an inner proxy killed, the root killed."""

from __future__ import annotations

from tests.integration.e2e import E2ETestCase
from tests.integration.topology import wait_until

PAGE = "onegate\n"


class RemoteFailureTests(E2ETestCase):
    """A remote service that stops and comes back."""

    def test_remote_stopped_then_started(self) -> None:
        """With the service stopped a guest's request fails at once (no hang); once it
        is started again requests work, with the same proxy processes."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)])
        server = hv.host.serve_http(5030, files={"index.html": PAGE})
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
        before = hv.host.proxies()

        server.stop()
        for _ in range(3):
            self.assert_fails_at_once(hv.guest, 5030)

        server.start()
        done = hv.guest.curl(hv.guest.service_url(5030), check=True)
        self.assertEqual(done.stdout, PAGE)
        self.assertEqual(hv.host.proxies(), before)


class KillTests(E2ETestCase):
    """Proxies killed with SIGKILL."""

    def test_kill_inner(self) -> None:
        """An inner proxy killed with -9 is restarted by the root and serves again."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: PAGE})
        inner = f"one_tproxy_{hv.bridge}"
        hv.guest.wait_serving(5030)
        before = self.wait_proxies(hv.host, {"one_tproxy", inner})

        self.kill9(before[inner])

        def restarted() -> dict[str, int] | None:
            now = hv.host.proxies()
            return now if now.get(inner) not in (None, before[inner]) else None

        after = wait_until(restarted, 15, 0.1, "a new inner proxy")
        self.assertEqual(after["one_tproxy"], before["one_tproxy"])
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)

    def test_kill_root(self) -> None:
        """After kill -9 of the root no proxy process is left; ``start`` brings the
        root and the inner back, and guests are served again."""
        hv = self.hypervisor([(5030, "127.0.0.1", 5030)], services={5030: PAGE})
        names = {"one_tproxy", f"one_tproxy_{hv.bridge}"}
        hv.guest.wait_serving(5030)
        before = self.wait_proxies(hv.host, names)

        self.kill9(before["one_tproxy"])
        self.wait_proxies(hv.host, set())
        code, _ = hv.host.status()
        self.assertEqual(code, 3)
        self.assertFalse(hv.guest.curl(hv.guest.service_url(5030), timeout=3).ok)

        hv.host.tproxy("start", check=True)
        self.wait_proxies(hv.host, names)
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
