"""The root proxy's status document: what ``{"cmd": "stats"}`` answers on the control channel.

It joins, per bridge, what the root knows by itself (the supervisor: inner
proxy PID, uptime, restarts, service map; the link's per-port counters from
``tproxy.metrics``) with what the inner proxy last reported over STATS (which
ports it listens on). Pure: the caller passes the clock readings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from tproxy.metrics import STATUS_VERSION, BridgeStats, empty_port


class SupervisorView(Protocol):
    """What is read of a ``tproxy.root.InnerSupervisor``."""

    @property
    def bridge(self) -> str: ...
    @property
    def services(self) -> Mapping[int, Any]: ...
    @property
    def starts(self) -> int: ...
    @property
    def process(self) -> Any: ...
    @property
    def link(self) -> Any: ...
    @property
    def started_at(self) -> float: ...


def _listener(report: Mapping[str, Any] | None, port: int) -> str:
    if report is None:
        return "unknown"
    if port in (report.get("listening") or ()):
        return "listening"
    return "not listening"


def _listen_error(report: Mapping[str, Any] | None, port: int) -> str | None:
    """Why the inner proxy could not bind ``port`` (its last report), if it said."""
    errors = (report or {}).get("listen_errors")
    if not isinstance(errors, Mapping):
        return None
    error = errors.get(str(port))
    return str(error) if error is not None else None


def bridge_status(
    sup: SupervisorView, stats: BridgeStats | None, now: float, counting: bool = True
) -> dict[str, Any]:
    """One bridge's part of the status document (without counter figures unless ``counting``)."""
    link = sup.link
    process = sup.process
    running = process is not None and getattr(process, "pid", None) is not None
    report = getattr(link, "inner_report", None) if link is not None else None
    report_at = getattr(link, "inner_report_at", None) if link is not None else None
    if not counting:
        counters: dict[int, Any] = {}
    elif link is not None and hasattr(link, "snapshot"):
        counters = link.snapshot()
    elif stats is not None:
        counters = stats.snapshot()
    else:
        counters = {}
    ports: dict[str, Any] = {}
    for port in sorted(set(sup.services) | set(counters)):
        entry = dict(counters.get(port) or empty_port()) if counting else {}
        dest = sup.services.get(port)
        entry["destination"] = str(dest) if dest is not None else None
        entry["listener"] = _listener(report, port) if running else "not running"
        error = _listen_error(report, port) if running else None
        if error is not None and entry["listener"] == "not listening":
            entry["listen_error"] = error
        ports[str(port)] = entry
    inner: dict[str, Any] = {
        "pid": process.pid if running else None,
        "running": running,
        "uptime": now - sup.started_at if running else None,
        "restarts": max(0, sup.starts - 1),
        "report_age": None if report_at is None else now - report_at,
    }
    if counting and report is not None and isinstance(report.get("counters"), dict):
        inner["link"] = report["counters"]
    return {"inner": inner, "ports": ports}


def status_document(
    supervisors: Iterable[SupervisorView],
    stats: Mapping[str, BridgeStats],
    pid: int,
    started_at: float,
    now: float,
    counting: bool = True,
) -> dict[str, Any]:
    """The whole status document (``docs/operations.md``, "Control channel").

    ``counting`` False (``ONE_TPROXY_COUNTERS=off``): the document says so and
    carries processes, destinations and listeners, but no counter figures.
    """
    return {
        "version": STATUS_VERSION,
        "counting": counting,
        "root": {"pid": pid, "uptime": now - started_at},
        "bridges": {
            sup.bridge: bridge_status(sup, stats.get(sup.bridge), now, counting)
            for sup in sorted(supervisors, key=lambda s: s.bridge)
        },
    }
