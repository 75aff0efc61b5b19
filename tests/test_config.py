"""Tests for tproxy.config: every rule of DESIGN.md 2.1 and the optional limits."""

from __future__ import annotations

import os
import textwrap

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.trial import unittest

from tproxy import config
from tproxy.config import (
    Config,
    ConfigError,
    Endpoint,
    Limits,
    ResolveError,
    load_config,
    log_level,
    parse_config,
)
from tproxy.model import Destination

from .logcapture import Captured

SAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "OpenNebulaNetwork.conf"
)


def parse(text: str) -> Config:
    """Parse dedented YAML as the file ``/etc/test.conf``."""
    return parse_config(textwrap.dedent(text).encode(), "/etc/test.conf")


def no_resolve(host: str) -> str:
    """A resolver that fails the test when called."""
    raise AssertionError(f"resolver called for {host!r}")


def entry(port: object, addr: object = "10.0.0.1", rport: object = 80, extra: str = "") -> str:
    """One ``:tproxy:`` list item in block style."""
    return f"- :service_port: {port}\n  :remote_addr: {addr}\n  :remote_port: {rport}\n" + extra


class SampleFileTests(unittest.TestCase):
    """The sample file shipped in docs/."""

    def test_sample_loads(self) -> None:
        """The sample has debug level 2 and its two endpoints, in order, with lines."""
        cfg = load_config(SAMPLE)
        self.assertEqual(cfg.path, SAMPLE)
        self.assertEqual(cfg.debug_level, 2)
        self.assertEqual(cfg.log_level, LogLevel.info)
        self.assertEqual(cfg.limits, Limits())
        self.assertEqual(
            cfg.endpoints,
            (
                Endpoint(1, 5030, "10.11.12.13", 5030, (), line=6),
                Endpoint(2, 1234, "10.11.12.34", 1234, ("vnet_name_or_id", "3"), line=10),
            ),
        )

    def test_sample_applicable(self) -> None:
        """OneGate applies everywhere; the custom service by name or by numeric id."""
        cfg = load_config(SAMPLE)
        onegate = {5030: Destination("10.11.12.13", 5030)}
        both = {**onegate, 1234: Destination("10.11.12.34", 1234)}
        self.assertEqual(cfg.applicable(resolve=no_resolve), onegate)
        self.assertEqual(cfg.applicable("vnet_name_or_id", resolve=no_resolve), both)
        self.assertEqual(cfg.applicable(network_id="3", resolve=no_resolve), both)
        self.assertEqual(cfg.applicable("other", "4", resolve=no_resolve), onegate)


class KeysTests(unittest.TestCase):
    """Ruby-symbol keys and keys that are not ours."""

    def test_ruby_symbol_keys(self) -> None:
        """``:tproxy:`` and ``:service_port:`` are read as YAML gives them (":tproxy")."""
        cfg = parse(":tproxy:\n" + entry(5030, "10.11.12.13", 5030))
        self.assertEqual(cfg.applicable(), {5030: Destination("10.11.12.13", 5030)})

    def test_plain_keys_are_not_ours(self) -> None:
        """``tproxy:`` without the colon is an unknown key, so there are no endpoints."""
        cfg = parse(
            """\
            tproxy:
            - service_port: 5030
              remote_addr: 10.0.0.1
              remote_port: 5030
            """
        )
        self.assertEqual(cfg.endpoints, ())

    def test_other_opennebula_keys_ignored(self) -> None:
        """A full OpenNebulaNetwork.conf with other settings is read without complaint."""
        seen = Captured(self, "tproxy.config")
        cfg = parse(
            """\
            # Other OpenNebula network settings
            :whitelisted_options: [a, b]
            :ipset_maxelem: 65536
            :keep_empty_bridge: false
            :bridge_conf:
              :stp_state: 0
            :ovs_bridge_conf: {}
            :ip_bridge_conf: ~
            :validate_vlan_id: false
            :tproxy_debug_level: 3
            :tproxy:
            - :service_port: 5030
              :remote_addr: 10.11.12.13
              :remote_port: 5030
              :comment: unknown entry keys are ignored too
            """
        )
        self.assertEqual(cfg.debug_level, 3)
        self.assertEqual(cfg.applicable(), {5030: Destination("10.11.12.13", 5030)})
        self.assertEqual(seen.messages(None), [])


class NetworksTests(unittest.TestCase):
    """Which entries apply to which network."""

    def test_missing_empty_or_null_applies_everywhere(self) -> None:
        """No ``:networks:``, ``[]`` and null apply to every network and to none given."""
        cfg = parse(
            ":tproxy:\n"
            + entry(1)
            + entry(2, extra="  :networks: []\n")
            + entry(3, extra="  :networks:\n")
        )
        for args in [(), ("net",), (None, "7"), ("net", "7")]:
            self.assertEqual(list(cfg.applicable(*args, resolve=no_resolve)), [1, 2, 3])

    def test_name_match(self) -> None:
        """An entry limited by name applies only to that network name."""
        cfg = parse(":tproxy:\n" + entry(1, extra="  :networks: [blue, green]\n"))
        self.assertEqual(list(cfg.applicable("green")), [1])
        self.assertEqual(list(cfg.applicable("red")), [])
        self.assertEqual(list(cfg.applicable("gree")), [])

    def test_numeric_and_string_ids(self) -> None:
        """Ids written as YAML ints or strings match the id compared as a string."""
        cfg = parse(
            ":tproxy:\n"
            + entry(1, extra="  :networks: [3]\n")
            + entry(2, extra="  :networks: ['7']\n")
        )
        self.assertEqual(list(cfg.applicable(network_id="3")), [1])
        self.assertEqual(list(cfg.applicable(network_id="7")), [2])
        self.assertEqual(list(cfg.applicable(network_id="37")), [])
        # A name that happens to look like an id matches the written id, too.
        self.assertEqual(list(cfg.applicable("7")), [2])

    def test_name_or_id(self) -> None:
        """Name and id together: either one matching is enough."""
        cfg = parse(
            ":tproxy:\n"
            + entry(1, extra="  :networks: [blue]\n")
            + entry(2, extra="  :networks: [5]\n")
        )
        self.assertEqual(list(cfg.applicable("blue", "5")), [1, 2])
        self.assertEqual(list(cfg.applicable("blue", "6")), [1])
        self.assertEqual(list(cfg.applicable("red", "5")), [2])

    def test_neither_option_only_unrestricted(self) -> None:
        """With neither name nor id only entries without ``:networks:`` apply (DESIGN 2.3)."""
        cfg = parse(":tproxy:\n" + entry(1, extra="  :networks: [blue]\n") + entry(2))
        self.assertEqual(list(cfg.applicable()), [2])

    def test_scalar_networks(self) -> None:
        """A single name or id written without a list counts as a list of one."""
        cfg = parse(
            ":tproxy:\n"
            + entry(1, extra="  :networks: blue\n")
            + entry(2, extra="  :networks: 9\n")
        )
        self.assertEqual(cfg.endpoints[0].networks, ("blue",))
        self.assertEqual(list(cfg.applicable("blue", "9")), [1, 2])

    def test_bad_network_item_skips_entry(self) -> None:
        """A network item that is neither a name nor an id skips the entry with a warning."""
        seen = Captured(self, "tproxy.config")
        cfg = parse(
            ":tproxy:\n"
            + entry(1, extra="  :networks: [{a: 1}]\n")
            + entry(2, extra="  :networks: [true]\n")
        )
        self.assertEqual(cfg.endpoints, ())
        msgs = seen.messages()
        self.assertEqual(len(msgs), 2)
        self.assertIn("entry 1 (line 2) skipped: :networks: item", msgs[0])
        self.assertIn("entry 2 (line 6) skipped: :networks: item True", msgs[1])

    def test_applies_to(self) -> None:
        """Endpoint.applies_to compares ids as strings."""
        ep = Endpoint(1, 80, "10.0.0.1", 80, ("4",))
        self.assertTrue(ep.applies_to(network_id="4"))
        self.assertTrue(ep.applies_to(network_id=4))  # type: ignore[arg-type]
        self.assertFalse(ep.applies_to())
        self.assertTrue(Endpoint(1, 80, "10.0.0.1", 80).applies_to())


class DuplicateTests(unittest.TestCase):
    """Duplicate service ports: the first applicable entry wins."""

    def test_first_wins_with_warning_naming_both(self) -> None:
        """A later entry with the same service port is ignored and both are named."""
        seen = Captured(self, "tproxy.config")
        cfg = parse(":tproxy:\n" + entry(80, "10.0.0.1") + entry(81) + entry(80, "10.0.0.2"))
        self.assertEqual(
            cfg.applicable(),
            {80: Destination("10.0.0.1", 80), 81: Destination("10.0.0.1", 80)},
        )
        self.assertEqual(
            seen.messages(),
            [
                "/etc/test.conf: :tproxy: entry 3 (line 8) ignored: service port 80 "
                "is already used by entry 1 (line 2)"
            ],
        )

    def test_only_applicable_entries_count(self) -> None:
        """Entries for other networks do not claim their port."""
        seen = Captured(self, "tproxy.config")
        cfg = parse(
            ":tproxy:\n"
            + entry(80, "10.0.0.1", extra="  :networks: [blue]\n")
            + entry(80, "10.0.0.2", extra="  :networks: [red]\n")
            + entry(80, "10.0.0.3")
        )
        self.assertEqual(cfg.applicable("red"), {80: Destination("10.0.0.2", 80)})
        self.assertEqual(len(seen.messages()), 1)
        self.assertIn("entry 3 (line 10) ignored", seen.messages()[0])
        self.assertIn("entry 2 (line 6)", seen.messages()[0])
        seen.clear()
        self.assertEqual(cfg.applicable("blue"), {80: Destination("10.0.0.1", 80)})
        self.assertEqual(cfg.applicable("green"), {80: Destination("10.0.0.3", 80)})
        self.assertEqual(cfg.applicable(), {80: Destination("10.0.0.3", 80)})
        self.assertEqual(len(seen.messages()), 1)  # only for "blue"

    def test_invalid_entries_do_not_claim(self) -> None:
        """A skipped invalid entry does not claim its service port."""
        cfg = parse(":tproxy:\n" + entry(80, rport=0) + entry(80, "10.0.0.2"))
        self.assertEqual(cfg.applicable(), {80: Destination("10.0.0.2", 80)})

    def test_unresolvable_first_still_claims(self) -> None:
        """The first entry keeps its port even when its host name does not resolve."""
        seen = Captured(self, "tproxy.config")

        def resolve(host: str) -> str:
            raise ResolveError("no such name")

        cfg = parse(":tproxy:\n" + entry(80, "gone.example") + entry(80, "10.0.0.2"))
        self.assertEqual(cfg.applicable(resolve=resolve), {})
        self.assertEqual(len(seen.messages()), 2)

    def test_same_port_different_backends_per_network(self) -> None:
        """One service port may go to different backends on different networks."""
        cfg = parse(
            ":tproxy:\n"
            + entry(5030, "10.0.0.1", extra="  :networks: [0]\n")
            + entry(5030, "10.0.0.2", extra="  :networks: [1]\n")
        )
        self.assertEqual(cfg.applicable(network_id="0")[5030].addr, "10.0.0.1")
        self.assertEqual(cfg.applicable(network_id="1")[5030].addr, "10.0.0.2")


class EntryValidationTests(unittest.TestCase):
    """Invalid entries are skipped with a warning naming the entry and the reason."""

    def setUp(self) -> None:
        self.seen = Captured(self, "tproxy.config")

    def assertSkipped(self, text: str, *fragments: str) -> None:
        """Parsing ``:tproxy:`` + text skips entry 1 with one warning holding fragments."""
        seen = self.seen
        seen.clear()
        cfg = parse(":tproxy:\n" + text)
        self.assertEqual(cfg.endpoints, ())
        msgs = seen.messages()
        self.assertEqual(len(msgs), 1, msgs)
        self.assertIn("/etc/test.conf: :tproxy: entry 1 (line 2) skipped: ", msgs[0])
        for fragment in fragments:
            self.assertIn(fragment, msgs[0])

    def test_missing_keys(self) -> None:
        """Each of the three keys is required; the warning names the missing ones."""
        self.assertSkipped(
            "- :remote_addr: 10.0.0.1\n  :remote_port: 80\n", "missing :service_port:"
        )
        self.assertSkipped("- :service_port: 80\n  :remote_port: 80\n", "missing :remote_addr:")
        self.assertSkipped(
            "- :service_port: 80\n  :remote_addr: 10.0.0.1\n", "missing :remote_port:"
        )
        self.assertSkipped(
            "- :networks: [a]\n", "missing :service_port:, :remote_addr:, :remote_port:"
        )

    def test_not_a_mapping(self) -> None:
        """An item that is a number, a string or a list is skipped."""
        self.assertSkipped("- 5030\n", "it is a number")
        self.assertSkipped("- onegate\n", "it is a string")
        self.assertSkipped("- [5030]\n", "it is a list")
        self.assertSkipped("- \n", "it is a null")

    def test_bad_ports(self) -> None:
        """Ports out of range, floats, booleans and other strings are refused."""
        for bad in [
            "0",
            "65536",
            "-1",
            "1.5",
            "true",
            "abc",
            "'05030'",
            "''",
            "'+80'",
            "[80]",
            "'5030.0'",
        ]:
            self.assertSkipped(entry(bad), ":service_port: ", "is not an integer port in 1-65535")
            self.assertSkipped(entry(80, rport=bad), ":remote_port: ")

    def test_ports_as_strings(self) -> None:
        """Decimal strings count as that integer, as in OpenNebula."""
        cfg = parse(":tproxy:\n" + entry("'5030'", rport='"8080"') + entry("' 81 '", rport=65535))
        self.assertEqual(
            cfg.applicable(),
            {5030: Destination("10.0.0.1", 8080), 81: Destination("10.0.0.1", 65535)},
        )

    def test_bad_remote_addr(self) -> None:
        """Addresses that are neither IPv4 nor a host name are refused at load time."""
        for bad in [
            "''",
            "5",
            "10.1.2.300",
            "'a b'",
            "'::1'",
            "-bad.example",
            "a..b",
            "[10.0.0.1]",
            "x" * 64,
        ]:
            self.assertSkipped(entry(80, bad), ":remote_addr: ", "IPv4 address or a host name")

    def test_index_counts_invalid_entries(self) -> None:
        """Entry numbers are positions in the list, counting skipped entries too."""
        seen = self.seen
        cfg = parse(":tproxy:\n" + entry(80, rport=0) + entry(81) + entry("x"))
        self.assertEqual([(e.index, e.line) for e in cfg.endpoints], [(2, 5)])
        self.assertEqual(
            [m.split(" skipped")[0] for m in seen.messages()],
            [
                "/etc/test.conf: :tproxy: entry 1 (line 2)",
                "/etc/test.conf: :tproxy: entry 3 (line 8)",
            ],
        )
        self.assertEqual(cfg.endpoints[0].label, "entry 2 (line 5)")

    def test_flow_style_list(self) -> None:
        """Entries written in flow style work (quoted keys) and get line numbers too."""
        cfg = parse(
            """\
            :tproxy: [{":service_port": 80, ":remote_addr": 10.0.0.1, ":remote_port": 8080}]
            """
        )
        self.assertEqual(cfg.endpoints, (Endpoint(1, 80, "10.0.0.1", 8080, (), line=1),))


class ResolveTests(unittest.TestCase):
    """Host names in ``:remote_addr:``."""

    def test_localhost(self) -> None:
        """``localhost`` resolves to 127.0.0.1 with the real resolver."""
        cfg = parse(":tproxy:\n" + entry(80, "localhost", 8080))
        self.assertEqual(cfg.applicable(), {80: Destination("127.0.0.1", 8080)})

    def test_resolve_ipv4(self) -> None:
        """The default resolver returns IPv4 and raises ResolveError on failure."""
        self.assertEqual(config.resolve_ipv4("localhost"), "127.0.0.1")
        self.assertEqual(config.resolve_ipv4("10.1.2.3"), "10.1.2.3")
        self.assertRaises(ResolveError, config.resolve_ipv4, "no-such-host.invalid")
        self.assertRaises(ResolveError, config.resolve_ipv4, "a" * 300)

    def test_literals_not_resolved_and_names_once(self) -> None:
        """IPv4 literals never reach the resolver; each name is resolved once per call."""
        calls: list[str] = []

        def resolve(host: str) -> str:
            calls.append(host)
            return "192.0.2.7"

        cfg = parse(
            ":tproxy:\n"
            + entry(1, "10.0.0.1")
            + entry(2, "onegate.example.")
            + entry(3, "onegate.example.")
        )
        self.assertEqual(
            cfg.applicable(resolve=resolve),
            {
                1: Destination("10.0.0.1", 80),
                2: Destination("192.0.2.7", 80),
                3: Destination("192.0.2.7", 80),
            },
        )
        self.assertEqual(calls, ["onegate.example."])

    def test_unresolvable_skipped(self) -> None:
        """A name that does not resolve (or not to IPv4) is skipped with a warning."""
        seen = Captured(self, "tproxy.config")
        answers: dict[str, object] = {
            "a.example": ResolveError("Name or service not known"),
            "b.example": OSError("network down"),
            "c.example": "::1",
            "d.example": "192.0.2.4",
        }

        def resolve(host: str) -> str:
            answer = answers[host]
            if isinstance(answer, Exception):
                raise answer
            return str(answer)

        cfg = parse(
            ":tproxy:\n"
            + entry(1, "a.example")
            + entry(2, "b.example")
            + entry(3, "c.example")
            + entry(4, "d.example")
        )
        self.assertEqual(cfg.applicable(resolve=resolve), {4: Destination("192.0.2.4", 80)})
        msgs = seen.messages()
        self.assertEqual(len(msgs), 3)
        self.assertEqual(
            msgs[0],
            "/etc/test.conf: :tproxy: entry 1 (line 2) skipped: cannot resolve :remote_addr: "
            "'a.example' to IPv4: Name or service not known",
        )
        self.assertIn("entry 2 (line 5) skipped", msgs[1])
        self.assertIn("network down", msgs[1])
        self.assertIn("entry 3 (line 8) skipped", msgs[2])


class DebugLevelTests(unittest.TestCase):
    """``:tproxy_debug_level:``."""

    def test_mapping(self) -> None:
        """0-3 map to ERROR, WARNING, INFO, DEBUG."""
        expected = [LogLevel.error, LogLevel.warn, LogLevel.info, LogLevel.debug]
        for level, want in enumerate(expected):
            self.assertEqual(log_level(level), want)
            cfg = parse(f":tproxy_debug_level: {level}\n")
            self.assertEqual((cfg.debug_level, cfg.log_level), (level, want))

    def test_log_level_refuses_out_of_range(self) -> None:
        """log_level refuses anything but an int 0-3."""
        for bad in [-1, 4, True, "2", 2.0]:
            self.assertRaises(ValueError, log_level, bad)

    def test_default(self) -> None:
        """Without the key the level is 2 (INFO), silently."""
        seen = Captured(self, "tproxy.config")
        self.assertEqual(parse(":other: 1\n").debug_level, 2)
        self.assertEqual(seen.messages(None), [])

    def test_string_level(self) -> None:
        """A decimal string counts as its number."""
        self.assertEqual(parse(":tproxy_debug_level: '3'\n").debug_level, 3)

    def test_invalid_warns_and_uses_info(self) -> None:
        """Out of range, boolean, float or text: a warning and INFO."""
        seen = Captured(self, "tproxy.config")
        for bad in ["4", "-1", "true", "1.5", "debug", "~", "[1]"]:
            seen.clear()
            self.assertEqual(parse(f":tproxy_debug_level: {bad}\n").debug_level, 2)
            msgs = seen.messages()
            self.assertEqual(len(msgs), 1, bad)
            self.assertIn(":tproxy_debug_level: ", msgs[0])
            self.assertIn("is not 0-3; using 2 (INFO)", msgs[0])


class LimitsTests(unittest.TestCase):
    """The optional limit keys."""

    def test_defaults(self) -> None:
        """Without the keys: 10000 per bridge, 1000 per guest, 5 s, no idle timeout, 10 s,
        a 1 MiB stream window."""
        self.assertEqual(
            parse("{}\n").limits,
            Limits(
                max_streams_per_bridge=10000,
                max_streams_per_guest=1000,
                connect_timeout=5.0,
                idle_timeout=None,
                grace_period=10.0,
                stream_window=1048576,
            ),
        )

    def test_values(self) -> None:
        """Every key sets its limit; numbers may be strings."""
        cfg = parse(
            """\
            :tproxy_max_connections: 500
            :tproxy_max_connections_per_guest: '20'
            :tproxy_connect_timeout: 2.5
            :tproxy_idle_timeout: 600
            :tproxy_grace_period: 0
            :tproxy_stream_window: 256
            """
        )
        self.assertEqual(cfg.limits, Limits(500, 20, 2.5, 600.0, 0.0, 262144))

    def test_stream_window_bounds(self) -> None:
        """The window is whole KiB from 16 to 65536, also as a string."""
        for kib in ("16", "'4096'", "65536"):
            window = parse(f":tproxy_stream_window: {kib}\n").limits.stream_window
            self.assertEqual(window, int(kib.strip("'")) * 1024)

    def test_idle_off(self) -> None:
        """0, off (YAML false) and null switch the idle timeout off."""
        for off in ["0", "off", "false", "~"]:
            self.assertIsNone(parse(f":tproxy_idle_timeout: {off}\n").limits.idle_timeout)

    def test_invalid_values_warn_and_default(self) -> None:
        """A bad value gives a warning naming the key and the default is used."""
        bad = {
            ":tproxy_max_connections": ["0", "-5", "1.5", "many", "true", "[1]", "1" + "0" * 400],
            ":tproxy_max_connections_per_guest": ["0", "x"],
            ":tproxy_connect_timeout": ["0", "-1", ".nan", ".inf", "soon", "true"],
            ":tproxy_idle_timeout": ["-1", "true", "later", ".inf"],
            ":tproxy_grace_period": ["-1", "x", "on"],
            ":tproxy_stream_window": ["15", "65537", "0", "1.5", "1m", "true", "~"],
        }
        seen = Captured(self, "tproxy.config")
        for key, values in bad.items():
            for value in values:
                seen.clear()
                self.assertEqual(parse(f"{key}: {value}\n").limits, Limits(), (key, value))
                msgs = seen.messages()
                self.assertEqual(len(msgs), 1, (key, value))
                self.assertIn(f"/etc/test.conf: {key}: ", msgs[0])
                self.assertIn("using the default", msgs[0])


class FileErrorTests(unittest.TestCase):
    """Files that cannot be used at all raise ConfigError with one line naming the file."""

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertConfigError(self, path: str, *fragments: str) -> ConfigError:
        e = self.assertRaises(ConfigError, load_config, path)
        text = str(e)
        self.assertTrue(text.startswith(path), text)
        self.assertNotIn("\n", text)
        for fragment in fragments:
            self.assertIn(fragment, text)
        return e

    def test_missing_file(self) -> None:
        """A missing file names the file and the reason."""
        path = os.path.join(self.mktemp(), "nope.conf")
        e = self.assertConfigError(path, "cannot read", "No such file or directory")
        self.assertIsNone(e.line)
        self.assertEqual(e.path, path)

    def test_directory(self) -> None:
        """A directory instead of a file is unreadable."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertConfigError(path, "cannot read", "Is a directory")

    def test_not_yaml_with_line(self) -> None:
        """Broken YAML names the line where YAML found the problem."""
        path = self.write(b":tproxy_debug_level: 2\n:tproxy:\n- :service_port: [5030\n  :x: 1\n")
        e = self.assertConfigError(path, "not valid YAML")
        self.assertEqual(e.line, 4)
        self.assertTrue(str(e).startswith(f"{path}, line 4: not valid YAML: "), str(e))

    def test_tab_indentation(self) -> None:
        """A tab in the indentation is a YAML error with its line."""
        path = self.write(b":tproxy:\n- :service_port: 80\n\t:remote_addr: x\n")
        self.assertEqual(self.assertConfigError(path, "not valid YAML").line, 3)

    def test_plain_text(self) -> None:
        """A file of plain text is YAML but not a mapping of settings."""
        path = self.write(b"hello world\n")
        self.assertConfigError(path, "not a YAML mapping", "string")

    def test_top_level_list(self) -> None:
        """A list at the top is an error."""
        path = self.write(b"- :service_port: 80\n")
        self.assertConfigError(path, "line 1", "not a YAML mapping", "list")

    def test_binary(self) -> None:
        """Bytes that are not text are an error."""
        self.assertConfigError(self.write(b"\x00\x01\x02\xff"), "not a YAML text file")

    def test_tproxy_mapping(self) -> None:
        """``:tproxy:`` as a mapping instead of a list is an error with its line."""
        path = self.write(b":tproxy_debug_level: 1\n:tproxy:\n  :service_port: 80\n")
        e = self.assertConfigError(path, ":tproxy: must be a list of endpoints, not a mapping")
        self.assertEqual(e.line, 3)
        self.assertEqual(
            str(e), f"{path}, line 3: :tproxy: must be a list of endpoints, not a mapping"
        )

    def test_tproxy_scalar(self) -> None:
        """``:tproxy:`` as a string or a number is an error."""
        self.assertConfigError(self.write(b":tproxy: onegate\n"), "line 1", "not a string")
        self.assertConfigError(self.write(b":tproxy: 5030\n"), "not a number")

    def test_valid_without_endpoints(self) -> None:
        """An empty file, one without ``:tproxy:`` and an empty ``:tproxy:`` are valid."""
        for data in [b"", b"# only a comment\n", b":other: 1\n", b":tproxy:\n", b":tproxy: []\n"]:
            cfg = load_config(self.write(data))
            self.assertEqual((cfg.endpoints, cfg.applicable()), ((), {}))

    def test_nested_too_deeply(self) -> None:
        """A pathologically nested document is an error, not a crash."""
        path = self.write(b":tproxy: " + b"[" * 5000 + b"]" * 5000 + b"\n")
        self.assertConfigError(path, "nested too deeply")

    def test_several_documents(self) -> None:
        """A file with several YAML documents is an error with the line of the second."""
        path = self.write(b":a: 1\n---\n:b: 2\n")
        self.assertEqual(self.assertConfigError(path, "not valid YAML").line, 2)

    def test_python_tags_refused(self) -> None:
        """Tags that would build Python objects are refused (safe loading)."""
        path = self.write(b":tproxy: !!python/object/apply:os.system ['true']\n")
        self.assertConfigError(path, "line 1", "not valid YAML")

    def test_one_line_message(self) -> None:
        """ConfigError's text folds whitespace into one line."""
        e = ConfigError("/f", "a\nb\n  c", 3)
        self.assertEqual(str(e), "/f, line 3: a b c")
        self.assertEqual((e.path, e.reason, e.line), ("/f", "a\nb\n  c", 3))

    def test_utf8_with_names(self) -> None:
        """UTF-8 text (e.g. a network name) is read."""
        cfg = load_config(
            self.write(b":tproxy:\n" + entry(80, extra="  :networks: [réseau]\n").encode())
        )
        self.assertEqual(list(cfg.applicable("réseau")), [80])


# -- robustness: whatever the file holds, the loader answers Config or ConfigError -----------

_KEYS = [
    ":tproxy",
    ":tproxy_debug_level",
    ":tproxy_max_connections",
    ":tproxy_max_connections_per_guest",
    ":tproxy_connect_timeout",
    ":tproxy_idle_timeout",
    ":tproxy_grace_period",
    ":tproxy_stream_window",
    ":service_port",
    ":remote_addr",
    ":remote_port",
    ":networks",
    "other",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["5030", " 80 ", "localhost", "10.0.0.1", "a.example", "0", "3"]),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS), children, max_size=5),
    ),
    max_leaves=20,
)


def _fake_resolve(host: str) -> str:
    if host.startswith("a"):
        raise ResolveError("no")
    return "192.0.2.1"


class RobustnessTests(unittest.TestCase):
    """Arbitrary documents and bytes never make the loader fail in another way."""

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=8))
    def test_any_document(self, document: dict[str, object]) -> None:
        """Any YAML mapping gives a Config or a ConfigError, and applicable() never raises."""
        text = yaml.safe_dump(document)
        try:
            cfg = parse_config(text, "/f")
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
            return
        self.assertIn(cfg.debug_level, range(4))
        for network, network_id in [(None, None), ("a", "3"), ("other", "0")]:
            service_map = cfg.applicable(network, network_id, resolve=_fake_resolve)
            for port, dest in service_map.items():
                self.assertTrue(1 <= port <= 65535)
                self.assertIsInstance(dest, Destination)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        """Any bytes give a Config or a one-line ConfigError."""
        try:
            parse_config(data, "/f")
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
