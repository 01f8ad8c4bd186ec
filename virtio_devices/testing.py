"""The device author's test kit: fakes of what a transport gives a device, and a rig.

Public, so that embedders test their own devices the same way:

* :class:`FakeClock`: a monotonic clock that moves only when told;
* :class:`FakeLoop`: an :class:`~virtio_devices.base.EventLoop` that never sleeps:
  timers fire when the test runs them (:meth:`FakeLoop.run_due`), fd readers when
  the test fires them (:meth:`FakeLoop.fire_reader`), and callbacks posted by
  worker threads when the test runs them (:meth:`FakeLoop.run_soon`, after
  :meth:`FakeLoop.wait_soon` to wait for one without sleeping);
* :class:`FakeInterrupt`: records ``signal_used`` and config changes;
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
from typing import Any, Self

from virtio_queue import GuestMemory, Queue
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc

from .base import VIRTIO_RING_F_EVENT_IDX, VirtioDevice

__all__ = ["DeviceRig", "FakeClock", "FakeInterrupt", "FakeLoop", "FakeTimer", "RawDesc"]


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
    soon: list[Callable[[], None]] = field(default_factory=list)
    _soon_cv: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

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
        this thread (the loop's); return how many callbacks ran.

        Raises:
            TimeoutError: fewer were posted within ``timeout`` seconds.
        """
        if not self.loop.wait_soon(count, timeout):
            raise TimeoutError(f"rig: {count} worker completion(s) not posted within {timeout} s")
        return self.loop.run_soon()

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
