"""Tests for tproxy.protocol.events."""

from __future__ import annotations

import attrs
from twisted.trial import unittest

from tproxy.protocol.events import DataReceived, StreamRefused
from tproxy.protocol.frames import Reason


class EventTests(unittest.TestCase):
    """Events are small immutable values."""

    def test_frozen(self) -> None:
        """An event cannot be changed after it was made."""
        ev = DataReceived(1, b"x")
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, ev, "data", b"y")

    def test_value_equality(self) -> None:
        """Events compare by value, so tests can assert exact event lists."""
        self.assertEqual(StreamRefused(3, Reason.REFUSED), StreamRefused(3, Reason.REFUSED))
        self.assertNotEqual(StreamRefused(3, Reason.REFUSED), StreamRefused(3, Reason.TIMED_OUT))

    def test_slots(self) -> None:
        """Events use slots (no per-instance dict on the DATA path)."""
        self.assertFalse(hasattr(DataReceived(1, b"x"), "__dict__"))
