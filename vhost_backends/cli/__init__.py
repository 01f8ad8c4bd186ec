"""The ``vhost-device-<name>`` commands, one module per daemon.

Each module has the same four pieces (STYLE.md §6): ``build_parser()`` with the
upstream flags spelled exactly as upstream spells them, a frozen ``Config`` dataclass
whose ``from_args`` does all validation, ``run(config) -> int`` which starts the
daemon, and ``main(argv=None) -> int``, the console-script entry point.
"""
