"""Observability in real namespaces: ``status --json`` after known traffic, ``check`` verdicts.

Each test is one simulated hypervisor (prefix ``tqo``) whose tproxy state is
built by hand as DESIGN.md 2.2 shows; the product runs inside it as
``python -m tproxy start|status|check|stop``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from typing import Any

from twisted.trial import unittest

from tests.integration.topology import (
    Guest,
    Host,
    config_yaml,
    require_root,
    wait_until,
)

LOCAL = "127.0.0.1"
#: A program that holds a port on 169.254.16.9 (at most 5 minutes).
SQUATTER = (
    "import socket, time\n"
    "s = socket.socket()\n"
    "s.bind(('169.254.16.9', {port}))\n"
    "s.listen()\n"
    "print('listening', flush=True)\n"
    "time.sleep(300)\n"
)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process we started, by PID, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
OK = "\u2713"
FAIL = "\u2717"


class ObserveTestCase(unittest.TestCase):
    """A host with one bridge and a guest; helpers to read the mesh's status."""

    timeout = 120

    def setUp(self) -> None:
        require_root()
        self.host = Host(self, prefix="tqo")

    def bridge_with_guest(self, services: dict[int, tuple[str, int]]) -> tuple[str, Guest]:
        br = self.host.add_bridge()
        guest = self.host.add_guest(br)
        self.host.build_tproxy_state(br, services)
        return br, guest

    def start(self) -> None:
        self.host.write_config(config_yaml([], debug_level=3))
        self.host.tproxy("start", check=True)

    def status_json(self) -> dict[str, Any]:
        done = self.host.tproxy("status", "--json")
        self.assertEqual(done.returncode, 0, done.stderr + self.host.logs())
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def port_status(self, br: str, port: int) -> dict[str, Any]:
        result: dict[str, Any] = self.status_json()["bridges"][br]["ports"][str(port)]
        return result

    def check(self, *args: str) -> tuple[int, list[str], list[str]]:
        """``one-tproxy check ARGS``: exit status, every line, the failed lines."""
        done = self.host.tproxy("check", "--timeout", "2", *args)
        lines = done.stdout.splitlines()
        return done.returncode, lines, [x for x in lines if FAIL in x]

    def wait_listening(self, br: str, port: int) -> None:
        wait_until(
            lambda: self.port_status(br, port)["listener"] == "listening",
            timeout=15,
            interval=0.1,
            message=f"listener {port} reported",
        )


class StatusTests(ObserveTestCase):
    """``status --json``, ``--verbose`` and ``--prometheus`` report a known workload exactly."""

    def test_known_workload(self) -> None:
        """N uploads of B bytes and one refused connection appear exactly in status --json."""
        sink_port, dead_port = 7101, 7102
        self.host.serve_sink(sink_port)
        br, guest = self.bridge_with_guest({5030: (LOCAL, sink_port), 1234: (LOCAL, dead_port)})
        self.start()
        self.wait_listening(br, 5030)
        self.wait_listening(br, 1234)
        n, size = 3, 100_000
        for _ in range(n):
            done = guest.upload(5030, size)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        refused = guest.curl(guest.service_url(1234), timeout=5)
        self.assertFalse(refused.ok)

        def settled() -> dict[str, Any] | None:
            doc = self.status_json()
            ports = doc["bridges"][br]["ports"]
            if ports["5030"]["streams_open"] or ports["1234"]["requested"] < 1:
                return None
            return doc

        doc = wait_until(settled, timeout=10, interval=0.1, message="streams closed")
        reply = len(f"{size} ") + 64 + 1  # the sink answers "COUNT SHA256\n"
        p = doc["bridges"][br]["ports"]["5030"]
        self.assertEqual(p["destination"], f"{LOCAL}:{sink_port}")
        self.assertEqual(p["listener"], "listening")
        self.assertEqual((p["requested"], p["accepted"], p["streams_open"]), (n, n, 0))
        self.assertEqual(p["refused"], {})
        self.assertEqual(p["resets"], {})
        self.assertEqual(p["bytes_to_service"], n * size)
        self.assertEqual(p["bytes_to_guest"], n * reply)
        self.assertEqual(p["connect_latency"]["count"], n)
        self.assertGreater(p["connect_latency"]["p99"], 0)
        self.assertGreaterEqual(p["connect_latency"]["p99"], p["connect_latency"]["p50"])
        q = doc["bridges"][br]["ports"]["1234"]
        self.assertEqual((q["requested"], q["accepted"]), (1, 0))
        self.assertEqual(q["refused"], {"REFUSED": 1})
        self.assertEqual((q["bytes_to_service"], q["bytes_to_guest"]), (0, 0))
        inner = doc["bridges"][br]["inner"]
        self.assertTrue(inner["running"])
        self.assertEqual(inner["restarts"], 0)
        # The inner proxy's own counters arrive with its next periodic STATS report.
        wait_until(
            lambda: self.status_json()["bridges"][br]["inner"]["link"]["accepted"] == n,
            timeout=10,
            interval=0.2,
            message="the inner proxy's STATS report",
        )
        link = self.status_json()["bridges"][br]["inner"]["link"]
        self.assertEqual(link["refused"], {"REFUSED": 1})
        self.assertEqual(link["bytes_to_link"], n * size)
        procs = self.host.proxies()
        self.assertEqual(doc["root"]["pid"], procs["one_tproxy"])
        self.assertEqual(inner["pid"], procs[f"one_tproxy_{br}"])

        prom = self.host.tproxy("status", "--prometheus")
        self.assertEqual(prom.returncode, 0, prom.stderr)
        lines = prom.stdout.splitlines()
        labels = f'bridge="{br}",port="5030"'
        self.assertIn(f"one_tproxy_streams_accepted_total{{{labels}}} {n}", lines)
        self.assertIn(f"one_tproxy_bytes_to_service_total{{{labels}}} {n * size}", lines)
        self.assertIn(
            f'one_tproxy_streams_refused_total{{bridge="{br}",port="1234",reason="REFUSED"}} 1',
            lines,
        )
        verbose = self.host.tproxy("status", "--verbose")
        self.assertEqual(verbose.returncode, 0, verbose.stderr)
        self.assertIn(f"port 5030 -> {LOCAL}:{sink_port}: listener listening", verbose.stdout)
        plain = self.host.tproxy("status")
        self.assertEqual(len(plain.stdout.splitlines()), 2, plain.stdout)

        sock = os.path.join(self.host.run_dir, "one_tproxy", "control.sock")
        self.assertEqual(stat.S_IMODE(os.stat(sock).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode), 0o700)

        # The root restarts a killed inner proxy: status counts the restart and
        # keeps the bridge's counters.
        os.kill(inner["pid"], signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            b = self.status_json()["bridges"][br]
            return b if b["inner"]["restarts"] == 1 and b["inner"]["running"] else None

        b = wait_until(restarted, timeout=15, interval=0.1, message="inner restarted")
        self.assertNotEqual(b["inner"]["pid"], inner["pid"])
        self.assertEqual(b["ports"]["5030"]["accepted"], n)
        self.assertEqual(b["ports"]["5030"]["bytes_to_service"], n * size)

    def test_counters_off(self) -> None:
        """Started with ONE_TPROXY_COUNTERS=off the mesh serves; status says counters off."""
        sink_port = 7103
        self.host.serve_sink(sink_port)
        br, guest = self.bridge_with_guest({5030: (LOCAL, sink_port)})
        self.host.write_config(config_yaml([], debug_level=3))
        self.host.used_tproxy = True
        started = self.host.run(
            self.host.tproxy_argv("start"),
            env={**self.host.env, "ONE_TPROXY_COUNTERS": "off"},
            timeout=60,
        )
        self.assertEqual(started.returncode, 0, started.stderr + self.host.logs())
        self.wait_listening(br, 5030)
        done = guest.upload(5030, 10_000)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        doc = self.status_json()
        self.assertIs(doc["counting"], False)
        self.assertEqual(
            doc["bridges"][br]["ports"]["5030"],
            {"destination": f"{LOCAL}:{sink_port}", "listener": "listening"},
        )
        self.assertNotIn("link", doc["bridges"][br]["inner"])
        # Both proxies say so in their logs: the inner one inherited the switch.
        for name in ("one_tproxy", f"one_tproxy_{br}"):
            with open(os.path.join(self.host.log_dir, f"{name}.log")) as f:
                self.assertIn("ONE_TPROXY_COUNTERS=off: counters off", f.read(), name)
        verbose = self.host.tproxy("status", "--verbose")
        self.assertIn("counters off (ONE_TPROXY_COUNTERS=off)", verbose.stdout)
        prom = self.host.tproxy("status", "--prometheus")
        self.assertIn(f'one_tproxy_listener_up{{bridge="{br}",port="5030"}} 1', prom.stdout)
        self.assertNotIn("one_tproxy_streams_accepted_total", prom.stdout)

    def test_port_in_use(self) -> None:
        """A port held by another program: status and check give the reason, the log says it
        once per backoff step, and the port is bound once it is free."""
        sink_port = 7104
        self.host.serve_sink(sink_port)
        br, guest = self.bridge_with_guest({5030: (LOCAL, sink_port)})
        # Another program holds 169.254.16.9:5030 in the bridge's namespace (where lo is
        # down, so it is not connected to: it says when it listens).
        squatter = self.host.inner(br).spawn(
            [sys.executable, "-c", SQUATTER.format(port=5030)], stdout=subprocess.PIPE
        )
        self.addCleanup(_end, squatter)
        assert squatter.stdout is not None
        self.assertEqual(squatter.stdout.readline(), b"listening\n")
        self.start()

        def reported() -> dict[str, Any] | None:
            p = self.port_status(br, 5030)
            return p if p.get("listen_error") else None

        p = wait_until(reported, timeout=15, interval=0.2, message="the bind error reported")
        self.assertEqual(p["listener"], "not listening")
        self.assertEqual(p["listen_error"], "Address already in use")
        code, _, failed = self.check(br)
        self.assertEqual(code, 1)
        self.assertIn(
            f"{br} port 5030: {FAIL} listening on 169.254.16.9:5030: the inner proxy does not "
            "listen on it (cannot bind: Address already in use; it keeps retrying)",
            failed,
        )
        verbose = self.host.tproxy("status", "--verbose")
        self.assertIn("listener not listening (Address already in use; retrying)", verbose.stdout)
        log_path = os.path.join(self.host.log_dir, f"one_tproxy_{br}.log")
        wait_until(
            lambda: "retrying in 4 s" in open(log_path).read(),
            timeout=15,
            interval=0.2,
            message="the third failed attempt logged",
        )
        with open(log_path) as f:
            lines = [line for line in f if "cannot listen on 169.254.16.9:5030" in line]
        self.assertEqual(len(lines), 3, lines)  # attempts at 0, 1 and 3 s: one line each step
        _end(squatter)
        self.wait_listening(br, 5030)
        self.assertNotIn("listen_error", self.port_status(br, 5030))
        done = guest.upload(5030, 1000)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_not_running(self) -> None:
        """Without a root proxy, status --json exits 3 and --prometheus says one_tproxy_up 0."""
        done = self.host.tproxy("status", "--json")
        self.assertEqual(done.returncode, 3, done.stdout + done.stderr)
        self.assertIn("not running", done.stderr)
        prom = self.host.tproxy("status", "--prometheus")
        self.assertEqual(prom.returncode, 3)
        self.assertIn("one_tproxy_up 0", prom.stdout.splitlines())


class LimitsTests(ObserveTestCase):
    """Limits in the inner proxy: the stream window at start, new limits on reload."""

    def test_small_window(self) -> None:
        """With a 16 KiB window the inner proxy says so at start and 1 MB still crosses."""
        sink_port = 7105
        self.host.serve_sink(sink_port)
        br, guest = self.bridge_with_guest({5030: (LOCAL, sink_port)})
        self.host.write_config(config_yaml([], debug_level=2, stream_window=16))
        self.host.tproxy("start", check=True)
        self.wait_listening(br, 5030)
        done = guest.upload(5030, 1_000_000)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        with open(os.path.join(self.host.log_dir, f"one_tproxy_{br}.log")) as f:
            self.assertIn("stream window 16 KiB", f.read())

    def test_reload_reaches_inner(self) -> None:
        """After a reload the inner proxy holds (and logs) the file's new limits."""
        br, _ = self.bridge_with_guest({5030: (LOCAL, 7106)})
        self.host.write_config(config_yaml([], debug_level=2))
        self.host.tproxy("start", check=True)
        self.wait_listening(br, 5030)
        self.host.write_config(config_yaml([], debug_level=2, grace_period=1, stream_window=64))
        self.host.tproxy("reload", check=True)
        log_path = os.path.join(self.host.log_dir, f"one_tproxy_{br}.log")
        wait_until(
            lambda: "limits changed: grace_period 10.0 -> 1.0, stream_window 1048576 -> 65536"
            in open(log_path).read(),
            timeout=15,
            interval=0.2,
            message="the inner proxy's new limits",
        )


class CheckTests(ObserveTestCase):
    """``check`` passes on a healthy bridge and names the cause of each broken variant."""

    def test_healthy_and_broken_variants(self) -> None:
        """Healthy: exit 0; backend stopped, listener missing, veth down, map pointing nowhere."""
        sink_port = 7201
        sink = self.host.serve_sink(sink_port)
        services = {5030: (LOCAL, sink_port)}
        br, guest = self.bridge_with_guest(services)
        self.start()
        self.wait_listening(br, 5030)

        rc, lines, bad = self.check()
        self.assertEqual((rc, bad), (0, []), "\n".join(lines))
        self.assertTrue(all(OK in x for x in lines))
        self.assertIn(f"{br} port 5030: {OK} listening on 169.254.16.9:5030", "\n".join(lines))
        self.assertTrue(any(f"destination {LOCAL}:{sink_port}: connected in" in x for x in lines))
        rc, lines, bad = self.check(br)
        self.assertEqual((rc, bad), (0, []), "\n".join(lines))

        # Backend stopped.
        sink.stop()
        rc, lines, bad = self.check()
        self.assertEqual(rc, 1)
        self.assertEqual(
            bad,
            [
                f"{br} port 5030: {FAIL} destination {LOCAL}:{sink_port}: "
                "connection refused (is the service running?)"
            ],
        )
        sink.start()

        # Listener missing: a map element the running mesh was not reloaded for.
        self.host.set_service_map(br, {**services, 7777: (LOCAL, sink_port)})
        rc, lines, bad = self.check()
        self.assertEqual(rc, 1)
        self.assertEqual(
            bad,
            [
                f"{br} port 7777: {FAIL} listening on 169.254.16.9:7777: "
                "the inner proxy does not listen on it"
            ],
        )

        # Map element pointing nowhere (no route from this hypervisor; nothing is sent).
        self.host.set_service_map(br, {**services, 7777: ("169.254.254.254", 80)})
        self.host.tproxy("reload", check=True)
        self.wait_listening(br, 7777)
        rc, lines, bad = self.check()
        self.assertEqual(rc, 1)
        self.assertEqual(
            bad,
            [f"{br} port 7777: {FAIL} destination 169.254.254.254:80: no route to the destination"],
        )
        self.host.set_service_map(br, services)
        self.host.tproxy("reload", check=True)

        # Veth down.
        self.host.ip("link", "set", f"{br}b", "down")
        rc, lines, bad = self.check()
        self.assertEqual(rc, 1)
        self.assertEqual(bad, [f"{br}: {FAIL} veth {br}b on bridge {br}: {br}b is down"])
        self.host.ip("link", "set", f"{br}b", "up")
        rc, lines, bad = self.check()
        self.assertEqual((rc, bad), (0, []), "\n".join(lines))

        self.host.tproxy("stop", check=True)
        rc, lines, bad = self.check()
        self.assertEqual(rc, 1)
        self.assertIn(f"{FAIL} root proxy one_tproxy: not running (one-tproxy start)", bad)
        self.assertIn(f"{br}: {FAIL} inner proxy one_tproxy_{br}: not running", bad)
        self.assertFalse(guest.curl(guest.service_url(5030), timeout=2).ok)
