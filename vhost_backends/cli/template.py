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
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

from virtio_devices.template import TemplateDevice

from ._common import ConfigError, env_poll_max_us, make_parser, run_main

__all__ = ["Config", "build_parser", "main", "run"]

PROG = "vhost-device-template"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-template``, as upstream's ``FooArgs``."""
    p = make_parser(PROG, __doc__)
    p.add_argument(
        "-s",
        "--socket-path",
        required=True,
        metavar="SOCKET",
        help="Location of vhost-user Unix domain socket. This supports a single socket / guest.",
    )
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
        path = os.fspath(ns.socket_path)
        if pathlib.PurePath(path).name in ("", ".", ".."):
            raise ConfigError(f"socket path {path!r} has no file name")
        return cls(socket_path=path)


def run(config: Config) -> int:
    """Serve the socket until SIGINT/SIGTERM, a fresh device per connection."""
    # Imported here so that parsing and validation work without the daemon layer.
    from vhost_backends.daemon import run_daemons  # noqa: PLC0415

    def device_factory(index: int) -> TemplateDevice:
        return TemplateDevice()

    return run_daemons(PROG, [config.socket_path], device_factory, poll_max_us=env_poll_max_us())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-template`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
