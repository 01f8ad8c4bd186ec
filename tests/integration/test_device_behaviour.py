"""rng, template and vsock behaviour, written once, run through vhost-user and virtio-mmio.

Every test takes ``driver`` (a :class:`virtio_devices.testing.DeviceDriver`) and runs
twice: against the daemon process through our vhost-user front-end, and in-process
through the mmio transport (device_drivers.py).  The device logic is the same code
both times; what differs is only the transport, so a test that passes on one and
fails on the other is a transport bug.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.base import VirtioDevice
from virtio_devices.hosts.files import FileEntropySource
from virtio_devices.hosts.vsock import UnixHost
from virtio_devices.rng import RngDevice
from virtio_devices.template import TemplateDevice
from virtio_devices.testing import DeviceDriver
from virtio_devices.vsock import VsockDevice

pytestmark = pytest.mark.slow

# Byte i of the entropy file: a pattern whose every short window is distinct.
SOURCE = bytes((i * 31 + i // 251) & 0xFF for i in range(1 << 14))


def _source(tmp: Path) -> Path:
    path = tmp / "entropy.bin"
    if not path.exists():
        path.write_bytes(SOURCE)
    return path


RNG = DeviceCase(
    command=lambda tmp: [
        *console_script("vhost-device-rng", "vhost_backends.cli.rng"),
        "-f",
        str(_source(tmp)),
    ],
    build=lambda tmp: RngDevice(FileEntropySource(_source(tmp))),
    release=lambda device: device.source.close() if isinstance(device, RngDevice) else None,
    suffix="0",
)
TEMPLATE = DeviceCase(
    command=lambda tmp: console_script("vhost-device-template", "vhost_backends.cli.template"),
    build=lambda tmp: TemplateDevice(),
)

rng = driver_fixture(RNG)
template = driver_fixture(TEMPLATE)


# -- rng (VIRTIO 1.2 §5.4) ------------------------------------------------------------------


def test_rng_fills_request_from_source(rng: DeviceDriver) -> None:
    head, (out,) = rng.add_request(0, writable=[64])
    assert rng.kick(0) == [(head, 64)]
    assert rng.read(out, 64) == SOURCE[:64]


def test_rng_requests_of_one_kick_get_consecutive_bytes(rng: DeviceDriver) -> None:
    reqs = [rng.add_request(0, writable=[n]) for n in (16, 1, 100)]
    used = rng.kick(0, count=3)
    assert used == [(head, n) for (head, _), n in zip(reqs, (16, 1, 100), strict=True)]
    got = b"".join(rng.read(outs[0], n) for (_, outs), n in zip(reqs, (16, 1, 100), strict=True))
    assert got == SOURCE[:117]


def test_rng_later_kicks_continue_the_stream(rng: DeviceDriver) -> None:
    """Kick after kick (mmio: the fill path after the first), the bytes go on where
    the last request stopped, and a chain the fill path cannot serve in the middle
    is returned empty without disturbing the others."""
    got = b""
    for n in (5, 7, 9):
        head, (out,) = rng.add_request(0, writable=[n])
        assert rng.kick(0) == [(head, n)]
        got += rng.read(out, n)
    good, (out1,) = rng.add_request(0, writable=[3])
    bad, _ = rng.add_request(0, readable=[b"x"], writable=[4])
    last, (out2,) = rng.add_request(0, writable=[3])
    assert rng.kick(0, count=3) == [(good, 3), (bad, 0), (last, 3)]
    got += rng.read(out1, 3) + rng.read(out2, 3)
    assert got == SOURCE[:27]


def test_rng_driver_readable_buffer_returned_empty(rng: DeviceDriver) -> None:
    """§5.4.6.1: the driver MUST NOT place driver-readable buffers into the queue;
    the device returns such a chain with used length 0 and goes on."""
    bad, _ = rng.add_request(0, readable=[b"nope"])
    good, (out,) = rng.add_request(0, writable=[8])
    assert rng.kick(0, count=2) == [(bad, 0), (good, 8)]
    assert rng.read(out, 8) == SOURCE[:8]


def test_rng_two_writable_buffers_returned_empty(rng: DeviceDriver) -> None:
    """Upstream serves exactly one writable buffer per chain."""
    head, outs = rng.add_request(0, writable=[4, 4])
    assert rng.kick(0) == [(head, 0)]
    assert rng.read(outs[0], 4) == b"\xee" * 4


def test_rng_source_end_gives_short_read(rng: DeviceDriver) -> None:
    first, _ = rng.add_request(0, writable=[len(SOURCE) - 10])
    tail, (out,) = rng.add_request(0, writable=[64])
    assert rng.kick(0, count=2) == [(first, len(SOURCE) - 10), (tail, 10)]
    assert rng.read(out, 10) == SOURCE[-10:]


# -- template (loopback) --------------------------------------------------------------------


def test_template_echoes_readable_into_writable(template: DeviceDriver) -> None:
    head, (out,) = template.add_request(0, readable=[b"hello, ", b"device"], writable=[32])
    assert template.kick(0) == [(head, 13)]
    assert template.read(out, 14) == b"hello, device\xee"


def test_template_splits_across_writable_buffers(template: DeviceDriver) -> None:
    head, (a, b) = template.add_request(0, readable=[b"abcdef"], writable=[4, 4])
    assert template.kick(0) == [(head, 6)]
    assert template.read(a, 4) + template.read(b, 4) == b"abcdef\xee\xee"


@pytest.mark.parametrize(("readable", "writable"), [([b"only"], []), ([], [4])])
def test_template_one_sided_chain_used_zero(
    template: DeviceDriver, readable: list[bytes], writable: list[int]
) -> None:
    head, outs = template.add_request(0, readable=readable, writable=writable)
    assert template.kick(0) == [(head, 0)]
    for out in outs:
        assert template.read(out, 4) == b"\xee" * 4


def test_template_many_requests_one_kick(template: DeviceDriver) -> None:
    reqs = [template.add_request(0, readable=[bytes([i]) * 3], writable=[3]) for i in range(20)]
    assert template.kick(0, count=20) == [(head, 3) for head, _ in reqs]
    assert [template.read(outs[0], 3) for _, outs in reqs] == [bytes([i]) * 3 for i in range(20)]


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
