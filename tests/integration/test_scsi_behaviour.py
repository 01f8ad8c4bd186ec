"""scsi behaviour (VIRTIO 1.2 §5.6, two image files):
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
from virtio_devices.hosts.images import open_image
from virtio_devices.scsi import testing as st
from virtio_devices.scsi.device import ScsiDevice
from virtio_devices.testing import DeviceDriver

pytestmark = pytest.mark.slow


# Two images: 64 blocks of a pattern, and 8 blocks of zeros.
DISK = bytes((i * 13 + i // 509) & 0xFF for i in range(64 * 512))


def _disks(tmp: Path) -> list[str]:
    paths = [tmp / "disk0.img", tmp / "disk1.img"]
    if not paths[0].exists():
        paths[0].write_bytes(DISK)
        paths[1].write_bytes(bytes(8 * 512))
    return [str(p) for p in paths]


def _close_images(device: VirtioDevice) -> None:
    if isinstance(device, ScsiDevice):
        for img in device.images:
            img.close()


SCSI = DeviceCase(
    command=lambda tmp: [*console_script("vhost-device-scsi", "vhost_backends.cli.scsi"), *_disks(tmp)],
    build=lambda tmp: ScsiDevice([open_image(p, read_only=False) for p in _disks(tmp)]),
    release=_close_images,
    num_queues=6,
)

scsi = driver_fixture(SCSI)


# -- scsi (VIRTIO 1.2 §5.6) -------------------------------------------------------------------


def _scsi(
    drv: DeviceDriver, cdb: bytes, *, data_out: bytes = b"", data_in: int = 0, queue: int = 2, lun: int = 0
) -> tuple[int, st.Resp, bytes]:
    readable = [st.cmd_req(cdb, lun), *([data_out] if data_out else [])]
    head, outs = drv.add_request(queue, readable, [st.RESP_HEADER, *([data_in] if data_in else [])])
    ((got, length),) = drv.kick(queue)
    assert got == head
    data = drv.read(outs[1], length - st.RESP_HEADER) if data_in else b""
    return length, st.Resp.parse(drv.read(outs[0], st.RESP_HEADER)), data


def test_scsi_config_space(scsi: DeviceDriver) -> None:
    cfg = struct.unpack("<IIIIIIIHHI", scsi.read_config(0, 36))
    assert cfg == (4, 126, 0xFFFF, 128, 16, 96, 32, 0, 255, 16383)


def test_scsi_inquiry_capacity_and_luns(scsi: DeviceDriver) -> None:
    _, resp, data = _scsi(scsi, st.inquiry(), data_in=96)
    assert (resp.response, resp.status) == (0, 0) and data[8:16] == b"rust-vmm"
    _, resp, data = _scsi(scsi, st.read_capacity16(), data_in=32)
    assert struct.unpack_from(">QI", data) == (63, 512)
    _, resp, data = _scsi(scsi, st.read_capacity16(), data_in=32, lun=1)
    assert struct.unpack_from(">QI", data) == (7, 512)
    _, resp, data = _scsi(scsi, st.report_luns(), data_in=256)
    assert data[:4] == struct.pack(">I", 16)
    _, resp, _ = _scsi(scsi, st.read10(0, 1), data_in=512, lun=2)
    assert resp.status == 2 and resp.key_asc == (5, 0x25, 0)


def test_scsi_write_then_read_back(scsi: DeviceDriver) -> None:
    payload = bytes(range(256)) * 8
    n, resp, _ = _scsi(scsi, st.write10(5, 4, flags=0x08), data_out=payload)
    assert (n, resp.response, resp.status) == (st.RESP_HEADER, 0, 0)
    n, resp, data = _scsi(scsi, st.read10(4, 6), data_in=6 * 512)
    assert n == st.RESP_HEADER + 3072
    assert data == DISK[2048:2560] + payload + DISK[4608:5120]
    _, resp, _ = _scsi(scsi, st.sync10())
    assert resp.status == 0


def test_scsi_every_request_queue_and_bad_target(scsi: DeviceDriver) -> None:
    for q in (2, 3, 4, 5):
        _, resp, data = _scsi(scsi, st.read10(q, 1), data_in=512, queue=q)
        assert resp.status == 0 and data == DISK[q * 512 : (q + 1) * 512]
    head, (out,) = scsi.add_request(2, [st.cmd_req(b"\0", target=3)], [st.RESP_HEADER])
    assert scsi.kick(2) == [(head, st.RESP_HEADER)]
    assert st.Resp.parse(scsi.read(out, st.RESP_HEADER)).response == 3


def test_scsi_task_management_answered(scsi: DeviceDriver) -> None:
    head, (out,) = scsi.add_request(0, [st.tmf_req(5)], [1])
    assert scsi.kick(0) == [(head, 1)]
    assert scsi.read(out, 1) == b"\0"
