"""Tests for tproxy.control: the JSON-lines protocol on a fake transport, directory preparation."""

from __future__ import annotations

import json
import os
import socket
import stat

from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from tproxy.control import (
    MAX_REQUEST,
    ControlError,
    ControlFactory,
    handle_line,
    prepare_directory,
    query,
    socket_path,
)


def _handlers() -> dict[str, object]:
    def stats(request: object) -> dict[str, object]:
        return {"bridges": {}, "n": 1}

    def broken(request: object) -> dict[str, object]:
        raise RuntimeError("kaput")

    return {"stats": stats, "broken": broken}


class HandleLineTests(unittest.TestCase):
    """One request line to one answer object."""

    def test_known_command(self) -> None:
        """A known command returns its handler's object."""
        self.assertEqual(handle_line(b'{"cmd": "stats"}', _handlers()), {"bridges": {}, "n": 1})  # type: ignore[arg-type]

    def test_unknown_command(self) -> None:
        """An unknown command is an error naming the known ones."""
        answer = handle_line(b'{"cmd": "nope"}', _handlers())  # type: ignore[arg-type]
        self.assertIn("unknown command 'nope'", answer["error"])
        self.assertIn("broken, stats", answer["error"])

    def test_malformed(self) -> None:
        """Bad JSON and non-objects are errors, not crashes."""
        for line in (b"{", b"[1]", b'"stats"', b'{"cmd": 3}'):
            self.assertIn("error", handle_line(line, _handlers()))  # type: ignore[arg-type]

    def test_failing_handler(self) -> None:
        """A handler that raises becomes an error answer and a logged failure."""
        answer = handle_line(b'{"cmd": "broken"}', _handlers())  # type: ignore[arg-type]
        self.assertEqual(answer, {"error": "command broken failed: kaput"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ProtocolTests(unittest.TestCase):
    """The line protocol on a StringTransport."""

    def _connect(self) -> tuple[object, StringTransport]:
        proto = ControlFactory(_handlers()).buildProtocol(None)  # type: ignore[arg-type]
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t

    def test_several_requests_one_connection(self) -> None:
        """Each request line gets one answer line, in order, split input included."""
        proto, t = self._connect()
        proto.dataReceived(b'{"cmd": "stats"}\n{"cmd"')  # type: ignore[attr-defined]
        proto.dataReceived(b': "nope"}\r\n\n')  # type: ignore[attr-defined]
        lines = t.value().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[0]), {"bridges": {}, "n": 1})
        self.assertIn("error", json.loads(lines[1]))
        self.assertFalse(t.disconnecting)

    def test_overlong_request(self) -> None:
        """A line longer than the limit gets an error and the connection is closed."""
        proto, t = self._connect()
        proto.dataReceived(b"x" * (MAX_REQUEST + 10))  # type: ignore[attr-defined]
        self.assertIn(b"longer than", t.value())
        self.assertTrue(t.disconnecting)


class DirectoryTests(unittest.TestCase):
    """The socket's directory and stale sockets."""

    def test_directory_mode_and_stale_socket(self) -> None:
        """The directory becomes 0700 and a stale socket file is removed."""
        run = self.mktemp()
        path = socket_path(run)
        os.makedirs(os.path.dirname(path), mode=0o755)
        os.chmod(os.path.dirname(path), 0o755)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        prepare_directory(path)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertFalse(os.path.exists(path))

    def test_not_a_socket(self) -> None:
        """A regular file where the socket goes is left alone and reported."""
        run = self.mktemp()
        path = socket_path(run)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("keep me")
        self.assertRaises(ControlError, prepare_directory, path)
        self.assertTrue(os.path.isfile(path))


class QueryErrorTests(unittest.TestCase):
    """The blocking client's errors when nobody answers (no server involved)."""

    def test_no_socket(self) -> None:
        """A missing socket says the root proxy may not run."""
        e = self.assertRaises(ControlError, query, os.path.join(self.mktemp(), "x.sock"), {})
        self.assertIn("is the root proxy running", str(e))

    def test_stale_socket(self) -> None:
        """A socket file nobody listens on says nobody answers."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "s")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        e = self.assertRaises(ControlError, query, path, {"cmd": "stats"})
        self.assertIn("nobody answers", str(e))
