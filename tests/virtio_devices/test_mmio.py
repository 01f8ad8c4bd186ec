"""The virtio-mmio transport (virtio_devices.mmio) against VIRTIO 1.2 §4.2.2.

Each device-side rule of §4.2.2.1 (and what §4.2.2.2 forbids the driver, which the
device must survive) has a test citing it; the driver is the kit's MmioDriver or raw
register accesses.  The last test drives random register sequences (hypothesis).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_devices.base import COMMON_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice
from virtio_devices.errors import DeviceNeedsReset
from virtio_devices.hosts.files import BytesEntropySource
from virtio_devices.mmio import (
    MAGIC_VALUE,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_RESET,
    MmioTransport,
    Reg,
)
from virtio_devices.rng import RngDevice
from virtio_devices.template import TemplateDevice
from virtio_devices.testing import FakeLoop, IrqLine, MmioDriver, MmioDriverError
from virtio_queue import DescriptorChain, GuestMemory
from virtio_queue.testing import GuardedMemory

MEM = 1 << 20


class ConfigDevice(VirtioDevice):
    """A device with an 8-byte config space the test changes, and a writable byte."""

    device_id = 0x42
    name = "cfg"
    queue_sizes = (8, 4)
    has_config = True

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        return 0


class BuggyDevice(TemplateDevice):
    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        raise RuntimeError("bug in handle_chain")


class Rig:
    def __init__(self, device: VirtioDevice, memory: GuestMemory | None = None) -> None:
        self._fd = -1
        if memory is None:
            memory, self._fd = GuestMemory.memfd(MEM)
        self.memory = memory
        self.loop = FakeLoop()
        self.irq = IrqLine()
        self.device = device
        self.t = MmioTransport(device, self.memory, self.loop, self.irq)
        self.drv = MmioDriver(self.t, self.memory, irq=self.irq)

    def close(self) -> None:
        self.t.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def r(self, offset: int) -> int:
        return self.t.read(offset, 4)

    def w(self, offset: int, value: int) -> None:
        self.t.write(offset, 4, value)

    def to_features_ok(self, features: int | None = None) -> None:
        self.drv.reset()
        self.drv.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        feats = self.drv.device_features() if features is None else features
        self.w(Reg.DRIVER_FEATURES_SEL, 1)
        self.w(Reg.DRIVER_FEATURES, feats >> 32)
        self.w(Reg.DRIVER_FEATURES_SEL, 0)
        self.w(Reg.DRIVER_FEATURES, feats & 0xFFFFFFFF)
        self.drv.add_status(STATUS_FEATURES_OK)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(TemplateDevice())
    yield r
    r.close()


@pytest.fixture
def cfg() -> Iterator[Rig]:
    r = Rig(ConfigDevice())
    yield r
    r.close()


# -- identity ------------------------------------------------------------------------------


def test_identity_registers(rig: Rig) -> None:
    """§4.2.2.1: the device MUST return 0x74726976 in MagicValue and 0x2 in Version."""
    assert rig.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
    assert rig.r(Reg.VERSION) == 2
    assert rig.r(Reg.DEVICE_ID) == TemplateDevice.device_id
    assert rig.r(Reg.VENDOR_ID) == 0


def test_device_features_pages_offer_version_1_and_ring_reset(rig: Rig) -> None:
    """§4.2.2 DeviceFeaturesSel selects 32-bit pages; §6.1: VERSION_1 offered."""
    feats = rig.drv.device_features()
    assert feats == COMMON_FEATURES | VIRTIO_F_RING_RESET
    rig.w(Reg.DEVICE_FEATURES_SEL, 7)
    assert rig.r(Reg.DEVICE_FEATURES) == 0


def test_shared_memory_regions_absent_read_minus_one(rig: Rig) -> None:
    """§4.2.2: reading SHMLen of a region that does not exist gives -1."""
    rig.w(Reg.SHM_SEL, 0)
    assert rig.r(Reg.SHM_LEN_LOW) == rig.r(Reg.SHM_LEN_HIGH) == 0xFFFFFFFF


# -- initialisation and the kick path ------------------------------------------------------


def test_linux_style_init_then_echo(rig: Rig) -> None:
    feats = rig.drv.init()
    assert feats & VIRTIO_F_VERSION_1
    assert rig.r(Reg.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    assert rig.device.active
    head, (out,) = rig.drv.add_request(0, [b"hello"], [8])
    rig.drv.notify(0)
    assert rig.irq.raised == 1
    assert rig.drv.interrupt() == 1
    assert rig.irq.raised == 1 and rig.irq.level is False
    assert rig.drv.used(0) == [(head, 5)]
    assert rig.memory.read(out, 5) == b"hello"


def test_interrupt_status_holds_until_acked(rig: Rig) -> None:
    """§4.2.2.1: the device MUST present each event in InterruptStatus from the moment
    it takes place until the driver acknowledges it in InterruptACK; bits for events
    that did not take place MUST be zero."""
    rig.drv.init()
    assert rig.r(Reg.INTERRUPT_STATUS) == 0
    rig.drv.add_request(0, [b"a"], [1])
    rig.drv.notify(0)
    assert rig.r(Reg.INTERRUPT_STATUS) == 1
    rig.w(Reg.INTERRUPT_ACK, 2)  # a bit that is not set: nothing changes
    assert rig.r(Reg.INTERRUPT_STATUS) == 1 and rig.irq.level
    rig.w(Reg.INTERRUPT_ACK, 1)
    assert rig.r(Reg.INTERRUPT_STATUS) == 0 and not rig.irq.level


def test_event_idx_suppresses_interrupts_until_used_event(rig: Rig) -> None:
    """§2.7.10: with EVENT_IDX the device interrupts only past used_event."""
    rig.drv.init()
    assert rig.drv.event_idx
    rig.drv.add_request(0, [b"a"], [1])
    rig.drv.notify(0)
    rig.drv.interrupt()
    mock = rig.drv.mocks[0]
    mock.used_elems()  # seen, but used_event left at 0: no interrupt wanted
    rig.drv.add_request(0, [b"b"], [1])
    rig.drv.notify(0)
    assert rig.irq.raised == 1 and rig.r(Reg.INTERRUPT_STATUS) == 0


def test_reset_clears_interrupt_status_and_queue_ready(rig: Rig) -> None:
    """§4.2.2.1: upon reset the device MUST clear all bits in InterruptStatus and the
    ready bits in QueueReady for all queues."""
    rig.drv.init()
    rig.drv.add_request(0, [b"a"], [1])
    rig.drv.notify(0)
    assert rig.r(Reg.INTERRUPT_STATUS)
    rig.w(Reg.STATUS, 0)
    assert rig.r(Reg.INTERRUPT_STATUS) == 0 and not rig.irq.level
    assert rig.r(Reg.STATUS) == 0
    rig.w(Reg.QUEUE_SEL, 0)
    assert rig.r(Reg.QUEUE_READY) == 0
    assert not rig.device.active


def test_queue_not_ready_is_not_accessed(cfg: Rig) -> None:
    """§4.2.2.1: the device MUST NOT access virtqueue contents when QueueReady is zero:
    a notify of a queue left unset reaches neither the device nor guest memory."""
    cfg.drv.init(queues=1)  # queue 1 never set up
    before = cfg.memory.read(0, MEM)
    cfg.drv.notify(1)
    assert cfg.memory.read(0, MEM) == before
    assert cfg.r(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET == 0


def test_notify_before_driver_ok_is_ignored(rig: Rig) -> None:
    """§2.1.2: the device MUST NOT consume buffers before DRIVER_OK."""
    rig.to_features_ok()
    mock = rig.drv.setup_queue(0, 8)
    assert mock is not None
    rig.drv.mocks = [mock]
    rig.drv.add_request(0, [b"a"], [1])
    rig.drv.notify(0)
    assert mock.used_idx() == 0 and not rig.device.active


def test_queue_num_max_zero_for_absent_queue(rig: Rig) -> None:
    """§4.2.2: QueueNumMax reads zero for a queue that is not available; writes to an
    absent queue's registers are ignored."""
    rig.w(Reg.QUEUE_SEL, 5)
    assert rig.r(Reg.QUEUE_NUM_MAX) == 0
    rig.w(Reg.QUEUE_NUM, 4)
    rig.w(Reg.QUEUE_READY, 1)
    assert rig.r(Reg.QUEUE_READY) == 0
    rig.w(Reg.QUEUE_SEL, 0)
    assert rig.r(Reg.QUEUE_NUM_MAX) == TemplateDevice.queue_sizes[0]


# -- features ------------------------------------------------------------------------------


def test_features_ok_refused_for_bits_not_offered(rig: Rig) -> None:
    """§2.2.1 / §3.1.1: the device MUST fail to set FEATURES_OK for features it does
    not accept (here a bit never offered); the driver sees it clear on read-back."""
    rig.to_features_ok(VIRTIO_F_VERSION_1 | (1 << 5))
    assert rig.r(Reg.STATUS) & STATUS_FEATURES_OK == 0
    rig.w(Reg.STATUS, rig.r(Reg.STATUS) | STATUS_DRIVER_OK)
    assert rig.r(Reg.STATUS) & STATUS_DRIVER_OK == 0 and not rig.device.active


def test_features_ok_refused_without_version_1(rig: Rig) -> None:
    """§6.1: a version 2 device has no legacy interface: VERSION_1 must be accepted."""
    rig.to_features_ok(VIRTIO_RING_F_EVENT_IDX)
    assert rig.r(Reg.STATUS) & STATUS_FEATURES_OK == 0
    with pytest.raises(MmioDriverError, match="FEATURES_OK refused"):
        rig.drv.init(VIRTIO_RING_F_EVENT_IDX)


def test_features_ok_acks_device_features(rig: Rig) -> None:
    rig.to_features_ok(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_RESET)
    assert rig.r(Reg.STATUS) & STATUS_FEATURES_OK
    # The device hears of its own bits only; RING_RESET is the transport's.
    assert rig.device.acked_features == VIRTIO_F_VERSION_1


def test_driver_features_frozen_after_features_ok(rig: Rig) -> None:
    """§3.1.1: features are negotiated before FEATURES_OK; later writes are ignored."""
    rig.to_features_ok(VIRTIO_F_VERSION_1)
    rig.w(Reg.DRIVER_FEATURES_SEL, 0)
    rig.w(Reg.DRIVER_FEATURES, VIRTIO_RING_F_EVENT_IDX)
    assert rig.t.driver_features == VIRTIO_F_VERSION_1


# -- status --------------------------------------------------------------------------------


def test_status_bits_never_go_backwards(rig: Rig) -> None:
    """§2.1.2: the driver MUST NOT clear a status bit; such a write is ignored."""
    rig.drv.init()
    status = rig.r(Reg.STATUS)
    rig.w(Reg.STATUS, STATUS_ACKNOWLEDGE)
    assert rig.r(Reg.STATUS) == status and rig.device.active


def test_driver_ok_without_features_ok_is_refused(rig: Rig) -> None:
    """§3.1.1: DRIVER_OK comes after FEATURES_OK."""
    rig.w(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert rig.r(Reg.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert not rig.device.active


def test_device_bug_sets_needs_reset_and_config_interrupt() -> None:
    """§2.1.2: the device SHOULD set DEVICE_NEEDS_RESET when it needs a reset, and if
    DRIVER_OK is set it MUST then send a configuration change notification."""
    r = Rig(BuggyDevice())
    r.drv.init()
    gen = r.r(Reg.CONFIG_GENERATION)
    r.drv.add_request(0, [b"x"], [1])
    r.drv.notify(0)
    assert r.r(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert r.r(Reg.INTERRUPT_STATUS) == 2 and r.irq.level
    assert r.r(Reg.CONFIG_GENERATION) != gen
    assert r.t.device_failures == 1 and not r.device.active
    # Notifies are ignored until the driver resets; after a reset it works again.
    r.drv.notify(0)
    assert r.t.device_failures == 1
    r.drv.init()
    assert r.r(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET == 0
    r.close()


def test_broken_avail_ring_sets_needs_reset(rig: Rig) -> None:
    """A ring that breaks (avail->idx more than the queue size ahead, §2.7.13.3) puts
    the device in DEVICE_NEEDS_RESET, and nothing is written to guest memory."""
    rig.drv.init(queue_size=8)
    rig.drv.mocks[0].set_avail_idx(100)
    rig.drv.notify(0)
    assert rig.r(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert rig.drv.mocks[0].used_idx() == 0


def test_loop_callback_failure_sets_needs_reset() -> None:
    """A device callback on the loop that raises is a device failure, not the VMM's."""

    class TimerDevice(TemplateDevice):
        def handle_chain(self, index: int, chain: DescriptorChain) -> int:
            assert self.loop is not None
            self.loop.call_later(0.0, self.boom)
            return 0

        def boom(self) -> None:
            raise DeviceNeedsReset("timer bug")

    r = Rig(TimerDevice())
    r.drv.init()
    r.drv.add_request(0, [], [1])
    r.drv.notify(0)
    assert r.loop.run_due() == 1
    assert r.r(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    r.close()


def test_reset_drops_device_timers() -> None:
    """After a reset nothing the device registered runs (its timers are cancelled)."""
    ran: list[int] = []

    class TimerDevice(TemplateDevice):
        def handle_chain(self, index: int, chain: DescriptorChain) -> int:
            assert self.loop is not None
            self.loop.call_later(0.0, lambda: ran.append(1))
            return 0

    r = Rig(TimerDevice())
    r.drv.init()
    r.drv.add_request(0, [], [1])
    r.drv.notify(0)
    r.w(Reg.STATUS, 0)
    r.loop.run_due()
    assert ran == []
    r.t.close()


# -- queue set-up --------------------------------------------------------------------------


def _select_and_fill(rig: Rig, num: int, desc: int, avail: int, used: int) -> None:
    rig.w(Reg.QUEUE_SEL, 0)
    rig.w(Reg.QUEUE_NUM, num)
    for reg, gpa in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, avail), (Reg.QUEUE_DEVICE_LOW, used)):
        rig.w(reg, gpa & 0xFFFFFFFF)
        rig.w(reg + 4, gpa >> 32)


@pytest.mark.parametrize("num", [0, 3, 2048])
def test_queue_num_not_power_of_two_or_too_big_refused(rig: Rig, num: int) -> None:
    """§4.2.2.2: QueueNum MUST be at most QueueNumMax; §2.7: a power of two."""
    rig.to_features_ok()
    _select_and_fill(rig, num, 0x0, 0x4000, 0x5000)
    assert rig.t.queues[0].size == TemplateDevice.queue_sizes[0]  # unchanged


def test_queue_ready_refused_before_addresses(rig: Rig) -> None:
    rig.to_features_ok()
    rig.w(Reg.QUEUE_SEL, 0)
    rig.w(Reg.QUEUE_NUM, 8)
    rig.w(Reg.QUEUE_DESC_LOW, 0x1000)
    rig.w(Reg.QUEUE_READY, 1)
    assert rig.r(Reg.QUEUE_READY) == 0


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (MEM - 16, 0x4000, 0x5000),  # descriptor table runs past the end of memory
        (0x0, 1 << 40, 0x5000),  # driver area outside guest memory
        (0x8, 0x4000, 0x5000),  # descriptor table not 16-byte aligned (§2.7)
        (0x0, 0x4000, 0x5002),  # device area not 4-byte aligned
    ],
)
def test_queue_ready_refused_for_bad_ring_addresses(rig: Rig, desc: int, avail: int, used: int) -> None:
    """Rings outside guest memory or misaligned (§2.7 alignment table): QueueReady
    reads back 0 and the device never gets the queue."""
    rig.to_features_ok()
    _select_and_fill(rig, 8, desc, avail, used)
    rig.w(Reg.QUEUE_READY, 1)
    assert rig.r(Reg.QUEUE_READY) == 0


def test_queue_registers_frozen_while_ready(rig: Rig) -> None:
    """§4.2.2.2: while QueueReady is set the driver MUST NOT access QueueNum or the
    ring addresses; the device ignores such writes."""
    rig.drv.init(queue_size=8)
    rig.w(Reg.QUEUE_SEL, 0)
    rig.w(Reg.QUEUE_NUM, 4)
    rig.w(Reg.QUEUE_DESC_LOW, 0x8000)
    q = rig.t.queues[0]
    assert q.size == 8 and q.desc_table == rig.drv.mocks[0].desc_table


def test_queue_ready_zero_stops_the_queue(rig: Rig) -> None:
    """§4.2.2 QueueReady: writing 0 stops the queue; reading back gives 0."""
    rig.drv.init(queue_size=8)
    rig.w(Reg.QUEUE_SEL, 0)
    rig.w(Reg.QUEUE_READY, 0)
    assert rig.r(Reg.QUEUE_READY) == 0
    rig.drv.add_request(0, [b"a"], [1])
    rig.drv.notify(0)
    assert rig.drv.mocks[0].used_idx() == 0


def test_queue_reset_presents_one_until_reenabled(rig: Rig) -> None:
    """§4.2.2.1 (VIRTIO_F_RING_RESET): the device MUST reset the queue when 1 is
    written to QueueReset and present 1 there until the driver re-enables it with
    QueueReady; it MUST present 0 after a device reset."""
    rig.drv.init(queue_size=8)
    head, _ = rig.drv.add_request(0, [b"a"], [1])
    rig.w(Reg.QUEUE_SEL, 0)
    rig.w(Reg.QUEUE_RESET, 1)
    assert rig.r(Reg.QUEUE_RESET) == 1
    assert rig.r(Reg.QUEUE_READY) == 0
    # Set the queue up again (fresh rings), then it serves from index 0.
    mock = rig.drv.setup_queue(0, 8)
    assert mock is not None
    rig.drv.mocks[0] = mock
    assert rig.r(Reg.QUEUE_RESET) == 0
    head, _ = rig.drv.add_request(0, [b"z"], [1])
    rig.drv.notify(0)
    assert rig.drv.used(0) == [(head, 1)]
    rig.w(Reg.QUEUE_RESET, 1)
    rig.w(Reg.STATUS, 0)
    assert rig.r(Reg.QUEUE_RESET) == 0


def test_queue_reset_refused_without_ring_reset_feature(rig: Rig) -> None:
    rig.drv.init(COMMON_FEATURES, queue_size=8)
    rig.w(Reg.QUEUE_SEL, 0)
    rig.w(Reg.QUEUE_RESET, 1)
    assert rig.r(Reg.QUEUE_RESET) == 0 and rig.r(Reg.QUEUE_READY) == 1


# -- config space --------------------------------------------------------------------------


def test_config_space_little_endian_access_sizes(cfg: Rig) -> None:
    """§4.2.2.2: config fields are read with 8-bit, aligned 16-bit and aligned
    32-bit accesses; the config space is little-endian (§2.5)."""
    t = cfg.t
    assert t.read(0x100, 1) == 0x01
    assert t.read(0x102, 2) == 0x0403
    assert t.read(0x104, 4) == 0x08070605
    assert t.read(0x108, 4) == 0  # past the config space


@pytest.mark.parametrize(("offset", "size"), [(0x101, 2), (0x102, 4), (0x100, 8), (0x100, 3)])
def test_config_space_misaligned_access_refused(cfg: Rig, offset: int, size: int) -> None:
    """§4.2.2.2: other sizes or alignments are not allowed: reads give 0, writes do nothing."""
    assert cfg.t.read(offset, size) == 0
    cfg.t.write(offset, size, 0)
    assert cfg.device.config_space() == b"\x01\x02\x03\x04\x05\x06\x07\x08"


def test_config_write_reaches_device(cfg: Rig) -> None:
    cfg.t.write(0x101, 1, 0xAA)
    assert cfg.t.read(0x100, 4) == 0x0403AA01


def test_config_generation_changes_with_config(cfg: Rig) -> None:
    """§4.2.2.1: the device MUST change ConfigGeneration if there is any risk of a
    driver seeing an inconsistent configuration state; even a change that is undone
    between two field reads is seen."""
    dev = cfg.device
    assert isinstance(dev, ConfigDevice)
    g0 = cfg.r(Reg.CONFIG_GENERATION)
    assert cfg.r(Reg.CONFIG_GENERATION) == g0  # stable while nothing changes
    cfg.t.read(0x100, 4)
    dev.config[0] = 9
    cfg.t.read(0x104, 4)
    dev.config[0] = 1  # back to what the first read saw
    assert cfg.r(Reg.CONFIG_GENERATION) != g0
    assert cfg.drv.read_config(0, 2) == b"\x01\x02"


def test_config_change_signal_interrupts_and_bumps_generation(cfg: Rig) -> None:
    """§4.2.2: InterruptStatus bit 1 for a configuration change; the generation moves."""
    cfg.drv.init()
    g0 = cfg.r(Reg.CONFIG_GENERATION)
    assert cfg.device.interrupt is not None
    cfg.device.interrupt.signal_config_change()
    assert cfg.r(Reg.INTERRUPT_STATUS) == 2
    assert cfg.r(Reg.CONFIG_GENERATION) != g0
    assert cfg.drv.interrupt() == 2 and cfg.drv.config_changes == 1


# -- bad accesses --------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [(0x70, 1), (0x72, 2), (0x71, 4), (0x70, 8), (-4, 4)])
def test_control_register_accesses_must_be_aligned_32_bit(rig: Rig, offset: int, size: int) -> None:
    """§4.2.2.2: the driver MUST only use 32-bit wide and aligned accesses for the
    control registers; others read 0 and writes do nothing."""
    rig.drv.init()
    status = rig.r(Reg.STATUS)
    assert rig.t.read(offset, size) == 0
    rig.t.write(offset, size, 0)
    assert rig.r(Reg.STATUS) == status


def test_read_only_and_write_only_registers(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """§4.2.2.2: the driver MUST NOT write read-only or read write-only registers."""
    caplog.set_level(logging.WARNING, "virtio_devices.mmio")
    rig.w(Reg.MAGIC_VALUE, 0)
    rig.w(Reg.INTERRUPT_STATUS, 1)
    assert rig.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
    assert rig.r(Reg.QUEUE_NOTIFY) == 0
    assert rig.r(Reg.DRIVER_FEATURES) == 0
    assert any("read-only register 0x0" in m for m in caplog.messages)
    assert any("write-only register 0x50" in m for m in caplog.messages)


def test_refusals_are_rate_limited(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """STYLE.md §5: a guest hammering a bad register cannot flood the log."""
    caplog.set_level(logging.WARNING, "virtio_devices.mmio")
    for _ in range(1000):
        rig.w(Reg.MAGIC_VALUE, 0)
    assert 1 <= len(caplog.records) <= 20


def test_value_wider_than_access_refused(rig: Rig) -> None:
    rig.t.write(Reg.STATUS, 4, 1 << 32)
    rig.t.write(Reg.STATUS, 4, -1)
    assert rig.r(Reg.STATUS) == 0


# -- random register traffic ---------------------------------------------------------------

# Mostly well-formed accesses to real registers (so that sequences reach the queues
# and the device), some anywhere and of any size.
_REGS = [v for k, v in vars(Reg).items() if k.isupper()]
_OFFSETS = st.one_of(
    st.sampled_from(_REGS),
    st.sampled_from([Reg.QUEUE_NOTIFY, Reg.STATUS, Reg.QUEUE_READY, Reg.QUEUE_SEL, Reg.INTERRUPT_ACK]),
    st.integers(0x100, 0x110),
    st.integers(-8, 0x210),
)
_ACCESS = st.tuples(
    st.booleans(),
    _OFFSETS,
    st.sampled_from([4, 4, 4, 4, 1, 2, 8, 3]),
    st.one_of(
        st.integers(0, 15),
        st.sampled_from([0, 0, 0xFF, 0x1000, 0x4000, 0x5000, 0xFFFFFFFF, 1 << 32, -1]),
        st.integers(0, 0xFFFFFFFF),
    ),
)


@given(st.lists(_ACCESS, max_size=60), st.booleans())
def test_random_register_sequences_never_raise(accesses: list[tuple[bool, int, int, int]], rng: bool) -> None:
    """No exception escapes read/write whatever the driver does, and nothing is
    written outside guest memory (guard bytes around two regions with a gap)."""
    guarded = GuardedMemory([(0, 0x40000), (0x80000, 0x10000)])
    source = BytesEntropySource(bytes(range(256)) * 4)
    device: VirtioDevice = RngDevice(source) if rng else ConfigDevice()
    r = Rig(device, guarded.memory)
    try:
        # Half the time start from a working device, so that notifies reach queues.
        if accesses and accesses[0][3] & 1:
            r.drv.init(queue_size=8)
            r.drv.add_request(0, [], [16])
        for is_write, offset, size, value in accesses:
            if is_write:
                r.t.write(offset, size, value)
            else:
                got = r.t.read(offset, size)
                assert 0 <= got < 1 << 32
        r.t.close()
        assert not device.active
        guarded.check_guards()
    finally:
        source.close()
        r.close()
        guarded.memory.clear()


_OPS = st.lists(
    st.one_of(
        _ACCESS,
        st.sampled_from(["notify", "request", "ack", "stop", "queue-reset", "set-up", "overrun"]),
    ),
    max_size=60,
)


@given(_OPS, st.booleans())
def test_random_accesses_between_requests_never_raise(ops: list[object], rng: bool) -> None:
    """From a working device: requests, notifies and interrupt handling mixed with
    random register accesses (resets, queue stops and resets, bad addresses...): no
    exception escapes, nothing is written outside guest memory, and after a reset
    the driver can initialise the device again."""
    guarded = GuardedMemory([(0, 0x40000), (0x80000, 0x10000)])
    source = BytesEntropySource(bytes(range(256)) * 64)
    device: VirtioDevice = RngDevice(source) if rng else TemplateDevice()
    r = Rig(device, guarded.memory)
    try:
        r.drv.init(queue_size=8)
        for op in ops:
            if op == "notify":
                r.drv.notify(0)
            elif op == "request":
                r.drv.add_request(0, [] if rng else [b"ping"], [16])
            elif op == "ack":
                r.drv.interrupt()
            elif op in ("stop", "queue-reset"):
                r.w(Reg.QUEUE_SEL, 0)
                r.w(Reg.QUEUE_READY if op == "stop" else Reg.QUEUE_RESET, 0 if op == "stop" else 1)
            elif op == "set-up":
                # A stopped or reset queue set up again with fresh rings.
                with contextlib.suppress(MmioDriverError):
                    mock = r.drv.setup_queue(0, 8)
                    if mock is not None:
                        r.drv.mocks[0] = mock
            elif op == "overrun":
                # avail->idx more than a ring ahead (§2.7.13.3): the ring breaks.
                mock = r.drv.mocks[0]
                mock.set_avail_idx(mock.avail_idx() + 100)
            else:
                assert isinstance(op, tuple)
                is_write, offset, size, value = op
                if is_write:
                    r.t.write(offset, size, value)
                else:
                    assert 0 <= r.t.read(offset, size) < 1 << 32
        guarded.check_guards()
        r.drv.init(queue_size=8)
        head, _ = r.drv.add_request(0, [] if rng else [b"ping"], [4])
        r.drv.notify(0)
        assert r.drv.used(0) == [(head, 4)]
    finally:
        source.close()
        r.close()
        guarded.memory.clear()


# -- the fill path (rng) -------------------------------------------------------------------


def test_rng_fill_path_hands_other_chains_to_process_queue() -> None:
    """After the first kick, rng requests are filled by the queue's compiled path; a
    chain it cannot serve (device-readable, VIRTIO 1.2 §5.4.6.1) goes back to the
    avail ring and the drain loop returns it with length 0; the requests after it
    are served, in order, with one interrupt."""
    data = bytes(range(200))
    source = BytesEntropySource(data)
    r = Rig(RngDevice(source))
    try:
        r.drv.init(queue_size=8)
        first, _ = r.drv.add_request(0, [], [4])
        r.drv.notify(0)  # the first kick: process_queue
        r.drv.interrupt()
        assert r.drv.used(0) == [(first, 4)]
        good1, (out1,) = r.drv.add_request(0, [], [8])
        bad, _ = r.drv.add_request(0, [b"readable"], [])
        good2, (out2,) = r.drv.add_request(0, [], [8])
        raised = r.irq.raised
        r.drv.notify(0)
        assert r.irq.raised == raised + 1
        assert r.drv.used(0) == [(good1, 8), (bad, 0), (good2, 8)]
        assert r.memory.read(out1, 8) + r.memory.read(out2, 8) == data[4:20]
        assert r.device.chains_served == 4 and r.device.bytes_served == 20
    finally:
        r.close()
        source.close()


def test_memory_removed_under_ready_ring_sets_needs_reset(rig: Rig) -> None:
    """The VMM removed the RAM holding a ready ring: the next notify breaks the ring
    (no access outside guest memory) and the device reports DEVICE_NEEDS_RESET."""
    rig.drv.init(queue_size=8)
    rig.drv.add_request(0, [b"a"], [1])
    region = rig.memory.remove_region(0)
    try:
        rig.drv.notify(0)
        assert rig.t.status & STATUS_DEVICE_NEEDS_RESET
        assert rig.t.device_failures == 1
    finally:
        rig.memory.add_region(region)


# -- the kit's driver ----------------------------------------------------------------------


class _FakeBus:
    def __init__(self, regs: dict[int, int]) -> None:
        self.regs = regs

    def read(self, offset: int, size: int) -> int:
        return self.regs.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs[offset] = value


@pytest.mark.parametrize(
    ("regs", "match"),
    [
        ({0x0: 0x12345678, 0x4: 2, 0x8: 4}, "MagicValue"),
        ({0x0: MAGIC_VALUE, 0x4: 1, 0x8: 4}, "Version 1"),
        ({0x0: MAGIC_VALUE, 0x4: 2, 0x8: 0}, "DeviceID 0"),
    ],
)
def test_kit_driver_probe_ignores_wrong_devices(regs: dict[int, int], match: str) -> None:
    """§4.2.2.2: the driver MUST ignore a device whose MagicValue is not 0x74726976,
    whose Version is not 2 (this driver has no legacy support), or whose DeviceID is
    0x0; the kit's driver refuses them as Linux's virtio_mmio does."""
    memory, fd = GuestMemory.memfd(1 << 16)
    try:
        with pytest.raises(MmioDriverError, match=match):
            MmioDriver(_FakeBus(regs), memory).probe()
    finally:
        os.close(fd)


# -- removal ------------------------------------------------------------------------------
class ClosingDevice(TemplateDevice):
    """Counts its close() calls; raises from it when ``fail`` is set."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.closed = 0
        self.active_at_close: list[bool] = []

    def close(self) -> None:
        self.closed += 1
        self.active_at_close.append(self.active)
        if self.fail:
            raise RuntimeError("a bug in close")


def test_removing_the_transport_resets_then_closes_the_device() -> None:
    """What the device keeps across a reset (gpio's lines, vsock's host connections)
    is released when the VMM removes it, as when a vhost-user session ends."""
    dev = ClosingDevice()
    r = Rig(dev)
    r.drv.init()
    assert dev.active
    r.close()
    assert dev.closed == 1 and dev.active_at_close == [False]


def test_a_device_close_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    dev = ClosingDevice(fail=True)
    r = Rig(dev)
    r.drv.init()
    r.close()
    assert dev.closed == 1 and not dev.active
    assert "device close failed" in caplog.text
