"""The two drivers of the shared device behaviour suite (one suite, two transports).

:class:`VhostUserDeviceDriver` starts a daemon's console script in a subprocess and
drives it with our :class:`~vhost_backends.frontend.Frontend` over a real socket;
:class:`virtio_devices.testing.MmioDeviceDriver` serves the same device in-process
through :class:`virtio_devices.mmio.MmioTransport`.  Both implement
:class:`virtio_devices.testing.DeviceDriver`, so a behaviour test takes a ``driver``
and runs twice.  A new device adds one :class:`DeviceCase` (how to start its daemon,
how to build it in-process) to its test module (docs/adding-a-device.md).

A module of its own (not conftest.py) so that test modules import it by a unique name.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_process import DaemonProcess

from vhost_backends.frontend import Frontend
from virtio_devices.base import VirtioDevice
from virtio_devices.testing import DeviceDriver, MmioDeviceDriver

TIMEOUT = 10.0
TRANSPORTS = ("vhost-user", "mmio")
#: Entries per queue, the same for both transports.
QUEUE_SIZE = 64


class VhostUserDeviceDriver:
    """A daemon process driven by our vhost-user front-end (QEMU's set-up order).

    Args:
        command: the daemon's command line without its socket flag.
        socket_flag: the flag naming the socket (``-s``).
        socket_path: where the daemon listens; ``suffix`` is appended to connect
            (rng-style daemons add an index even to one socket).
        num_queues: rings to set up, each of :data:`QUEUE_SIZE` entries.
    """

    def __init__(
        self,
        command: Sequence[str],
        socket_path: str,
        *,
        socket_flag: str = "-s",
        suffix: str = "",
        num_queues: int = 1,
    ) -> None:
        self.daemon = DaemonProcess(socket_path + suffix, [*command, socket_flag, socket_path])
        try:
            self.daemon.wait_for("listening", TIMEOUT)
            self.fe = Frontend.connect(socket_path + suffix, timeout=TIMEOUT)
        except BaseException:
            self._stop()
            raise
        try:
            self.fe.negotiate()
            self.fe.add_memory(4 << 20)
            self.fe.set_mem_table()
            self.rings = [self.fe.setup_ring(i, QUEUE_SIZE) for i in range(num_queues)]
        except BaseException:
            self.close()
            raise

    def add_request(
        self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()
    ) -> tuple[int, list[int]]:
        return self.fe.add_request(index, readable, writable, fill=0xEE)

    def kick(self, index: int = 0, count: int = 1) -> list[tuple[int, int]]:
        self.fe.kick(index)
        return self.fe.wait_used(index, count, TIMEOUT)

    def read(self, gpa: int, length: int) -> bytes:
        return self.fe.memory.read(gpa, length)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.fe.get_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.fe.set_config(offset, data)

    def _stop(self) -> None:
        if self.daemon.alive():
            assert self.daemon.terminate() == 0, self.daemon.log[-5:]

    def close(self) -> None:
        self.fe.close()
        self._stop()


def console_script(name: str, module: str) -> list[str]:
    """The installed console script ``name``, else ``python -m module``."""
    script = shutil.which(name)
    return [script] if script is not None else [sys.executable, "-m", module]


@dataclass(frozen=True)
class DeviceCase:
    """One device for the shared suite: its daemon and its in-process twin.

    ``command(tmp)`` is the daemon's command line (without its socket flag,
    ``socket_flag``), ``build(tmp)``
    the same device for the in-process transport and ``release(device)`` what
    closes its host backend afterwards; ``suffix`` is what the daemon appends to
    its socket path, ``socket_flag`` the flag that names it (vsock: ``--socket``).
    """

    command: Callable[[Path], list[str]]
    build: Callable[[Path], VirtioDevice]
    release: Callable[[VirtioDevice], None] = lambda device: None
    suffix: str = ""
    num_queues: int = 1
    #: The daemon's flag naming its socket (sound: ``--socket``).
    socket_flag: str = "-s"


def open_driver(case: DeviceCase, transport: str, tmp: Path) -> DeviceDriver:
    """The device of ``case`` behind ``transport`` (one of :data:`TRANSPORTS`)."""
    if transport == "mmio":
        device = case.build(tmp)
        return MmioDeviceDriver(device, queue_size=QUEUE_SIZE, on_close=lambda: case.release(device))
    return VhostUserDeviceDriver(
        case.command(tmp),
        str(tmp / "dev.sock"),
        socket_flag=case.socket_flag,
        suffix=case.suffix,
        num_queues=case.num_queues,
    )


def driver_fixture(case: DeviceCase) -> Callable[..., Iterator[DeviceDriver]]:
    """A pytest fixture ``driver`` running each test through both transports."""

    @pytest.fixture(params=TRANSPORTS)
    def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeviceDriver]:
        drv = open_driver(case, request.param, tmp_path)
        try:
            yield drv
        finally:
            drv.close()

    return driver
