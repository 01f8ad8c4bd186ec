"""input behaviour (VIRTIO 1.2 §5.8, simulated keyboard and tablet):
written once, run through vhost-user and virtio-mmio.

The pattern of test_device_behaviour.py (docs/adding-a-device.md): every test takes its
device's driver fixture and runs twice, through the daemon and in-process through mmio.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from device_drivers import DeviceCase, console_script, driver_fixture

from virtio_devices.base import VirtioDevice
from virtio_devices.hosts.input import ControlServer, SimInputHost
from virtio_devices.input import InputDevice
from virtio_devices.testing import DeviceDriver

pytestmark = pytest.mark.slow


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
