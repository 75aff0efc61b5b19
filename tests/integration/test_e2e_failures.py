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

    def test_remote_silent_times_out(self) -> None:
        """A remote that never answers the SYN (dropped) is given up after
        ``:tproxy_connect_timeout:``: the guest's request fails long before its own
        timeout, the failure is logged, and another service keeps working."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (1234, "127.0.0.1", 6000)],
            services={5030: PAGE},
            connect_timeout=1,
        )
        hv.host.nft(
            "-f",
            "-",
            input=(
                "table ip tqe_blackhole {\n"
                "  chain out { type filter hook output priority 0; tcp dport 6000 drop; }\n"
                "}\n"
            ),
        )
        hv.guest.wait_serving(5030)
        self.assert_fails_at_once(hv.guest, 1234)
        self.assertIn("127.0.0.1:6000", hv.host.log())
        self.assertEqual(hv.guest.curl(hv.guest.service_url(5030), check=True).stdout, PAGE)


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
        # Nothing of the mesh is left at all (helpers such as a template too).
        wait_until(lambda: not hv.host.product_pids(), 10, 0.1, "no mesh process")
        code, _ = hv.host.status()
        self.assertEqual(code, 3)
        self.assertFalse(hv.guest.curl(hv.guest.service_url(5030), timeout=3).ok)

        hv.host.tproxy("start", check=True)
        self.wait_proxies(hv.host, names)
        self.assertEqual(hv.guest.wait_serving(5030), PAGE)
