"""rng, template, gpio and sound behaviour, written once, run through vhost-user and virtio-mmio.

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

from virtio_devices.gpio import GpioDevice
from virtio_devices.hosts.audio import NullAudio
from virtio_devices.hosts.files import FileEntropySource
from virtio_devices.hosts.gpio import SimGpioChip
from virtio_devices.rng import RngDevice
from virtio_devices.sound import SoundDevice
from virtio_devices.template import TemplateDevice
from virtio_devices.testing import DeviceDriver

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

GPIO = DeviceCase(
    command=lambda tmp: [*console_script("vhost-device-gpio", "vhost_backends.cli.gpio"), "-l", "s8"],
    build=lambda tmp: GpioDevice(SimGpioChip(8)),
    release=lambda device: device.chip.close() if isinstance(device, GpioDevice) else None,
    suffix="0",
    num_queues=2,
)
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

rng = driver_fixture(RNG)
template = driver_fixture(TEMPLATE)
gpio = driver_fixture(GPIO)
sound = driver_fixture(SOUND)


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


# -- gpio (VIRTIO 1.2 §5.17) -----------------------------------------------------------------


def _gpio_msg(rtype: int, line: int = 0, value: int = 0) -> bytes:
    return struct.pack("<HHI", rtype, line, value)


def _gpio(driver: DeviceDriver, rtype: int, line: int = 0, value: int = 0, size: int = 2) -> bytes:
    head, (out,) = driver.add_request(0, readable=[_gpio_msg(rtype, line, value)], writable=[size])
    assert driver.kick(0) == [(head, size)]
    return driver.read(out, size)


GPIO_NAMES = b"".join(b"dummy%d\0" % i for i in range(8))


def test_gpio_config_and_line_names(gpio: DeviceDriver) -> None:
    assert gpio.read_config(0, 8) == struct.pack("<HHI", 8, 0, len(GPIO_NAMES))
    assert _gpio(gpio, 1, size=1 + len(GPIO_NAMES)) == b"\x00" + GPIO_NAMES


def test_gpio_direction_and_value_round_trip(gpio: DeviceDriver) -> None:
    assert _gpio(gpio, 2, 4) == b"\x00\x02"  # GET_DIRECTION, unconfigured: the chip's input
    assert _gpio(gpio, 5, 4, 1) == b"\x00\x00"  # SET_VALUE 1
    assert _gpio(gpio, 3, 4, 1) == b"\x00\x00"  # SET_DIRECTION out
    assert _gpio(gpio, 2, 4) == b"\x00\x01"
    assert _gpio(gpio, 4, 4) == b"\x00\x01"  # GET_VALUE
    assert _gpio(gpio, 3, 4, 2) == b"\x00\x00"  # SET_DIRECTION in
    assert _gpio(gpio, 4, 4) == b"\x00\x00"  # the input's level (0)
    assert _gpio(gpio, 3, 4, 0) == b"\x00\x00"  # released
    assert _gpio(gpio, 4, 4) == b"\x01\x00"  # nothing to read


@pytest.mark.parametrize(("rtype", "line", "value"), [(9, 0, 0), (2, 8, 0), (5, 0, 2), (3, 0, 7), (6, 0, 5)])
def test_gpio_refused_request_answers_err(gpio: DeviceDriver, rtype: int, line: int, value: int) -> None:
    assert _gpio(gpio, rtype, line, value) == b"\x01\x00"
    assert _gpio(gpio, 2, 0) == b"\x00\x02"  # the device goes on


def test_gpio_request_without_status_byte_returned_empty(gpio: DeviceDriver) -> None:
    head, _ = gpio.add_request(0, readable=[_gpio_msg(2)])
    assert gpio.kick(0) == [(head, 0)]


def test_gpio_eventq_buffer_without_irq_returned_invalid(gpio: DeviceDriver) -> None:
    head, (out,) = gpio.add_request(1, readable=[b"\x03\x00"], writable=[1])
    assert gpio.kick(1) == [(head, 1)]
    assert gpio.read(out, 1) == b"\x00"


def test_gpio_disabling_irq_returns_held_buffer_invalid(gpio: DeviceDriver) -> None:
    assert _gpio(gpio, 3, 6, 2) == b"\x00\x00"  # input
    assert _gpio(gpio, 6, 6, 1) == b"\x00\x00"  # IRQ_TYPE edge rising
    head, (out,) = gpio.add_request(1, readable=[b"\x06\x00"], writable=[1])
    assert gpio.kick(1, count=0) == []  # held: the interrupt is unmasked
    assert _gpio(gpio, 2, 6) == b"\x00\x02"  # ordered after the eventq kick
    assert _gpio(gpio, 6, 6, 0) == b"\x00\x00"  # IRQ_TYPE none
    assert gpio.kick(1) == [(head, 1)]
    assert gpio.read(out, 1) == b"\x00"  # VIRTIO_GPIO_IRQ_STATUS_INVALID


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
