"""Counters of the running mesh, and their two renderings (JSON-able dict, Prometheus text).

Theory of operation. Counting is sans-I/O and cheap: the root's link keeps one
:class:`PortStats` per (bridge, service port) and bumps ints (kept in an
``array``, :class:`Cell`) at the events of a stream's life (requested,
refused, accepted, reset, ended); bytes are added once per stream when it
ends (each stream already counts its own bytes), so the data path gains no
work at all, and a snapshot adds the bytes of the streams still open.
Connect latency goes into a fixed ring of the last :data:`LATENCY_WINDOW`
samples kept as C doubles (an ``array``: no object per sample; as a list of
floats, the 1,024 floats made during a burst of connections outlived it,
scattered over the allocator's pools, issue 7 (f)); percentiles are computed
only when a snapshot is taken.

The counting can be switched off for a whole mesh with the environment
variable :data:`COUNTERS_ENV` (``ONE_TPROXY_COUNTERS=off``), read once when a
proxy starts and inherited by the inner proxies: it exists to measure what the
counting costs (``bench/bench_mesh.py``'s ``one-tproxy-uncounted`` path). Off
means the links do none of the counting work (no :class:`PortStats`, no
latency clock readings, no link counters, no counters in STATS reports), and
the status document says ``"counting": false`` and carries no counter figures
rather than zeros.

The *status document* is the JSON object the control channel returns
(``{"cmd": "stats"}``, see ``docs/operations.md``): :func:`render_prometheus`
and :func:`render_text` turn it into the Prometheus text exposition format and
the readable ``status --verbose`` output, so the command line needs nothing
but that document.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import define, field

#: How many recent connect latencies each service port keeps.
LATENCY_WINDOW = 1024

#: Version of the status document (bumped on incompatible changes).
STATUS_VERSION = 1


#: Environment variable that switches the counters off (``off``/``0``/``no``/``false``).
COUNTERS_ENV = "ONE_TPROXY_COUNTERS"

_OFF = frozenset({"off", "0", "no", "false"})


def counting_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process counts: False when ``ONE_TPROXY_COUNTERS`` says ``off``."""
    env = os.environ if environ is None else environ
    return env.get(COUNTERS_ENV, "").strip().lower() not in _OFF


#: What a proxy logs (WARNING) at start when its counters are off.
COUNTERS_OFF_MESSAGE = COUNTERS_ENV + "=off: counters off in this process (status shows no figures)"


class Cell:
    """A counter attribute kept in its owner's ``array`` (``_cells[index]``), not as an int object.

    Why: a counter bumped during a burst of connections (``x += 1``) makes a
    new int object at every bump above 256, and the last one lives on,
    wherever pymalloc put it among the burst's blocks: a few such survivors
    keep whole arenas from being freed once the burst's connections closed
    (issue 7 (f), docs/performance.md). Stored in a preallocated array, the
    value has no object of its own; reading it makes a short-lived int.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return obj._cells[self.index]

    def __set__(self, obj: Any, value: Any) -> None:
        obj._cells[self.index] = value


class LatencyWindow:
    """The last ``size`` samples in a ring; percentiles over them on demand."""

    __slots__ = ("_samples", "_cells", "_total", "size")

    count = Cell(0)
    """Samples ever recorded."""
    _next = Cell(1)

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        if size < 1:
            raise ValueError("a latency window holds at least one sample")
        self.size = size
        self._samples = array("d")
        self._cells = array("q", (0, 0))
        self._total = array("d", (0.0,))

    @property
    def total(self) -> float:
        """Sum of every sample ever recorded (seconds)."""
        return self._total[0]

    def record(self, seconds: float) -> None:
        """Add one sample, replacing the oldest once the ring is full."""
        cells = self._cells  # count, _next: indexed directly, no descriptor calls
        cells[0] += 1
        self._total[0] += seconds
        samples = self._samples
        if len(samples) < self.size:
            samples.append(seconds)
        else:
            i = cells[1]
            samples[i] = seconds
            cells[1] = (i + 1) % self.size

    def recent(self) -> list[float]:
        """The samples in the window (any order)."""
        return list(self._samples)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of the window, None when it is empty."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]


class PortStats:
    """Counters of one service port of one bridge (root side).

    The int counters are :class:`Cell` s of one preallocated ``array('q')``
    (no object born per bump, see :class:`Cell`).
    """

    __slots__ = ("_cells", "refused", "resets", "latency")

    streams_open = Cell(0)
    """Streams requested and not yet ended (connecting or open)."""
    requested = Cell(1)
    """OPENs received for this port."""
    accepted = Cell(2)
    """Streams whose destination connection succeeded."""
    bytes_to_service = Cell(3)
    """Bytes from guests to the destination, of streams that ended."""
    bytes_to_guest = Cell(4)
    """Bytes from the destination to guests, of streams that ended."""

    def __init__(self) -> None:
        self._cells = array("q", bytes(5 * 8))
        self.refused: dict[str, int] = {}
        """Opens refused, by reason name (REFUSED, TIMED_OUT, UNKNOWN_SERVICE, ...)."""
        self.resets: dict[str, int] = {}
        """Streams ended by a reset (either side, also while connecting), by reason name."""
        self.latency = LatencyWindow()
        """Connect latencies of the recent accepted streams."""

    def __repr__(self) -> str:
        return f"PortStats({self.snapshot()!r})"

    def refuse(self, reason: str) -> None:
        """Count an open refused for ``reason``."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def reset(self, reason: str) -> None:
        """Count a stream ended by a reset for ``reason``."""
        self.resets[reason] = self.resets.get(reason, 0) + 1

    def ended(self, to_service: int, to_guest: int) -> None:
        """A stream ended: it no longer counts as open, its bytes join the totals."""
        self.streams_open -= 1
        self.bytes_to_service += to_service
        self.bytes_to_guest += to_guest

    def snapshot(self, live_to_service: int = 0, live_to_guest: int = 0) -> dict[str, Any]:
        """A JSON-able dict; ``live_*`` are the bytes of streams still open."""
        lat = self.latency
        return {
            "streams_open": self.streams_open,
            "requested": self.requested,
            "accepted": self.accepted,
            "refused": dict(sorted(self.refused.items())),
            "resets": dict(sorted(self.resets.items())),
            "bytes_to_service": self.bytes_to_service + live_to_service,
            "bytes_to_guest": self.bytes_to_guest + live_to_guest,
            "connect_latency": {
                "p50": lat.percentile(0.5),
                "p99": lat.percentile(0.99),
                "window": len(lat.recent()),
                "count": lat.count,
                "sum": lat.total,
            },
        }


@define
class BridgeStats:
    """The :class:`PortStats` of every service port seen on one bridge."""

    ports: dict[int, PortStats] = field(factory=dict)
    """Service port -> its counters (created at the port's first open)."""

    def port(self, service_port: int) -> PortStats:
        """The counters of ``service_port``, created when first asked for."""
        stats = self.ports.get(service_port)
        if stats is None:
            stats = self.ports[service_port] = PortStats()
        return stats

    def snapshot(self, live: Iterable[tuple[int, int, int]] = ()) -> dict[int, dict[str, Any]]:
        """Port -> snapshot; ``live`` gives (port, to_service, to_guest) of each open stream."""
        extra: dict[int, list[int]] = {}
        for port, to_service, to_guest in live:
            sums = extra.setdefault(port, [0, 0])
            sums[0] += to_service
            sums[1] += to_guest
        out: dict[int, dict[str, Any]] = {}
        for port in sorted(self.ports):
            up, down = extra.get(port, (0, 0))
            out[port] = self.ports[port].snapshot(up, down)
        return out


def empty_port() -> dict[str, Any]:
    """The snapshot of a port that saw no stream yet."""
    return PortStats().snapshot()


# ---------------------------------------------------------------- Prometheus


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class _Exposition:
    """Collects samples per metric family and writes them with HELP/TYPE, families in order."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def declare(self, name: str, kind: str, help_text: str) -> None:
        self._families.setdefault(name, (kind, help_text, []))

    def add(
        self, name: str, labels: Mapping[str, object], value: float | int, suffix: str = ""
    ) -> None:
        self._families[name][2].append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


#: Metric families: name -> (type, help). The order is the output order.
METRICS: dict[str, tuple[str, str]] = {
    "one_tproxy_up": ("gauge", "1 when the root proxy answered (always 1 in its own output)."),
    "one_tproxy_uptime_seconds": ("gauge", "Seconds since the process started."),
    "one_tproxy_inner_up": ("gauge", "1 when the bridge's inner proxy runs."),
    "one_tproxy_inner_restarts_total": (
        "counter",
        "Times the root restarted the bridge's inner proxy.",
    ),
    "one_tproxy_listener_up": (
        "gauge",
        "1 when the inner proxy listens on 169.254.16.9 on the service port.",
    ),
    "one_tproxy_streams_open": ("gauge", "Streams connecting or open now."),
    "one_tproxy_streams_requested_total": ("counter", "Streams guests asked for."),
    "one_tproxy_streams_accepted_total": (
        "counter",
        "Streams whose destination connection succeeded.",
    ),
    "one_tproxy_streams_refused_total": ("counter", "Streams refused, by reason."),
    "one_tproxy_streams_reset_total": ("counter", "Streams ended by a reset, by reason."),
    "one_tproxy_bytes_to_service_total": ("counter", "Bytes from guests to the destination."),
    "one_tproxy_bytes_to_guest_total": ("counter", "Bytes from the destination to guests."),
    "one_tproxy_connect_latency_seconds": (
        "summary",
        "Time to connect to the destination (quantiles over the recent window).",
    ),
}


#: The families that exist only while the proxies count (``ONE_TPROXY_COUNTERS``).
COUNTER_METRICS = frozenset(
    name
    for name in METRICS
    if name.startswith(("one_tproxy_streams_", "one_tproxy_bytes_", "one_tproxy_connect_"))
)


def render_prometheus(status: Mapping[str, Any]) -> str:
    """The status document in the Prometheus text exposition format (version 0.0.4).

    A document of a mesh that does not count (``"counting": false``) gives the
    process and listener families only, not counters that would read zero.
    """
    counting = status.get("counting", True) is not False
    out = _Exposition()
    for name, (kind, help_text) in METRICS.items():
        if counting or name not in COUNTER_METRICS:
            out.declare(name, kind, help_text)
    out.add("one_tproxy_up", {}, 1)
    root = status.get("root") or {}
    if root.get("uptime") is not None:
        out.add("one_tproxy_uptime_seconds", {"process": "one_tproxy"}, float(root["uptime"]))
    bridges: Mapping[str, Any] = status.get("bridges") or {}
    for bridge in sorted(bridges):
        info = bridges[bridge]
        inner = info.get("inner") or {}
        b = {"bridge": bridge}
        running = bool(inner.get("running"))
        out.add("one_tproxy_inner_up", b, running)
        if running and inner.get("uptime") is not None:
            out.add(
                "one_tproxy_uptime_seconds",
                {"process": f"one_tproxy_{bridge}"},
                float(inner["uptime"]),
            )
        out.add("one_tproxy_inner_restarts_total", b, int(inner.get("restarts", 0)))
        ports: Mapping[str, Any] = info.get("ports") or {}
        for port in sorted(ports, key=int):
            p = ports[port]
            bp = {"bridge": bridge, "port": port}
            listener = p.get("listener")
            if listener is not None:
                out.add("one_tproxy_listener_up", bp, listener == "listening")
            if not counting:
                continue
            out.add("one_tproxy_streams_open", bp, int(p["streams_open"]))
            out.add("one_tproxy_streams_requested_total", bp, int(p["requested"]))
            out.add("one_tproxy_streams_accepted_total", bp, int(p["accepted"]))
            for reason, n in sorted(p["refused"].items()):
                out.add("one_tproxy_streams_refused_total", {**bp, "reason": reason}, int(n))
            for reason, n in sorted(p["resets"].items()):
                out.add("one_tproxy_streams_reset_total", {**bp, "reason": reason}, int(n))
            out.add("one_tproxy_bytes_to_service_total", bp, int(p["bytes_to_service"]))
            out.add("one_tproxy_bytes_to_guest_total", bp, int(p["bytes_to_guest"]))
            lat = p["connect_latency"]
            name = "one_tproxy_connect_latency_seconds"
            for q, key in (("0.5", "p50"), ("0.99", "p99")):
                value = lat.get(key)
                out.add(name, {**bp, "quantile": q}, math.nan if value is None else float(value))
            out.add(name, bp, float(lat["sum"]), suffix="_sum")
            out.add(name, bp, int(lat["count"]), suffix="_count")
    return out.text()


# ---------------------------------------------------------------- readable


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{seconds:.1f}s"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _reasons(counts: Mapping[str, int]) -> str:
    if not counts:
        return "0"
    total = sum(counts.values())
    return f"{total} (" + ", ".join(f"{r.lower()} {n}" for r, n in sorted(counts.items())) + ")"


def render_text(status: Mapping[str, Any]) -> str:
    """The status document for people (``one-tproxy status --verbose``)."""
    root = status.get("root") or {}
    counting = status.get("counting", True) is not False
    head = f"one_tproxy: pid {root.get('pid')}, up {_duration(root.get('uptime'))}"
    if not counting:
        head += f"; counters off ({COUNTERS_ENV}=off)"
    lines = [head]
    bridges: Mapping[str, Any] = status.get("bridges") or {}
    for bridge in sorted(bridges):
        info = bridges[bridge]
        inner = info.get("inner") or {}
        if inner.get("running"):
            state = f"pid {inner.get('pid')}, up {_duration(inner.get('uptime'))}"
        else:
            state = "not running"
        lines.append(f"  one_tproxy_{bridge}: {state}, restarts {inner.get('restarts', 0)}")
        ports: Mapping[str, Any] = info.get("ports") or {}
        for port in sorted(ports, key=int):
            p = ports[port]
            error = p.get("listen_error")
            lines.append(
                f"    port {port} -> {p.get('destination') or '(not in the map)'}: "
                f"listener {p.get('listener') or 'unknown'}"
                + (f" ({error}; retrying)" if error else "")
            )
            if not counting:
                continue
            lat = p["connect_latency"]
            lines.append(
                f"      streams: {p['streams_open']} open, {p['accepted']} accepted, "
                f"refused {_reasons(p['refused'])}, reset {_reasons(p['resets'])}"
            )
            lines.append(
                f"      bytes: {p['bytes_to_service']} to the service, "
                f"{p['bytes_to_guest']} to guests; connect p50 {_ms(lat.get('p50'))}, "
                f"p99 {_ms(lat.get('p99'))} (last {lat.get('window', 0)})"
            )
    return "\n".join(lines) + "\n"
