"""Tests of one-tproxy.

``tests/`` mirrors ``tproxy/``; integration tests live in ``tests/integration``.
"""
