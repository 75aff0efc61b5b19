"""What the end-to-end tests share: a base class and a one-call simulated hypervisor.

Every e2e test runs the real driver (``one-tproxy up/down``) and the real
daemons inside its own test hypervisor namespace (see ``topology.py``), with
services on that namespace's 127.0.0.1, and is cleaned up whatever happens.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence

from attrs import frozen
from twisted.trial import unittest

from tests.integration.topology import Guest, Host, config_yaml, require_root, wait_until

#: A grace period short enough that cleanup's ``one-tproxy stop`` is quick.
GRACE = 1


@frozen
class Hypervisor:
    """A test hypervisor with one bridge and its guests, after ``one-tproxy up``."""

    host: Host
    """The hypervisor namespace."""
    bridge: str
    """Its bridge."""
    guests: tuple[Guest, ...]
    """The guests on the bridge."""

    @property
    def guest(self) -> Guest:
        """The first guest."""
        return self.guests[0]


class E2ETestCase(unittest.TestCase):
    """Base class: skipped with the reason unless root; builds hypervisors in one call."""

    prefix = "tqe"

    def setUp(self) -> None:
        require_root()

    def make_host(self) -> Host:
        """A new, empty test hypervisor (cleaned up after the test)."""
        return Host(self, prefix=self.prefix)

    def hypervisor(
        self,
        endpoints: Sequence[tuple[int, str, int] | tuple[int, str, int, Sequence[str]]],
        services: Mapping[int, str] | None = None,
        guests: int = 1,
        network: str | None = None,
        network_id: str | None = None,
        host: Host | None = None,
        up: bool = True,
        **settings: object,
    ) -> Hypervisor:
        """A hypervisor (or one more bridge on ``host``) with ``guests`` guests, HTTP
        services on 127.0.0.1 (``{port: index.html text}``), the config of ``endpoints``,
        and ``one-tproxy up BR`` done. ``settings`` add ``:tproxy_KEY:`` lines."""
        host = host or self.make_host()
        bridge = host.add_bridge()
        members = tuple(host.add_guest(bridge) for _ in range(guests))
        for port, text in (services or {}).items():
            host.serve_http(port, files={"index.html": text})
        host.write_config(config_yaml(endpoints, **{"grace_period": GRACE, **settings}))
        if up:
            host.up(bridge, network=network, network_id=network_id)
        return Hypervisor(host, bridge, members)

    def assert_refused(self, guest: Guest, port: int) -> None:
        """A connection from ``guest`` to 169.254.16.9:PORT is refused at once (curl 7)."""
        done = guest.curl(guest.service_url(port), timeout=5)
        self.assertEqual(
            done.returncode,
            7,
            f"port {port}: expected a refusal, got {done.returncode} "
            f"{done.stdout!r} {done.stderr!r}",
        )

    def assert_fails_at_once(self, guest: Guest, port: int) -> None:
        """A request from ``guest`` via PORT fails with an error, not a timeout (curl 28)."""
        done = guest.curl(guest.service_url(port), timeout=8)
        self.assertFalse(done.ok, f"port {port} answered {done.stdout!r}")
        self.assertNotEqual(done.returncode, 28, f"port {port} hung until curl gave up")

    def kill9(self, pid: int) -> None:
        """SIGKILL one process (of ours, found by the scoped /proc scan)."""
        os.kill(pid, signal.SIGKILL)

    def wait_proxies(self, host: Host, expected: set[str], timeout: float = 15.0) -> dict[str, int]:
        """Wait (bounded) until exactly the ``expected`` proxy processes run on ``host``."""

        def check() -> tuple[dict[str, int]] | None:
            found = host.proxies()
            return (found,) if set(found) == expected else None  # a tuple: true even if empty

        try:
            result = wait_until(check, timeout, 0.1, f"proxies {sorted(expected)}")
        except AssertionError as e:
            raise AssertionError(f"{e}; running: {host.proxies()}\n{host.logs()}") from None
        return dict(result[0])
