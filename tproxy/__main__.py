"""``python -m tproxy`` is ``one-tproxy``."""

from tproxy.cli import console

console()
