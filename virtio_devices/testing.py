"""The device author's test kit: fakes of what a transport gives a device, and a rig.

Public, so that embedders test their own devices the same way:

* :class:`FakeClock`: a monotonic clock that moves only when told;
* :class:`FakeLoop`: an :class:`~virtio_devices.base.EventLoop` that never sleeps:
  timers fire when the test runs them (:meth:`FakeLoop.run_due`), fd readers when
  the test fires them (:meth:`FakeLoop.fire_reader`), and callbacks posted by
  worker threads when the test runs them (:meth:`FakeLoop.run_soon`, after
  :meth:`FakeLoop.wait_soon` to wait for one without sleeping);
* :class:`FakeInterrupt`: records ``signal_used`` and config changes;
* :class:`MmioDriver`: a virtio-mmio driver (probe, initialisation, notify,
  interrupt, config reads) as Linux's virtio_mmio does them, over any register
  window; :class:`MmioDeviceDriver` puts a device behind
  :class:`~virtio_devices.mmio.MmioTransport` and that driver in-process;
* :class:`DeviceRig`: a device activated on all its queues, each driven by a
  :class:`virtio_queue.testing.MockSplitQueue` in memfd guest memory, EVENT_IDX on
  or off, with helpers to add a chain, kick, and read the used entries::

      rig = DeviceRig(TemplateDevice(), event_idx=True)
      head, (out,) = rig.add_request(0, readable=[b"ping"], writable=[4])
      assert rig.kick(0) == [(head, 4)]
      assert rig.read(out, 4) == b"ping"
      rig.close()

The kit imports nothing of the transport (it stays in this layer) and nothing of
pytest.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from virtio_queue import GuestMemory, Queue
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc

from ._pump import FdPump
from .base import VIRTIO_RING_F_EVENT_IDX, VirtioDevice

__all__ = [
    "DeviceDriver",
    "DeviceRig",
    "FakeClock",
    "FakeInterrupt",
    "FakeLoop",
    "FakeTimer",
    "IrqLine",
    "MmioBus",
    "MmioDeviceDriver",
    "MmioDriver",
    "MmioDriverError",
    "RawDesc",
]


@dataclass
class FakeTimer:
    """A :class:`virtio_devices.base.TimerHandle` that a test fires by hand."""

    when: float
    delay: float
    callback: Callable[[], None]
    cancelled: bool = False
    fired: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeClock:
    """A monotonic clock (seconds) that only moves when the test says so."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeLoop:
    """An :class:`virtio_devices.base.EventLoop` that records and never sleeps."""

    clock: FakeClock = field(default_factory=FakeClock)
    timers: list[FakeTimer] = field(default_factory=list)
    readers: dict[int, Callable[[], None]] = field(default_factory=dict)
    pumps: dict[int, FdPump] = field(default_factory=dict)
    soon: list[Callable[[], None]] = field(default_factory=list)
    _soon_cv: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def add_reader(self, fd: int, callback: Callable[[], None], pump: FdPump | None = None) -> None:
        # fire_reader calls the callback (which runs the pump), as a loop without
        # pumps; fire_pump runs the pump first, as the vhost-user loop.
        self.readers[fd] = callback
        if pump is not None:
            self.pumps[fd] = pump
        else:
            self.pumps.pop(fd, None)

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)
        self.pumps.pop(fd, None)

    def fire_pump(self, fd: int) -> bool:
        """Serve ``fd``'s readiness as a loop that serves pumps: its pump (when it
        has one), then the callback only if the pump asks; return whether the
        callback ran.

        Raises:
            KeyError: nothing watches ``fd``.
        """
        callback = self.readers[fd]
        pump = self.pumps.get(fd)
        if pump is not None:
            try:
                if not pump.pump():
                    return False
            except Exception as e:
                pump.error = e
        callback()
        return True

    def fire_reader(self, fd: int) -> None:
        """Call the reader of ``fd`` as the loop would when it is readable.

        Raises:
            KeyError: nothing watches ``fd``.
        """
        self.readers[fd]()

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(self.clock.now + delay, delay, callback)
        self.timers.append(t)
        return t

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Queue ``callback`` for :meth:`run_soon`; any thread may call it."""
        with self._soon_cv:
            self.soon.append(callback)
            self._soon_cv.notify_all()

    def wait_soon(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` callbacks are queued; False on timeout."""
        with self._soon_cv:
            return self._soon_cv.wait_for(lambda: len(self.soon) >= count, timeout)

    def run_soon(self) -> int:
        """Run the callbacks queued so far, in order, on this thread; return how many."""
        with self._soon_cv:
            batch, self.soon[:] = list(self.soon), []
        for cb in batch:
            cb()
        return len(batch)

    def pending_timers(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and not t.fired]

    def run_due(self) -> int:
        """Fire the timers whose time has come (by the fake clock); return how many."""
        n = 0
        for t in sorted(self.pending_timers(), key=lambda t: t.when):
            if t.when <= self.clock.now and not t.cancelled:
                t.fired = True
                t.callback()
                n += 1
        return n


@dataclass
class FakeInterrupt:
    """An :class:`virtio_devices.base.Interrupt` that counts its calls."""

    used: list[int] = field(default_factory=list)
    config_changes: int = 0

    def signal_used(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config_change(self) -> None:
        self.config_changes += 1


class DeviceRig:
    """A device activated on one mock-driven queue per entry of its ``queue_sizes``.

    Each queue gets ``span`` bytes of the memfd guest memory (rings first, then the
    buffers :meth:`alloc` hands out).  Features: the device's own, EVENT_IDX only if
    ``event_idx``.  ``memory`` may be given (then ``close`` does not close it).

    Args:
        device: the device to activate (not yet active).
        queue_size: the size of every ring (at most the device's maximum).
        event_idx: negotiate VIRTIO_RING_F_EVENT_IDX (VIRTIO 1.2 §2.7.10).
        loop, interrupt: fakes to use instead of fresh ones.
        memory_size: bytes of guest memory, from guest address 0.

    Raises:
        ValueError: the memory is too small for the queues.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        queue_size: int = 16,
        event_idx: bool = False,
        loop: FakeLoop | None = None,
        interrupt: FakeInterrupt | None = None,
        memory: GuestMemory | None = None,
        memory_size: int = 1 << 20,
    ) -> None:
        self._fd = -1
        if memory is None:
            memory, self._fd = GuestMemory.memfd(memory_size)
        self.memory = memory
        self.device = device
        self.loop = loop if loop is not None else FakeLoop()
        self.clock = self.loop.clock
        self.interrupt = interrupt if interrupt is not None else FakeInterrupt()
        nq = device.num_queues
        self.span = (memory_size // max(nq, 1)) & ~0xFFF
        if self.span < 16 * queue_size + 4096 * 2:
            raise ValueError(f"rig: {memory_size} bytes of memory are too few for {nq} queues")
        self.mocks = [MockSplitQueue(memory, queue_size, base=i * self.span) for i in range(nq)]
        self.queues: list[Queue] = [
            m.create_queue(event_idx=event_idx, max_size=size)
            for m, size in zip(self.mocks, device.queue_sizes, strict=True)
        ]
        features = device.device_features()
        device.ack_features(features if event_idx else features & ~VIRTIO_RING_F_EVENT_IDX)
        device.activate(memory, self.queues, self.interrupt, self.loop)

    @property
    def mock(self) -> MockSplitQueue:
        """The driver of queue 0."""
        return self.mocks[0]

    def alloc(self, index: int, data: bytes | int) -> int:
        """A buffer in queue ``index``'s area holding ``data`` (or ``data`` bytes of
        0xee); returns its guest address.

        Raises:
            ValueError: the queue's area is full.
        """
        payload = data if isinstance(data, bytes) else b"\xee" * data
        gpa = self.mocks[index].alloc(max(len(payload), 1))
        if gpa + len(payload) > (index + 1) * self.span:
            raise ValueError(f"rig: queue {index}'s area is full")
        self.memory.write(gpa, payload)
        return gpa

    def add_chain(self, index: int, descs: Sequence[RawDesc]) -> int:
        """Make the chain ``descs`` available on queue ``index``; return its head."""
        return self.mocks[index].add_chain(descs)

    def add_request(
        self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()
    ) -> tuple[int, list[int]]:
        """Add a chain of readable buffers (these bytes) then writable ones (these
        sizes, filled with 0xee); return its head and the writable buffers' addresses."""
        descs = [RawDesc(self.alloc(index, data), len(data), 0, 0) for data in readable]
        outs = [self.alloc(index, size) for size in writable]
        descs += [RawDesc(gpa, size, VIRTQ_DESC_F_WRITE, 0) for gpa, size in zip(outs, writable, strict=True)]
        return self.add_chain(index, descs), outs

    def reconnect(self, index: int, in_flight: Sequence[int]) -> None:
        """Leave queue ``index`` as a vhost-user reconnect with inflight tracking
        does: a previous back-end popped every available chain and used all but
        ``in_flight``, which are resubmitted (served first, in this order) and
        ``next_avail`` is the used index plus their count, as the handler sets them.
        The previous back-end's used entries are not reported by :meth:`used`.

        Raises:
            ValueError: a head of ``in_flight`` is not an available chain.
        """
        queue = self.queues[index]
        popped = []
        while (chain := queue.pop_chain()) is not None:
            popped.append(chain.head_index)
        missing = set(in_flight) - set(popped)
        if missing:
            raise ValueError(f"rig: in-flight heads {sorted(missing)} are not available chains")
        for head in popped:
            if head not in in_flight:
                queue.add_used(head, 0)
        self.used(index)
        queue.set_next_avail((queue.used_idx() + len(in_flight)) & 0xFFFF)
        queue.resubmit(in_flight)

    def kick(self, index: int = 0) -> list[tuple[int, int]]:
        """``device.process_queue(index)``; return the used entries new since the last look."""
        self.device.process_queue(index)
        return self.used(index)

    def used(self, index: int = 0) -> list[tuple[int, int]]:
        """The ``(head, used length)`` entries the device added since the last look."""
        return self.mocks[index].used_elems()

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes of guest memory."""
        return self.memory.read(gpa, length)

    def complete_workers(self, count: int = 1, timeout: float = 10.0) -> int:
        """Wait for ``count`` worker completions to be posted, then apply them on
        this thread (the loop's); return how many callbacks ran.  Completions of
        the device's own engine (:meth:`VirtioDevice.wait_completions`) count too:
        each wait that applied some is one.

        Raises:
            TimeoutError: fewer were posted within ``timeout`` seconds.
        """
        ran = 0
        for index in range(len(self.queues)):
            while ran < count and self.device.wait_completions(index, timeout):
                ran += 1
        jobs = self.device._jobs
        if ran:
            # What the engine handed on to a worker (a short transfer) counts with it.
            if jobs is None or not any(jobs.in_flight(i) for i in range(len(self.queues))):
                return ran
            count = max(count - ran, 1)
        if not self.loop.wait_soon(count, timeout):
            raise TimeoutError(f"rig: {count} worker completion(s) not posted within {timeout} s")
        return ran + self.loop.run_soon()

    def close(self) -> None:
        """Reset the device and release the guest memory the rig made."""
        if self.device.active:
            self.device.reset()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- a virtio-mmio driver -------------------------------------------------------------------

# Offsets and status bits a driver uses (VIRTIO 1.2 §4.2.2, §2.1); the same values as
# virtio_devices.mmio's, spelled again so that the driver does not lean on the model.
_MAGIC, _VERSION, _DEVICE_ID, _VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
_DEV_FEAT, _DEV_FEAT_SEL, _DRV_FEAT, _DRV_FEAT_SEL = 0x010, 0x014, 0x020, 0x024
_QSEL, _QNUM_MAX, _QNUM, _QREADY, _QNOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
_INT_STATUS, _INT_ACK, _STATUS = 0x060, 0x064, 0x070
_QDESC, _QDRIVER, _QDEVICE = 0x080, 0x090, 0x0A0
_CONFIG_GEN, _CONFIG = 0x0FC, 0x100
_ACK, _DRIVER, _DRIVER_OK, _FEATURES_OK = 1, 2, 4, 8
_VERSION_1 = 1 << 32


class MmioBus(Protocol):
    """A virtio-mmio register window: what :class:`virtio_devices.mmio.MmioTransport`
    is, or a VMM's bus at the device's base address."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class MmioDriverError(RuntimeError):
    """The device failed a step of the driver's probe or initialisation (the step and
    the value read are in the message), as Linux's virtio_mmio would refuse it."""


@dataclass
class IrqLine:
    """An interrupt line for :class:`~virtio_devices.mmio.MmioTransport`'s ``irq``:
    the level, how often it was raised, and an optional callback on each raise."""

    level: bool = False
    raised: int = 0
    on_raise: Callable[[], None] | None = None

    def __call__(self, level: bool) -> None:
        if level and not self.level:
            self.raised += 1
            self.level = True
            if self.on_raise is not None:
                self.on_raise()
        elif not level:
            self.level = False


class MmioDriver:
    """The driver side of a virtio-mmio device, in the order Linux's virtio_mmio and
    virtio_ring use (drivers/virtio/virtio_mmio.c, virtio.c).

    :meth:`probe` checks MagicValue, Version 2 and a non-zero DeviceID (VIRTIO 1.2
    §4.2.2.2: the driver MUST ignore a device otherwise).  :meth:`init` resets the
    device, sets ACKNOWLEDGE and DRIVER, reads the 64 feature bits, writes the
    accepted ones, sets FEATURES_OK and reads it back, sets up every queue (QueueSel,
    QueueReady must read 0, QueueNumMax, QueueNum, the three ring addresses,
    QueueReady) with a :class:`~virtio_queue.testing.MockSplitQueue` each, and sets
    DRIVER_OK (§3.1.1).  :meth:`notify` writes QueueNotify; :meth:`interrupt` reads
    InterruptStatus and acknowledges it, as the interrupt handler does;
    :meth:`read_config` retries while ConfigGeneration changes (§2.5.1).

    Queue ``i``'s rings and buffers live in ``[base + i * span, base + (i+1) * span)``
    of ``memory``.

    Raises:
        MmioDriverError: from :meth:`probe` and :meth:`init`, a refusal.
    """

    def __init__(
        self,
        bus: MmioBus,
        memory: GuestMemory,
        *,
        irq: IrqLine | None = None,
        base: int = 0,
        span: int = 1 << 16,
    ) -> None:
        self.bus = bus
        self.memory = memory
        self.irq = irq
        self.base = base
        self.span = span
        self.mocks: list[MockSplitQueue] = []
        self.features = 0
        self.device_id = 0
        self.event_idx = False
        #: InterruptStatus bits seen by :meth:`interrupt` since the last look.
        self.config_changes = 0

    # -- registers --------------------------------------------------------------------------
    def read32(self, offset: int) -> int:
        return self.bus.read(offset, 4)

    def write32(self, offset: int, value: int) -> None:
        self.bus.write(offset, 4, value)

    def status(self) -> int:
        return self.read32(_STATUS)

    def add_status(self, bits: int) -> None:
        """``vm_set_status(get_status() | bits)`` (Linux's virtio_add_status)."""
        self.write32(_STATUS, self.status() | bits)

    # -- probe and initialisation ------------------------------------------------------------
    def probe(self) -> int:
        """Check the device's identity; return its DeviceID.

        Raises:
            MmioDriverError: a wrong MagicValue or Version, or DeviceID 0.
        """
        magic = self.read32(_MAGIC)
        if magic != 0x74726976:
            raise MmioDriverError(f"probe: MagicValue {magic:#x} is not 0x74726976")
        version = self.read32(_VERSION)
        if version != 2:
            raise MmioDriverError(f"probe: Version {version} is not 2")
        self.device_id = self.read32(_DEVICE_ID)
        if self.device_id == 0:
            raise MmioDriverError("probe: DeviceID 0 (a placeholder)")
        self.read32(_VENDOR_ID)
        return self.device_id

    def device_features(self) -> int:
        self.write32(_DEV_FEAT_SEL, 1)
        high = self.read32(_DEV_FEAT)
        self.write32(_DEV_FEAT_SEL, 0)
        return high << 32 | self.read32(_DEV_FEAT)

    def reset(self) -> None:
        """Write 0 to Status and check it reads 0 (§2.4, Linux's vm_reset)."""
        self.write32(_STATUS, 0)
        if self.status() != 0:
            raise MmioDriverError(f"reset: Status reads {self.status():#x} after writing 0")

    def init(
        self, features: int | None = None, *, queue_size: int | None = None, queues: int | None = None
    ) -> int:
        """Probe, negotiate and set up the queues; return the features negotiated.

        ``features``: the bits the driver accepts (default: everything offered);
        ``queue_size``: at most this many entries per queue (default QueueNumMax);
        ``queues``: how many queues to set up (default: until QueueNumMax reads 0).

        Raises:
            MmioDriverError: FEATURES_OK did not stick, or a queue was refused.
        """
        self.probe()
        self.reset()
        self.add_status(_ACK)
        self.add_status(_DRIVER)
        offered = self.device_features()
        accepted = offered if features is None else offered & features
        self.write32(_DRV_FEAT_SEL, 1)
        self.write32(_DRV_FEAT, accepted >> 32)
        self.write32(_DRV_FEAT_SEL, 0)
        self.write32(_DRV_FEAT, accepted & 0xFFFFFFFF)
        self.add_status(_FEATURES_OK)
        if not self.status() & _FEATURES_OK:
            raise MmioDriverError(f"init: FEATURES_OK refused for features {accepted:#x}")
        self.features = accepted
        self.event_idx = bool(accepted & VIRTIO_RING_F_EVENT_IDX)
        self.mocks = []
        index = 0
        while queues is None or index < queues:
            mock = self.setup_queue(index, queue_size)
            if mock is None:
                break
            self.mocks.append(mock)
            index += 1
        self.add_status(_DRIVER_OK)
        return accepted

    def setup_queue(self, index: int, queue_size: int | None = None) -> MockSplitQueue | None:
        """Linux's ``vm_setup_vq``: None when the queue does not exist (QueueNumMax 0).

        Raises:
            MmioDriverError: the queue is ready already, or QueueReady did not stick.
        """
        self.write32(_QSEL, index)
        if self.read32(_QREADY):
            raise MmioDriverError(f"queue {index}: QueueReady reads 1 before set-up")
        num_max = self.read32(_QNUM_MAX)
        if num_max == 0:
            return None
        size = num_max if queue_size is None else min(num_max, queue_size)
        mock = MockSplitQueue(self.memory, size, base=self.base + index * self.span)
        if mock.data_addr >= self.base + (index + 1) * self.span:
            raise MmioDriverError(f"queue {index}: {size} entries do not fit in {self.span} bytes")
        self.write32(_QNUM, size)
        for reg, gpa in ((_QDESC, mock.desc_table), (_QDRIVER, mock.avail_ring), (_QDEVICE, mock.used_ring)):
            self.write32(reg, gpa & 0xFFFFFFFF)
            self.write32(reg + 4, gpa >> 32)
        self.write32(_QREADY, 1)
        if not self.read32(_QREADY):
            raise MmioDriverError(f"queue {index}: QueueReady refused")
        return mock

    # -- running ------------------------------------------------------------------------------
    def alloc(self, index: int, data: bytes | int) -> int:
        """A buffer in queue ``index``'s area holding ``data`` (or ``data`` bytes of 0xee).

        Raises:
            ValueError: the queue's area is full.
        """
        payload = data if isinstance(data, bytes) else b"\xee" * data
        gpa = self.mocks[index].alloc(max(len(payload), 1))
        if gpa + len(payload) > self.base + (index + 1) * self.span:
            raise ValueError(f"mmio driver: queue {index}'s area is full")
        self.memory.write(gpa, payload)
        return gpa

    def add_request(
        self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()
    ) -> tuple[int, list[int]]:
        """Add a chain of readable buffers then writable ones (these sizes); return its
        head and the writable buffers' addresses."""
        descs = [RawDesc(self.alloc(index, data), len(data), 0, 0) for data in readable]
        outs = [self.alloc(index, size) for size in writable]
        descs += [RawDesc(gpa, size, VIRTQ_DESC_F_WRITE, 0) for gpa, size in zip(outs, writable, strict=True)]
        return self.mocks[index].add_chain(descs), outs

    def notify(self, index: int) -> None:
        """QueueNotify (Linux's ``vm_notify``: the queue index)."""
        self.write32(_QNOTIFY, index)

    def interrupt(self) -> int:
        """The interrupt handler (``vm_interrupt``): read InterruptStatus, acknowledge
        exactly those bits; return them."""
        status = self.read32(_INT_STATUS)
        if status:
            self.write32(_INT_ACK, status)
        if status & 2:
            self.config_changes += 1
        return status

    def used(self, index: int) -> list[tuple[int, int]]:
        """The new used entries of queue ``index``; with EVENT_IDX, ask to be
        interrupted for the next one (``virtqueue_enable_cb``)."""
        mock = self.mocks[index]
        out = mock.used_elems()
        if self.event_idx:
            mock.set_used_event(mock.last_used)
        return out

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space, byte by byte, retried while
        ConfigGeneration changes (§2.5.1, Linux's ``__virtio_cread_many``)."""
        while True:
            before = self.read32(_CONFIG_GEN)
            data = bytes(self.bus.read(_CONFIG + offset + i, 1) for i in range(size))
            if self.read32(_CONFIG_GEN) == before:
                return data

    def write_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` into the config space byte by byte (Linux's ``vm_set``)."""
        for i, byte in enumerate(data):
            self.bus.write(_CONFIG + offset + i, 1, byte)


class DeviceDriver(Protocol):
    """What a device behaviour test drives, whatever the transport: one interface,
    two implementations (:class:`MmioDeviceDriver` in-process, and the vhost-user
    twin of the integration tests, our ``Frontend`` against the daemon), so that a
    device's behaviour tests are written once and run through both
    (docs/adding-a-device.md, "One suite, two transports")."""

    def add_request(
        self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()
    ) -> tuple[int, list[int]]:
        """Make a chain available on queue ``index``: device-readable buffers holding
        ``readable``, then device-writable buffers of these sizes (filled with 0xee);
        return its head and the writable buffers' guest addresses."""

    def kick(self, index: int = 0, count: int = 1) -> list[tuple[int, int]]:
        """Notify queue ``index``; return the new used ``(head, length)`` entries once
        at least ``count`` are there (what the device did by then)."""

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes of guest memory."""

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device's config space."""

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write to the device's config space (fields the driver may write)."""

    def close(self) -> None:
        """Take the device down and release what the driver made."""


class MmioDeviceDriver:
    """A device driven through virtio-mmio in-process: the transport, the driver,
    a :class:`FakeLoop` and guest memory, behind the same small interface as the
    vhost-user driver of the shared device tests (``add_request``, ``kick``,
    ``read``, ``read_config``, ``write_config``, ``close``).

    Args:
        device: the device (not active).
        features: what the driver accepts (default: everything offered).
        queue_size: entries per queue (at most QueueNumMax).
        on_close: called by :meth:`close` after the device was reset (closes what
            the test gave the device, e.g. rng's entropy source).
        memory_size: bytes of guest memory at least (split evenly between the
            queues' areas); default: what the rings need, twice.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        features: int | None = None,
        queue_size: int = 256,
        on_close: Callable[[], None] | None = None,
        memory_size: int = 0,
    ) -> None:
        self._on_close = on_close
        from .mmio import MmioTransport  # noqa: PLC0415 - the kit does not need the transport otherwise

        nq = max(device.num_queues, 1)
        # Each queue's area: its rings, then at least as much again for buffers.
        span = 1 << 16
        while span < 16 * queue_size + 8 * queue_size + 3 * 4096:
            span <<= 1
        span = max(2 * span, (memory_size // nq) & ~0xFFF)
        self.memory, self._fd = GuestMemory.memfd(nq * span)
        self.loop = FakeLoop()
        self.irq = IrqLine()
        self.device = device
        self.transport = MmioTransport(device, self.memory, self.loop, self.irq)
        self.driver = MmioDriver(self.transport, self.memory, irq=self.irq, span=span)
        self.driver.init(features, queue_size=queue_size)

    def add_request(
        self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()
    ) -> tuple[int, list[int]]:
        return self.driver.add_request(index, readable, writable)

    def kick(self, index: int = 0, count: int = 1) -> list[tuple[int, int]]:
        """QueueNotify, then the interrupt handler; return the new used entries.

        Served synchronously, except requests the device gave to worker threads
        (:meth:`VirtioDevice.run_in_worker`) or to its own asynchronous engine
        (:meth:`VirtioDevice.wait_completions`): while fewer than ``count`` entries
        are used and the queue has such work in flight, its completions are waited
        for and applied on this thread (the loop's), as the vhost-user twin waits."""
        self.driver.notify(index)
        used: list[tuple[int, int]] = []
        while True:
            if self.irq.level:
                self.driver.interrupt()
            used += self.driver.used(index)
            if len(used) >= count:
                return used
            if self.device.wait_completions(index, 10.0):
                continue
            jobs = self.device._jobs
            if jobs is None or not jobs.in_flight(index):
                return used
            if not self.loop.wait_soon(1, 10.0):
                raise TimeoutError(f"mmio: q{index}'s worker jobs posted nothing within 10 s")
            self.loop.run_soon()

    def read(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.driver.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.driver.write_config(offset, data)

    def close(self) -> None:
        self.transport.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
