"""One module per ``one-tproxy`` subcommand group.

Each module offers ``add_arguments(name, parser)`` and
``run(name, args, paths) -> int``.
"""
