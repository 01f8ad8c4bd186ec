"""rng, template, gpio, scsi and input behaviour, written once, run through vhost-user and
virtio-mmio.

Every test takes ``driver`` (a :class:`virtio_devices.testing.DeviceDriver`) and runs
twice: against the daemon process through our vhost-user front-end, and in-process
through the mmio transport (device_drivers.py).  The device logic is the same code
both times; what differs is only the transport, so a test that passes on one and
fails on the other is a transport bug.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.base import VirtioDevice
from virtio_devices.gpio import GpioDevice
from virtio_devices.hosts.files import FileEntropySource
from virtio_devices.hosts.gpio import SimGpioChip
from virtio_devices.hosts.images import open_image
from virtio_devices.hosts.input import ControlServer, SimInputHost
from virtio_devices.input import InputDevice
from virtio_devices.rng import RngDevice
from virtio_devices.scsi import testing as st
from virtio_devices.scsi.device import ScsiDevice
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

rng = driver_fixture(RNG)
template = driver_fixture(TEMPLATE)
gpio = driver_fixture(GPIO)
scsi = driver_fixture(SCSI)


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


# -- input (VIRTIO 1.2 §5.8), on the simulated keyboard and tablet ----------------------------------

_CONTROLS: dict[int, ControlServer] = {}


def _sim_input(kind: str, tmp: Path) -> InputDevice:
    """The in-process twin of ``-e sim:<kind> --sim-control <tmp>/<kind>.ctl``."""
    host = SimInputHost(kind)
    _CONTROLS[id(host)] = ControlServer(host, str(tmp / f"{kind}.ctl0"))
    return InputDevice(host)


def _release_input(device: VirtioDevice) -> None:
    if isinstance(device, InputDevice):
        _CONTROLS.pop(id(device.host)).close()
        device.host.close()


def _input_case(kind: str) -> DeviceCase:
    return DeviceCase(
        command=lambda tmp: [
            *console_script("vhost-device-input", "vhost_backends.cli.input"),
            "-e",
            f"sim:{kind}",
            "--sim-control",
            str(tmp / f"{kind}.ctl"),
        ],
        build=lambda tmp: _sim_input(kind, tmp),
        release=_release_input,
        suffix="0",
        num_queues=2,
    )


keyboard = driver_fixture(_input_case("keyboard"))
tablet = driver_fixture(_input_case("tablet"))


def _control(tmp: Path, kind: str, *lines: str) -> list[str]:
    """Send control lines to the simulated device; its replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp / f"{kind}.ctl0"))
        s.sendall("".join(f"{line}\n" for line in lines).encode())
        data = b""
        while data.count(b"\n") < len(lines):
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
    return data.decode().splitlines()


def _select(drv: DeviceDriver, sel: int, subsel: int = 0) -> tuple[int, bytes]:
    drv.write_config(0, bytes([sel]))
    drv.write_config(1, bytes([subsel]))
    cfg = drv.read_config(0, 136)
    assert cfg[:2] == bytes([sel, subsel])
    return cfg[2], cfg[8:]


def _events(drv: DeviceDriver, n: int, count: int) -> list[tuple[int, int, int]]:
    """Post ``n`` eventq buffers, kick, wait for ``count``; the events they hold."""
    reqs = [drv.add_request(0, writable=[8]) for _ in range(n)]
    used = drv.kick(0, count=count)
    bufs = dict(reqs)
    return [struct.unpack("<HHi", drv.read(bufs[head][0], 8)) for head, length in used if length == 8]


def test_input_config_identity(keyboard: DeviceDriver) -> None:
    size, union = _select(keyboard, 0x01)  # ID_NAME
    assert union[:size] == b"vhost-device-input simulated keyboard"
    size, union = _select(keyboard, 0x02)  # ID_SERIAL
    assert union[:size] == b"sim-keyboard-0"
    size, union = _select(keyboard, 0x03)  # ID_DEVIDS: size 8, upstream 128
    assert size == 8 and struct.unpack("<HHHH", union[:8]) == (6, 1, 1, 1)


def test_input_config_ev_bits_leds_and_unknown_select(keyboard: DeviceDriver) -> None:
    assert _select(keyboard, 0x11, 0x11)[1][:1] == b"\x07"  # EV_BITS/EV_LED: NUML CAPSL SCROLLL
    assert _select(keyboard, 0x11, 0x03) == (0, bytes(128))  # no EV_ABS on a keyboard
    assert _select(keyboard, 0x42, 0x00) == (0, bytes(128))  # §5.8.5.2: size 0


def test_input_config_tablet_abs_info_and_props(tablet: DeviceDriver) -> None:
    size, union = _select(tablet, 0x12, 0x00)  # ABS_INFO ABS_X
    assert size == 20 and struct.unpack("<iiiii", union[:20]) == (0, 32767, 0, 0, 100)
    assert _select(tablet, 0x10)[1][:1] == b"\x02"  # PROP_BITS: INPUT_PROP_DIRECT


def test_input_injected_events_arrive_grouped(keyboard: DeviceDriver, tmp_path: Path) -> None:
    assert _control(tmp_path, "keyboard", "EV EV_MSC MSC_SCAN 30", "KEY KEY_A 1") == ["ok", "ok"]
    assert _events(keyboard, 3, 3) == [(4, 4, 30), (1, 30, 1), (0, 0, 0)]


def test_input_tablet_absolute_events(tablet: DeviceDriver, tmp_path: Path) -> None:
    lines = ["EV EV_ABS ABS_X 32767", "EV EV_ABS ABS_Y 5", "EV EV_KEY BTN_TOUCH 1", "SYN"]
    assert _control(tmp_path, "tablet", *lines) == ["ok"] * 4
    assert _events(tablet, 4, 4) == [(3, 0, 32767), (3, 1, 5), (1, 0x14A, 1), (0, 0, 0)]


def test_input_led_reaches_host_device(keyboard: DeviceDriver, tmp_path: Path) -> None:
    head, _ = keyboard.add_request(1, readable=[struct.pack("<HHi", 0x11, 1, 1)])  # EV_LED LED_CAPSL 1
    assert keyboard.kick(1) == [(head, 0)]
    assert _control(tmp_path, "keyboard", "GET EV_LED LED_CAPSL") == ["ok 1"]


def test_input_statusq_torn_event_returned_empty(keyboard: DeviceDriver, tmp_path: Path) -> None:
    """§5.8.6.1: statusq buffers MUST hold at least one whole virtio_input_event."""
    bad, _ = keyboard.add_request(1, readable=[b"\x11\x00\x01\x00"])
    good, _ = keyboard.add_request(1, readable=[struct.pack("<HHi", 0x11, 0, 1)])
    assert keyboard.kick(1, count=2) == [(bad, 0), (good, 0)]
    assert _control(tmp_path, "keyboard", "GET EV_LED LED_CAPSL", "GET EV_LED LED_NUML") == ["ok 0", "ok 1"]
