"""vsock behaviour (VIRTIO 1.2 §5.10, hybrid vsock over a Unix socket):
written once, run through vhost-user and virtio-mmio.

The pattern of test_device_behaviour.py (docs/adding-a-device.md): every test takes its
device's driver fixture and runs twice, through the daemon and in-process through mmio.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.base import VirtioDevice
from virtio_devices.hosts.vsock import UnixHost
from virtio_devices.testing import DeviceDriver
from virtio_devices.vsock import VsockDevice

pytestmark = pytest.mark.slow


# -- vsock (VIRTIO 1.2 §5.10) --------------------------------------------------------------


def _vsock_device(tmp: Path) -> VsockDevice:
    return VsockDevice(3, UnixHost(str(tmp / "mmio.vsock")), queue_size=64)


def _vsock_release(device: VirtioDevice) -> None:
    if isinstance(device, VsockDevice):
        device.host.close()


VSOCK = DeviceCase(
    command=lambda tmp: [
        *console_script("vhost-device-vsock", "vhost_backends.cli.vsock"),
        "--guest-cid=3",
        f"--uds-path={tmp / 'vu.vsock'}",
    ],
    build=_vsock_device,
    release=_vsock_release,
    num_queues=3,
    socket_flag="--socket",
)
vsock = driver_fixture(VSOCK)
_VSOCK_HDR = struct.Struct("<QQIIIHHIII")


def _vsock_packet(src_port: int, dst_port: int, op: int, src_cid: int = 3) -> bytes:
    return _VSOCK_HDR.pack(src_cid, 2, src_port, dst_port, 0, 1, op, 0, 65536, 0)


def test_vsock_config_space_is_guest_cid(vsock: DeviceDriver) -> None:
    assert vsock.read_config(0, 8) == struct.pack("<Q", 3)  # §5.10.4 le64 guest_cid


@pytest.mark.parametrize("op", [1, 5], ids=["REQUEST-closed-port", "RW-no-connection"])
def test_vsock_answers_rst_for_no_connection(vsock: DeviceDriver, op: int) -> None:
    rx, (buf,) = vsock.add_request(0, writable=[4096 + 44])
    tx, _ = vsock.add_request(1, readable=[_vsock_packet(5000, 4321, op)])
    assert vsock.kick(1) == [(tx, 0)]
    assert vsock.kick(0) == [(rx, 44)]
    fields = _VSOCK_HDR.unpack(vsock.read(buf, 44))
    # src 2:4321 -> dst 3:5000, len 0, STREAM, RST (§5.10.6.5)
    assert fields[:7] == (2, 3, 4321, 5000, 0, 1, 3)


def test_vsock_short_header_returned_unused(vsock: DeviceDriver) -> None:
    tx, _ = vsock.add_request(1, readable=[b"\0" * 20])  # §5.10.6: a whole header MUST be there
    assert vsock.kick(1) == [(tx, 0)]
