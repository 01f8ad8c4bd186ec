"""vhost-device-input: a vhost-user virtio-input (keyboard, mouse, tablet) device backend.

Same flags as rust-vmm's ``vhost-device-input`` (``vhost-device-input/src/main.rs``):
``-s/--socket-path`` is suffixed with the index of each ``-e/--event-list`` entry
(``<path>0`` serves the first device, even when there is only one), and
``-e/--event-list`` is a comma-separated list of evdev nodes (the flag may also be
repeated).  Every node is opened once at startup; a missing, unreadable or non-evdev
node is one ``error:`` line and exit status 1.

Ours only, chosen so that every upstream command line means the same here:

* an ``--event-list`` entry ``sim:keyboard`` or ``sim:tablet`` (never an evdev
  path) is a simulated device, whose events are injected through a control socket
  (protocol in :mod:`virtio_devices.hosts.input`): ``--sim-control PATH`` puts the
  control socket of entry ``i`` at ``PATH<i>`` (the index appended, as for the
  vhost-user sockets); without it, at the device's own socket path plus ``.ctl``
  (``/tmp/in.sock0.ctl``);
* ``VHD_INPUT_GRAB=1`` in the environment grabs each host device (``EVIOCGRAB``)
  while a guest uses it, so that the host's own desktop no longer sees its events;
  off by default, as upstream.

Example::

    vhost-device-input --socket-path=/tmp/input.sock -e /dev/input/event3,sim:tablet
    vhost-device-input -s /tmp/in.sock -e sim:keyboard --sim-control /tmp/kbd.ctl   # /tmp/kbd.ctl0
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from virtio_devices.hosts.input import SIM_KINDS, ControlServer, InputHostError, SimInputHost
from virtio_devices.input import InputDevice

from ._common import ConfigError, env_switch, make_parser, run_main, serve, socket_paths

if TYPE_CHECKING:
    from virtio_devices.hosts.input import InputHost

__all__ = ["OUR_FLAGS", "SIM_PREFIX", "Config", "EventSource", "build_parser", "main", "run"]

log = logging.getLogger(__name__)

PROG = "vhost-device-input"
#: Flags upstream does not have (left out of the comparison with upstream's flags).
OUR_FLAGS = frozenset({"--sim-control"})
SIM_PREFIX = "sim:"


def _event_list(text: str) -> list[str]:
    """clap's ``value_delimiter = ','``: one argument, several values."""
    return text.split(",")


_event_list.delimiter = ","  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-input``, flag for flag as upstream's ``InputArgs``."""
    p = make_parser(PROG, __doc__)
    p.add_argument(
        "-s",
        "--socket-path",
        required=True,
        metavar="SOCKET",
        help="Location of vhost-user Unix domain socket. This is suffixed by 0,1,2.. for each event device.",
    )
    p.add_argument(
        "-e",
        "--event-list",
        required=True,
        action="extend",
        type=_event_list,
        metavar="EVENT_LIST",
        help="Comma-separated list of input event devices (/dev/input/eventX); "
        "sim:keyboard and sim:tablet are simulated devices (ours)",
    )
    p.add_argument(
        "--sim-control",
        metavar="PATH",
        help="(ours) control sockets of the sim: devices at PATH0, PATH1.. (by --event-list index) "
        "[default: <socket path><index>.ctl]",
    )
    return p


class EventSource(NamedTuple):
    """One ``--event-list`` entry: an evdev path, or a simulated kind and its control socket."""

    path: str
    sim_kind: str | None = None
    control: str | None = None


class Config(NamedTuple):
    """A validated ``vhost-device-input`` configuration: one socket per event source."""

    socket_paths: list[str]
    sources: list[EventSource]
    grab: bool

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """Validate the parsed flags.

        Raises:
            ConfigError: an empty ``--event-list`` entry, an unknown ``sim:`` kind, the
                socket path or ``--sim-control`` names no file, or
                ``VHD_INPUT_GRAB`` is not 0 or 1.
        """
        entries: list[str] = list(ns.event_list)
        paths = socket_paths(os.fspath(ns.socket_path), max(len(entries), 1))
        controls = [f"{p}.ctl" for p in paths]
        if ns.sim_control is not None:
            controls = socket_paths(os.fspath(ns.sim_control), len(paths))
        sources = []
        for i, (entry, control) in enumerate(zip(entries, controls, strict=True)):
            if not entry:
                raise ConfigError(f"--event-list entry {i} is empty")
            if not entry.startswith(SIM_PREFIX):
                sources.append(EventSource(entry))
                continue
            kind = entry[len(SIM_PREFIX) :]
            if kind not in SIM_KINDS:
                raise ConfigError(
                    f"--event-list entry {entry!r}: unknown simulated device {kind!r} "
                    f"(sim:{', sim:'.join(SIM_KINDS)})"
                )
            sources.append(EventSource(entry, kind, control))
        return cls(paths, sources, env_switch("VHD_INPUT_GRAB", False))


def _open(source: EventSource) -> tuple[InputHost, ControlServer | None]:
    """Open one host device (and a simulated one's control socket).

    Raises:
        ConfigError: the node cannot be opened or is not an evdev node, python-evdev
            is missing, or the control socket cannot be bound.
    """
    if source.sim_kind is None:
        try:
            from virtio_devices.hosts.evdev_input import EvdevInputHost  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise ConfigError(
                f"--event-list {source.path}: python-evdev is needed for evdev nodes ({e}); "
                "install the 'hosts' extra"
            ) from None
        try:
            return EvdevInputHost(source.path), None
        except InputHostError as e:
            raise ConfigError(f"--event-list {e}") from None
    host = SimInputHost(source.sim_kind)
    assert source.control is not None
    try:
        return host, ControlServer(host, source.control)
    except OSError as e:
        host.close()
        raise ConfigError(
            f"--event-list {source.path}: control socket {source.control}: {e.strerror}"
        ) from None


def run(config: Config) -> int:
    """Open every event device once, serve one socket per device until SIGINT/SIGTERM.

    Each front-end connection gets a fresh :class:`~virtio_devices.input.InputDevice`
    over the host device of its socket.  Rings are not polled unless ``VHD_POLL_US``
    says so: events come from the host device's fd, and an eventq kick only gives
    buffers back, which wait for the next event anyway.

    Raises:
        ConfigError: an event device cannot be opened (see :func:`_open`).
    """
    hosts: list[InputHost] = []
    servers: list[ControlServer] = []
    try:
        for source in config.sources:
            host, server = _open(source)
            hosts.append(host)
            if server is not None:
                servers.append(server)
                log.info("%s: control socket %s", source.path, server.path)

        def device_factory(index: int) -> InputDevice:
            return InputDevice(hosts[index], grab=config.grab)

        return serve(PROG, config.socket_paths, device_factory, default_poll_us=0)
    finally:
        for server in servers:
            server.close()
        for host in hosts:
            host.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-input`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
