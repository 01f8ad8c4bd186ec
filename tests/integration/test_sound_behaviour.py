"""sound behaviour (VIRTIO 1.2 §5.14, null backend):
written once, run through vhost-user and virtio-mmio.

The pattern of test_device_behaviour.py (docs/adding-a-device.md): every test takes its
device's driver fixture and runs twice, through the daemon and in-process through mmio.
"""

from __future__ import annotations

import struct

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.hosts.audio import NullAudio
from virtio_devices.sound import SoundDevice
from virtio_devices.testing import DeviceDriver

pytestmark = pytest.mark.slow


SOUND = DeviceCase(
    command=lambda tmp: [
        *console_script("vhost-device-sound", "vhost_backends.cli.sound"),
        "--backend",
        "null",
    ],
    build=lambda tmp: SoundDevice(NullAudio()),
    release=lambda device: device.backend.close() if isinstance(device, SoundDevice) else None,
    num_queues=4,
    socket_flag="--socket",
)

sound = driver_fixture(SOUND)


# -- sound (VIRTIO 1.2 §5.14): the requests answered on the loop ------------------------------


def _control(drv: DeviceDriver, request: bytes, reply: int = 4) -> tuple[int, bytes]:
    head, (out,) = drv.add_request(0, readable=[request], writable=[reply])
    ((got, used),) = drv.kick(0)
    assert got == head
    data = drv.read(out, used)
    return struct.unpack_from("<I", data)[0], data[4:]


def test_sound_config_and_info(sound: DeviceDriver) -> None:
    assert sound.read_config(0, 16) == struct.pack("<IIII", 0, 2, 6, 0)
    status, payload = _control(sound, struct.pack("<IIII", 0x0100, 0, 2, 32), 68)
    assert status == 0x8000 and len(payload) == 64
    assert (payload[24], payload[56]) == (0, 1)  # directions: output, input
    status, payload = _control(sound, struct.pack("<IIII", 0x0200, 0, 6, 24), 4 + 144)
    assert status == 0x8000 and payload[24 + 6 : 24 + 8] == bytes([3, 4])  # stereo out: FL, FR


def test_sound_refusals(sound: DeviceDriver) -> None:
    assert _control(sound, struct.pack("<IIII", 0x0100, 1, 2, 32), 68)[0] == 0x8001  # BAD_MSG
    assert _control(sound, struct.pack("<I", 0x4242))[0] == 0x8002  # NOT_SUPP
    assert _control(sound, struct.pack("<II", 0x0104, 0))[0] == 0x8001  # START before PREPARE
    # SET_PARAMS: S8 is not offered (NOT_SUPP), S16 stereo 48 kHz is.
    assert _control(sound, struct.pack("<IIIIIBBBx", 0x0101, 0, 3840, 960, 0, 2, 3, 7))[0] == 0x8002
    assert _control(sound, struct.pack("<IIIIIBBBx", 0x0101, 0, 3840, 960, 0, 2, 5, 7))[0] == 0x8000
    # I/O on a stream id out of range, and on a stream not prepared: BAD_MSG at once.
    for sid in (9, 0):
        head, (out,) = sound.add_request(2, readable=[struct.pack("<I", sid) + bytes(64)], writable=[8])
        assert sound.kick(2) == [(head, 8)]
        assert struct.unpack("<II", sound.read(out, 8)) == (0x8001, 0)


def test_sound_state_machine(sound: DeviceDriver) -> None:
    # VIRTIO 1.2 §5.14.6.6.1 (the null backend answers on the loop, so both
    # transports see every answer at once).
    params = struct.pack("<IIIIIBBBx", 0x0101, 1, 3840, 960, 0, 2, 5, 7)
    steps = [
        (params, 0x8000),
        (struct.pack("<II", 0x0105, 1), 0x8001),  # STOP from SET_PARAMETERS
        (struct.pack("<II", 0x0102, 1), 0x8000),  # PREPARE
        (struct.pack("<II", 0x0104, 1), 0x8000),  # START
        (params, 0x8001),  # SET_PARAMS while started
        (struct.pack("<II", 0x0103, 1), 0x8001),  # RELEASE while started
        (struct.pack("<II", 0x0105, 1), 0x8000),  # STOP
        (struct.pack("<II", 0x0103, 1), 0x8000),  # RELEASE
        (struct.pack("<II", 0x0104, 1), 0x8001),  # START after RELEASE
    ]
    for request, status in steps:
        assert _control(sound, request)[0] == status, request.hex()
