"""vhost-device-gpio: a vhost-user virtio-gpio device backend.

Same flags and checks as rust-vmm's ``vhost-device-gpio``
(``vhost-device-gpio/src/backend.rs``): ``-s/--socket-path`` is suffixed with the
socket index (``<path>0 .. <path>N-1``, even for one socket); ``-l/--device-list``
is ``:``-separated, one entry per socket: ``N`` for the host chip
``/dev/gpiochipN`` (through python ``gpiod``, the ``hosts`` extra) or ``sN`` for a
simulated chip of N lines named ``dummy0 ..`` (always available; upstream needs the
``mock_gpio`` cargo feature).  Host chips may not repeat, simulated ones may.

``--sim-control PATH`` (ours; upstream has no such flag, so its command lines stay
valid) listens on a Unix stream socket at exactly PATH for ASCII command lines that
drive the simulated chips: ``set <dev> <line> <0|1>`` sets an input level (an edge
for a waiting interrupt), ``get <dev> <line>`` answers ``ok <none|in|out> <value>``;
``<dev>`` is the index of the entry in ``-l``.

Example::

    vhost-device-gpio -s /tmp/gpio.sock -c 2 -l 0:s8 --sim-control /tmp/gpio.ctl
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from virtio_devices.gpio import GpioDevice
from virtio_devices.hosts.gpio import GpioChip, GpioChipError, SimControlServer, SimGpioChip

from ._common import ConfigError, add_socket_count_args, make_parser, run_main, serve, socket_paths, uint

__all__ = ["OUR_FLAGS", "Config", "DeviceEntry", "build_parser", "main", "parse_device_list", "run"]

log = logging.getLogger(__name__)

PROG = "vhost-device-gpio"
#: Flags of ours beside upstream's (tests/vhost_backends/test_cli_flags.py).
OUR_FLAGS = frozenset({"--sim-control"})
_U32_MAX = 2**32 - 1

_AFTER_HELP = (
    "Each device number here will be used to access the corresponding /dev/gpiochipX or "
    'simulate a GPIO device with N pins. Example, "-c 4 -l 3:s4:6:s1"'
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-gpio``: upstream's ``GpioArgs`` plus
    ``--sim-control``."""
    p = make_parser(PROG, __doc__)
    p.epilog = _AFTER_HELP
    add_socket_count_args(p, count_help="Number of guests (sockets) to connect to. [default: 1]")
    # Upstream's socket count is a usize; add_socket_count_args made it a u32.
    for action in p._actions:
        if action.dest == "socket_count":
            action.type = uint(64)
    p.add_argument(
        "-l",
        "--device-list",
        required=True,
        metavar="DEVICE_LIST",
        help="List of GPIO devices, one for each guest, in the format <N1>[:<N2>]: N a host "
        "/dev/gpiochipN, sN a simulated chip of N lines",
    )
    p.add_argument(
        "--sim-control",
        metavar="PATH",
        help="Unix socket at PATH taking 'set <dev> <line> <0|1>' and 'get <dev> <line>' "
        "lines for simulated chips (not an upstream flag)",
    )
    return p


class DeviceEntry(NamedTuple):
    """One entry of ``-l``: a host chip number, or the line count of a simulated chip."""

    simulated: bool
    number: int

    def __str__(self) -> str:
        return f"s{self.number}" if self.simulated else str(self.number)


def _parse_u32(text: str) -> int:
    """Rust's ``str::parse::<u32>``: decimal digits, an optional ``+``.

    Raises:
        ConfigError: upstream's ``ParseFailure`` ("Failed while parsing to integer").
    """
    digits = text[1:] if text.startswith("+") else text
    if not digits:
        reason = "cannot parse integer from empty string"
    elif not digits.isascii() or not digits.isdigit():
        reason = "invalid digit found in string"
    elif int(digits) > _U32_MAX:
        reason = "number too large to fit in target type"
    else:
        return int(digits)
    raise ConfigError(f"Failed while parsing to integer: {text!r}: {reason}")


def parse_device_list(text: str) -> list[DeviceEntry]:
    """Upstream's ``DeviceConfig::try_from``: ``:``-separated ``N`` or ``sN`` entries.

    Raises:
        ConfigError: an entry is not a number (upstream: "Failed while parsing to
            integer"), a host chip repeats ("Duplicate device detected: N"), or a
            simulated chip has more lines than virtio-gpio's 16-bit ``ngpio``
            (upstream panics).
    """
    entries: list[DeviceEntry] = []
    for item in text.split(":"):
        if item.startswith("s"):
            lines = _parse_u32(item[1:])
            if lines > 0xFFFF:
                raise ConfigError(
                    f"simulated chip {item}: at most 65535 lines (virtio-gpio's ngpio is 16 bits)"
                )
            entries.append(DeviceEntry(True, lines))
            continue
        entry = DeviceEntry(False, _parse_u32(item))
        if entry in entries:
            raise ConfigError(f"Duplicate device detected: {entry.number}")
        entries.append(entry)
    return entries


class Config(NamedTuple):
    """A validated ``vhost-device-gpio`` configuration (upstream's ``GpioConfiguration``)."""

    socket_path: str
    socket_count: int
    devices: tuple[DeviceEntry, ...]
    sim_control: str | None = None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """Validate the parsed flags (upstream's ``TryFrom<GpioArgs>``, same order).

        Raises:
            ConfigError: a socket count of 0 ("Invalid socket count: 0"), a bad
                device list (:func:`parse_device_list`), a device count that is not
                the socket count ("Socket count (x) doesn't match device count y"),
                or a path that names no file.
        """
        count: int = ns.socket_count
        if count == 0:
            raise ConfigError("Invalid socket count: 0")
        devices = tuple(parse_device_list(ns.device_list))
        if len(devices) != count:
            raise ConfigError(f"Socket count ({count}) doesn't match device count {len(devices)}")
        sim_control = None if ns.sim_control is None else os.fspath(ns.sim_control)
        if sim_control is not None and not os.path.basename(sim_control):
            raise ConfigError(f"--sim-control {sim_control!r} names no file")
        config = cls(os.fspath(ns.socket_path), count, devices, sim_control)
        config.socket_paths()  # a path without a file name fails here, not in run()
        return config

    def socket_paths(self) -> list[str]:
        """The sockets to serve: ``<socket_path>0 .. <socket_path>{count-1}``."""
        return socket_paths(self.socket_path, self.socket_count)


def open_chip(entry: DeviceEntry) -> GpioChip:
    """The chip of one ``-l`` entry: a fresh simulated chip, or the host's
    ``/dev/gpiochipN`` through gpiod.

    Raises:
        ConfigError: the host chip cannot be opened, or gpiod is not installed.
    """
    if entry.simulated:
        return SimGpioChip(entry.number)
    try:
        from virtio_devices.hosts.gpiod_chip import GpiodChip, chip_path  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ConfigError(
            f"Could not open gpio device: host chips need the python gpiod package "
            f"(pip install 'vhost-device-py[hosts]'): {e}"
        ) from e
    try:
        return GpiodChip(chip_path(entry.number))
    except GpioChipError as e:
        raise ConfigError(f"Could not open gpio device: {e}") from e


def run(config: Config) -> int:
    """Open every chip once, start ``--sim-control``, serve every socket until
    SIGINT/SIGTERM; a fresh :class:`~virtio_devices.gpio.GpioDevice` per front-end
    connection over the socket's chip (a simulated chip keeps its input levels
    across connections; a device reset releases the lines).

    Raises:
        ConfigError: a chip cannot be opened, or ``--sim-control`` cannot listen.
    """
    chips: list[GpioChip] = []
    control: SimControlServer | None = None
    try:
        for entry in config.devices:
            chips.append(open_chip(entry))
        if config.sim_control is not None:
            sims = [c if isinstance(c, SimGpioChip) else None for c in chips]
            try:
                control = SimControlServer(config.sim_control, sims)
            except GpioChipError as e:
                raise ConfigError(str(e)) from e
            control.start()
            log.info("--sim-control %s: accepting commands", config.sim_control)

        def device_factory(index: int) -> GpioDevice:
            return GpioDevice(chips[index])

        return serve(PROG, config.socket_paths(), device_factory)
    finally:
        if control is not None:
            control.close()
        for chip in chips:
            chip.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-gpio`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
