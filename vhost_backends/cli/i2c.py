"""vhost-device-i2c: a vhost-user virtio-i2c (I2C adapter) device backend.

Same flags as rust-vmm's ``vhost-device-i2c`` (``vhost-device-i2c/src/main.rs``):
``-s/--socket-path`` suffixed with the socket index (``<path>0 .. <path>N-1``),
``-c/--socket-count``, and ``-l/--device-list``: comma-separated adapters, each
``<bus>:<addr>[:<addr>...]`` with decimal 7-bit client addresses, unique across the
list.  ``<bus>`` is an adapter number (``/dev/i2c-N``) or, when not a number, an
adapter name matched (trimmed) against ``/sys/bus/i2c/devices/i2c-*/name``.  Every
socket exposes the same adapters.  The reserved name ``sim`` is a simulated bus
with a 24C02 EEPROM at each address (an adapter whose sysfs name is ``sim`` can
still be chosen by number).

Example::

    vhost-device-i2c -s /tmp/i2c.sock -c 2 -l 6:32:41,sim:80
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from virtio_devices.hosts.i2c import (
    SIM_ADAPTER_NAME,
    SYSFS_I2C_DEVICES,
    HostAdapter,
    I2cAdapter,
    I2cBus,
    I2cError,
    SimAdapter,
    find_adapter,
)
from virtio_devices.i2c import I2cDevice

from ._common import ConfigError, add_socket_count_args, make_parser, run_main, serve, socket_paths

__all__ = ["AdapterSpec", "Config", "build_parser", "main", "open_bus", "parse_device_list", "run"]

PROG = "vhost-device-i2c"
#: Client addresses are 7-bit.
MAX_ADDR = 127


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-i2c``, flag for flag as upstream's ``I2cArgs``."""
    p = make_parser(PROG, __doc__)
    add_socket_count_args(p)
    p.add_argument(
        "-l",
        "--device-list",
        required=True,
        metavar="DEVICE_LIST",
        help=(
            "List of I2C bus and clients in format "
            "<bus-name>:<client_addr>[:<client_addr>][,<bus-name>:<client_addr>[:<client_addr>]]; "
            f"the bus name {SIM_ADAPTER_NAME!r} is a simulated bus of 24C02 EEPROMs"
        ),
    )
    return p


@dataclass(frozen=True)
class AdapterSpec:
    """One ``<bus>:<addr>...`` entry: an adapter number, or a name (``sim`` included)."""

    number: int | None
    name: str | None
    addrs: tuple[int, ...]

    def __str__(self) -> str:
        # Upstream's Display of AdapterIdentifier.
        return f"adapter_no:: {self.number}" if self.number is not None else f"adapter_name: {self.name}"

    @property
    def is_sim(self) -> bool:
        return self.number is None and self.name == SIM_ADAPTER_NAME


def _rust_u(text: str, bits: int, what: str) -> int | None:
    """Rust's ``str::parse::<uN>``: ASCII digits after an optional ``+``; None if not."""
    digits = text[1:] if text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    if value >= 1 << bits:
        raise ConfigError(
            f"--device-list: Failed while parsing to integer: {what} {text!r}: "
            "number too large to fit in target type"
        )
    return value


def parse_device_list(text: str) -> list[AdapterSpec]:
    """Parse ``-l``, with upstream's rules (``AdapterConfig::try_from``).

    The list is trimmed, split on ``,``; each entry on ``:``.  Its first field is an
    adapter number if it parses as a u32, else a name (trimmed); the others are
    decimal client addresses (u16 syntax).

    Raises:
        ConfigError: an address that is not a number ("Failed while parsing to
            integer"), above 127 ("Invalid client address"), or given twice in the
            whole list ("Duplicate client address detected"), or an adapter named
            twice ("Duplicate adapter detected").
    """
    specs: list[AdapterSpec] = []
    seen_addrs: set[int] = set()
    for entry in text.strip().split(","):
        fields = entry.split(":")
        ident = fields[0]
        number = _rust_u(ident, 32, "adapter number")
        name = None if number is not None else ident.strip()
        addrs: list[int] = []
        for field in fields[1:]:
            addr = _rust_u(field, 16, "client address")
            if addr is None:
                raise ConfigError(
                    f"--device-list: Failed while parsing to integer: client address {field!r} "
                    "is not a decimal number"
                )
            if addr > MAX_ADDR:
                raise ConfigError(
                    f"--device-list: Invalid client address: {addr} (7-bit addresses are 0..={MAX_ADDR})"
                )
            if addr in addrs:
                raise ConfigError(f"--device-list: Duplicate client address detected: {addr}")
            addrs.append(addr)
        spec = AdapterSpec(number, name, tuple(addrs))
        # Upstream's order: the adapter first, then its addresses against the others.
        if any(s.number == spec.number and s.name == spec.name for s in specs):
            raise ConfigError(f"--device-list: Duplicate adapter detected: {spec}")
        for addr in addrs:
            if addr in seen_addrs:
                raise ConfigError(f"--device-list: Duplicate client address detected: {addr}")
        seen_addrs.update(addrs)
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class Config:
    """A validated ``vhost-device-i2c`` configuration (upstream's ``I2cConfiguration``)."""

    socket_path: str
    socket_count: int
    devices: tuple[AdapterSpec, ...]

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """Validate the parsed flags (nothing is opened yet).

        Raises:
            ConfigError: the socket count is 0 ("Invalid socket count"), the socket
                path's directory does not exist or is not a directory, or the device
                list breaks a rule of :func:`parse_device_list`.
        """
        count: int = ns.socket_count
        if count == 0:
            raise ConfigError(f"--socket-count: Invalid socket count: {count}")
        path = os.fspath(ns.socket_path)
        parent = pathlib.Path(os.path.abspath(path)).parent
        if not parent.exists():
            raise ConfigError(f"Invalid path `{path}` given: Parent directory `{parent}` does not exist.")
        if not parent.is_dir():
            raise ConfigError(f"Invalid path `{path}` given: `{parent}` is a file, not a directory.")
        devices = tuple(parse_device_list(ns.device_list))
        config = cls(socket_path=path, socket_count=count, devices=devices)
        config.socket_paths()
        return config

    def socket_paths(self) -> list[str]:
        """The sockets to serve: ``<socket_path>0 .. <socket_path>{count-1}``."""
        return socket_paths(self.socket_path, self.socket_count)


def open_bus(specs: Sequence[AdapterSpec], sysfs: str = SYSFS_I2C_DEVICES) -> I2cBus:
    """Open every adapter of the list once and check its addresses (upstream's ``I2cMap::new``).

    Names are looked up in ``sysfs``; ``sim`` makes a :class:`SimAdapter`; a number
    opens ``/dev/i2c-N`` (its mode chosen by ``I2C_FUNCS``) and claims each address
    with ``I2C_SLAVE``.

    Raises:
        ConfigError: an adapter is not found, is found twice (a name and a number
            for the same adapter), cannot be opened or used, or refuses an address.
    """
    opened: list[tuple[I2cAdapter, tuple[int, ...]]] = []
    numbers: set[int] = set()
    try:
        for spec in specs:
            adapter: I2cAdapter
            if spec.is_sim:
                adapter = SimAdapter(spec.addrs)
            else:
                number = spec.number if spec.number is not None else find_adapter(spec.name or "", sysfs)
                if number in numbers:
                    raise ConfigError(
                        f"--device-list: Duplicate adapter detected: adapter_no:: {number} ({spec})"
                    )
                numbers.add(number)
                host = HostAdapter(number)
                opened.append((host, spec.addrs))
                for addr in spec.addrs:
                    host.check_address(addr)
                continue
            opened.append((adapter, spec.addrs))
        return I2cBus(opened)
    except (I2cError, ConfigError) as e:
        for adapter, _ in opened:
            adapter.close()
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e


def run(config: Config) -> int:
    """Open the adapters once, serve every socket until SIGINT/SIGTERM.

    Each front-end connection gets a fresh :class:`~virtio_devices.i2c.I2cDevice`;
    all of them share the one bus (the same devices for every guest, as upstream).

    Raises:
        ConfigError: an adapter cannot be used (:func:`open_bus`).
    """
    bus = open_bus(config.devices)
    try:
        return serve(PROG, config.socket_paths(), lambda index: I2cDevice(bus))
    finally:
        bus.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-i2c`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
