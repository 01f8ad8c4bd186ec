"""The virtio-mmio transport (VIRTIO 1.2 §4.2, version 2 register layout) over any device.

A VMM that embeds a device maps one :class:`MmioTransport` at a guest-physical
address and forwards the guest's accesses to that window from its MMIO exit handler::

    transport = MmioTransport(RngDevice(source), memory, loop, irq=line.set_level)
    value = transport.read(offset, size)          # a load from base + offset
    transport.write(offset, size, value)          # a store to base + offset

``memory`` is the guest's :class:`~virtio_queue.GuestMemory` (the VMM may add and
remove regions later), ``loop`` an :class:`~virtio_devices.base.EventLoop` (ours,
:class:`virtio_devices.aio.AsyncioLoop` over asyncio, or the VMM's own), and
``irq(level)`` the interrupt line: called with True when InterruptStatus becomes
non-zero and with False when the driver's InterruptACK clears it (a level-triggered
line; an edge-triggered VMM injects on True).

Threading: :meth:`MmioTransport.read` and :meth:`MmioTransport.write` run on the
loop's thread, like every device callback (base.py's ordering rules: only the loop
thread touches a queue).  A VMM whose vCPUs run on other threads posts each access
to the loop (``loop.call_soon_threadsafe``) and waits for reads.

What the transport does for the device (each with the clause it implements):

* identity: MagicValue, Version 2, DeviceID, VendorID (§4.2.2);
* features: DeviceFeatures is the device's offer plus the transport's
  VIRTIO_F_RING_RESET; FEATURES_OK is refused (left clear on read-back) when the
  driver accepted a bit that was not offered or did not accept VIRTIO_F_VERSION_1
  (§2.2.1, §3.1.1, §6.1); the device gets ``ack_features`` at FEATURES_OK;
* queues: QueueSel, QueueNumMax (0 for a queue that does not exist), QueueNum,
  the three ring addresses and QueueReady are kept per queue and checked when the
  driver sets QueueReady (size a power of two at most QueueNumMax, all three
  addresses written, aligned and inside guest memory, §2.7); a refused QueueReady
  reads back 0.  Clearing QueueReady and QueueReset (VIRTIO_F_RING_RESET) quiesce
  the device's queue first (§4.2.2 QueueReady, §2.6.1 virtqueue reset);
* Status: DRIVER_OK activates the device with every queue (§3.1.1); writing 0
  resets the device, its queues, InterruptStatus and the features (§2.4, §4.2.2.1);
  bits going backwards and bits out of order are ignored (§2.1.2: the driver MUST
  NOT clear a status bit);
* QueueNotify serves the queue on the caller's thread, only after DRIVER_OK and
  for a ready queue (§2.1.2, §4.2.2.1: the device MUST NOT access a queue whose
  QueueReady is zero), with ``device.process_queue`` (whose drain loop fills a
  device's host-source requests on the queue's compiled path itself);
* interrupts: the device's ``signal_used`` sets InterruptStatus bit 0 and
  ``signal_config_change`` bit 1; InterruptACK clears the bits written (§4.2.2.1);
* DEVICE_NEEDS_RESET: when the device raises ``DeviceNeedsReset`` (or any bug),
  when a ring breaks (a queue or guest-memory error from ``process_queue``), or
  when a callback the device registered on the loop fails, the device is reset,
  Status gains DEVICE_NEEDS_RESET and, after DRIVER_OK, a configuration change
  notification is sent (§2.1.2); notifies are ignored until the driver resets;
* config space at 0x100: byte, aligned 16-bit and aligned 32-bit accesses
  (§4.2.2.2; 64-bit fields are read as two 32-bit halves), little-endian;
  ConfigGeneration changes whenever the config space changed since the last
  config or generation read, or the device signalled a config change (§2.5.1,
  §4.2.2.1).

Bad input never raises out of :meth:`MmioTransport.read` / :meth:`MmioTransport.write`
and never reaches guest memory: accesses that are not 32-bit aligned to a control
register, values wider than the access, reads of write-only and writes of read-only
registers, unknown offsets, a QueueSel out of range, and the refusals above are
ignored (reads return 0) and logged with rate limiting (§4.2.2.2 lists them as
what the driver MUST NOT do; the device stays usable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from virtio_queue import GuestMemory, Queue
from virtio_queue.errors import GuestMemoryError, QueueError
from virtio_queue.ratelimit import RateLimiter

from .base import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, EventLoop, VirtioDevice
from .device_loop import DeviceLoop

__all__ = [
    "MAGIC_VALUE",
    "MMIO_CONFIG",
    "MMIO_SIZE",
    "MMIO_VERSION",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DEVICE_NEEDS_RESET",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
    "VIRTIO_F_RING_RESET",
    "VIRTIO_MMIO_INT_CONFIG",
    "VIRTIO_MMIO_INT_VRING",
    "MmioTransport",
    "Reg",
]

log = logging.getLogger(__name__)

#: "virt" in little-endian ASCII (§4.2.2).
MAGIC_VALUE: Final = 0x74726976
#: The register layout version this model implements (version 1 is legacy).
MMIO_VERSION: Final = 2
#: Where the device-specific config space starts.
MMIO_CONFIG: Final = 0x100
#: The size of the window a VMM maps for one device (one page, as QEMU and Linux use).
MMIO_SIZE: Final = 0x200

#: VIRTIO 1.2 §6: the driver may reset one queue (QueueReset).
VIRTIO_F_RING_RESET: Final = 1 << 40

# Device status bits (VIRTIO 1.2 §2.1).
STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8
STATUS_DEVICE_NEEDS_RESET: Final = 64
STATUS_FAILED: Final = 128

# InterruptStatus bits (§4.2.2).
VIRTIO_MMIO_INT_VRING: Final = 1
VIRTIO_MMIO_INT_CONFIG: Final = 2


class Reg:
    """Offsets of the control registers (VIRTIO 1.2 §4.2.2, table "MMIO Device Register Layout")."""

    MAGIC_VALUE: Final = 0x000
    VERSION: Final = 0x004
    DEVICE_ID: Final = 0x008
    VENDOR_ID: Final = 0x00C
    DEVICE_FEATURES: Final = 0x010
    DEVICE_FEATURES_SEL: Final = 0x014
    DRIVER_FEATURES: Final = 0x020
    DRIVER_FEATURES_SEL: Final = 0x024
    QUEUE_SEL: Final = 0x030
    QUEUE_NUM_MAX: Final = 0x034
    QUEUE_NUM: Final = 0x038
    QUEUE_READY: Final = 0x044
    QUEUE_NOTIFY: Final = 0x050
    INTERRUPT_STATUS: Final = 0x060
    INTERRUPT_ACK: Final = 0x064
    STATUS: Final = 0x070
    QUEUE_DESC_LOW: Final = 0x080
    QUEUE_DESC_HIGH: Final = 0x084
    QUEUE_DRIVER_LOW: Final = 0x090
    QUEUE_DRIVER_HIGH: Final = 0x094
    QUEUE_DEVICE_LOW: Final = 0x0A0
    QUEUE_DEVICE_HIGH: Final = 0x0A4
    SHM_SEL: Final = 0x0AC
    SHM_LEN_LOW: Final = 0x0B0
    SHM_LEN_HIGH: Final = 0x0B4
    SHM_BASE_LOW: Final = 0x0B8
    SHM_BASE_HIGH: Final = 0x0BC
    QUEUE_RESET: Final = 0x0C0
    CONFIG_GENERATION: Final = 0x0FC


_READ_ONLY = frozenset(
    {
        Reg.MAGIC_VALUE,
        Reg.VERSION,
        Reg.DEVICE_ID,
        Reg.VENDOR_ID,
        Reg.DEVICE_FEATURES,
        Reg.QUEUE_NUM_MAX,
        Reg.INTERRUPT_STATUS,
        Reg.SHM_LEN_LOW,
        Reg.SHM_LEN_HIGH,
        Reg.SHM_BASE_LOW,
        Reg.SHM_BASE_HIGH,
        Reg.CONFIG_GENERATION,
    }
)
_WRITE_ONLY = frozenset(
    {
        Reg.DEVICE_FEATURES_SEL,
        Reg.DRIVER_FEATURES,
        Reg.DRIVER_FEATURES_SEL,
        Reg.QUEUE_SEL,
        Reg.QUEUE_NUM,
        Reg.QUEUE_NOTIFY,
        Reg.INTERRUPT_ACK,
        Reg.QUEUE_DESC_LOW,
        Reg.QUEUE_DESC_HIGH,
        Reg.QUEUE_DRIVER_LOW,
        Reg.QUEUE_DRIVER_HIGH,
        Reg.QUEUE_DEVICE_LOW,
        Reg.QUEUE_DEVICE_HIGH,
        Reg.SHM_SEL,
    }
)
# The ring address registers: offset -> (which ring, high half).
_ADDR_REGS = {
    Reg.QUEUE_DESC_LOW: (0, False),
    Reg.QUEUE_DESC_HIGH: (0, True),
    Reg.QUEUE_DRIVER_LOW: (1, False),
    Reg.QUEUE_DRIVER_HIGH: (1, True),
    Reg.QUEUE_DEVICE_LOW: (2, False),
    Reg.QUEUE_DEVICE_HIGH: (2, True),
}
_RING_NAMES = ("descriptor table", "driver area", "device area")
# Status bits the driver sets (DEVICE_NEEDS_RESET is the device's).
_DRIVER_BITS = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
_U32 = 0xFFFFFFFF


class _QueueRegs:
    """What the driver wrote for one queue (the registers the ``Queue`` applies only at
    QueueReady): the three ring addresses and which of them were written."""

    __slots__ = ("addrs", "reset_done", "written")

    def __init__(self) -> None:
        self.addrs = [0, 0, 0]
        self.written = 0  # bit i: ring i's address was written since the last reset
        self.reset_done = False  # QueueReset reads 1 (§4.2.2.1)

    def clear(self) -> None:
        self.addrs[:] = [0, 0, 0]
        self.written = 0


class _Interrupt:
    """The device's :class:`~virtio_devices.base.Interrupt`: InterruptStatus bits."""

    __slots__ = ("_transport",)

    def __init__(self, transport: MmioTransport) -> None:
        self._transport = transport

    def signal_used(self, queue_index: int) -> None:
        t = self._transport
        if t.interrupt_status:
            t.interrupt_status |= VIRTIO_MMIO_INT_VRING
        else:
            t.interrupt_status = VIRTIO_MMIO_INT_VRING
            t.irq(True)

    def signal_config_change(self) -> None:
        t = self._transport
        t.config_generation = (t.config_generation + 1) & _U32
        t._interrupt(VIRTIO_MMIO_INT_CONFIG)


class MmioTransport:
    """A virtio-mmio version 2 register block driving one :class:`VirtioDevice`.

    See the module docstring for the behaviour and the clauses it follows.

    Args:
        device: the device (not active; the transport activates it at DRIVER_OK).
        memory: the guest's memory, where the driver puts the rings and buffers.
        loop: the event loop the device registers its host fds and timers on, and
            on whose thread :meth:`read` and :meth:`write` are called.
        irq: the interrupt line, ``irq(True)`` when InterruptStatus becomes
            non-zero, ``irq(False)`` when it is acknowledged back to zero.
        vendor_id: what VendorID reads (default 0: no vendor).
        name: prefix of log lines (default: ``mmio-<device name>``).
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        loop: EventLoop,
        irq: Callable[[bool], None],
        *,
        vendor_id: int = 0,
        name: str | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.vendor_id = vendor_id & _U32
        self.name = name or f"mmio-{device.name}"
        self.loop = DeviceLoop(loop, self._callback_failed)
        #: The Queue objects the device gets at DRIVER_OK, one per ``queue_sizes`` entry.
        self.queues: list[Queue] = [Queue(size, memory) for size in device.queue_sizes]
        self._regs = [_QueueRegs() for _ in self.queues]
        self._interrupt_obj = _Interrupt(self)
        self._ratelimit = RateLimiter()
        #: Feature bits offered: the device's and the transport's.
        self.offered_features = device.device_features() | VIRTIO_F_RING_RESET
        #: What the driver wrote to DriverFeatures (both halves).
        self.driver_features = 0
        #: Device status (§2.1), InterruptStatus, ConfigGeneration as the driver reads them.
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        #: How many times the device was put in DEVICE_NEEDS_RESET.
        self.device_failures = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._config_seen = self._config_bytes()
        # DRIVER_OK set and DEVICE_NEEDS_RESET clear: notifies are served.
        self._running = False

    # -- the VMM's entry points ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A guest load of ``size`` bytes at ``offset`` of the window; the value read.

        Never raises: accesses §4.2.2.2 forbids read 0 (see the module docstring).
        """
        if offset == 0x060 and size == 4:
            return self.interrupt_status  # InterruptStatus, once per interrupt
        if offset >= MMIO_CONFIG:
            return self._read_config(offset - MMIO_CONFIG, size)
        if size != 4 or offset & 3 or offset < 0:
            self._refuse("read", "%d-byte read at %#x: control registers are 32-bit aligned", size, offset)
            return 0
        return self._read_reg(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest store of ``value`` (``size`` bytes) at ``offset`` of the window.

        Never raises: accesses §4.2.2.2 forbids are ignored (see the module docstring).
        """
        if offset == 0x050 and size == 4 and self._running and 0 <= value < len(self.queues):
            # The hot path (QueueNotify): a kick of a queue that exists, the device running.
            if self.queues[value].ready:
                try:
                    self.device.process_queue(value)
                except Exception as e:
                    self._device_failed(e, f"q{value}")
                return
        elif offset == 0x064 and size == 4 and 0 <= value <= _U32:
            self._ack(value)  # InterruptACK, once per interrupt
            return
        if size in (1, 2, 4) and not 0 <= value < 1 << (8 * size):
            self._refuse("value", "%d-byte write at %#x: value %r does not fit", size, offset, value)
            return
        if offset >= MMIO_CONFIG:
            self._write_config(offset - MMIO_CONFIG, size, value)
            return
        if size != 4 or offset & 3 or offset < 0:
            self._refuse("write", "%d-byte write at %#x: control registers are 32-bit aligned", size, offset)
            return
        self._write_reg(offset, value)

    def close(self) -> None:
        """The VMM removes the device: reset it, drop what it registered on the loop,
        then let it release what it keeps across a reset (gpio's lines, vsock's host
        connections) through its ``close()``, if it has one, as the vhost-user daemon
        does when a session ends. A ``close()`` that raises is logged."""
        self._reset()
        close = getattr(self.device, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("%s: device close failed", self.name)

    # -- registers ------------------------------------------------------------------------
    def _selected(self) -> tuple[Queue, _QueueRegs] | None:
        sel = self._queue_sel
        if sel < len(self.queues):
            return self.queues[sel], self._regs[sel]
        return None

    def _read_reg(self, offset: int) -> int:
        if offset == Reg.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == Reg.STATUS:
            return self.status
        if offset == Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == Reg.VERSION:
            return MMIO_VERSION
        if offset == Reg.DEVICE_ID:
            return self.device.device_id
        if offset == Reg.VENDOR_ID:
            return self.vendor_id
        if offset == Reg.DEVICE_FEATURES:
            # Selector pages past the 64 bits we have read 0.
            sel = self._device_features_sel
            return (self.offered_features >> (32 * sel)) & _U32 if sel < 2 else 0
        if offset == Reg.CONFIG_GENERATION:
            self._check_config()
            return self.config_generation
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            # No shared memory regions: "a length of -1" for every id (§4.2.2).
            return _U32
        selected = self._selected()
        if offset == Reg.QUEUE_NUM_MAX:
            # §4.2.2: zero when the queue is not available.
            return selected[0].max_size if selected is not None else 0
        if offset == Reg.QUEUE_READY:
            return int(selected[0].ready) if selected is not None else 0
        if offset == Reg.QUEUE_RESET:
            return int(selected[1].reset_done) if selected is not None else 0
        if offset in _WRITE_ONLY:
            self._refuse("wo", "read of write-only register %#x", offset)
        else:
            self._refuse("unknown", "read of unknown register %#x", offset)
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == Reg.QUEUE_NOTIFY:
            self._notify(value)
        elif offset == Reg.INTERRUPT_ACK:
            self._ack(value)
        elif offset == Reg.STATUS:
            self._write_status(value)
        elif offset == Reg.DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == Reg.QUEUE_SEL:
            self._queue_sel = value
        elif offset == Reg.QUEUE_NUM:
            self._write_queue_num(value)
        elif offset == Reg.QUEUE_READY:
            self._write_queue_ready(value)
        elif offset in _ADDR_REGS:
            self._write_queue_addr(offset, value)
        elif offset == Reg.QUEUE_RESET:
            self._write_queue_reset(value)
        elif offset == Reg.SHM_SEL:
            pass  # no regions: every id reads as absent
        elif offset in _READ_ONLY:
            self._refuse("ro", "write %#x to read-only register %#x", value, offset)
        else:
            self._refuse("unknown", "write %#x to unknown register %#x", value, offset)

    # -- features and status ------------------------------------------------------------
    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK:
            # §3.1.1: features are fixed once FEATURES_OK is set.
            self._refuse("features", "DriverFeatures write %#x after FEATURES_OK", value)
            return
        sel = self._driver_features_sel
        if sel >= 2:
            if value:
                self._refuse("features", "DriverFeatures page %d: bits %#x were never offered", sel, value)
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(_U32 << shift)) | (value << shift)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self.status & _DRIVER_BITS
        new = value & _DRIVER_BITS
        if old & ~new:
            # §2.1.2: the driver MUST NOT clear a device status bit (only a reset does).
            self._refuse("status", "status write %#x clears bits of %#x", value, self.status)
            return
        added = new & ~old
        if added & STATUS_FEATURES_OK and not self._features_ok(new):
            added &= ~STATUS_FEATURES_OK
        if added & STATUS_DRIVER_OK:
            if not (old | added) & STATUS_FEATURES_OK:
                self._refuse("status", "DRIVER_OK without FEATURES_OK (status %#x)", value)
                added &= ~STATUS_DRIVER_OK
            elif self.status & STATUS_DEVICE_NEEDS_RESET:
                self._refuse("status", "DRIVER_OK while the device needs a reset")
                added &= ~STATUS_DRIVER_OK
        self.status |= added
        if added & STATUS_DRIVER_OK:
            self._activate()

    def _features_ok(self, status: int) -> bool:
        """FEATURES_OK is being set: accept the driver's features or refuse (§2.2.1, §3.1.1)."""
        if not status & STATUS_DRIVER:
            self._refuse("status", "FEATURES_OK before DRIVER (status %#x)", status)
            return False
        extra = self.driver_features & ~self.offered_features
        if extra:
            self._refuse("features", "FEATURES_OK refused: driver accepted bits %#x never offered", extra)
            return False
        if not self.driver_features & VIRTIO_F_VERSION_1:
            # §6.1: a device may refuse a driver that did not accept VERSION_1;
            # version 2 of this transport has no legacy interface.
            self._refuse("features", "FEATURES_OK refused: VIRTIO_F_VERSION_1 not accepted")
            return False
        self.device.ack_features(self.driver_features)
        event_idx = bool(self.driver_features & VIRTIO_RING_F_EVENT_IDX)
        for queue in self.queues:
            queue.event_idx = event_idx
        return True

    def _activate(self) -> None:
        """DRIVER_OK: hand the device its memory, queues, interrupt and loop (§3.1.1)."""
        self.loop.open()
        try:
            self.device.activate(self.memory, self.queues, self._interrupt_obj, self.loop)
        except Exception as e:
            self._device_failed(e, "activate")
            return
        self._running = True

    def _reset(self) -> None:
        """Device reset (§2.4): the device, its queues, features, status and InterruptStatus."""
        self._running = False
        try:
            self.device.reset()
        except Exception as e:
            # The device is reset all the same (base.py); its error is only logged.
            log.error("%s: device reset failed: %s", self.name, e)
        self.loop.clear()
        for queue, regs in zip(self.queues, self._regs, strict=True):
            queue.reset()
            regs.clear()
            regs.reset_done = False
        self.driver_features = 0
        self._device_features_sel = self._driver_features_sel = self._queue_sel = 0
        self.status = 0
        # §4.2.2.1: upon reset the device MUST clear all bits in InterruptStatus.
        if self.interrupt_status:
            self.interrupt_status = 0
            self.irq(False)

    # -- queues ---------------------------------------------------------------------------
    def _write_queue_num(self, value: int) -> None:
        selected = self._selected()
        if selected is None:
            self._refuse("qsel", "QueueNum write for queue %d: no such queue", self._queue_sel)
            return
        queue, _ = selected
        if queue.ready:
            # §4.2.2.2: the driver MUST NOT access QueueNum while QueueReady is set.
            self._refuse("queue", "QueueNum write %d to ready queue %d", value, self._queue_sel)
            return
        try:
            queue.size = value
        except QueueError as e:
            self._refuse("queue", "QueueNum write to queue %d refused: %s", self._queue_sel, e)

    def _write_queue_addr(self, offset: int, value: int) -> None:
        selected = self._selected()
        if selected is None:
            self._refuse("qsel", "ring address write for queue %d: no such queue", self._queue_sel)
            return
        queue, regs = selected
        if queue.ready:
            self._refuse("queue", "ring address write to ready queue %d", self._queue_sel)
            return
        ring, high = _ADDR_REGS[offset]
        shift = 32 if high else 0
        regs.addrs[ring] = (regs.addrs[ring] & ~(_U32 << shift)) | (value << shift)
        regs.written |= 1 << ring

    def _write_queue_ready(self, value: int) -> None:
        selected = self._selected()
        if selected is None:
            self._refuse("qsel", "QueueReady write for queue %d: no such queue", self._queue_sel)
            return
        queue, regs = selected
        index = self._queue_sel
        if value == 0:
            if queue.ready:
                self._stop_queue(index)
            return
        if value != 1:
            self._refuse("queue", "QueueReady write %d to queue %d: only 0 and 1 are defined", value, index)
            return
        if queue.ready:
            return
        if regs.written != 0b111:
            missing = [n for i, n in enumerate(_RING_NAMES) if not regs.written >> i & 1]
            self._refuse("queue", "queue %d enabled before its %s address", index, " and ".join(missing))
            return
        try:
            queue.desc_table, queue.avail_ring, queue.used_ring = regs.addrs
            queue.validate()
        except QueueError as e:
            self._refuse("queue", "queue %d not enabled: %s", index, e)
            return
        queue.ready = True
        regs.reset_done = False

    def _stop_queue(self, index: int) -> None:
        """QueueReady 0 on a ready queue: take it back from the device, then stop it."""
        if self.device.active:
            try:
                self.device.quiesce(index)
            except Exception as e:
                self._device_failed(e, f"q{index} quiesce")
        self.queues[index].ready = False

    def _write_queue_reset(self, value: int) -> None:
        selected = self._selected()
        if selected is None:
            self._refuse("qsel", "QueueReset write for queue %d: no such queue", self._queue_sel)
            return
        if value != 1:
            self._refuse("queue", "QueueReset write %d: only 1 resets a queue", value)
            return
        if not self.driver_features & VIRTIO_F_RING_RESET or not self.status & STATUS_FEATURES_OK:
            self._refuse("queue", "QueueReset without VIRTIO_F_RING_RESET negotiated")
            return
        queue, regs = selected
        index = self._queue_sel
        if queue.ready:
            self._stop_queue(index)
        # §2.6.1: a reset queue is back in its state after a device reset (not
        # ready, QueueNum at its maximum, addresses and indexes 0).
        queue.reset()
        queue.event_idx = bool(self.driver_features & VIRTIO_RING_F_EVENT_IDX)
        regs.clear()
        regs.reset_done = True

    def _notify(self, value: int) -> None:
        """QueueNotify that the fast path of :meth:`write` did not serve: refused."""
        if not self._running:
            self._refuse(
                "notify", "notify of queue %d before DRIVER_OK or while the device needs a reset", value
            )
        elif value >= len(self.queues):
            self._refuse("notify", "notify of queue %d: no such queue", value)
        else:
            self._refuse("notify", "notify of queue %d, which is not ready", value)

    # -- interrupts -----------------------------------------------------------------------
    def _interrupt(self, bit: int) -> None:
        was = self.interrupt_status
        self.interrupt_status = was | bit
        if not was:
            self.irq(True)

    def _ack(self, value: int) -> None:
        was = self.interrupt_status
        if not was:
            return
        self.interrupt_status = was & ~value
        if not self.interrupt_status:
            self.irq(False)

    # -- device failures ------------------------------------------------------------------
    def _device_failed(self, err: Exception, where: str) -> None:
        """The device raised a bug or ``DeviceNeedsReset``, or a ring broke: reset the
        device, set DEVICE_NEEDS_RESET and, after DRIVER_OK, notify a config change
        (§2.1.2: the device MUST send one after it sets DEVICE_NEEDS_RESET)."""
        self.device_failures += 1
        kind = "ring broken" if isinstance(err, (QueueError, GuestMemoryError)) else "device failed"
        self._ratelimit.log(
            log, logging.ERROR, "failed", "%s: %s: %s, DEVICE_NEEDS_RESET: %s", self.name, where, kind, err
        )
        self._running = False
        try:
            self.device.reset()
        except Exception as e:
            log.error("%s: device reset after failure failed: %s", self.name, e)
        self.loop.clear()
        for queue in self.queues:
            queue.ready = False
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.config_generation = (self.config_generation + 1) & _U32
            self._interrupt(VIRTIO_MMIO_INT_CONFIG)

    def _callback_failed(self, err: Exception) -> None:
        self._device_failed(err, "loop callback")

    # -- config space ---------------------------------------------------------------------
    def _config_bytes(self) -> bytes:
        try:
            return self.device.config_space()
        except Exception as e:
            self._ratelimit.log(log, logging.ERROR, "config", "%s: config_space failed: %s", self.name, e)
            return b""

    def _check_config(self) -> None:
        """Bump ConfigGeneration if the config space changed since the last look
        (§4.2.2.1: it MUST change when a driver risks an inconsistent view)."""
        now = self._config_bytes()
        if now != self._config_seen:
            self._config_seen = now
            self.config_generation = (self.config_generation + 1) & _U32

    def _config_access_ok(self, what: str, offset: int, size: int) -> bool:
        # §4.2.2.2: 8-bit accesses, or 16/32-bit accesses aligned to their size
        # (64-bit fields are read as two aligned 32-bit halves).
        if size not in (1, 2, 4) or offset % size:
            self._refuse(
                "config", "%d-byte config %s at %#x: not an aligned 8/16/32-bit access", size, what, offset
            )
            return False
        return True

    def _read_config(self, offset: int, size: int) -> int:
        if not self._config_access_ok("read", offset, size):
            return 0
        self._check_config()
        try:
            data = self.device.read_config(offset, size)
        except Exception as e:
            self._ratelimit.log(log, logging.ERROR, "config", "%s: read_config failed: %s", self.name, e)
            return 0
        return int.from_bytes(data[:size].ljust(size, b"\0"), "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if not self._config_access_ok("write", offset, size):
            return
        try:
            self.device.write_config(offset, value.to_bytes(size, "little"))
        except Exception as e:
            self._ratelimit.log(log, logging.ERROR, "config", "%s: write_config failed: %s", self.name, e)
        self._check_config()

    # -- logging --------------------------------------------------------------------------
    def _refuse(self, key: str, msg: str, *args: object) -> None:
        """Log an access the spec forbids the driver, rate-limited per kind."""
        self._ratelimit.log(log, logging.WARNING, key, "%s: " + msg, self.name, *args)
