"""Where things live: the default paths and their environment overrides (DESIGN.md 2.3)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from attrs import frozen

DEFAULT_CONFIG = "/var/tmp/one/etc/vnm/OpenNebulaNetwork.conf"
DEFAULT_LOG_DIR = "/var/log"
DEFAULT_RUN_DIR = "/var/run"

ENV_CONFIG = "ONE_TPROXY_CONFIG"
ENV_LOG_DIR = "ONE_TPROXY_LOG_DIR"
ENV_RUN_DIR = "ONE_TPROXY_RUN_DIR"


@frozen
class Paths:
    """The three locations every command and daemon agrees on."""

    config: str
    """The OpenNebulaNetwork.conf YAML file."""
    log_dir: str
    """Where ``one_tproxy.log`` and ``one_tproxy_BR.log`` are written."""
    run_dir: str
    """Where runtime files (control socket, lock) live."""

    @classmethod
    def from_sources(
        cls,
        config: str | None = None,
        log_dir: str | None = None,
        run_dir: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Paths:
        """Command-line values win over environment variables, which win over defaults."""
        env = os.environ if environ is None else environ
        return cls(
            config=config or env.get(ENV_CONFIG) or DEFAULT_CONFIG,
            log_dir=log_dir or env.get(ENV_LOG_DIR) or DEFAULT_LOG_DIR,
            run_dir=run_dir or env.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR,
        )
