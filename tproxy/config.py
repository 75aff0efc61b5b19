"""The configuration file (DESIGN.md 2.1): its model, its loader and its rules.

Theory of operation: ``load_config`` reads the YAML file once and turns it into
a frozen ``Config``. Problems with the *file* (unreadable, not YAML, not a
mapping, ``:tproxy:`` not a list) raise ``ConfigError`` with one line naming
the file and, where YAML gives one, the line. Problems with *one entry* or one
optional setting never fail the load: the entry is skipped (or the setting takes
its default) with a warning through ``twisted.logger``, so that one typo cannot
take every service down.

Which entries apply depends on the virtual network, so ``Config.applicable``
picks them per network, drops duplicate service ports (first applicable entry
wins) and resolves host names to IPv4 through an injectable resolver. The keys
are written Ruby-symbol style (``:tproxy:``), which YAML reads as strings that
start with a colon (``":tproxy"``); unknown keys are ignored because the file is
shared with the rest of OpenNebula's network settings. ``docs/configuration.md``
describes every key for administrators.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from attrs import frozen
from twisted.logger import Logger, LogLevel

from tproxy.model import Destination

log = Logger()

#: Keys of the file, as YAML reads ``:key:`` (a string starting with a colon).
KEY_ENDPOINTS = ":tproxy"
KEY_DEBUG_LEVEL = ":tproxy_debug_level"
KEY_MAX_CONNECTIONS = ":tproxy_max_connections"
KEY_MAX_CONNECTIONS_PER_GUEST = ":tproxy_max_connections_per_guest"
KEY_CONNECT_TIMEOUT = ":tproxy_connect_timeout"
KEY_IDLE_TIMEOUT = ":tproxy_idle_timeout"
KEY_GRACE_PERIOD = ":tproxy_grace_period"
KEY_STREAM_WINDOW = ":tproxy_stream_window"

#: Bounds of ``:tproxy_stream_window:``, in KiB (16 KiB .. 64 MiB).
STREAM_WINDOW_KIB = (16, 65536)

#: Keys of one ``:tproxy:`` entry.
KEY_SERVICE_PORT = ":service_port"
KEY_REMOTE_ADDR = ":remote_addr"
KEY_REMOTE_PORT = ":remote_port"
KEY_NETWORKS = ":networks"

#: ``:tproxy_debug_level:`` when the file does not set it (or sets it wrongly).
DEFAULT_DEBUG_LEVEL = 2

_LEVELS = (LogLevel.error, LogLevel.warn, LogLevel.info, LogLevel.debug)

_DECIMAL_RE = re.compile(r"[1-9][0-9]*|0")
_NUMERIC_DOTTED_RE = re.compile(r"[0-9.]+")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


class ConfigError(Exception):
    """The configuration file cannot be used at all; ``str()`` is one line naming the file."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        self.path = path
        """The file."""
        self.reason = reason
        """What is wrong, one line."""
        self.line = line
        """1-based line of the problem, when YAML tells."""
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {_one_line(reason)}")


class ResolveError(Exception):
    """A host name that does not resolve to an IPv4 address."""


def log_level(debug_level: int) -> LogLevel:
    """``:tproxy_debug_level:`` 0-3 as the twisted.logger level: ERROR, WARNING, INFO, DEBUG."""
    if isinstance(debug_level, bool) or not isinstance(debug_level, int):
        raise ValueError(f"debug level {debug_level!r} is not an integer")
    if not 0 <= debug_level < len(_LEVELS):
        raise ValueError(f"debug level {debug_level!r} is not in 0-3")
    return _LEVELS[debug_level]


def resolve_ipv4(host: str) -> str:
    """The first IPv4 address of ``host`` (an address stays itself); ResolveError if none."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ResolveError(reason) from e
    for _family, _type, _proto, _canon, sockaddr in infos:
        return str(sockaddr[0])
    raise ResolveError("no IPv4 address")


@frozen
class Limits:
    """Resource limits of the proxies; each one comes from an optional key of the file."""

    max_streams_per_bridge: int = 10000
    """``:tproxy_max_connections:`` - concurrent streams of one bridge (inner proxy)."""
    max_streams_per_guest: int = 1000
    """``:tproxy_max_connections_per_guest:`` - concurrent streams from one guest address."""
    connect_timeout: float = 5.0
    """``:tproxy_connect_timeout:`` - seconds the root waits for a remote connection."""
    idle_timeout: float | None = None
    """``:tproxy_idle_timeout:`` - seconds without data before a stream is closed; None = off."""
    grace_period: float = 10.0
    """``:tproxy_grace_period:`` - seconds a stop waits for open streams before closing them."""
    stream_window: int = 1048576
    """``:tproxy_stream_window:`` (KiB in the file) - each proxy's initial receive window
    per stream, in bytes: what one stream may have in flight towards a proxy (new links)."""


@frozen
class Endpoint:
    """One valid entry of ``:tproxy:``, as written (host names are not resolved yet)."""

    index: int
    """1-based position in the ``:tproxy:`` list, for messages (invalid entries count too)."""
    service_port: int
    """Port the guests connect to at 169.254.16.9."""
    remote_addr: str
    """IPv4 address or host name of the real service."""
    remote_port: int
    """Port of the real service."""
    networks: tuple[str, ...] = ()
    """Network names or ids (as strings) the entry is limited to; empty = every network."""
    line: int | None = None
    """1-based line of the entry in the file, when known."""

    @property
    def label(self) -> str:
        """How messages name this entry: ``entry 2 (line 9)``."""
        return _entry_label(self.index, self.line)

    def applies_to(self, network: str | None = None, network_id: str | None = None) -> bool:
        """Whether the entry serves the given network (DESIGN.md 2.1/2.3).

        An entry without ``:networks:`` applies to every network, and also when
        neither name nor id is given; a limited entry applies only when the name
        or the id is in its list (compared as strings).
        """
        if not self.networks:
            return True
        return (network is not None and network in self.networks) or (
            network_id is not None and str(network_id) in self.networks
        )


@frozen
class Config:
    """The tproxy part of the configuration file."""

    path: str
    """The file it was read from."""
    debug_level: int = DEFAULT_DEBUG_LEVEL
    """``:tproxy_debug_level:``, 0-3."""
    endpoints: tuple[Endpoint, ...] = ()
    """Every valid ``:tproxy:`` entry, in file order (duplicates included)."""
    limits: Limits = Limits()
    """Resource limits."""

    @property
    def log_level(self) -> LogLevel:
        """The twisted.logger level of ``debug_level``."""
        return log_level(self.debug_level)

    def applicable(
        self,
        network: str | None = None,
        network_id: str | None = None,
        resolve: Callable[[str], str] = resolve_ipv4,
    ) -> dict[int, Destination]:
        """The service map for one network: service port -> destination, in file order.

        Entries that do not apply are left out. An entry whose service port
        repeats an earlier applicable entry is ignored with a warning naming
        both (the first one wins, even when its host name then fails to
        resolve). Host names are resolved with ``resolve`` (which raises
        ``ResolveError`` or ``OSError`` when it cannot), each name once per
        call; an entry whose name does not resolve is left out with a warning.
        """
        result: dict[int, Destination] = {}
        claimed: dict[int, Endpoint] = {}
        resolved: dict[str, str | None] = {}
        for ep in self.endpoints:
            if not ep.applies_to(network, network_id):
                continue
            first = claimed.get(ep.service_port)
            if first is not None:
                log.warn(
                    "{path}: :tproxy: {entry} ignored: "
                    "service port {port} is already used by {first}",
                    path=self.path,
                    entry=ep.label,
                    port=ep.service_port,
                    first=first.label,
                )
                continue
            claimed[ep.service_port] = ep
            addr = _literal_ipv4(ep.remote_addr)
            if addr is None:
                if ep.remote_addr not in resolved:
                    resolved[ep.remote_addr] = self._resolve(ep, resolve)
                addr = resolved[ep.remote_addr]
                if addr is None:
                    continue
            result[ep.service_port] = Destination(addr, ep.remote_port)
        return result

    def _resolve(self, ep: Endpoint, resolve: Callable[[str], str]) -> str | None:
        try:
            addr = resolve(ep.remote_addr)
            ipaddress.IPv4Address(addr)
        except (ResolveError, OSError, ValueError) as e:
            log.warn(
                "{path}: :tproxy: {entry} skipped: "
                "cannot resolve :remote_addr: {host!r} to IPv4: {error}",
                path=self.path,
                entry=ep.label,
                host=ep.remote_addr,
                error=e,
            )
            return None
        return str(addr)


def load_config(path: str) -> Config:
    """Read and check the configuration file; ConfigError if it cannot be used at all."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read the configuration file: {e.strerror or e}")
    return parse_config(data, path)


def parse_config(data: bytes | str, path: str) -> Config:
    """Build a Config from the file's contents; ``path`` only names it in messages."""
    root_node, document = _load_yaml(data, path)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(
            path,
            f"the file is not a YAML mapping of settings (it holds a {_kind(document)})",
            _node_line(root_node),
        )
    entries_node = _value_node(root_node, KEY_ENDPOINTS)
    raw_entries = document.get(KEY_ENDPOINTS)
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise ConfigError(
            path,
            f":tproxy: must be a list of endpoints, not a {_kind(raw_entries)}",
            _node_line(entries_node),
        )
    item_nodes: list[yaml.Node] = []
    if isinstance(entries_node, yaml.SequenceNode):
        item_nodes = list(entries_node.value)
    endpoints = []
    for i, raw in enumerate(raw_entries):
        line = _node_line(item_nodes[i]) if i < len(item_nodes) else None
        ep = _parse_entry(raw, i + 1, line, path)
        if ep is not None:
            endpoints.append(ep)
    return Config(
        path=path,
        debug_level=_parse_debug_level(document, path),
        endpoints=tuple(endpoints),
        limits=_parse_limits(document, path),
    )


#: libyaml's parser when PyYAML has it (same results, far less Python code run).
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(data: bytes | str, path: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the plain data of a YAML document."""
    try:
        loader = _SafeLoader(data)
        try:
            node = loader.get_single_node()
            document = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = e.problem or e.context or "error"
        if "nesting depth" in reason:  # libyaml's words for a RecursionError
            raise ConfigError(path, "not usable YAML: nested too deeply")
        raise ConfigError(
            path, f"not valid YAML: {reason}", mark.line + 1 if mark is not None else None
        )
    except yaml.reader.ReaderError as e:
        raise ConfigError(path, f"not a YAML text file: {e.reason} at byte {e.position}")
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML: {e}")
    except RecursionError:
        raise ConfigError(path, "not usable YAML: nested too deeply")
    return node, document


def _value_node(mapping: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(mapping, yaml.MappingNode):
        return None
    found = None
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            found = value_node  # the last one wins, as when YAML builds the dict
    return found


def _node_line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _entry_label(index: int, line: int | None) -> str:
    return f"entry {index}" + (f" (line {line})" if line is not None else "")


def _parse_entry(raw: object, index: int, line: int | None, path: str) -> Endpoint | None:
    """One ``:tproxy:`` entry, or None (with a warning naming it and why) if it is invalid."""
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"it is a {_kind(raw)}, not a mapping of :service_port: etc.")
        missing = [k for k in (KEY_SERVICE_PORT, KEY_REMOTE_ADDR, KEY_REMOTE_PORT) if k not in raw]
        if missing:
            raise ValueError("missing " + ", ".join(f"{k}:" for k in missing))
        return Endpoint(
            index=index,
            line=line,
            service_port=_port(raw[KEY_SERVICE_PORT], KEY_SERVICE_PORT),
            remote_addr=_host(raw[KEY_REMOTE_ADDR]),
            remote_port=_port(raw[KEY_REMOTE_PORT], KEY_REMOTE_PORT),
            networks=_networks(raw.get(KEY_NETWORKS)),
        )
    except ValueError as e:
        log.warn(
            "{path}: :tproxy: {entry} skipped: {reason}",
            path=path,
            entry=_entry_label(index, line),
            reason=str(e),
        )
        return None


def _port(value: object, key: str) -> int:
    """A TCP port: an int, or a decimal string as OpenNebula accepts, in 1-65535."""
    port: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and _DECIMAL_RE.fullmatch(value.strip()):
        port = int(value.strip())
    if port is None or not 1 <= port <= 65535:
        raise ValueError(f"{key}: {value!r} is not an integer port in 1-65535")
    return port


def _literal_ipv4(value: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def _host(value: object) -> str:
    """An IPv4 address or a host name (checked for shape only; resolved later)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f":remote_addr: {value!r} is not an IPv4 address or a host name")
    host = value.strip()
    if _literal_ipv4(host) is not None:
        return host
    name = host[:-1] if host.endswith(".") else host
    if (
        _NUMERIC_DOTTED_RE.fullmatch(host)
        or len(name) > 253
        or not all(_HOST_LABEL_RE.fullmatch(label) for label in name.split("."))
    ):
        raise ValueError(f":remote_addr: {value!r} is not an IPv4 address or a host name")
    return host


def _networks(value: object) -> tuple[str, ...]:
    """``:networks:``: names and numeric ids, compared as strings; missing/empty = all."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError(f":networks: item {item!r} is not a network name or numeric id")
        out.append(str(item).strip())
    return tuple(out)


def _parse_debug_level(document: Mapping[str, Any], path: str) -> int:
    if KEY_DEBUG_LEVEL not in document:
        return DEFAULT_DEBUG_LEVEL
    value = document[KEY_DEBUG_LEVEL]
    level: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        level = value
    elif isinstance(value, str) and _DECIMAL_RE.fullmatch(value.strip()):
        level = int(value.strip())
    if level is None or not 0 <= level <= 3:
        log.warn(
            "{path}: :tproxy_debug_level: {value!r} is not 0-3; using {default} (INFO)",
            path=path,
            value=value,
            default=DEFAULT_DEBUG_LEVEL,
        )
        return DEFAULT_DEBUG_LEVEL
    return level


def _number(value: object) -> float | None:
    """An int/float (or a string holding one), finite; None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


_INVALID: Any = object()


def _parse_limits(document: Mapping[str, Any], path: str) -> Limits:
    defaults = Limits()

    def setting(key: str, default: Any, check: Callable[[object], Any], rule: str) -> Any:
        if key not in document:
            return default
        value = document[key]
        result = check(value)
        if result is _INVALID:
            log.warn(
                "{path}: {key}: {value!r} is not {rule}; using the default ({default})",
                path=path,
                key=key,
                value=value,
                rule=rule,
                default="off" if default is None else default,
            )
            return default
        return result

    def positive_int(value: object) -> Any:
        number = _number(value)
        if number is None or number != int(number) or number < 1:
            return _INVALID
        return int(number)

    def positive(value: object) -> Any:
        number = _number(value)
        return number if number is not None and number > 0 else _INVALID

    def non_negative(value: object) -> Any:
        number = _number(value)
        return number if number is not None and number >= 0 else _INVALID

    def window_kib(value: object) -> Any:
        number = _number(value)
        low, high = STREAM_WINDOW_KIB
        if number is None or number != int(number) or not low <= number <= high:
            return _INVALID
        return int(number)

    def idle(value: object) -> Any:
        if value is None or value is False:
            return None
        number = _number(value)
        if number is None or number < 0:
            return _INVALID
        return number or None

    return Limits(
        max_streams_per_bridge=setting(
            KEY_MAX_CONNECTIONS,
            defaults.max_streams_per_bridge,
            positive_int,
            "a positive integer",
        ),
        max_streams_per_guest=setting(
            KEY_MAX_CONNECTIONS_PER_GUEST,
            defaults.max_streams_per_guest,
            positive_int,
            "a positive integer",
        ),
        connect_timeout=setting(
            KEY_CONNECT_TIMEOUT,
            defaults.connect_timeout,
            positive,
            "a number of seconds > 0",
        ),
        idle_timeout=setting(
            KEY_IDLE_TIMEOUT,
            defaults.idle_timeout,
            idle,
            "a number of seconds >= 0 (0, off or null: no idle timeout)",
        ),
        grace_period=setting(
            KEY_GRACE_PERIOD,
            defaults.grace_period,
            non_negative,
            "a number of seconds >= 0",
        ),
        stream_window=setting(
            KEY_STREAM_WINDOW,
            defaults.stream_window // 1024,
            window_kib,
            f"a whole number of KiB from {STREAM_WINDOW_KIB[0]} to {STREAM_WINDOW_KIB[1]}",
        )
        * 1024,
    )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {
        dict: "mapping",
        list: "list",
        str: "string",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = [
    "Config",
    "ConfigError",
    "Endpoint",
    "Limits",
    "ResolveError",
    "load_config",
    "log_level",
    "parse_config",
    "resolve_ipv4",
]
