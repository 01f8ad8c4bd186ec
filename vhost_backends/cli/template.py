"""vhost-device-template: a vhost-user backend for the template ("Foo") device.

The smallest complete daemon, to copy when adding a device (docs/adding-a-device.md).
Same flag as rust-vmm's ``vhost-device-template``: one socket, ``-s/--socket-path``,
used verbatim (no index suffix).  Each request is logged (``RUST_LOG=info``) and,
unlike upstream, completed: readable bytes are echoed into the writable buffers.

Example::

    vhost-device-template --socket-path=/tmp/foo.sock
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

from virtio_devices.template import TemplateDevice

from ._common import add_socket_path_arg, make_parser, run_main, serve, verbatim_socket_path

__all__ = ["Config", "build_parser", "main", "run"]

PROG = "vhost-device-template"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-template``, as upstream's ``FooArgs``."""
    p = make_parser(PROG, __doc__)
    add_socket_path_arg(p)
    return p


class Config(NamedTuple):
    """A validated ``vhost-device-template`` configuration (upstream's ``FooConfiguration``)."""

    socket_path: str

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """Validate the parsed flags.

        Upstream's conversion cannot fail; a device with real options validates
        them here and raises :class:`ConfigError`.

        Raises:
            ConfigError: the socket path names no file.
        """
        return cls(socket_path=verbatim_socket_path(ns.socket_path))


def run(config: Config) -> int:
    """Serve the socket until SIGINT/SIGTERM, a fresh device per connection."""
    return serve(PROG, [config.socket_path], lambda index: TemplateDevice())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-template`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
