"""The String-Phone protocol, sans-I/O: framing, events and the connection state machine.

Nothing in this package touches a socket, a reactor or a clock: it is fed bytes
and returns events and bytes (``docs/protocol.md`` is its specification).
``tproxy.link`` adapts it to Twisted transports.
"""

from tproxy.protocol.connection import Connection, ProtocolError, Role, StreamState
from tproxy.protocol.frames import FrameType, Reason

__all__ = ["Connection", "FrameType", "ProtocolError", "Reason", "Role", "StreamState"]
