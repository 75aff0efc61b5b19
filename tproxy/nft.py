"""The nftables edge: the only module that talks to libnftables.

It reads the service maps the daemons serve (table ``ip one_tproxy``, one map
``ep_BR`` per bridge) and writes the per-bridge state of DESIGN.md 2.2 for the
driver: the map ``ep_BR`` and, in table ``bridge one_tproxy``, the chain
``ch_BR`` with its one ARP rule, the chain ``guard_BR`` with its
anti-spoofing rule (and the ``tproxy_veths`` set on kernels without
``meta ibrname``).

Theory of operation:

* One :class:`Nftables` wraps one libnftables context. A context opens its
  netlink socket when it is created, so it acts on the network namespace of
  the thread that created it, and it is not thread-safe: one per thread.
* Every change is first compared with what the kernel holds; when nothing
  differs nothing is sent, so a second ``up`` changes nothing at all (not
  even rule handles). Otherwise the change is built as plain JSON and applied
  as ONE ``json_cmd`` batch (one kernel transaction); ``rc != 0`` raises
  :class:`NftError` carrying the batch and libnftables' message.
* One exception to JSON: libnftables 1.0.6's JSON parser cannot declare a map
  whose data is a concatenation (``ipv4_addr . inet_service``; it silently
  creates a plain set instead), so a missing ``ep_BR`` map is created, with its
  elements, by one text transaction built from validated values only.
* A refused rule aborts its whole batch, so the ``meta ibrname`` ARP rule is
  tried in a batch of its own; when the kernel answers "Operation not
  supported" the fallback of DESIGN.md 2.2 is written instead and that is
  logged once per :class:`Nftables`.
* The tables stay while anything is in them and are deleted by
  :meth:`Nftables.remove_bridge` when removing a bridge leaves them empty, so a
  ``down`` after an ``up`` returns the ruleset to exactly its earlier listing.
* Reading never crashes on odd JSON: anything unexpected is logged and skipped.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from attrs import frozen
from twisted.logger import Logger

from tproxy.model import (
    SERVICE_ADDRESS,
    Destination,
    InvalidBridgeNameError,
    check_bridge_name,
)

log = Logger(namespace="tproxy.nft")

#: The table holding the service maps (family ip) and the ARP chains (family bridge).
TABLE = "one_tproxy"
#: Map name prefix: map ``ep_BR`` holds bridge BR's endpoints.
MAP_PREFIX = "ep_"
#: Chain name prefix: chain ``ch_BR`` holds bridge BR's ARP rule.
CHAIN_PREFIX = "ch_"
#: Chain name prefix reserved for the hardening work (anti-spoofing, DESIGN.md 2.2).
GUARD_PREFIX = "guard_"
#: The named set of every ``BRb`` used by the fallback ARP rule.
VETH_SET = "tproxy_veths"
#: The priority of ``priority filter`` in the bridge family.
BRIDGE_FILTER_PRIORITY = -200

_MAP_TYPE = "inet_service"
_MAP_DATA = "ipv4_addr . inet_service"
_NOT_SUPPORTED = "Operation not supported"
_NO_SUCH = "No such file or directory"


class NftError(Exception):
    """libnftables refused a command; carries what was sent and what it answered."""

    def __init__(self, message: str, batch: object = None) -> None:
        self.message = message
        self.batch = batch
        text = message.strip().replace("\n\n", "\n")
        if batch is not None:
            sent = batch if isinstance(batch, str) else json.dumps(batch)
            text = f"{text} (batch: {sent})"
        super().__init__(text)


class ArpRuleForm(enum.Enum):
    """Which of the two ARP rules of DESIGN.md 2.2 a chain ``ch_BR`` holds."""

    IBRNAME = "ibrname"
    """``meta ibrname "BR" oifname != "BRb" ...``: needs CONFIG_NFT_BRIDGE_META."""
    FALLBACK = "fallback"
    """``oifname != @tproxy_veths ...``: works on every kernel."""


class NftContext(Protocol):
    """The part of ``nftables.Nftables`` this module uses (a fake stands in for tests)."""

    def json_cmd(self, json_root: Any) -> tuple[int, Any, str]: ...

    def cmd(self, cmdline: str) -> tuple[int, Any, str]: ...


class NftEdge(Protocol):
    """What the driver needs from nftables; :class:`Nftables` is the real one."""

    def read_service_maps(self) -> dict[str, dict[int, Destination]]: ...

    def write_service_map(self, bridge: str, service_map: Mapping[int, Destination]) -> bool: ...

    def write_arp_rule(self, bridge: str) -> tuple[ArpRuleForm, bool]: ...

    def write_guard(self, bridge: str, form: ArpRuleForm, mac: str | None = None) -> bool: ...

    def remove_bridge(self, bridge: str) -> bool: ...


def default_context() -> NftContext:
    """A fresh libnftables context acting on the calling thread's network namespace."""
    import nftables

    ctx = nftables.Nftables()
    ctx.set_json_output(True)
    ctx.set_handle_output(False)
    return ctx  # type: ignore[no-any-return]


# ---- JSON building (pure functions, unit-tested) -------------------------


def map_name(bridge: str) -> str:
    """The nft map of a bridge's endpoints."""
    return MAP_PREFIX + bridge


def chain_name(bridge: str) -> str:
    """The nft chain of a bridge's ARP rule."""
    return CHAIN_PREFIX + bridge


def veth_outer(bridge: str) -> str:
    """``BRb``: the veth end that is a port of the bridge."""
    return bridge + "b"


def guard_name(bridge: str) -> str:
    """The nft chain of a bridge's anti-spoofing rule."""
    return GUARD_PREFIX + bridge


def _map_ref(bridge: str) -> dict[str, Any]:
    return {"family": "ip", "table": TABLE, "name": map_name(bridge)}


def _chain_ref(bridge: str) -> dict[str, Any]:
    return {"family": "bridge", "table": TABLE, "name": chain_name(bridge)}


def _set_ref() -> dict[str, Any]:
    return {"family": "bridge", "table": TABLE, "name": VETH_SET}


def _elements(service_map: Mapping[int, Destination]) -> list[Any]:
    return [
        [port, {"concat": [dest.addr, dest.port]}] for port, dest in sorted(service_map.items())
    ]


def _check_service_map(service_map: Mapping[int, Destination]) -> None:
    for port, dest in service_map.items():
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"service port {port!r} is not an integer in 1-65535")
        if not isinstance(dest, Destination):
            raise TypeError(f"service port {port}: {dest!r} is not a Destination")
        # Destination validates itself; re-check the address form for the text path.
        ipaddress.IPv4Address(dest.addr)


def create_map_text(bridge: str, service_map: Mapping[int, Destination]) -> str:
    """The text transaction creating table ``ip one_tproxy`` and map ``ep_BR`` with elements.

    Only validated values go in (a checked bridge name, IPv4 addresses, integer
    ports), so no quoting is needed.
    """
    check_bridge_name(bridge)
    _check_service_map(service_map)
    elements = ", ".join(
        f"{port} : {dest.addr} . {dest.port}" for port, dest in sorted(service_map.items())
    )
    body = f"type {_MAP_TYPE} : {_MAP_DATA};"
    if elements:
        body += f" elements = {{ {elements} }};"
    return f"add table ip {TABLE}\nadd map ip {TABLE} {map_name(bridge)} {{ {body} }}\n"


def refill_map_batch(bridge: str, service_map: Mapping[int, Destination]) -> dict[str, Any]:
    """The JSON batch flushing an existing map ``ep_BR`` and adding every element."""
    _check_service_map(service_map)
    cmds: list[Any] = [{"flush": {"map": _map_ref(bridge)}}]
    if service_map:
        cmds.append({"add": {"element": {**_map_ref(bridge), "elem": _elements(service_map)}}})
    return {"nftables": cmds}


def arp_rule_exprs(bridge: str, form: ArpRuleForm) -> list[Any]:
    """The expressions of the ARP rule of DESIGN.md 2.2, in nft's JSON form."""
    tail: list[Any] = [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "arp", "field": "operation"}},
                "right": "request",
            }
        },
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "arp", "field": "daddr ip"}},
                "right": SERVICE_ADDRESS,
            }
        },
        {"drop": None},
    ]
    if form is ArpRuleForm.IBRNAME:
        head: list[Any] = [
            {"match": {"op": "==", "left": {"meta": {"key": "ibrname"}}, "right": bridge}},
            {
                "match": {
                    "op": "!=",
                    "left": {"meta": {"key": "oifname"}},
                    "right": veth_outer(bridge),
                }
            },
        ]
    else:
        head = [
            {
                "match": {
                    "op": "!=",
                    "left": {"meta": {"key": "oifname"}},
                    "right": "@" + VETH_SET,
                }
            }
        ]
    return head + tail


def _bridge_prelude(bridge: str, form: ArpRuleForm) -> list[Any]:
    """Table ``bridge one_tproxy``; for the fallback form also its set ``tproxy_veths``
    holding ``BRb`` (both ARP chains match against it)."""
    cmds: list[Any] = [{"add": {"table": {"family": "bridge", "name": TABLE}}}]
    if form is ArpRuleForm.FALLBACK:
        cmds.append({"add": {"set": {**_set_ref(), "type": "ifname"}}})
        cmds.append({"add": {"element": {**_set_ref(), "elem": [veth_outer(bridge)]}}})
    return cmds


def arp_rule_batch(bridge: str, form: ArpRuleForm) -> dict[str, Any]:
    """The JSON batch (re)writing chain ``ch_BR`` with its one ARP rule.

    The fallback form also creates the set ``tproxy_veths`` and adds ``BRb`` to it.
    """
    cmds = _bridge_prelude(bridge, form)
    cmds += [
        {
            "add": {
                "chain": {
                    **_chain_ref(bridge),
                    "type": "filter",
                    "hook": "forward",
                    "prio": BRIDGE_FILTER_PRIORITY,
                    "policy": "accept",
                }
            }
        },
        {"flush": {"chain": _chain_ref(bridge)}},
        {
            "add": {
                "rule": {
                    "family": "bridge",
                    "table": TABLE,
                    "chain": chain_name(bridge),
                    "expr": arp_rule_exprs(bridge, form),
                }
            }
        },
    ]
    return {"nftables": cmds}


def _bridge_port_match(bridge: str, form: ArpRuleForm, key: str) -> list[Any]:
    """``meta ibrname "BR" KEY != "BRb"`` or, without bridge meta, ``KEY != @tproxy_veths``."""
    if form is ArpRuleForm.IBRNAME:
        return [
            {"match": {"op": "==", "left": {"meta": {"key": "ibrname"}}, "right": bridge}},
            {"match": {"op": "!=", "left": {"meta": {"key": key}}, "right": veth_outer(bridge)}},
        ]
    return [{"match": {"op": "!=", "left": {"meta": {"key": key}}, "right": "@" + VETH_SET}}]


def guard_rule_exprs(bridge: str, form: ArpRuleForm) -> list[Any]:
    """The ARP anti-spoofing rule of chain ``guard_BR``, in nft's JSON form.

    ``meta ibrname "BR" iifname != "BRb" arp saddr ip 169.254.16.9 drop``, or
    without bridge meta ``iifname != @tproxy_veths arp saddr ip 169.254.16.9 drop``:
    an ARP packet of any operation (reply, request, gratuitous announcement)
    whose *sender* is the service address is dropped unless it comes from a
    ``BRb``, i.e. from the inner namespace that really owns the address.
    """
    return _bridge_port_match(bridge, form, "iifname") + [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "arp", "field": "saddr ip"}},
                "right": SERVICE_ADDRESS,
            }
        },
        {"drop": None},
    ]


def guard_mac_exprs(bridge: str, mac: str) -> list[Any]:
    """``iifname != "BRb" ether saddr MAC drop``: frames with ``BRa``'s MAC as source
    from any other port.  In the prerouting hook this runs before the bridge learns
    the source address, so no guest can make the bridge send it the frames meant for
    ``BRa`` (FDB poisoning).  ``BRa``'s MAC names the bridge by itself: no bridge meta
    is needed on any kernel."""
    return [
        {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": veth_outer(bridge)}},
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                "right": mac.lower(),
            }
        },
        {"drop": None},
    ]


def guard_rules(bridge: str, form: ArpRuleForm, mac: str | None = None) -> list[list[Any]]:
    """The rules of chain ``guard_BR``, in order: the ARP rule, then the MAC rule if known."""
    rules = [guard_rule_exprs(bridge, form)]
    if mac:
        rules.append(guard_mac_exprs(bridge, mac))
    return rules


def guard_batch(bridge: str, form: ArpRuleForm, mac: str | None = None) -> dict[str, Any]:
    """The JSON batch (re)writing chain ``guard_BR`` (prerouting hook) with its rules.

    Prerouting sees every frame that enters the bridge from a port before it is
    forwarded to other ports, delivered to the hypervisor itself, or used to
    learn its source address.  The fallback form relies on the set
    ``tproxy_veths`` that the ARP rule's batch creates and fills
    (``write_arp_rule`` runs first); it is added here too, so the guard never
    refers to a missing set.
    """
    ref = {"family": "bridge", "table": TABLE, "name": guard_name(bridge)}
    cmds = _bridge_prelude(bridge, form)
    cmds += [
        {
            "add": {
                "chain": {
                    **ref,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": BRIDGE_FILTER_PRIORITY,
                    "policy": "accept",
                }
            }
        },
        {"flush": {"chain": ref}},
    ]
    for expr in guard_rules(bridge, form, mac):
        rule = {"family": "bridge", "table": TABLE, "chain": guard_name(bridge), "expr": expr}
        cmds.append({"add": {"rule": rule}})
    return {"nftables": cmds}


# ---- Reading the kernel's JSON -------------------------------------------


@frozen
class TableState:
    """What one of our tables holds, as far as this module cares."""

    exists: bool
    """False when the table is missing."""
    maps: Mapping[str, Mapping[str, Any]]
    """Map name -> its JSON object."""
    sets: Mapping[str, Mapping[str, Any]]
    """Set name -> its JSON object."""
    chains: Mapping[str, Mapping[str, Any]]
    """Chain name -> its JSON object."""
    rules: Mapping[str, list[list[Any]]]
    """Chain name -> the ``expr`` list of each of its rules, in order."""


def parse_table(objects: Iterable[Any]) -> TableState:
    """Sort the objects of one ``list table`` answer by kind; skip what is not an object."""
    maps: dict[str, Mapping[str, Any]] = {}
    sets: dict[str, Mapping[str, Any]] = {}
    chains: dict[str, Mapping[str, Any]] = {}
    rules: dict[str, list[list[Any]]] = {}
    for obj in objects:
        if not isinstance(obj, dict) or len(obj) != 1:
            continue
        ((kind, body),) = obj.items()
        if not isinstance(body, dict):
            continue
        name = body.get("name")
        if kind == "map" and isinstance(name, str):
            maps[name] = body
        elif kind == "set" and isinstance(name, str):
            sets[name] = body
        elif kind == "chain" and isinstance(name, str):
            chains[name] = body
            rules.setdefault(name, [])
        elif kind == "rule" and isinstance(body.get("chain"), str):
            expr = body.get("expr")
            rules.setdefault(body["chain"], []).append(expr if isinstance(expr, list) else [])
    return TableState(exists=True, maps=maps, sets=sets, chains=chains, rules=rules)


_MISSING_TABLE = TableState(exists=False, maps={}, sets={}, chains={}, rules={})


def _elem_value(item: Any) -> Any:
    """Strip the ``{"elem": {"val": ...}}`` wrapper nft uses for elements with options."""
    if isinstance(item, dict) and isinstance(item.get("elem"), dict):
        return item["elem"].get("val")
    return item


def parse_service_map(name: str, body: Mapping[str, Any]) -> dict[int, Destination] | None:
    """One ``ep_BR`` map's JSON -> its service map; None (logged) if the map is not ours."""
    if body.get("type") != _MAP_TYPE or body.get("map") != _MAP_DATA:
        log.warn(
            "nft map {name} has type {type!r} : {data!r}, not {want}; skipped",
            name=name,
            type=body.get("type"),
            data=body.get("map"),
            want=f"{_MAP_TYPE} : {_MAP_DATA}",
        )
        return None
    result: dict[int, Destination] = {}
    elems = body.get("elem", [])
    if not isinstance(elems, list):
        log.warn(
            "nft map {name}: elements {elems!r} are not a list; skipped", name=name, elems=elems
        )
        return result
    for item in elems:
        try:
            key, data = item
            key = _elem_value(key)
            addr, port = data["concat"]
            if not isinstance(key, int) or isinstance(key, bool) or not 1 <= key <= 65535:
                raise ValueError(f"service port {key!r}")
            result[key] = Destination(addr, port)
        except Exception as e:
            log.warn(
                "nft map {name}: element {item!r} skipped ({error})", name=name, item=item, error=e
            )
    return result


def _rule_forms(bridge: str, rules: list[list[Any]]) -> ArpRuleForm | None:
    """The form of a chain's rules when they are exactly one ARP rule of ours, else None."""
    if len(rules) != 1:
        return None
    for form in ArpRuleForm:
        if rules[0] == arp_rule_exprs(bridge, form):
            return form
    return None


def _set_elements(body: Mapping[str, Any] | None) -> list[Any]:
    if body is None:
        return []
    elems = body.get("elem", [])
    if isinstance(elems, str):
        return [elems]
    return [_elem_value(e) for e in elems] if isinstance(elems, list) else []


# ---- The edge ------------------------------------------------------------


class Nftables:
    """The nftables edge of one network namespace: reader and writer (see module doc)."""

    def __init__(self, context: NftContext | None = None) -> None:
        self._ctx = context if context is not None else default_context()
        self._ibrname_supported: bool | None = None
        self._fallback_logged = False

    # -- low level

    def _apply(self, batch: dict[str, Any]) -> None:
        rc, _output, error = self._ctx.json_cmd(batch)
        if rc != 0:
            raise NftError(error or f"libnftables returned {rc}", batch)

    def _apply_text(self, text: str) -> None:
        rc, _output, error = self._ctx.cmd(text)
        if rc != 0:
            raise NftError(error or f"libnftables returned {rc}", text)

    def _read_table(self, family: str) -> TableState:
        batch = {"nftables": [{"list": {"table": {"family": family, "name": TABLE}}}]}
        rc, output, error = self._ctx.json_cmd(batch)
        if rc != 0:
            if _NO_SUCH in (error or ""):
                return _MISSING_TABLE
            raise NftError(error or f"libnftables returned {rc}", batch)
        objects = output.get("nftables", []) if isinstance(output, dict) else []
        if not isinstance(objects, list):
            log.warn("nft answered {output!r} to a listing; ignored", output=output)
            objects = []
        return parse_table(objects)

    # -- reader

    def read_service_maps(self) -> dict[str, dict[int, Destination]]:
        """Every map ``ep_BR`` of table ``ip one_tproxy`` as bridge BR -> service map.

        A missing table gives ``{}``; maps or elements that are not ours are
        logged and skipped. Raises :class:`NftError` only when libnftables
        itself fails.
        """
        table = self._read_table("ip")
        result: dict[str, dict[int, Destination]] = {}
        for name, body in sorted(table.maps.items()):
            if not name.startswith(MAP_PREFIX):
                log.warn(
                    "nft map {name} in table ip {table} is not ours; skipped",
                    name=name,
                    table=TABLE,
                )
                continue
            bridge = name[len(MAP_PREFIX) :]
            try:
                check_bridge_name(bridge)
            except InvalidBridgeNameError as e:
                log.warn("nft map {name} skipped: {error}", name=name, error=e)
                continue
            service_map = parse_service_map(name, body)
            if service_map is not None:
                result[bridge] = service_map
        return result

    def arp_rule_state(self, bridge: str) -> tuple[ArpRuleForm | None, bool]:
        """(form of chain ``ch_BR``'s one ARP rule or None, ``BRb`` in ``tproxy_veths``?).

        Read only (``one-tproxy check``): None when the chain is missing or does
        not hold exactly one of our ARP rules.
        """
        check_bridge_name(bridge)
        table = self._read_table("bridge")
        form = _rule_forms(bridge, table.rules.get(chain_name(bridge), []))
        in_set = veth_outer(bridge) in _set_elements(table.sets.get(VETH_SET))
        return form, in_set

    # -- writer

    def write_service_map(self, bridge: str, service_map: Mapping[int, Destination]) -> bool:
        """Make map ``ep_BR`` hold exactly ``service_map``; True if anything changed.

        A map ``ep_BR`` of another type is an error (nothing is changed).
        """
        check_bridge_name(bridge)
        _check_service_map(service_map)
        name = map_name(bridge)
        table = self._read_table("ip")
        body = table.maps.get(name)
        if body is None:
            if name in table.sets:
                raise NftError(f"table ip {TABLE} holds a set {name}, not a map; remove it first")
            self._apply_text(create_map_text(bridge, service_map))
            return True
        if body.get("type") != _MAP_TYPE or body.get("map") != _MAP_DATA:
            raise NftError(
                f"map ip {TABLE} {name} has type {body.get('type')} : {body.get('map')}, "
                f"not {_MAP_TYPE} : {_MAP_DATA}; remove it first"
            )
        current = parse_service_map(name, body)
        if current == dict(service_map):
            return False
        self._apply(refill_map_batch(bridge, service_map))
        return True

    def write_arp_rule(self, bridge: str) -> tuple[ArpRuleForm, bool]:
        """Make chain ``ch_BR`` hold exactly its one ARP rule; (form used, changed?).

        Tries ``meta ibrname`` first (in a batch of its own: a refused rule
        aborts its whole batch); on "Operation not supported" writes the
        fallback rule and ``BRb`` into the set ``tproxy_veths``.
        """
        check_bridge_name(bridge)
        table = self._read_table("bridge")
        current = _rule_forms(bridge, table.rules.get(chain_name(bridge), []))
        in_set = veth_outer(bridge) in _set_elements(table.sets.get(VETH_SET))
        if current is ArpRuleForm.IBRNAME or (current is ArpRuleForm.FALLBACK and in_set):
            return current, False
        if self._ibrname_supported is not False:
            batch = arp_rule_batch(bridge, ArpRuleForm.IBRNAME)
            rc, _output, error = self._ctx.json_cmd(batch)
            if rc == 0:
                self._ibrname_supported = True
                return ArpRuleForm.IBRNAME, True
            if _NOT_SUPPORTED not in (error or ""):
                raise NftError(error or f"libnftables returned {rc}", batch)
            self._ibrname_supported = False
        if not self._fallback_logged:
            self._fallback_logged = True
            log.info(
                "this kernel refuses nft 'meta ibrname' (no CONFIG_NFT_BRIDGE_META): "
                "using the equivalent rule 'oifname != @{set} arp operation request "
                "arp daddr ip {addr} drop' with set bridge {table} {set}",
                set=VETH_SET,
                addr=SERVICE_ADDRESS,
                table=TABLE,
            )
        self._apply(arp_rule_batch(bridge, ArpRuleForm.FALLBACK))
        return ArpRuleForm.FALLBACK, True

    def write_guard(self, bridge: str, form: ArpRuleForm, mac: str | None = None) -> bool:
        """Make chain ``guard_BR`` hold exactly its anti-spoofing rules; True if it changed.

        ``form`` is the one ``write_arp_rule`` found this kernel takes (the
        ARP rule uses the same bridge match, so it needs no probing of its
        own); ``mac`` is ``BRa``'s MAC address (no MAC rule without it).  A
        chain on another hook, or with other rules, is rewritten.
        """
        check_bridge_name(bridge)
        table = self._read_table("bridge")
        chain = table.chains.get(guard_name(bridge), {})
        rules = table.rules.get(guard_name(bridge), [])
        in_set = veth_outer(bridge) in _set_elements(table.sets.get(VETH_SET))
        if (
            chain.get("hook") == "prerouting"
            and rules == guard_rules(bridge, form, mac)
            and (form is ArpRuleForm.IBRNAME or in_set)
        ):
            return False
        self._apply(guard_batch(bridge, form, mac))
        return True

    def remove_bridge(self, bridge: str) -> bool:
        """Remove map ``ep_BR``, chain ``ch_BR`` and ``BRb`` from ``tproxy_veths``.

        Each only if present, in one batch; a table that this removal leaves
        empty is deleted too (an empty table found as it is stays).
        True if anything changed. The ``guard_BR`` chain (hardening) is removed
        as well when present.
        """
        check_bridge_name(bridge)
        cmds: list[Any] = []
        ip_table = self._read_table("ip")
        if ip_table.exists:
            name = map_name(bridge)
            if name in ip_table.maps:
                cmds.append({"delete": {"map": _map_ref(bridge)}})
                if _empty_after(ip_table, maps={name}):
                    cmds.append({"delete": {"table": {"family": "ip", "name": TABLE}}})
        br_table = self._read_table("bridge")
        if br_table.exists:
            gone: set[str] = set()
            for chain in (chain_name(bridge), GUARD_PREFIX + bridge):
                if chain in br_table.chains:
                    cmds.append(
                        {"delete": {"chain": {"family": "bridge", "table": TABLE, "name": chain}}}
                    )
                    gone.add(chain)
            veth = veth_outer(bridge)
            members = _set_elements(br_table.sets.get(VETH_SET))
            if veth in members:
                cmds.append({"delete": {"element": {**_set_ref(), "elem": [veth]}}})
            touched = bool(gone) or veth in members
            if touched and _empty_after(br_table, chains=gone, set_members={veth}):
                cmds.append({"delete": {"table": {"family": "bridge", "name": TABLE}}})
        if not cmds:
            return False
        self._apply({"nftables": cmds})
        return True


def _empty_after(
    table: TableState,
    maps: AbstractSet[str] = frozenset(),
    chains: AbstractSet[str] = frozenset(),
    set_members: AbstractSet[str] = frozenset(),
) -> bool:
    """True if the table holds nothing once these maps, chains and set members are gone.

    The ``tproxy_veths`` set counts as nothing when it would be empty.
    """
    if set(table.maps) - maps or set(table.chains) - chains:
        return False
    for name, body in table.sets.items():
        if name != VETH_SET or set(_set_elements(body)) - set_members:
            return False
    return True
