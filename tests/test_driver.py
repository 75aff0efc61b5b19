"""Unit tests of the driver's up/down logic with fake netlink and nftables edges."""

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
from collections.abc import Mapping
from typing import Any

from attrs import define, field
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from tproxy import driver
from tproxy.commands import driver as command
from tproxy.driver import DriverError, down, up
from tproxy.model import Destination
from tproxy.netlink import Link, NetlinkError, NotFoundError
from tproxy.nft import ArpRuleForm
from tproxy.settings import Paths

NS = "one_tproxy_br0"
SMAP = {5030: Destination("10.11.12.13", 5030)}


@define
class FakeLink:
    """A mutable link of the fake kernel."""

    index: int
    kind: str | None
    up: bool = False
    master: int | None = None
    peer: int | None = None
    addresses: list[tuple[str, int]] = field(factory=list)


class FakeNet:
    """A tiny model of links and namespaces; records every operation in ``ops``."""

    def __init__(self) -> None:
        self.links: dict[str | None, dict[str, FakeLink]] = {None: {}}
        self.routes: dict[str | None, list[tuple[int, int]]] = {None: []}
        self.sysctls: dict[str, dict[str, str]] = {}
        self.ops: list[tuple[Any, ...]] = []
        self.index = 10
        self.fail_on: str | None = None
        self.closed = False

    def _op(self, *op: Any) -> None:
        if self.fail_on == op[0]:
            raise NetlinkError(f"fake {op[0]}", errno.EBUSY)
        self.ops.append(op)

    def add(self, name: str, kind: str | None, netns: str | None = None, **kw: Any) -> FakeLink:
        self.index += 1
        link = FakeLink(self.index, kind, **kw)
        self.links[netns][name] = link
        return link

    def add_bridge(self, name: str = "br0") -> FakeLink:
        return self.add(name, "bridge", up=True)

    def add_namespace(self, name: str, arp_ignore: str = "0") -> None:
        self.links[name] = {}
        self.routes[name] = []
        self.sysctls[name] = {k: arp_ignore for k in driver.ARP_SYSCTLS}

    def mutations(self) -> list[tuple[Any, ...]]:
        return [op for op in self.ops if op[0] not in ("get_sysctl",)]

    # -- NetEdge

    def namespace_exists(self, name: str) -> bool:
        return name in self.links

    def create_namespace(self, name: str) -> None:
        self._op("create_namespace", name)
        self.add_namespace(name)

    def remove_namespace(self, name: str) -> None:
        self._op("remove_namespace", name)
        del self.links[name]

    def link(self, name: str, netns: str | None = None) -> Link | None:
        fake = self.links[netns].get(name)
        if fake is None:
            return None
        return Link(fake.index, name, fake.kind, fake.up, fake.master, fake.peer)

    def create_veth(self, name: str, peer: str) -> None:
        self._op("create_veth", name, peer)
        a = self.add(name, "veth")
        b = self.add(peer, "veth")
        a.peer, b.peer = b.index, a.index

    def delete_link(self, name: str, netns: str | None = None) -> None:
        self._op("delete_link", name, netns)
        link = self.links[netns].pop(name)
        for links in self.links.values():
            for other, fake in list(links.items()):
                if fake.kind == "veth" and fake.index == link.peer and link.kind == "veth":
                    del links[other]

    def set_master(self, name: str, master: str) -> None:
        self._op("set_master", name, master)
        self.links[None][name].master = self.links[None][master].index

    def set_up(self, name: str, netns: str | None = None) -> None:
        self._op("set_up", name, netns)
        self.links[netns][name].up = True

    def move_to_namespace(self, name: str, netns: str) -> None:
        self._op("move_to_namespace", name, netns)
        self.links[netns][name] = self.links[None].pop(name)

    def addresses(self, name: str, netns: str | None = None) -> list[tuple[str, int]]:
        return list(self.links[netns][name].addresses)

    def add_address(
        self, name: str, address: str, prefixlen: int, netns: str | None = None
    ) -> None:
        self._op("add_address", name, address, prefixlen, netns)
        self.links[netns][name].addresses.append((address, prefixlen))

    def default_routes(self, netns: str | None = None) -> list[tuple[int, int]]:
        return list(self.routes[netns])

    def replace_default_route(self, name: str, netns: str | None = None) -> None:
        self._op("replace_default_route", name, netns)
        self.routes[netns] = [(self.links[netns][name].index, 253)]

    def get_sysctl(self, netns: str, key: str) -> str:
        self.ops.append(("get_sysctl", netns, key))
        return self.sysctls[netns][key]

    def set_sysctl(self, netns: str, key: str, value: str) -> None:
        self._op("set_sysctl", netns, key, value)
        self.sysctls[netns][key] = value

    def close(self) -> None:
        self.closed = True


class FakeNft:
    """Records the nftables edge's calls and keeps the maps and chains written."""

    def __init__(self, form: ArpRuleForm = ArpRuleForm.IBRNAME) -> None:
        self.form = form
        self.maps: dict[str, dict[int, Destination]] = {}
        self.chains: set[str] = set()
        self.guards: set[str] = set()
        self.ops: list[tuple[Any, ...]] = []

    def read_service_maps(self) -> dict[str, dict[int, Destination]]:
        return {k: dict(v) for k, v in self.maps.items()}

    def write_service_map(self, bridge: str, service_map: Mapping[int, Destination]) -> bool:
        if self.maps.get(bridge) == dict(service_map):
            return False
        self.ops.append(("write_service_map", bridge, dict(service_map)))
        self.maps[bridge] = dict(service_map)
        return True

    def write_arp_rule(self, bridge: str) -> tuple[ArpRuleForm, bool]:
        if bridge in self.chains:
            return self.form, False
        self.ops.append(("write_arp_rule", bridge))
        self.chains.add(bridge)
        return self.form, True

    def write_guard(self, bridge: str, form: ArpRuleForm, mac: str | None = None) -> bool:
        if bridge in self.guards:
            return False
        self.ops.append(("write_guard", bridge, form))
        self.guards.add(bridge)
        return True

    def remove_bridge(self, bridge: str) -> bool:
        if bridge not in self.maps and bridge not in self.chains and bridge not in self.guards:
            return False
        self.ops.append(("remove_bridge", bridge))
        self.maps.pop(bridge, None)
        self.chains.discard(bridge)
        self.guards.discard(bridge)
        return True


class UpTests(TestCase):
    """up builds the state of DESIGN.md 2.2 step by step, idempotently."""

    def setUp(self) -> None:
        self.run_dir = self.mktemp()
        self.net = FakeNet()
        self.nft = FakeNft()
        self.bridge = self.net.add_bridge()

    def up(self, service_map: Mapping[int, Destination] = SMAP) -> list[str]:
        return up("br0", service_map, self.net, self.nft, self.run_dir)

    def test_clean_host(self) -> None:
        """On a clean host every step runs, in the order of the design, sysctls before the move."""
        changes = self.up()
        self.assertEqual(
            self.net.mutations(),
            [
                ("create_veth", "br0b", "br0a"),
                ("set_master", "br0b", "br0"),
                ("set_up", "br0b", None),
                ("create_namespace", NS),
                ("move_to_namespace", "br0a", NS),
                ("add_address", "br0a", "169.254.16.9", 32, NS),
                ("set_up", "br0a", NS),
                ("replace_default_route", "br0a", NS),
            ],
        )
        self.assertEqual(
            self.nft.ops,
            [
                ("write_arp_rule", "br0"),
                ("write_guard", "br0", ArpRuleForm.IBRNAME),
                ("write_service_map", "br0", SMAP),
            ],
        )
        self.assertEqual(len(changes), 11)
        b = self.net.links[None]["br0b"]
        self.assertEqual((b.master, b.up), (self.bridge.index, True))
        a = self.net.links[NS]["br0a"]
        self.assertEqual(a.addresses, [("169.254.16.9", 32)])
        self.assertEqual(self.net.routes[NS], [(a.index, 253)])

    def test_sysctl_before_move(self) -> None:
        """arp_ignore is set to 0 (all, then default) inside the namespace before BRa moves in."""
        self.net.add_namespace(NS, arp_ignore="1")
        self.up()
        ops = self.net.mutations()
        move = ops.index(("move_to_namespace", "br0a", NS))
        self.assertEqual(
            ops[move - 2 : move],
            [
                ("set_sysctl", NS, "net.ipv4.conf.all.arp_ignore", "0"),
                ("set_sysctl", NS, "net.ipv4.conf.default.arp_ignore", "0"),
            ],
        )
        self.assertNotIn(("create_namespace", NS), ops)

    def test_second_up_changes_nothing(self) -> None:
        """A second up with the same map makes no change at all."""
        self.up()
        net_ops, nft_ops = len(self.net.mutations()), len(self.nft.ops)
        self.assertEqual(self.up(), [])
        self.assertEqual((len(self.net.mutations()), len(self.nft.ops)), (net_ops, nft_ops))

    def test_new_map(self) -> None:
        """A changed service map is written again; links are untouched."""
        self.up()
        net_ops = len(self.net.mutations())
        other = {22: Destination("10.0.0.1", 2222)}
        self.assertEqual(len(self.up(other)), 1)
        self.assertEqual(self.nft.maps["br0"], other)
        self.assertEqual(len(self.net.mutations()), net_ops)

    def test_completes_half_done_state(self) -> None:
        """A veth pair left by an interrupted up is attached, moved and configured."""
        self.net.create_veth("br0b", "br0a")
        self.net.ops.clear()
        self.up()
        self.assertEqual(self.net.mutations()[0], ("set_master", "br0b", "br0"))
        self.assertIn("br0a", self.net.links[NS])

    def test_bad_name(self) -> None:
        """A name over 14 characters is refused before anything is looked at."""
        e = self.assertRaises(DriverError, up, "x" * 15, SMAP, self.net, self.nft, self.run_dir)
        self.assertIn("14", str(e))
        self.assertEqual((self.net.ops, self.nft.ops), ([], []))

    def assert_refused(self, message: str) -> None:
        """up raises DriverError containing ``message`` and changes nothing."""
        self.net.ops.clear()
        e = self.assertRaises(DriverError, self.up)
        self.assertIn(message, str(e))
        self.assertEqual((self.net.mutations(), self.nft.ops), ([], []))

    def test_missing_bridge(self) -> None:
        """A bridge that does not exist is a clear error."""
        del self.net.links[None]["br0"]
        self.assert_refused("bridge br0 does not exist")

    def test_not_a_bridge(self) -> None:
        """A link BR that is not a bridge is a clear error."""
        self.net.links[None]["br0"].kind = "veth"
        self.assert_refused("br0 is not a bridge")

    def test_brb_not_veth(self) -> None:
        """A BRb that is not a veth cannot be fixed."""
        self.net.add("br0b", "bridge")
        self.assert_refused("br0b exists but is not a veth")

    def test_bra_in_namespace_not_veth(self) -> None:
        """A BRa inside the namespace that is not a veth cannot be fixed."""
        self.net.add_namespace(NS)
        self.net.add("br0a", None, NS)
        self.assert_refused("br0a in namespace one_tproxy_br0 exists but is not a veth")

    def test_foreign_peer(self) -> None:
        """A BRb whose peer is not BRa cannot be fixed."""
        self.net.create_veth("br0b", "other")
        self.assert_refused("its veth peer is not br0a")

    def test_bra_without_brb(self) -> None:
        """A BRa without BRb cannot be fixed."""
        self.net.add("br0a", "veth")
        self.assert_refused("br0a exists without br0b")

    def test_brb_in_other_bridge(self) -> None:
        """A BRb that is a port of another bridge cannot be fixed."""
        other = self.net.add("br1", "bridge")
        self.net.create_veth("br0b", "br0a")
        self.net.links[None]["br0b"].master = other.index
        self.assert_refused("port of another bridge")

    def test_kernel_failure(self) -> None:
        """A kernel failure midway is a DriverError naming the step; what it made is undone."""
        self.net.fail_on = "move_to_namespace"
        e = self.assertRaises(DriverError, self.up)
        self.assertIn("up br0: fake move_to_namespace", str(e))
        self.assertEqual(set(self.net.links), {None})
        self.assertEqual(set(self.net.links[None]), {"br0"})
        self.assertEqual(
            self.net.mutations()[-2:], [("delete_link", "br0b", None), ("remove_namespace", NS)]
        )

    def test_failure_keeps_what_existed(self) -> None:
        """A failed up removes only what it created itself: an existing namespace stays."""
        self.net.add_namespace(NS)
        self.net.fail_on = "add_address"
        self.assertRaises(DriverError, self.up)
        self.assertIn(NS, self.net.links)
        self.assertEqual(self.net.links[NS], {})
        self.assertNotIn("br0b", self.net.links[None])

    def test_failed_rollback_logged(self) -> None:
        """When undoing fails too, the original error is raised and the failure logged."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        real_remove = self.net.remove_namespace

        def broken_remove(name: str) -> None:
            raise NetlinkError("fake remove", errno.EBUSY)

        self.net.remove_namespace = broken_remove  # type: ignore[method-assign]
        self.net.fail_on = "add_address"
        e = self.assertRaises(DriverError, self.up)
        self.assertIn("fake add_address", str(e))
        warned = [ev for ev in events if ev.get("log_level") == LogLevel.warn]
        self.assertEqual([ev["what"] for ev in warned], [f"namespace {NS}"])
        self.assertNotIn("br0b", self.net.links[None])
        real_remove(NS)


class DownTests(TestCase):
    """down removes what is present and nothing else."""

    def setUp(self) -> None:
        self.run_dir = self.mktemp()
        self.net = FakeNet()
        self.nft = FakeNft()
        self.net.add_bridge()

    def test_after_up(self) -> None:
        """After up, down removes nft state, then the veth pair, then the namespace."""
        up("br0", SMAP, self.net, self.nft, self.run_dir)
        self.net.ops.clear()
        self.assertEqual(len(down("br0", self.net, self.nft, self.run_dir)), 3)
        self.assertEqual(
            self.net.mutations(), [("delete_link", "br0b", None), ("remove_namespace", NS)]
        )
        self.assertEqual(self.nft.ops[-1], ("remove_bridge", "br0"))
        self.assertEqual(set(self.net.links), {None})
        self.assertEqual(set(self.net.links[None]), {"br0"})

    def test_clean_host(self) -> None:
        """down on a clean host changes nothing and succeeds."""
        self.assertEqual(down("br0", self.net, self.nft, self.run_dir), [])
        self.assertEqual(self.net.mutations(), [])

    def test_leftover_bra(self) -> None:
        """A BRa left in the hypervisor namespace (interrupted up) is deleted."""
        self.net.create_veth("br0b", "br0a")
        del self.net.links[None]["br0b"]
        self.net.ops.clear()
        down("br0", self.net, self.nft, self.run_dir)
        self.assertEqual(self.net.mutations(), [("delete_link", "br0a", None)])

    def test_foreign_brb_left_alone(self) -> None:
        """A BRb that is not a veth is not ours and stays."""
        self.net.add("br0b", "bridge")
        down("br0", self.net, self.nft, self.run_dir)
        self.assertEqual(self.net.mutations(), [])

    def test_bad_name(self) -> None:
        """down refuses a name over 14 characters."""
        self.assertRaises(DriverError, down, "x" * 15, self.net, self.nft, self.run_dir)

    def test_kernel_failure(self) -> None:
        """A kernel failure is a DriverError naming the bridge."""
        up("br0", SMAP, self.net, self.nft, self.run_dir)
        self.net.fail_on = "remove_namespace"
        e = self.assertRaises(DriverError, down, "br0", self.net, self.nft, self.run_dir)
        self.assertIn("down br0:", str(e))


class LockTests(TestCase):
    """The driver lock is exclusive, bounded in time, and lives in the run dir."""

    def test_lock_file(self) -> None:
        """The lock file is created (mode 0600) in the run dir, which is made if missing."""
        run_dir = os.path.join(self.mktemp(), "run")
        with driver.driver_lock(run_dir):
            path = os.path.join(run_dir, driver.LOCK_NAME)
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_exclusive_and_bounded(self) -> None:
        """A second holder waits, then gives up with a clear error when the time is over."""
        run_dir = self.mktemp()
        now = [0.0]
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            now[0] += seconds

        with driver.driver_lock(run_dir):
            inner = driver.driver_lock(run_dir, timeout=1.0, clock=lambda: now[0], sleep=sleep)
            e = self.assertRaises(DriverError, inner.__enter__)
            self.assertIn("gave up", str(e))
            self.assertTrue(sleeps)
        with driver.driver_lock(run_dir, timeout=0):
            pass  # released: taken again at once

    def test_unusable_run_dir(self) -> None:
        """A run dir that cannot hold the lock is a clear error."""
        path = self.mktemp()
        with open(path, "w"):
            pass
        e = self.assertRaises(DriverError, driver.driver_lock(path).__enter__)
        self.assertIn("cannot open the driver lock", str(e))


class CommandTests(TestCase):
    """The up/down subcommands: config, edges and mesh calls, exit statuses."""

    def setUp(self) -> None:
        self.net = FakeNet()
        self.net.add_bridge()
        self.nft = FakeNft()
        self.patch(command, "_edges", lambda: (self.net, self.nft))
        self.mesh: list[str] = []
        self.mesh_rc = {"start": 0, "reload": 0}
        for name in ("start", "reload"):
            self.patch(command.daemonctl, name, self.mesh_step(name))
        tmp = self.mktemp()
        os.makedirs(tmp)
        self.config = os.path.join(tmp, "c.yaml")
        with open(self.config, "w") as f:
            f.write(
                ":tproxy:\n"
                "- :service_port: 5030\n"
                "  :remote_addr: 10.11.12.13\n"
                "  :remote_port: 5030\n"
                "  :networks: [net1]\n"
            )
        self.paths = Paths(self.config, tmp, tmp)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def mesh_step(self, name: str) -> Any:
        def step(paths: Paths) -> int:
            self.mesh.append(name)
            return self.mesh_rc[name]

        return step

    def run_cmd(self, name: str, *argv: str) -> int:
        parser = argparse.ArgumentParser()
        command.add_arguments(name, parser)
        return command.run(name, parser.parse_args(list(argv)), self.paths)

    def test_up(self) -> None:
        """up writes the applicable map, then starts and reloads the mesh."""
        self.assertEqual(self.run_cmd("up", "br0", "--network", "net1"), 0)
        self.assertEqual(self.nft.maps, {"br0": {5030: Destination("10.11.12.13", 5030)}})
        self.assertEqual(self.mesh, ["start", "reload"])
        self.assertTrue(self.net.closed)

    def test_nothing_applies(self) -> None:
        """With no applicable endpoint up changes nothing, calls no mesh, exits 0."""
        self.assertEqual(self.run_cmd("up", "br0", "--network", "other"), 0)
        self.assertEqual((self.net.ops, self.nft.ops, self.mesh), ([], [], []))

    def test_invalid_config(self) -> None:
        """An invalid config file is exit 1 with nothing changed."""
        with open(self.config, "w") as f:
            f.write(":tproxy: [\n")
        self.assertEqual(self.run_cmd("up", "br0", "--network", "net1"), 1)
        self.assertEqual((self.net.ops, self.nft.ops, self.mesh), ([], [], []))

    def test_bad_name(self) -> None:
        """A bad bridge name is exit 1 before the config is read."""
        self.assertEqual(self.run_cmd("up", "x" * 15), 1)
        self.assertEqual(self.run_cmd("down", "a b"), 1)
        self.assertIn("one-tproxy up: error: bridge name 'xxxxxxxxxxxxxxx'", self.stderr.getvalue())
        self.assertIn("one-tproxy down: error: bridge name 'a b'", self.stderr.getvalue())

    def test_driver_error(self) -> None:
        """A state up cannot fix is exit 1, and the mesh is not touched."""
        self.net.add("br0b", "bridge")
        self.assertEqual(self.run_cmd("up", "br0", "--network-id", "net1"), 1)
        self.assertEqual(self.mesh, [])
        self.net.fail_on = "delete_link"
        self.net.links[None]["br0b"].kind = "veth"
        self.assertEqual(self.run_cmd("down", "br0"), 1)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [
                "one-tproxy up: error: br0b exists but is not a veth (kind bridge); "
                "remove it first",
                "one-tproxy down: error: down br0: fake delete_link: Device or resource busy",
            ],
        )

    def test_mesh_failure_reported(self) -> None:
        """When the mesh fails after the state is built, its exit status is returned."""
        self.mesh_rc["start"] = 2
        self.assertEqual(self.run_cmd("up", "br0", "--network", "net1"), 2)
        self.assertEqual(self.mesh, ["start"])
        self.assertIn("br0", self.nft.maps)

    def test_state_only(self) -> None:
        """--state-only changes the state without calling the mesh."""
        self.assertEqual(self.run_cmd("up", "br0", "--network", "net1", "--state-only"), 0)
        self.assertEqual(self.run_cmd("down", "br0", "--state-only"), 0)
        self.assertEqual(self.mesh, [])
        self.assertEqual(self.nft.maps, {})

    def test_down(self) -> None:
        """down removes the state, then reloads the mesh; the reload's status is returned."""
        self.run_cmd("up", "br0", "--network", "net1", "-v")
        self.mesh.clear()
        self.mesh_rc["reload"] = 3
        self.assertEqual(self.run_cmd("down", "br0"), 3)
        self.assertEqual(self.mesh, ["reload"])
        self.assertEqual(self.nft.maps, {})
        self.assertIn(
            "one-tproxy: info: up br0: created veth pair br0b/br0a", self.stderr.getvalue()
        )


class NetlinkErrorTests(TestCase):
    """Error mapping of the netlink edge (pure parts)."""

    def test_error_for(self) -> None:
        """errno values map to our exception classes, with what was being done."""
        e = driver.NetlinkError("x", errno.EIO)
        self.assertIn("x:", str(e))
        from tproxy import netlink

        self.assertIsInstance(netlink.error_for("look", errno.ENODEV), NotFoundError)
        self.assertIsInstance(netlink.error_for("make", errno.EEXIST), netlink.ExistsError)
        self.assertIsInstance(netlink.error_for("a", errno.EPERM), netlink.NotPermittedError)
        self.assertIsInstance(netlink.error_for("a", errno.EOPNOTSUPP), netlink.NotSupportedError)
        self.assertIs(type(netlink.error_for("a", errno.EIO)), NetlinkError)

    def test_sysctl_path(self) -> None:
        """sysctl keys become /proc/sys paths; anything path-like is refused."""
        from tproxy import netlink

        self.assertEqual(
            netlink.sysctl_path("net.ipv4.conf.all.arp_ignore"),
            "/proc/sys/net/ipv4/conf/all/arp_ignore",
        )
        for bad in ("net/../x", "net..x", "", "net"):
            self.assertRaises(ValueError, netlink.sysctl_path, bad)
