"""The event loop as one device sees it: every callback it registers runs under the
transport's error policy (the device layer's "host-fault policy", see base.py).

A device registers host fds (readers), timers and, from its worker threads,
``call_soon_threadsafe`` callbacks.  They all run on the transport's loop thread.
Without a guard an exception from one of them would unwind that loop and end the
whole vhost-user session (or an embedding VMM's loop) for what is a device bug.
:class:`DeviceLoop` wraps each callback: an exception is handed to the transport's
``on_error`` (vhost-user: stop the device's rings, signal their err fds and reset it;
virtio-mmio: DEVICE_NEEDS_RESET) and the loop goes on.

Every transport uses it the same way: :meth:`DeviceLoop.open` before it activates the
device and :meth:`DeviceLoop.clear` after it reset it: readers and timers the device
left behind are dropped, callbacks posted before are not run and callbacks posted
while the device is reset (a worker finishing late) are dropped, so a device that was
taken back is never called into by an old registration and never writes a ring the
transport took back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._pump import FdPump

__all__ = ["DeviceLoop"]

log = logging.getLogger(__name__)


class _Handle(Protocol):
    def cancel(self) -> None: ...


class _Loop(Protocol):
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle: ...
    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None: ...


class _Timer:
    """What :meth:`DeviceLoop.call_later` returns: cancels the loop's timer and forgets it."""

    __slots__ = ("_handle", "_owner")

    def __init__(self, owner: DeviceLoop) -> None:
        self._owner = owner
        self._handle: _Handle | None = None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._owner._timers.discard(self)


class DeviceLoop:
    """The device's :class:`~virtio_devices.base.EventLoop`: the connection's loop with
    every callback guarded (see the module docstring).

    ``on_error(err)`` is called on the loop thread with the exception a callback raised
    (any :class:`Exception`; KeyboardInterrupt and SystemExit go through).
    """

    def __init__(self, loop: _Loop, on_error: Callable[[Exception], None]) -> None:
        self._loop = loop
        self._on_error = on_error
        self._readers: set[int] = set()
        self._timers: set[_Timer] = set()
        # Bumped by clear(): a callback posted or registered before it does not run.
        self._generation = 0
        # Between clear() and open() (the device is reset) nothing of it runs.
        self._open = False

    def _guard(self, callback: Callable[[], None]) -> Callable[[], None]:
        generation = self._generation

        def guarded() -> None:
            if generation != self._generation or not self._open:
                return
            try:
                callback()
            except Exception as e:
                self._on_error(e)

        return guarded

    def add_reader(self, fd: int, callback: Callable[[], None], pump: FdPump | None = None) -> None:
        """Watch ``fd`` (see :meth:`virtio_devices.base.EventLoop.add_reader`): the
        pump goes to a loop that serves pumps (``serves_pumps``: the vhost-user
        loop), whose errors reach ``callback`` and so the guard; any other loop
        gets the callback alone, which runs the pump."""
        guarded = self._guard(callback)
        if pump is not None and getattr(self._loop, "serves_pumps", False):
            self._loop.add_reader(fd, guarded, pump=pump)  # type: ignore[call-arg]
        else:
            self._loop.add_reader(fd, guarded)
        self._readers.add(fd)

    def remove_reader(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.discard(fd)
            self._loop.remove_reader(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self)
        guarded = self._guard(callback)

        def fire() -> None:
            self._timers.discard(timer)
            timer._handle = None
            guarded()

        timer._handle = self._loop.call_later(delay, fire)
        self._timers.add(timer)
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        # Any thread: the guard is built here, it only reads the generation.
        self._loop.call_soon_threadsafe(self._guard(callback))

    def fileno(self) -> int:
        """A fd readable whenever the loop has a fd ready (the wrapped loop's
        ``fileno()``, ``EventLoop.fileno`` of vhost-user), or -1 when the loop has
        none: a device may wait on it, on the loop's thread, for a moment that any
        of the loop's work cuts short."""
        fileno = getattr(self._loop, "fileno", None)
        return int(fileno()) if fileno is not None else -1

    def open(self) -> None:
        """The device is being activated: its callbacks run from now on."""
        self._open = True

    def clear(self) -> None:
        """Forget the device's registrations (called after its reset): remove the
        readers it left, cancel its timers, skip callbacks already posted, and drop
        those posted until :meth:`open`."""
        self._open = False
        self._generation += 1
        if self._readers or self._timers:
            log.debug("device left %d readers and %d timers at reset", len(self._readers), len(self._timers))
        for fd in self._readers:
            self._loop.remove_reader(fd)
        self._readers.clear()
        for timer in list(self._timers):
            timer.cancel()
