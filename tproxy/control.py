"""The root proxy's control channel: JSON lines over a UNIX socket in the run directory.

Theory of operation. The root serves ``RUN_DIR/one_tproxy/control.sock``
(the directory mode 0700, the socket 0600: only root may ask) with
:class:`ControlService`, an ordinary Twisted service on its own reactor.
Each request is one line holding a JSON object with a ``"cmd"`` key; each
answer is one line holding a JSON object: the handler's result, or
``{"error": "..."}`` for an unknown command, malformed JSON, a failing
handler or an over-long line. A connection may ask several times; the server
never waits on anything but the handler (handlers are synchronous and read
counters that are already there: nothing on the data path waits for them).

Commands (``docs/operations.md``, "Control channel"):

* ``{"cmd": "ping"}`` -> ``{"ok": true, "pid": PID}``
* ``{"cmd": "stats"}`` -> the status document (``tproxy.metrics``)

:func:`query` is the blocking client the command line uses, with a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

log = Logger(namespace="tproxy.control")

#: Directory (under the run directory) and file name of the control socket.
CONTROL_DIR = "one_tproxy"
CONTROL_SOCKET = "control.sock"
#: Longest request line accepted.
MAX_REQUEST = 65536
#: Longest answer the client reads.
MAX_RESPONSE = 16 * 1024 * 1024
#: Seconds the command line waits for an answer.
DEFAULT_TIMEOUT = 5.0

#: A command handler: the request object -> the answer object.
Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def socket_path(run_dir: str) -> str:
    """Where the root proxy of a host with run directory ``run_dir`` listens."""
    return os.path.join(run_dir, CONTROL_DIR, CONTROL_SOCKET)


class ControlError(Exception):
    """The control channel could not answer; ``str(e)`` says why in one line."""


def handle_line(line: bytes, handlers: Mapping[str, Handler]) -> dict[str, Any]:
    """The answer to one request line (sans-I/O: what the protocol writes back)."""
    try:
        request = json.loads(line)
    except ValueError as e:
        return {"error": f"malformed request: {e}"}
    if not isinstance(request, dict):
        return {"error": "malformed request: not a JSON object"}
    cmd = request.get("cmd")
    handler = handlers.get(cmd) if isinstance(cmd, str) else None
    if handler is None:
        return {"error": f"unknown command {cmd!r}; known: {', '.join(sorted(handlers))}"}
    try:
        return dict(handler(request))
    except Exception as e:
        log.failure("control command {cmd} failed", cmd=cmd)
        return {"error": f"command {cmd} failed: {e}"}


class ControlProtocol(LineOnlyReceiver):
    """One control connection: a JSON line in, a JSON line out, as often as asked."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = handlers

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        answer = handle_line(line, self.handlers)
        self.sendLine(json.dumps(answer, separators=(",", ":")).encode())

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(json.dumps({"error": f"request longer than {MAX_REQUEST} bytes"}).encode())
        self.transport.loseConnection()  # type: ignore[union-attr]


class ControlFactory(Factory):
    """Builds a :class:`ControlProtocol` per connection."""

    noisy = False

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = handlers

    def buildProtocol(self, addr: object) -> ControlProtocol:  # type: ignore[override]
        return ControlProtocol(self.handlers)


def prepare_directory(path: str) -> None:
    """Make the socket's directory (0700, root's) and remove a stale socket in it.

    A directory that exists with another owner or with access for others is
    tightened to 0700; something that is not a socket at ``path`` is an error.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not replacing it")
    os.unlink(path)


class ControlService(Service):
    """Listens on the control socket while running; removes it when stopped."""

    name = "control"

    def __init__(self, reactor: Any, path: str, handlers: Mapping[str, Handler]) -> None:
        self._reactor = reactor
        self.path = path
        self.handlers = handlers
        self._port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        super().startService()
        try:
            prepare_directory(self.path)
        except (OSError, ControlError) as e:
            log.error("no control channel: {error}", error=e)
            return
        endpoint = UNIXServerEndpoint(self._reactor, self.path, mode=0o600)
        d = endpoint.listen(ControlFactory(self.handlers))
        self.listening = d
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        os.chmod(self.path, 0o600)
        self._port = port
        log.info("control channel on {path}", path=self.path)
        return port

    def _failed(self, failure: Any) -> None:
        log.error(
            "no control channel on {path}: {error}", path=self.path, error=failure.getErrorMessage()
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        d: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return d


def query(
    path: str, request: Mapping[str, Any], timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """Send one request, return the answer object; ControlError with the reason otherwise.

    An answer holding ``"error"`` is raised as ControlError too.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is the root proxy running?") from None
        except ConnectionRefusedError:
            raise ControlError(f"nobody answers on {path}: is the root proxy running?") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(f"no answer on {path} within {timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"no answer on {path} within {timeout:g} s") from None
            except OSError as e:
                raise ControlError(f"reading from {path}: {e.strerror or e}") from None
            if not chunk:
                raise ControlError(f"the root proxy closed {path} without an answer")
            buf += chunk
            if len(buf) > MAX_RESPONSE:
                raise ControlError(f"answer on {path} longer than {MAX_RESPONSE} bytes")
    finally:
        sock.close()
    line = bytes(buf).split(b"\n", 1)[0]
    try:
        answer = json.loads(line)
    except ValueError as e:
        raise ControlError(f"malformed answer on {path}: {e}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"malformed answer on {path}: not a JSON object")
    if "error" in answer:
        raise ControlError(str(answer["error"]))
    return answer
