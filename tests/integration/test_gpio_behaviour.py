"""gpio behaviour (VIRTIO 1.2 §5.17, simulated chip):
written once, run through vhost-user and virtio-mmio.

The pattern of test_device_behaviour.py (docs/adding-a-device.md): every test takes its
device's driver fixture and runs twice, through the daemon and in-process through mmio.
"""

from __future__ import annotations

import struct

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.gpio import GpioDevice
from virtio_devices.hosts.gpio import SimGpioChip
from virtio_devices.testing import DeviceDriver

pytestmark = pytest.mark.slow


GPIO = DeviceCase(
    command=lambda tmp: [*console_script("vhost-device-gpio", "vhost_backends.cli.gpio"), "-l", "s8"],
    build=lambda tmp: GpioDevice(SimGpioChip(8)),
    release=lambda device: device.chip.close() if isinstance(device, GpioDevice) else None,
    suffix="0",
    num_queues=2,
)

gpio = driver_fixture(GPIO)


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
