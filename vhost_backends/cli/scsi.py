"""vhost-device-scsi: a vhost-user backend for virtio-scsi disks over raw image files.

Same flags as rust-vmm's ``vhost-device-scsi``: image files as positional arguments
(LUN k of target 0 is image k, at most 256), ``-r/--read-only``, ``--solid-state``
and one socket, ``-s/--socket-path``, used verbatim.  Unlike upstream, ``-r`` opens
the images read-only and refuses writes (DATA PROTECT), writes are supported, a
missing image is one error line, the daemon serves front-end after front-end,
``--direct`` bypasses the host page cache (O_DIRECT), and ``--fixed-buffers``
bounds the guest RAM registered with io_uring for it.

Example::

    vhost-device-scsi --socket-path=/tmp/scsi.sock disk0.img disk1.img
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from virtio_devices.hosts.images import DiskImage, ImageError, open_image
from virtio_devices.scsi.device import ScsiDevice
from virtio_devices.scsi.emulation import MAX_LUNS

from ._common import ConfigError, add_socket_path_arg, make_parser, run_main, serve, verbatim_socket_path

__all__ = ["OUR_FLAGS", "Config", "build_parser", "main", "run"]

PROG = "vhost-device-scsi"
#: Flags of ours beside upstream's (tests/vhost_backends/test_cli_flags.py).
OUR_FLAGS = frozenset({"--direct", "--fixed-buffers"})
log = logging.getLogger(__name__)
#: ``--fixed-buffers``' default: guest RAM up to 16 GiB is registered.
DEFAULT_FIXED_MIB = 16384


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-scsi``, as upstream's ``ScsiArgs``."""
    p = make_parser(PROG, __doc__)
    p.add_argument(
        "-r",
        "--read-only",
        action="store_true",
        help="Make the images read-only: the guest sees them write-protected and every write is refused.",
    )
    p.add_argument(
        "--solid-state",
        action="store_true",
        help="Tell the guest this disk is non-rotational (VPD page B1h).",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="Read and write the images with O_DIRECT, bypassing the host page cache "
        "(transfers whose buffers are not 512-byte aligned still use it); the images' clean "
        "pages are dropped from that cache once at start. Not in upstream.",
    )
    p.add_argument(
        "--fixed-buffers",
        type=int,
        default=DEFAULT_FIXED_MIB,
        metavar="MIB",
        help="With --direct: register the guest's RAM with io_uring when it is at most MIB MiB "
        f"(default {DEFAULT_FIXED_MIB}; 0: never), so that O_DIRECT transfers do not pin their pages "
        "one request at a time. Registering pins every page of that RAM, once per memory table and "
        "only once the RAM is allocated (at most 64 MiB of it not yet). Not in upstream.",
    )
    add_socket_path_arg(p, help="Location of vhost-user socket.")
    p.add_argument(
        "images", nargs="*", metavar="IMAGES", help="Images against which the SCSI actions are emulated."
    )
    return p


class Config(NamedTuple):
    """A validated ``vhost-device-scsi`` configuration."""

    socket_path: str
    images: tuple[str, ...]
    read_only: bool
    solid_state: bool
    direct: bool = False
    fixed_buffers_mib: int = DEFAULT_FIXED_MIB

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """Validate the parsed flags.

        Raises:
            ConfigError: more than 256 images (upstream: "More than 256 LUNs aren't
                currently supported"), or the socket path names no file.
        """
        images = tuple(os.fspath(p) for p in ns.images)
        if ns.fixed_buffers < 0:
            raise ConfigError(f"--fixed-buffers: a size in MiB, 0 or more, not {ns.fixed_buffers}")
        if len(images) > MAX_LUNS:
            raise ConfigError(f"IMAGES: at most {MAX_LUNS} images (LUNs) are supported, not {len(images)}")
        return cls(
            socket_path=verbatim_socket_path(ns.socket_path),
            images=images,
            read_only=bool(ns.read_only),
            solid_state=bool(ns.solid_state),
            direct=bool(ns.direct),
            fixed_buffers_mib=int(ns.fixed_buffers),
        )


def run(config: Config) -> int:
    """Open every image once, serve the socket until SIGINT/SIGTERM.

    Each front-end connection gets a fresh :class:`ScsiDevice` over the same open images.

    Raises:
        ConfigError: an image is missing, unreadable, or (without ``-r``) not writable.
    """
    images: list[DiskImage] = []
    try:
        for path in config.images:
            try:
                images.append(open_image(path, read_only=config.read_only, direct=config.direct))
            except ImageError as e:
                raise ConfigError(str(e)) from e
        if not images:
            log.warning("no images given: the target has no logical units")

        def device_factory(index: int) -> ScsiDevice:
            return ScsiDevice(
                images,
                read_only=config.read_only,
                solid_state=config.solid_state,
                fixed_max=config.fixed_buffers_mib << 20,
            )

        return serve(PROG, [config.socket_path], device_factory)
    finally:
        for image in images:
            image.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-scsi`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
