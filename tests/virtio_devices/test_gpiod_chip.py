"""The libgpiod v2 backend (``virtio_devices.hosts.gpiod_chip``) without hardware.

No machine running these tests has a ``/dev/gpiochip*``, so the calls into the
``gpiod`` binding are checked against a recording fake of its ``Chip`` and
``LineRequest`` that keeps libgpiod v2's rules (one request per set of lines, the
consumer name, ``reconfigure_lines`` in place, edge events queued until read, a
read of an empty request blocks).  The real chip is exercised inside a guest on
gpio-sim by the e2e suite; the test at the end runs here only if a chip exists.
"""

# ruff: noqa: E402 - the imports below need the importorskip above them
from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

gpiod = pytest.importorskip("gpiod", reason="the python gpiod binding (hosts/test extra) is not installed")
from gpiod.line import Direction, Edge, Value

from virtio_devices.gpio import (
    IRQ_STATUS_VALID,
    IRQ_TYPE_EDGE_RISING,
    IRQ_TYPE_LEVEL_LOW,
    MSG_GET_VALUE,
    MSG_IRQ_TYPE,
    MSG_SET_DIRECTION,
    MSG_SET_VALUE,
    GpioDevice,
)
from virtio_devices.hosts import gpiod_chip
from virtio_devices.hosts.gpio import (
    DIRECTION_IN,
    DIRECTION_OUT,
    EDGE_BOTH,
    EDGE_RISING,
    GpioChip,
    GpioChipError,
)
from virtio_devices.testing import DeviceRig


class FakeRequest:
    """A LineRequest of one line, with a pipe as its event fd."""

    def __init__(self, chip: FakeChip, config: dict[int, Any], consumer: str | None) -> None:
        self.chip = chip
        self.consumer = consumer
        self.settings: dict[int, Any] = dict(config)
        self.released = False
        self.events: list[Any] = []
        self.rfd, self.wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.values = {line: s.output_value for line, s in config.items()}

    @property
    def fd(self) -> int:
        return self.rfd

    def reconfigure_lines(self, config: dict[int, Any]) -> None:
        assert not self.released
        assert set(config) <= set(self.settings), "reconfigure may not add lines"
        self.settings.update(config)
        self.chip.calls.append(("reconfigure", dict(config)))
        for line, s in config.items():
            if s.direction == Direction.OUTPUT:
                self.values[line] = s.output_value

    def get_value(self, line: int) -> Any:
        return self.values.get(line, Value.INACTIVE)

    def set_value(self, line: int, value: Any) -> None:
        if self.settings[line].direction != Direction.OUTPUT:
            raise PermissionError(1, "Operation not permitted")
        self.values[line] = value

    def push_edge(self, line: int, rising: bool) -> None:
        kind = gpiod.EdgeEvent.Type.RISING_EDGE if rising else gpiod.EdgeEvent.Type.FALLING_EDGE
        self.events.append(gpiod.EdgeEvent(kind, 0, line, 0, 0))
        self.values[line] = Value.ACTIVE if rising else Value.INACTIVE
        os.write(self.wfd, b"e")

    def wait_edge_events(self, timeout: timedelta | float | None = None) -> bool:
        assert timeout == 0, "the backend must never block the event loop"
        return bool(self.events)

    def read_edge_events(self, max_events: int | None = None) -> list[Any]:
        assert self.events, "reading an empty request blocks in libgpiod"
        events, self.events = self.events, []
        os.read(self.rfd, 4096)
        return events

    def release(self) -> None:
        self.released = True
        os.close(self.rfd)
        os.close(self.wfd)


class FakeChip:
    def __init__(self, path: str, names: list[str | None]) -> None:
        self.path = path
        self.names = names
        self.calls: list[tuple[str, Any]] = []
        self.requests: list[FakeRequest] = []
        self.closed = False

    def get_info(self) -> Any:
        return type("Info", (), {"num_lines": len(self.names)})()

    def get_line_info(self, line: int) -> Any:
        direction = Direction.OUTPUT if line == 3 else Direction.INPUT
        return type("LineInfo", (), {"name": self.names[line], "direction": direction})()

    def request_lines(self, config: dict[int, Any], consumer: str | None = None, **kw: Any) -> FakeRequest:
        self.calls.append(("request", dict(config), consumer))
        req = FakeRequest(self, config, consumer)
        self.requests.append(req)
        return req

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[FakeChip]:
    node = tmp_path / "gpiochip9"
    node.write_text("")
    chip = FakeChip(str(node), ["LED", None, "BUTTON", "reset"])
    monkeypatch.setattr(gpiod_chip.gpiod, "is_gpiochip_device", lambda path: path == str(node))
    monkeypatch.setattr(gpiod_chip.gpiod, "Chip", lambda path: chip)
    yield chip


def test_gpiod_chip_is_a_gpio_chip(fake: FakeChip) -> None:
    with gpiod_chip.GpiodChip(fake.path) as chip:
        assert isinstance(chip, GpioChip)
        assert chip.num_lines() == 4
        assert [chip.line_name(i) for i in range(4)] == ["LED", "", "BUTTON", "reset"]
    assert fake.closed


def test_gpiod_chip_reports_the_kernels_direction_of_unconfigured_lines(fake: FakeChip) -> None:
    """GET_DIRECTION of a line the guest did not configure asks the line info, as
    upstream does (Linux's driver takes "none" for an error)."""
    chip = gpiod_chip.GpiodChip(fake.path)
    assert [chip.line_direction(i) for i in range(4)] == [DIRECTION_IN] * 3 + [DIRECTION_OUT]
    with DeviceRig(GpioDevice(chip), queue_size=16) as rig:
        head, (out,) = rig.add_request(0, readable=[_pack(2, 3, 0)], writable=[2])
        assert rig.kick(0) == [(head, 2)]
        assert rig.read(out, 2) == bytes((0, DIRECTION_OUT))
    chip.close()


def test_gpiod_chip_missing_or_not_a_chip(tmp_path: Any) -> None:
    with pytest.raises(GpioChipError, match="no such device"):
        gpiod_chip.GpiodChip(str(tmp_path / "gpiochip77"))
    other = tmp_path / "plain"
    other.write_text("")
    with pytest.raises(GpioChipError, match="is not a GPIO chip device"):
        gpiod_chip.GpiodChip(str(other))


def test_gpiod_chip_requests_each_line_once_with_our_consumer(fake: FakeChip) -> None:
    chip = gpiod_chip.GpiodChip(fake.path)
    chip.configure(0, DIRECTION_OUT, 1)
    chip.configure(0, DIRECTION_IN, 0, EDGE_BOTH)
    chip.configure(2, DIRECTION_IN)
    (req0, req2) = fake.requests
    assert [c[0] for c in fake.calls] == ["request", "reconfigure", "request"]
    assert req0.consumer == req2.consumer == gpiod_chip.CONSUMER == "vhu-gpio"
    first = fake.calls[0][1][0]
    assert (first.direction, first.output_value) == (Direction.OUTPUT, Value.ACTIVE)
    again = fake.calls[1][1][0]
    assert (again.direction, again.edge_detection) == (Direction.INPUT, Edge.BOTH)
    chip.release(0)
    assert req0.released and not req2.released
    chip.release(0)  # releasing a free line is a no-op
    chip.close()
    assert req2.released


def test_gpiod_chip_values_and_unrequested_lines(fake: FakeChip) -> None:
    chip = gpiod_chip.GpiodChip(fake.path)
    with pytest.raises(GpioChipError, match="line 1 is not requested"):
        chip.get_value(1)
    chip.configure(1, DIRECTION_OUT, 0)
    chip.set_value(1, 1)
    assert chip.get_value(1) == 1
    chip.configure(3, DIRECTION_IN)
    with pytest.raises(OSError):
        chip.set_value(3, 1)  # the kernel refuses to drive an input
    chip.close()


def test_gpiod_chip_edges_drained_without_blocking(fake: FakeChip) -> None:
    chip = gpiod_chip.GpiodChip(fake.path)
    chip.configure(2, DIRECTION_IN, 0, EDGE_RISING)
    assert chip.read_edges(2) == []
    req = fake.requests[0]
    assert chip.event_fd(2) == req.fd
    req.push_edge(2, True)
    req.push_edge(2, False)
    assert chip.read_edges(2) == [1, 2]
    assert chip.read_edges(2) == []
    chip.close()


def test_gpiod_chip_behind_the_device(fake: FakeChip) -> None:
    """The device over the gpiod backend: output, edge IRQ through the request fd,
    and an emulated level interrupt (libgpiod itself has no level events)."""
    chip = gpiod_chip.GpiodChip(fake.path)
    dev = GpioDevice(chip)
    with DeviceRig(dev, queue_size=16) as rig:

        def request(rtype: int, gpio: int, value: int = 0) -> bytes:
            head, (out,) = rig.add_request(0, readable=[bytes(_pack(rtype, gpio, value))], writable=[2])
            assert rig.kick(0) == [(head, 2)]
            return rig.read(out, 2)

        assert request(MSG_SET_VALUE, 0, 1) == b"\x00\x00"
        assert request(MSG_SET_DIRECTION, 0, DIRECTION_OUT) == b"\x00\x00"
        assert request(MSG_GET_VALUE, 0) == b"\x00\x01"
        assert request(MSG_SET_DIRECTION, 2, DIRECTION_IN) == b"\x00\x00"
        assert request(MSG_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING) == b"\x00\x00"
        req2 = fake.requests[1]
        assert req2.settings[2].edge_detection == Edge.RISING
        head, (status,) = rig.add_request(1, readable=[b"\x02\x00"], writable=[1])
        assert rig.kick(1) == []
        req2.push_edge(2, True)
        rig.loop.fire_reader(req2.fd)
        assert rig.used(1) == [(head, 1)]
        assert rig.read(status, 1) == bytes((IRQ_STATUS_VALID,))
        # Level low, emulated from both edges: the line is high now, so it waits.
        assert request(MSG_IRQ_TYPE, 2, 0) == b"\x00\x00"
        assert request(MSG_IRQ_TYPE, 2, IRQ_TYPE_LEVEL_LOW) == b"\x00\x00"
        assert req2.settings[2].edge_detection == Edge.BOTH
        head, _ = rig.add_request(1, readable=[b"\x02\x00"], writable=[1])
        assert rig.kick(1) == []
        req2.push_edge(2, False)
        rig.loop.fire_reader(req2.fd)
        assert rig.used(1) == [(head, 1)]
    # A reset keeps the lines requested; the device's close releases them.
    assert not any(r.released for r in fake.requests)
    dev.close()
    assert all(r.released for r in fake.requests)
    chip.close()


def _pack(rtype: int, gpio: int, value: int) -> bytes:
    return rtype.to_bytes(2, "little") + gpio.to_bytes(2, "little") + value.to_bytes(4, "little")


@pytest.mark.skipif(
    not glob.glob("/dev/gpiochip*"), reason="this host has no /dev/gpiochip* (the e2e guest has gpio-sim)"
)
def test_gpiod_chip_opens_a_real_chip() -> None:
    path = sorted(glob.glob("/dev/gpiochip*"))[0]
    try:
        chip = gpiod_chip.GpiodChip(path)
    except GpioChipError as e:
        pytest.skip(f"{path}: {e}")
    with chip:
        assert chip.num_lines() > 0
        dev = GpioDevice(chip)
        assert dev.ngpio == chip.num_lines()
