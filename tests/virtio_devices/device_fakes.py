"""Fakes of the transport-side objects a device sees: event loop, interrupt, clock.

Imported by the device tests as ``device_fakes`` (pytest puts this directory on
``sys.path``); the fixtures are in ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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

    clock: FakeClock
    timers: list[FakeTimer] = field(default_factory=list)
    readers: dict[int, Callable[[], None]] = field(default_factory=dict)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(self.clock.now + delay, delay, callback)
        self.timers.append(t)
        return t

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
