"""Options and service construction for ``twistd one-tproxy``.

The plugin file in ``twisted/plugins`` names this module; everything it needs
lives here so the plugin stays one line.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage

from tproxy import settings


class Options(usage.Options):
    """Command-line options of ``twistd one-tproxy`` (the same as ``one-tproxy``'s)."""

    optParameters = [
        ["config", "c", None, "configuration file"],
        ["log-dir", None, None, "directory of the log files"],
        ["run-dir", None, None, "directory of runtime files"],
    ]

    def postOptions(self) -> None:
        self.paths = settings.Paths.from_sources(
            config=self["config"], log_dir=self["log-dir"], run_dir=self["run-dir"]
        )


def makeService(options: Options) -> IService:
    """Build the root proxy's service tree (the daemon issue fills it in)."""
    return MultiService()
