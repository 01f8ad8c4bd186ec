"""virtio-i2c behaviour on the simulated adapter, run through vhost-user and virtio-mmio.

The shared device suite's pattern (docs/adding-a-device.md, "One suite, two
transports"): every test takes ``i2c`` (a :class:`virtio_devices.testing.DeviceDriver`)
and runs twice, against ``vhost-device-i2c -l sim:80:81`` driven by our ``Frontend``
over a real socket, and in-process behind :class:`virtio_devices.mmio.MmioTransport`.
Requests are shaped as Linux's virtio_i2c sends them for i2c-tools: ``i2ctransfer``
groups, ``i2cset``/``i2cget`` byte and word data, ``i2cdetect``'s quick writes.
"""

from __future__ import annotations

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.hosts.i2c import I2cBus, SimAdapter
from virtio_devices.i2c import VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD, I2cDevice, out_hdr
from virtio_devices.testing import DeviceDriver

pytestmark = pytest.mark.slow

FN, RD = VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD
OK, ERR = b"\x00", b"\x01"


def _sim_bus() -> I2cBus:
    sim = SimAdapter([80, 81])
    return I2cBus([(sim, [80, 81])])


I2C = DeviceCase(
    command=lambda tmp: [*console_script("vhost-device-i2c", "vhost_backends.cli.i2c"), "-l", "sim:80:81"],
    build=lambda tmp: I2cDevice(_sim_bus()),
    suffix="0",
)
i2c = driver_fixture(I2C)


def write(drv: DeviceDriver, addr: int, data: bytes, flags: int = 0) -> tuple[int, int]:
    head, (status,) = drv.add_request(0, [out_hdr(addr, flags), *([data] if data else [])], [1])
    return head, status


def read(drv: DeviceDriver, addr: int, n: int, flags: int = 0) -> tuple[int, int, int]:
    head, (buf, status) = drv.add_request(0, [out_hdr(addr, flags | RD)], [n, 1])
    return head, buf, status


def test_i2c_eeprom_write_then_read_back(i2c: DeviceDriver) -> None:
    """``i2ctransfer -y N w9@0x50 0x10 1 2 3 4 5 6 7 8`` then ``w1@0x50 0x10 r8``."""
    h, s = write(i2c, 80, bytes([0x10, *range(1, 9)]))
    assert i2c.kick(0) == [(h, 1)]
    assert i2c.read(s, 1) == OK
    h1, s1 = write(i2c, 80, b"\x10", FN)
    h2, b2, s2 = read(i2c, 80, 8)
    assert i2c.kick(0, count=2) == [(h1, 1), (h2, 9)]
    assert i2c.read(s1, 1) == OK and i2c.read(s2, 1) == OK
    assert i2c.read(b2, 8) == bytes(range(1, 9))


def test_i2c_byte_and_word_data(i2c: DeviceDriver) -> None:
    """``i2cset -y N 0x51 0x20 0xab`` / ``i2cget -y N 0x51 0x20``, and ``w`` mode."""
    reqs = [write(i2c, 81, b"\x20\xab"), write(i2c, 81, b"\x30\x34\x12")]
    assert len(i2c.kick(0, count=2)) == 2
    h1, _ = write(i2c, 81, b"\x20", FN)
    h2, b2, _ = read(i2c, 81, 1)
    h3, _ = write(i2c, 81, b"\x30", FN)
    h4, b4, _ = read(i2c, 81, 2)
    assert i2c.kick(0, count=4) == [(h1, 1), (h2, 2), (h3, 1), (h4, 3)]
    assert i2c.read(b2, 1) == b"\xab"
    assert i2c.read(b4, 2) == b"\x34\x12"
    assert [i2c.read(s, 1) for _, s in reqs] == [OK, OK]


def test_i2c_quick_write_finds_only_the_devices(i2c: DeviceDriver) -> None:
    """``i2cdetect -y``: a zero-length write to each address; OK only where a device is."""
    reqs = [(addr, *write(i2c, addr, b"")) for addr in (0x08, 79, 80, 81, 82, 0x77)]
    used = i2c.kick(0, count=len(reqs))
    assert sorted(used) == sorted((h, 1) for _, h, _ in reqs)
    found = [addr for addr, _, s in reqs if i2c.read(s, 1) == OK]
    assert found == [80, 81]


def test_i2c_unknown_address_fails_its_group_only(i2c: DeviceDriver) -> None:
    """VIRTIO 1.2 §5.19.6.1 FAIL_NEXT: the failed group's requests get ERR, the next
    group runs (upstream would give both groups one status)."""
    g1 = [write(i2c, 80, b"\x00\x11", FN), write(i2c, 0x33, b"\x00")]
    g2 = [write(i2c, 80, b"\x01\x22", FN), write(i2c, 80, b"\x01", FN)]
    h, b, s = read(i2c, 80, 1)
    used = i2c.kick(0, count=5)
    assert [u[0] for u in used] == [g1[0][0], g1[1][0], g2[0][0], g2[1][0], h]
    assert [i2c.read(x, 1) for _, x in g1 + g2] == [ERR, ERR, OK, OK]
    assert i2c.read(s, 1) == OK and i2c.read(b, 1) == b"\x22"


def test_i2c_wrong_direction_is_an_error_and_the_queue_goes_on(i2c: DeviceDriver) -> None:
    """§5.19.6.3: a read request's buffer MUST be device-writable; one that is
    readable gets ERR, and the next request is served."""
    hb, (sb,) = i2c.add_request(0, [out_hdr(80, RD), b"\x00\x00"], [1])
    h, s = write(i2c, 80, b"")
    assert i2c.kick(0, count=2) == [(hb, 1), (h, 1)]
    assert i2c.read(sb, 1) == ERR and i2c.read(s, 1) == OK
