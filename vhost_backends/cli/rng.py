"""vhost-device-rng: a vhost-user virtio-rng (entropy) device backend.

Same flags and behaviour as rust-vmm's ``vhost-device-rng``
(``vhost-device-rng/src/main.rs``): ``-s/--socket-path`` is suffixed with the
socket index (``<path>0 .. <path>N-1``, even for one socket); ``--max-bytes`` is
divided between the sockets (integer division); ``--period`` is the rate-limit
window in milliseconds, 1..=65536; ``--rng-source`` is opened once and shared.
Upstream's README calls the last flag ``--filename``; the binary only knows
``-f/--rng-source``, and so do we.

When ``--rng-source`` is the kernel's random device (``/dev/urandom``, the default,
or ``/dev/random``), its bytes are made by the vDSO's ``getrandom`` where the kernel
has it: the same generator without a system call per request
(:mod:`virtio_devices.hosts.files`); ``VHD_RNG_VDSO=0`` reads the file instead.

Example::

    vhost-device-rng --socket-path=/tmp/rng.sock -c 2 -m 512 -p 1000
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from virtio_devices.hosts.files import FileEntropySource, RngError
from virtio_devices.rng import RngDevice

from ._common import (
    U32_MAX,
    USIZE_MAX,
    ConfigError,
    add_socket_count_args,
    env_switch,
    make_parser,
    run_main,
    serve,
    socket_paths,
    uint,
)

__all__ = ["DEFAULT_RNG_SOURCE", "Config", "build_parser", "main", "run"]

log = logging.getLogger(__name__)

PROG = "vhost-device-rng"
DEFAULT_RNG_SOURCE = "/dev/urandom"
#: Upstream's VHU_RNG_MAX_PERIOD_MS (QEMU's vhost-user-rng/virtio-rng maximum).
MAX_PERIOD_MS = 65536


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-rng``, flag for flag as upstream's ``RngArgs``."""
    p = make_parser(PROG, __doc__)
    p.add_argument(
        "-p",
        "--period",
        type=uint(128),
        default=MAX_PERIOD_MS,
        metavar="PERIOD",
        help=f"Time needed (in ms) to transfer max-bytes amount of byte [default: {MAX_PERIOD_MS}]",
    )
    p.add_argument(
        "-m",
        "--max-bytes",
        type=uint(64),
        default=USIZE_MAX,
        metavar="MAX_BYTES",
        help=f"Maximum amount of byte that can be transferred in a period [default: {USIZE_MAX}]",
    )
    add_socket_count_args(p)
    p.add_argument(
        "-f",
        "--rng-source",
        default=DEFAULT_RNG_SOURCE,
        metavar="RNG_SOURCE",
        help=f"Where to get the RNG data from [default: {DEFAULT_RNG_SOURCE}]",
    )
    return p


class Config(NamedTuple):
    """A validated ``vhost-device-rng`` configuration (upstream's ``VuRngConfig``).

    ``max_bytes`` is already the per-socket share: ``--max-bytes`` divided by the
    socket count, as upstream's ``TryFrom<RngArgs>`` does.
    """

    period_ms: int
    max_bytes: int
    count: int  # type: ignore[assignment]  # shadows tuple.count: never used as a sequence
    socket_path: str
    rng_source: str

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """Validate the parsed flags.

        Raises:
            ConfigError: the period is 0 or above 65536 ms (upstream: "Period is
                too big"), the socket count is 0, or the socket path names no file.
        """
        period: int = ns.period
        count: int = ns.socket_count
        if period == 0 or period > MAX_PERIOD_MS:
            raise ConfigError(f"--period must be 1..={MAX_PERIOD_MS} (ms), not {period}")
        if count == 0:
            raise ConfigError(f"--socket-count must be at least 1, not {count}")
        if count > U32_MAX:  # argparse's u32 already refuses it; keep the invariant local
            raise ConfigError(f"--socket-count must be at most {U32_MAX}, not {count}")
        config = cls(
            period_ms=period,
            # Divide the bandwidth between the guests so the source is not overwhelmed.
            max_bytes=ns.max_bytes // count,
            count=count,
            socket_path=os.fspath(ns.socket_path),
            rng_source=os.fspath(ns.rng_source),
        )
        config.socket_paths()  # a path without a file name fails here, not in run()
        return config

    @property
    def device_max_bytes(self) -> int | None:
        """The per-device limit for :class:`RngDevice`: ``None`` when ``--max-bytes``
        was usize::MAX (the default), which no window can ever exhaust; the device
        then skips the rate-limit bookkeeping."""
        return None if self.max_bytes >= USIZE_MAX // self.count else self.max_bytes

    def socket_paths(self) -> list[str]:
        """The sockets to serve: ``<socket_path>0 .. <socket_path>{count-1}``."""
        return socket_paths(self.socket_path, self.count)


def run(config: Config) -> int:
    """Open the entropy source once, serve every socket until SIGINT/SIGTERM.

    Each front-end connection gets a fresh :class:`~virtio_devices.rng.RngDevice`
    (so a fresh rate-limit window), all reading the one shared source.

    Raises:
        ConfigError: the source cannot be opened.
    """
    vdso = env_switch("VHD_RNG_VDSO", True)
    try:
        source = FileEntropySource(config.rng_source, vdso=vdso)
    except RngError as e:
        raise ConfigError(str(e)) from e
    if source.uses_vdso:
        log.info("%s is the kernel's random device: its bytes come from the vDSO's getrandom", source.name)

    def device_factory(index: int) -> RngDevice:
        return RngDevice(source, period_ms=config.period_ms, max_bytes=config.device_max_bytes)

    try:
        return serve(PROG, config.socket_paths(), device_factory)
    finally:
        source.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-rng`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
