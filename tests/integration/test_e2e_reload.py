"""End to end reconfiguration while transfers run: nothing is cut."""

from __future__ import annotations

from tests.integration.e2e import GRACE, E2ETestCase
from tests.integration.topology import SERVICE_ADDRESS, config_yaml, wait_until

MB = 2**20


class ReloadTests(E2ETestCase):
    """A new configuration applies to new connections; open streams keep going."""

    def test_reload_while_transfers_run(self) -> None:
        """With a download on a kept port and an upload on a removed port in flight,
        ``up`` with a new config (and ``reload``) adds 1234, makes 5031 refuse, sends
        new connections of 5030 to its changed destination, and both transfers
        complete intact; the root proxy is not restarted."""
        hv = self.hypervisor(
            [(5030, "127.0.0.1", 5030), (5031, "127.0.0.1", 9000)],
            services={5030: "old destination\n", 7070: "new service\n", 7071: "changed\n"},
        )
        host, guest = hv.host, hv.guest
        host.serve_sink(9000)
        guest.wait_serving(5030)
        guest.wait_tcp(SERVICE_ADDRESS, 5031)
        root = self.wait_proxies(host, {"one_tproxy", f"one_tproxy_{hv.bridge}"})

        # About 5 s each at 4 MB/s: still running when the reload is done.
        down = guest.start_transfer("download", 5030, 20 * MB, rate=4 * MB)
        up = guest.start_transfer("upload", 5031, 20 * MB, rate=4 * MB)

        host.write_config(
            config_yaml([(5030, "127.0.0.1", 7071), (1234, "127.0.0.1", 7070)], grace_period=GRACE)
        )
        host.up(hv.bridge)
        host.tproxy("reload", check=True)
        self.assertIsNone(down.poll(), "download ended before the reload: test too short")
        self.assertIsNone(up.poll(), "upload ended before the reload: test too short")

        self.assertEqual(guest.wait_serving(1234), "new service\n")
        wait_until(
            lambda: guest.curl(guest.service_url(5031), timeout=2).returncode == 7,
            10,
            0.1,
            "port 5031 to refuse",
        )

        out_down, _ = down.communicate(timeout=60)
        out_up, _ = up.communicate(timeout=60)
        self.assertEqual(down.returncode, 0, out_down.decode() + host.logs())
        self.assertEqual(up.returncode, 0, out_up.decode() + host.logs())
        self.assertEqual(host.proxies()["one_tproxy"], root["one_tproxy"])
        self.assertEqual(guest.wait_serving(5030, expect="changed"), "changed\n")
