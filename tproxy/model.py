"""Value objects shared by the configuration, the nftables edge, the driver and the daemons.

They carry no behaviour beyond validation, so every layer can exchange them
without importing another layer.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from attrs import field, frozen

#: The address every hypervisor answers its guests at.
SERVICE_ADDRESS = "169.254.16.9"

#: ``BRa``/``BRb`` must fit IFNAMSIZ (15 characters), so a bridge name has at most 14.
MAX_BRIDGE_NAME = 14

_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class InvalidBridgeNameError(ValueError):
    """A bridge name that cannot be used for the per-bridge names of DESIGN.md 2.2."""


def check_bridge_name(name: str) -> str:
    """Return ``name`` if it can name a tproxy bridge, else raise InvalidBridgeNameError."""
    if not name or len(name) > MAX_BRIDGE_NAME:
        raise InvalidBridgeNameError(
            f"bridge name {name!r} must have 1 to {MAX_BRIDGE_NAME} characters "
            f"(so that {name}a and {name}b fit the 15 characters of an interface name)"
        )
    if not _BRIDGE_RE.match(name):
        raise InvalidBridgeNameError(
            f"bridge name {name!r} has characters an interface name cannot hold"
        )
    return name


def namespace_name(bridge: str) -> str:
    """The network namespace (and inner proxy process name) of a bridge."""
    return f"one_tproxy_{bridge}"


def _check_port(instance: object, attribute: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"port {value!r} is not an integer in 1-65535")


def _check_ipv4(instance: object, attribute: object, value: str) -> None:
    ipaddress.IPv4Address(value)


@frozen
class Destination:
    """Where the root proxy connects a stream: an IPv4 address and a TCP port."""

    addr: str = field(validator=_check_ipv4)
    """IPv4 address, dotted quad (host names are resolved before they get here)."""
    port: int = field(validator=_check_port)
    """TCP port, 1-65535."""

    def __str__(self) -> str:
        return f"{self.addr}:{self.port}"


#: The service map of one bridge: service port -> destination (nft map ``ep_BR``).
ServiceMap = Mapping[int, Destination]

#: Every bridge's service map, as read from table ``ip one_tproxy``.
MeshMap = Mapping[str, ServiceMap]
