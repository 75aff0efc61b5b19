"""Tests for the distribution's contents: what ``pip install .`` (non-editable) installs."""

from __future__ import annotations

import os
import warnings

from twisted.trial import unittest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(TOP, "pyproject.toml")


def _packages() -> list[str]:
    """The packages setuptools puts into the wheel, as it computes them from pyproject.toml."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist = apply_configuration(Distribution(), PYPROJECT)
    return list(dist.packages or [])


class PackagingTests(unittest.TestCase):
    """The wheel carries the twistd plugin without shadowing Twisted's own package."""

    def setUp(self) -> None:
        try:
            import setuptools.config.pyprojecttoml  # noqa: F401
        except ImportError as e:
            raise unittest.SkipTest(f"setuptools cannot read pyproject.toml here: {e}") from e

    def test_plugin_installed(self) -> None:
        """twisted/plugins/one_tproxy.py is part of a non-editable install."""
        self.assertIn("twisted.plugins", _packages())
        self.assertTrue(os.path.exists(os.path.join(TOP, "twisted", "plugins", "one_tproxy.py")))

    def test_twisted_not_shadowed(self) -> None:
        """Neither twisted/__init__.py nor twisted/plugins/__init__.py is ours to install."""
        self.assertNotIn("twisted", _packages())
        self.assertFalse(os.path.exists(os.path.join(TOP, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(TOP, "twisted", "plugins", "__init__.py")))

    def test_product_packages(self) -> None:
        """Every tproxy package is installed, and nothing of the tests."""
        packages = _packages()
        for name in ("tproxy", "tproxy.commands", "tproxy.protocol"):
            self.assertIn(name, packages)
        self.assertFalse([p for p in packages if p.split(".")[0] in ("tests", "bench")])
