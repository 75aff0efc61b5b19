"""What the root and every inner proxy do alike as daemons.

A :class:`DaemonRuntime` raises the open-files limit, reads the configuration
file (falling back to the defaults, with an error in the log, when it cannot be
used), writes ``LOG_DIR/NAME.log`` at the file's ``:tproxy_debug_level:`` and,
on :meth:`DaemonRuntime.reload` (SIGHUP), reopens that file and re-reads the
level.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from tproxy.config import Config, ConfigError, Limits, load_config, log_level
from tproxy.logs import DaemonLog, begin_daemon_logging
from tproxy.rlimits import raise_nofile_limit
from tproxy.settings import Paths

log = Logger(namespace="tproxy.runtime")


class DaemonRuntime:
    """Limits, configuration and log file of one proxy process named ``name``."""

    def __init__(
        self,
        name: str,
        paths: Paths,
        load: Callable[[str], Config] = load_config,
    ) -> None:
        self.name = name
        self.paths = paths
        self._load = load
        self.config = Config(paths.config)
        self.log_file: DaemonLog | None = None

    def limits(self) -> Limits:
        """The limits in force."""
        return self.config.limits

    def load(self) -> Config:
        """Read the configuration file; ConfigError when it cannot be used."""
        self.config = self._load(self.paths.config)
        return self.config

    def _try_load(self) -> None:
        try:
            self.load()
        except ConfigError as e:
            log.error("{error}; using the settings in force", error=e)

    def prepare(self, begin_logging: bool = True) -> None:
        """Raise the files limit, read the configuration, start the log file.

        ``begin_logging`` starts twisted.logger's global logging with the file
        (a standalone process); without it the file is added as an observer
        (under twistd, which began logging already).
        """
        _, soft_after = raise_nofile_limit()
        error: ConfigError | None = None
        try:
            self.load()
        except ConfigError as e:
            error = e
        self.log_file = DaemonLog(self.paths.log_dir, self.name, self.config.log_level)
        if begin_logging:
            begin_daemon_logging(self.log_file)
        else:
            self.log_file.install()
        if error is not None:
            log.error("{error}; using the default settings", error=error)
        log.info("open-files limit {soft}", soft=soft_after)

    def reload(self) -> None:
        """SIGHUP: reopen the log file, re-read the log level (and limits)."""
        if self.log_file is not None:
            self.log_file.reopen()
        self._try_load()
        if self.log_file is not None:
            self.log_file.set_level(self.config.log_level)
        log.info("reloaded: debug level {debug_level}", debug_level=self.config.debug_level)

    def set_debug_level(self, debug_level: int) -> None:
        """LogControl for the root service."""
        if self.log_file is not None:
            self.log_file.set_level(log_level(debug_level))

    def reopen(self) -> None:
        """LogControl for the root service."""
        if self.log_file is not None:
            self.log_file.reopen()
