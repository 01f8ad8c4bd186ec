"""virtio-gpio device logic (VIRTIO 1.2 §5.17) against the simulated chip.

Mirrors the unit tests of rust-vmm's ``vhost-device-gpio/src/{gpio,vhu_gpio}.rs``
(every message, its errors, the IRQ type rules) plus what we do differently: a bad
request is answered ``VIRTIO_GPIO_STATUS_ERR`` before any effect instead of ending
the vring worker, level interrupts are emulated, edges come through the line's fd
on the event loop, and a released line returns its eventq buffer.
"""

from __future__ import annotations

import errno
import logging
import select
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_devices.base import COMMON_FEATURES
from virtio_devices.gpio import (
    IRQ_STATUS_INVALID,
    IRQ_STATUS_VALID,
    IRQ_TYPE_EDGE_BOTH,
    IRQ_TYPE_EDGE_FALLING,
    IRQ_TYPE_EDGE_RISING,
    IRQ_TYPE_LEVEL_HIGH,
    IRQ_TYPE_LEVEL_LOW,
    IRQ_TYPE_NONE,
    MSG_GET_DIRECTION,
    MSG_GET_LINE_NAMES,
    MSG_GET_VALUE,
    MSG_IRQ_TYPE,
    MSG_SET_DIRECTION,
    MSG_SET_VALUE,
    QUEUE_SIZE,
    VIRTIO_GPIO_F_IRQ,
    VIRTIO_ID_GPIO,
    GpioDevice,
)
from virtio_devices.hosts.gpio import (
    DIRECTION_IN,
    DIRECTION_NONE,
    DIRECTION_OUT,
    EDGE_NONE,
    GpioChipError,
    SimGpioChip,
)
from virtio_devices.testing import DeviceRig

OK, ERR = b"\x00\x00", b"\x01\x00"
NONE, OUT, IN = DIRECTION_NONE, DIRECTION_OUT, DIRECTION_IN


def msg(rtype: int, gpio: int = 0, value: int = 0) -> bytes:
    """A ``virtio_gpio_request``: le16 type, le16 gpio, le32 value."""
    return struct.pack("<HHI", rtype, gpio, value)


class Rig(DeviceRig):
    """A GpioDevice over a simulated chip, with request helpers."""

    def __init__(self, chip: SimGpioChip, *, features: int | None = None) -> None:
        self.chip = chip
        self.dev = GpioDevice(chip)
        super().__init__(self.dev, queue_size=64, event_idx=True)
        if features is not None:
            self.dev.ack_features(features)

    def request(self, rtype: int, gpio: int = 0, value: int = 0, size: int = 2) -> bytes:
        """Send one message; return the response bytes (asserting used length = size)."""
        head, (out,) = self.add_request(0, readable=[msg(rtype, gpio, value)], writable=[size])
        assert self.kick(0) == [(head, size)]
        return self.read(out, size)

    def wait_irq(self, line: int) -> tuple[int, int]:
        """Queue an eventq buffer for ``line``; return its head and status address."""
        head, (out,) = self.add_request(1, readable=[struct.pack("<H", line)], writable=[1])
        return head, out

    def edges(self, line: int) -> None:
        """Let the loop deliver the line's edge events (its fd is readable)."""
        self.loop.fire_reader(self.chip.event_fd(line))

    def make_input(self, line: int, irq: int = IRQ_TYPE_NONE) -> None:
        assert self.request(MSG_SET_DIRECTION, line, IN) == OK
        if irq != IRQ_TYPE_NONE:
            assert self.request(MSG_IRQ_TYPE, line, irq) == OK


@pytest.fixture
def chip() -> Iterator[SimGpioChip]:
    with SimGpioChip(8) as c:
        yield c


@pytest.fixture
def rig(chip: SimGpioChip) -> Iterator[Rig]:
    with Rig(chip) as r:
        yield r


# -- identity and config space (§5.17.1-4) --------------------------------------------------


def test_gpio_identity_matches_upstream() -> None:
    assert GpioDevice.device_id == VIRTIO_ID_GPIO == 41
    assert GpioDevice.queue_sizes == (QUEUE_SIZE, QUEUE_SIZE)
    assert GpioDevice.features == COMMON_FEATURES | VIRTIO_GPIO_F_IRQ
    assert GpioDevice.has_config


def test_gpio_accepts_the_rings_qemu_asks_for() -> None:
    # QEMU 7.2's vhost-user-gpio: 256 entries; QEMU 10's: 1024 (upstream's 256 limit
    # refuses those and QEMU aborts).
    assert all(size >= 1024 for size in GpioDevice.queue_sizes)


def test_gpio_config_space(chip: SimGpioChip) -> None:
    dev = GpioDevice(chip)
    names = b"".join(b"dummy%d\0" % i for i in range(8))
    assert dev.read_config(0, 8) == struct.pack("<HHI", 8, 0, len(names))
    assert dev.names == names
    assert dev.read_config(4, 4) == struct.pack("<I", len(names))


def test_gpio_chip_without_lines_has_empty_names() -> None:
    dev = GpioDevice(SimGpioChip(0))
    assert dev.read_config(0, 8) == bytes(8)


# -- requestq messages (§5.17.6) ---------------------------------------------------------------


def test_gpio_get_line_names(rig: Rig) -> None:
    size = 1 + len(rig.dev.names)
    assert rig.request(MSG_GET_LINE_NAMES, size=size) == b"\x00" + rig.dev.names


def test_gpio_line_starts_unconfigured(rig: Rig) -> None:
    for line in range(8):
        # Not configured by the driver: what the chip says (a simulated line is an
        # input), as upstream answers for host chips; Linux takes "none" for an error.
        assert rig.request(MSG_GET_DIRECTION, line) == bytes((0, IN))
        assert rig.dev.direction(line) == NONE
        # No direction: nothing requested from the chip, nothing to read.
        assert rig.request(MSG_GET_VALUE, line) == ERR


def test_gpio_output_round_trip(rig: Rig, chip: SimGpioChip) -> None:
    assert rig.request(MSG_SET_VALUE, 3, 1) == OK
    assert chip.state(3) == (NONE, 0)  # cached until the line is an output (§5.17.6.5)
    assert rig.request(MSG_SET_DIRECTION, 3, OUT) == OK
    assert chip.state(3) == (OUT, 1)
    assert rig.request(MSG_GET_DIRECTION, 3) == bytes((0, OUT))
    assert rig.request(MSG_GET_VALUE, 3) == b"\x00\x01"
    assert rig.request(MSG_SET_VALUE, 3, 0) == OK
    assert chip.state(3) == (OUT, 0)
    assert rig.request(MSG_GET_VALUE, 3) == b"\x00\x00"


def test_gpio_input_reads_host_level(rig: Rig, chip: SimGpioChip) -> None:
    rig.make_input(5)
    assert rig.request(MSG_GET_DIRECTION, 5) == bytes((0, IN))
    assert rig.request(MSG_GET_VALUE, 5) == b"\x00\x00"
    chip.set_input(5, 1)
    assert rig.request(MSG_GET_VALUE, 5) == b"\x00\x01"


def test_gpio_set_value_on_input_is_used_when_output_later(rig: Rig, chip: SimGpioChip) -> None:
    """§5.17.6.5: the value "must be used" once the line is configured to output;
    upstream asks libgpiod to drive an input and answers ERR."""
    rig.make_input(2)
    assert rig.request(MSG_SET_VALUE, 2, 1) == OK
    assert chip.state(2) == (IN, 0)
    assert rig.request(MSG_SET_DIRECTION, 2, OUT) == OK
    assert chip.state(2) == (OUT, 1)


def test_gpio_direction_none_releases_and_discards_state(rig: Rig, chip: SimGpioChip) -> None:
    """§5.17.6.9: the device MUST discard all state of a line set to direction none."""
    assert rig.request(MSG_SET_VALUE, 1, 1) == OK
    assert rig.request(MSG_SET_DIRECTION, 1, OUT) == OK
    assert rig.request(MSG_SET_DIRECTION, 1, NONE) == OK
    assert chip.state(1) == (NONE, 0)
    assert rig.dev.direction(1) == NONE
    assert rig.request(MSG_GET_DIRECTION, 1) == bytes((0, IN))
    # The cached value went too: output needs a new SET_VALUE.
    assert rig.request(MSG_SET_DIRECTION, 1, OUT) == ERR


def test_gpio_output_without_value_is_refused(rig: Rig, chip: SimGpioChip) -> None:
    assert rig.request(MSG_SET_DIRECTION, 0, OUT) == ERR
    assert chip.state(0) == (NONE, 0)


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (msg(0), "type 0 is no message"),
        (msg(7), "type 7 is no message"),
        (msg(0xFFFF), "type 0xffff is no message"),
        (msg(MSG_GET_DIRECTION, 8), "line 8 >= ngpio"),
        (msg(MSG_SET_VALUE, 0xFFFF, 1), "line 0xffff >= ngpio"),
        (msg(MSG_SET_VALUE, 0, 2), "SET_VALUE of 2"),
        (msg(MSG_SET_VALUE, 0, 0xFFFF_FFFF), "SET_VALUE of 2**32-1"),
        (msg(MSG_SET_DIRECTION, 0, 3), "direction 3"),
        (msg(MSG_IRQ_TYPE, 0, IRQ_TYPE_EDGE_RISING), "IRQ on a line without direction"),
    ],
)
def test_gpio_bad_request_answers_err(rig: Rig, request_bytes: bytes, why: str) -> None:
    """§5.17.6.9: the device MUST set status; a request it cannot honour gets ERR."""
    head, (out,) = rig.add_request(0, readable=[request_bytes], writable=[2])
    assert rig.kick(0) == [(head, 2)], why
    assert rig.read(out, 2) == ERR, why
    # The device keeps working.
    assert rig.request(MSG_GET_DIRECTION, 0) == bytes((0, IN))


@pytest.mark.parametrize("size", [1, 3, 16])
def test_gpio_wrong_response_size_answers_err_before_any_effect(
    rig: Rig, chip: SimGpioChip, size: int
) -> None:
    """The response is ``{u8 status; u8 value}`` (§5.17.6); upstream performs the
    request and then answers ERR, we refuse first."""
    assert rig.request(MSG_SET_VALUE, 4, 1) == OK
    head, (out,) = rig.add_request(0, readable=[msg(MSG_SET_DIRECTION, 4, OUT)], writable=[size])
    assert rig.kick(0) == [(head, min(size, 2))]
    assert rig.read(out, min(size, 2)) == ERR[:size]
    assert chip.state(4) == (NONE, 0)


@pytest.mark.parametrize("delta", [-1, 1])
def test_gpio_line_names_wrong_size_answers_err(rig: Rig, delta: int) -> None:
    size = 1 + len(rig.dev.names) + delta
    head, (out,) = rig.add_request(0, readable=[msg(MSG_GET_LINE_NAMES)], writable=[size])
    assert rig.kick(0) == [(head, 2)]
    assert rig.read(out, 2) == ERR


@pytest.mark.parametrize("readable", [b"", msg(MSG_GET_DIRECTION)[:7], msg(MSG_GET_DIRECTION) + b"\0"])
def test_gpio_request_of_wrong_size_answers_err(rig: Rig, readable: bytes) -> None:
    """The request is exactly ``struct virtio_gpio_request`` (8 bytes, §5.17.6)."""
    head, (out,) = rig.add_request(0, readable=[readable] if readable else [], writable=[2])
    assert rig.kick(0) == [(head, 2)]
    assert rig.read(out, 2) == ERR


def test_gpio_request_without_writable_buffer_returned_empty(rig: Rig) -> None:
    """§5.17.6.8: the response buffer MUST be device-writable; without one there is
    no status to set, and the chain comes back with used length 0."""
    head, _ = rig.add_request(0, readable=[msg(MSG_GET_DIRECTION), b"\0\0"])
    assert rig.kick(0) == [(head, 0)]


def test_gpio_request_split_across_descriptors(rig: Rig) -> None:
    """VIRTIO 1.2 §2.6.4: the device MUST NOT assume a descriptor layout (upstream
    wants exactly two descriptors)."""
    raw = msg(MSG_GET_DIRECTION, 2)
    head, outs = rig.add_request(0, readable=[raw[:3], raw[3:]], writable=[1, 1])
    assert rig.kick(0) == [(head, 2)]
    assert rig.read(outs[0], 1) + rig.read(outs[1], 1) == bytes((0, IN))


def test_gpio_host_chip_failure_answers_err(
    rig: Rig, chip: SimGpioChip, monkeypatch: pytest.MonkeyPatch
) -> None:
    def vanished(*args: object, **kw: object) -> None:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(chip, "configure", vanished)
    assert rig.request(MSG_SET_DIRECTION, 0, IN) == ERR
    assert rig.dev.direction(0) == NONE


def test_gpio_bad_requests_log_rate_limited(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="virtio_devices.gpio"):
        for _ in range(50):
            assert rig.request(9) == ERR
    lines = [r for r in caplog.records if "unknown request type 9" in r.getMessage()]
    assert 1 <= len(lines) < 50


# What Linux's gpio-virtio sends, byte for byte (drivers/gpio/gpio-virtio.c): a
# request (le16 type, le16 gpio, le32 value) and the response the device must write into the 2-byte buffer.
LINUX_SEQUENCE = [
    # gpiod_direction_output(line 2, 1): SET_VALUE then SET_DIRECTION out.
    (bytes.fromhex("0500 0200 01000000"), bytes.fromhex("00 00")),  # type 5, gpio 2, value 1 -> OK, 0
    (bytes.fromhex("0300 0200 01000000"), bytes.fromhex("00 00")),  # type 3, gpio 2, out -> OK, 0
    (bytes.fromhex("0200 0200 00000000"), bytes.fromhex("00 01")),  # GET_DIRECTION -> OK, out
    (bytes.fromhex("0400 0200 00000000"), bytes.fromhex("00 01")),  # GET_VALUE -> OK, high
    # gpiod_direction_input(line 6), then its IRQ enabled for both edges.
    (bytes.fromhex("0300 0600 02000000"), bytes.fromhex("00 00")),  # SET_DIRECTION in -> OK
    (bytes.fromhex("0600 0600 03000000"), bytes.fromhex("00 00")),  # IRQ_TYPE edge both -> OK
    (bytes.fromhex("0600 0600 04000000"), bytes.fromhex("01 00")),  # level high before NONE -> ERR, 0
    (bytes.fromhex("0600 0600 00000000"), bytes.fromhex("00 00")),  # IRQ_TYPE none -> OK
    # gpio_free(line 2): SET_DIRECTION none.
    (bytes.fromhex("0300 0200 00000000"), bytes.fromhex("00 00")),  # -> OK, line released
]


def test_gpio_linux_request_vectors(rig: Rig, chip: SimGpioChip) -> None:
    for request, response in LINUX_SEQUENCE:
        head, (out,) = rig.add_request(0, readable=[request], writable=[2])
        assert rig.kick(0) == [(head, 2)], request.hex()
        assert rig.read(out, 2) == response, request.hex()
    assert chip.state(2) == (NONE, 0)
    assert chip.state(6) == (IN, 0)


# -- IRQ_TYPE (§5.17.6.6) --------------------------------------------------------------------


def test_gpio_irq_type_needs_the_feature(chip: SimGpioChip) -> None:
    """§5.17.6.6: IRQ_TYPE "is allowed only if VIRTIO_GPIO_F_IRQ has been negotiated"."""
    with Rig(chip, features=COMMON_FEATURES) as rig:
        rig.make_input(0)
        assert rig.request(MSG_IRQ_TYPE, 0, IRQ_TYPE_EDGE_RISING) == ERR


@pytest.mark.parametrize("irq", [5, 6, 7, 9, 12, 15, 16, 0x100])
def test_gpio_irq_type_outside_spec_refused(rig: Rig, irq: int) -> None:
    rig.make_input(0)
    assert rig.request(MSG_IRQ_TYPE, 0, irq) == ERR
    assert rig.dev.irq_type(0) == IRQ_TYPE_NONE


def test_gpio_irq_type_change_must_go_through_none(rig: Rig) -> None:
    """§5.17.6.8: the driver MUST disable an interrupt before changing its type."""
    rig.make_input(0, IRQ_TYPE_EDGE_RISING)
    assert rig.request(MSG_IRQ_TYPE, 0, IRQ_TYPE_EDGE_FALLING) == ERR
    assert rig.dev.irq_type(0) == IRQ_TYPE_EDGE_RISING
    assert rig.request(MSG_IRQ_TYPE, 0, IRQ_TYPE_EDGE_RISING) == OK  # unchanged: no-op
    assert rig.request(MSG_IRQ_TYPE, 0, IRQ_TYPE_NONE) == OK
    assert rig.request(MSG_IRQ_TYPE, 0, IRQ_TYPE_LEVEL_LOW) == OK
    assert rig.dev.irq_type(0) == IRQ_TYPE_LEVEL_LOW


def test_gpio_irq_on_output_refused(rig: Rig) -> None:
    """§5.17.6.8: the driver MUST NOT send IRQ messages for an output line."""
    assert rig.request(MSG_SET_VALUE, 0, 0) == OK
    assert rig.request(MSG_SET_DIRECTION, 0, OUT) == OK
    assert rig.request(MSG_IRQ_TYPE, 0, IRQ_TYPE_EDGE_BOTH) == ERR


# -- eventq and the IRQ state machine (§5.17.7) --------------------------------------------------


def test_gpio_waiter_without_irq_returned_invalid(rig: Rig) -> None:
    """§5.17.6.6: a buffer for a line whose interrupt is not enabled comes back INVALID."""
    head, out = rig.wait_irq(0)
    assert rig.kick(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_INVALID,))


def test_gpio_rising_edge_completes_waiter(rig: Rig, chip: SimGpioChip) -> None:
    rig.make_input(4, IRQ_TYPE_EDGE_RISING)
    head, out = rig.wait_irq(4)
    assert rig.kick(1) == []
    assert rig.dev.waiting() == [4]
    chip.set_input(4, 1)
    rig.edges(4)
    assert rig.used(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_VALID,))
    assert rig.interrupt.used[-1] == 1
    assert rig.dev.waiting() == []


def test_gpio_edge_of_other_kind_does_not_fire(rig: Rig, chip: SimGpioChip) -> None:
    chip.set_input(4, 1)
    rig.make_input(4, IRQ_TYPE_EDGE_RISING)
    head, _ = rig.wait_irq(4)
    assert rig.kick(1) == []
    chip.set_input(4, 0)  # falling: not enabled
    rig.edges(4)
    assert rig.used(1) == []
    chip.set_input(4, 1)
    rig.edges(4)
    assert rig.used(1) == [(head, 1)]


def test_gpio_edge_while_masked_is_latched(rig: Rig, chip: SimGpioChip) -> None:
    """§5.17.6.9: the device MUST latch an edge interrupt while it is masked."""
    rig.make_input(6, IRQ_TYPE_EDGE_FALLING)
    chip.set_input(6, 1)
    chip.set_input(6, 0)
    rig.edges(6)
    head, out = rig.wait_irq(6)
    assert rig.kick(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_VALID,))
    # The latch is spent: the next buffer waits.
    _ = rig.wait_irq(6)
    assert rig.kick(1) == []
    assert rig.dev.waiting() == [6]


def test_gpio_none_edge_none_with_waiter_queued(rig: Rig, chip: SimGpioChip) -> None:
    """NONE -> edge -> NONE with a buffer queued: §5.17.7.3, the device MUST return
    the buffer INVALID when the interrupt is disabled; it is completed once."""
    rig.make_input(1)
    rig.make_input(1, IRQ_TYPE_EDGE_BOTH)
    head, out = rig.wait_irq(1)
    assert rig.kick(1) == []
    assert rig.request(MSG_IRQ_TYPE, 1, IRQ_TYPE_NONE) == OK
    assert rig.used(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_INVALID,))
    # An edge after the disable reaches nobody, and the latch was discarded (§5.17.6.9).
    chip.set_input(1, 1)
    assert chip.event_fd(1) not in rig.loop.readers
    assert rig.request(MSG_IRQ_TYPE, 1, IRQ_TYPE_EDGE_BOTH) == OK
    _ = rig.wait_irq(1)
    assert rig.kick(1) == []
    assert rig.used(1) == []
    assert (rig.dev.irqs_valid, rig.dev.irqs_invalid) == (0, 1)


def test_gpio_release_returns_waiter_invalid(rig: Rig, chip: SimGpioChip) -> None:
    rig.make_input(2, IRQ_TYPE_EDGE_RISING)
    head, out = rig.wait_irq(2)
    rig.kick(1)
    assert rig.request(MSG_SET_DIRECTION, 2, NONE) == OK
    assert rig.used(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_INVALID,))
    assert rig.dev.irq_type(2) == IRQ_TYPE_NONE
    assert chip.state(2) == (NONE, 0)


def test_gpio_output_direction_disables_irq(rig: Rig) -> None:
    rig.make_input(2, IRQ_TYPE_EDGE_RISING)
    head, _ = rig.wait_irq(2)
    rig.kick(1)
    assert rig.request(MSG_SET_VALUE, 2, 1) == OK
    assert rig.request(MSG_SET_DIRECTION, 2, OUT) == OK
    assert rig.used(1) == [(head, 1)]
    assert rig.dev.irq_type(2) == IRQ_TYPE_NONE


def test_gpio_second_waiter_on_a_line_returned_first_kept(rig: Rig, chip: SimGpioChip) -> None:
    """§5.17.7.2: the driver MUST NOT queue two buffers for one line."""
    rig.make_input(3, IRQ_TYPE_EDGE_RISING)
    first, out1 = rig.wait_irq(3)
    second, out2 = rig.wait_irq(3)
    assert rig.kick(1) == [(second, 1)]
    assert rig.read(out2, 1) == bytes((IRQ_STATUS_INVALID,))
    chip.set_input(3, 1)
    rig.edges(3)
    assert rig.used(1) == [(first, 1)]
    assert rig.read(out1, 1) == bytes((IRQ_STATUS_VALID,))


@pytest.mark.parametrize(
    ("readable", "writable", "why"),
    [
        ([struct.pack("<H", 8)], [1], "line >= ngpio"),
        ([b"\x00"], [1], "request of 1 byte"),
        ([b"\x00\x00\x00\x00"], [1], "request of 4 bytes"),
        ([struct.pack("<H", 0)], [2], "response of 2 bytes"),
    ],
)
def test_gpio_bad_eventq_buffer_returned_invalid(
    rig: Rig, readable: list[bytes], writable: list[int], why: str
) -> None:
    rig.make_input(0, IRQ_TYPE_EDGE_RISING)
    head, (out, *_) = rig.add_request(1, readable=readable, writable=writable)
    assert rig.kick(1) == [(head, 1)], why
    assert rig.read(out, 1) == bytes((IRQ_STATUS_INVALID,)), why
    assert rig.dev.waiting() == []


def test_gpio_eventq_buffer_without_writable_byte_returned_empty(rig: Rig) -> None:
    head, _ = rig.add_request(1, readable=[b"\0\0"])
    assert rig.kick(1) == [(head, 0)]


def test_gpio_level_high_fires_at_once_and_is_not_latched(rig: Rig, chip: SimGpioChip) -> None:
    """Level interrupts (emulated): fire while the level is there (§5.17.7.1), and
    MUST NOT be latched while masked (§5.17.6.9)."""
    rig.make_input(7, IRQ_TYPE_LEVEL_HIGH)
    head, _ = rig.wait_irq(7)
    assert rig.kick(1) == []  # level low: waits
    chip.set_input(7, 1)
    rig.edges(7)
    assert rig.used(1) == [(head, 1)]
    # Still high when unmasked again: fires at once.
    head2, out2 = rig.wait_irq(7)
    assert rig.kick(1) == [(head2, 1)]
    assert rig.read(out2, 1) == bytes((IRQ_STATUS_VALID,))
    # A pulse while masked is forgotten once the level is gone.
    chip.set_input(7, 0)
    rig.edges(7)
    _ = rig.wait_irq(7)
    assert rig.kick(1) == []


def test_gpio_level_low(rig: Rig, chip: SimGpioChip) -> None:
    chip.set_input(0, 1)
    rig.make_input(0, IRQ_TYPE_LEVEL_LOW)
    head, out = rig.wait_irq(0)
    assert rig.kick(1) == []
    chip.set_input(0, 0)
    rig.edges(0)
    assert rig.used(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_VALID,))


def test_gpio_waiters_on_many_lines_fire_independently(rig: Rig, chip: SimGpioChip) -> None:
    heads = {}
    for line in range(8):
        rig.make_input(line, IRQ_TYPE_EDGE_RISING)
        heads[line], _ = rig.wait_irq(line)
    assert rig.kick(1) == []
    for line in (5, 2, 7):
        chip.set_input(line, 1)
        rig.edges(line)
    assert rig.used(1) == [(heads[5], 1), (heads[2], 1), (heads[7], 1)]
    assert rig.dev.waiting() == [0, 1, 3, 4, 6]


def test_gpio_vanished_chip_returns_waiter_invalid(
    rig: Rig, chip: SimGpioChip, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.make_input(1, IRQ_TYPE_EDGE_RISING)
    head, out = rig.wait_irq(1)
    rig.kick(1)
    fd = chip.event_fd(1)

    def vanished(line: int) -> list[int]:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(chip, "read_edges", vanished)
    rig.loop.fire_reader(fd)
    assert rig.used(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_INVALID,))
    assert fd not in rig.loop.readers
    # Other lines still work.
    assert rig.request(MSG_GET_DIRECTION, 1) == bytes((0, IN))


def test_gpio_quiesce_returns_waiters_invalid(rig: Rig) -> None:
    rig.make_input(0, IRQ_TYPE_EDGE_RISING)
    rig.make_input(1, IRQ_TYPE_LEVEL_HIGH)
    h0, _ = rig.wait_irq(0)
    h1, _ = rig.wait_irq(1)
    assert rig.kick(1) == []
    rig.dev.quiesce(1)
    assert sorted(rig.used(1)) == sorted([(h0, 1), (h1, 1)])
    assert rig.dev.waiting() == []


def test_gpio_reset_keeps_lines_close_releases_them(chip: SimGpioChip) -> None:
    """A reset (a vhost-user ring stop: QEMU's ``stop``) returns the waiting eventq
    buffers INVALID but keeps the lines; close() (the session is over) releases them."""
    rig = Rig(chip)
    rig.make_input(0, IRQ_TYPE_EDGE_RISING)
    assert rig.request(MSG_SET_VALUE, 1, 1) == OK
    assert rig.request(MSG_SET_DIRECTION, 1, OUT) == OK
    head, out = rig.wait_irq(0)
    rig.kick(1)
    rig.close()
    assert rig.used(1) == [(head, 1)]
    assert rig.read(out, 1) == bytes((IRQ_STATUS_INVALID,))
    assert rig.loop.readers == {}
    assert chip.state(1) == (OUT, 1)
    assert rig.dev.irq_type(0) == IRQ_TYPE_EDGE_RISING
    rig.dev.close()
    assert chip.state(0) == (NONE, 0)
    assert chip.state(1) == (NONE, 0)
    rig.dev.close()  # twice: harmless
    # A fresh device over the same chip starts from scratch.
    with Rig(chip) as again:
        assert again.dev.direction(1) == NONE
        assert again.request(MSG_GET_DIRECTION, 1) == bytes((0, IN))


def test_gpio_interrupt_survives_stop_and_start(chip: SimGpioChip) -> None:
    """Rings stopped and started again (QEMU ``stop``/``cont``): the enabled
    interrupt goes on, an edge while stopped is latched, the requeued buffer fires."""
    dev = GpioDevice(chip)
    with DeviceRig(dev, queue_size=64, event_idx=True) as first:
        head, (out,) = first.add_request(0, readable=[msg(MSG_SET_DIRECTION, 3, IN)], writable=[2])
        first.kick(0)
        head, (out,) = first.add_request(
            0, readable=[msg(MSG_IRQ_TYPE, 3, IRQ_TYPE_EDGE_RISING)], writable=[2]
        )
        assert first.kick(0) == [(head, 2)]
        assert first.read(out, 2) == OK
    chip.set_input(3, 1)  # while stopped
    with DeviceRig(dev, queue_size=64, event_idx=True) as second:
        fd = chip.event_fd(3)
        assert fd in second.loop.readers
        head, (status,) = second.add_request(1, readable=[struct.pack("<H", 3)], writable=[1])
        second.loop.fire_reader(fd)
        assert second.kick(1) == [(head, 1)]
        assert second.read(status, 1) == bytes((IRQ_STATUS_VALID,))
    dev.close()
    assert chip.state(3) == (NONE, 1)  # released; the host still holds the input high


# -- hypothesis over request bytes -------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    queue=st.sampled_from([0, 1]),
    readable=st.lists(st.binary(max_size=12), max_size=3),
    writable=st.lists(st.integers(0, 40), max_size=3),
    typed=st.tuples(st.integers(0, 8), st.integers(0, 10), st.integers(0, 12)),
    use_typed=st.booleans(),
)
def test_gpio_any_request_bytes_answered_once(  # noqa: PLR0917 - hypothesis draws
    chip: SimGpioChip,
    queue: int,
    readable: list[bytes],
    writable: list[int],
    typed: tuple[int, int, int],
    use_typed: bool,
) -> None:
    """Whatever the guest sends: every chain is used exactly once (now, or held on
    the eventq until the interrupt is disabled), within its writable bytes, with a
    status of 0 or 1 when any byte was written, and the device keeps answering."""
    if use_typed:
        readable = [msg(*typed)] if queue == 0 else [struct.pack("<H", typed[1])]
    if not readable and not writable:
        writable = [2]  # a chain has at least one descriptor
    with Rig(chip) as rig:
        rig.make_input(2, IRQ_TYPE_EDGE_BOTH)
        head, outs = rig.add_request(queue, readable=readable, writable=writable)
        used = rig.kick(queue)
        if not used:
            assert queue == 1 and rig.dev.waiting() == [2]
            assert rig.request(MSG_IRQ_TYPE, 2, IRQ_TYPE_NONE) == OK
            used = rig.used(1)
        assert used == [(head, used[0][1])]
        length = used[0][1]
        assert length <= sum(writable)
        if length:
            assert rig.read(outs[next(i for i, n in enumerate(writable) if n)], 1)[0] in (0, 1)
        assert rig.request(MSG_GET_DIRECTION, 2) == bytes((0, IN))
        assert rig.dev.broken is None
    for line in range(8):
        chip.release(line)
        chip.set_input(line, 0)


# -- the simulated chip ------------------------------------------------------------------------


def test_sim_chip_names_and_bounds() -> None:
    with SimGpioChip(3) as c:
        assert [c.line_name(i) for i in range(3)] == ["dummy0", "dummy1", "dummy2"]
        with pytest.raises(GpioChipError, match="line 3 out of range"):
            c.line_name(3)
        with pytest.raises(ValueError, match="level must be 0 or 1"):
            c.set_input(0, 2)
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        SimGpioChip(65536)


def test_sim_chip_refuses_what_the_kernel_refuses() -> None:
    with SimGpioChip(2) as c:
        with pytest.raises(GpioChipError, match="not requested"):
            c.get_value(0)
        c.configure(0, IN)
        with pytest.raises(GpioChipError, match="not an output"):
            c.set_value(0, 1)
        with pytest.raises(GpioChipError, match="edge detection on an output"):
            c.configure(1, OUT, 0, 3)


def test_sim_chip_edges_wake_the_fd_and_filter_by_detection() -> None:
    with SimGpioChip(1) as c:
        c.configure(0, IN, 0, 1)  # rising only
        fd = c.event_fd(0)
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(0) == []
        c.set_input(0, 1)
        c.set_input(0, 0)
        c.set_input(0, 1)
        assert p.poll(0)
        assert c.read_edges(0) == [1, 1]
        assert p.poll(0) == []
        c.configure(0, IN, 0, EDGE_NONE)
        c.set_input(0, 0)
        assert c.read_edges(0) == []
