"""The device :class:`~virtio_devices.base.EventLoop` over an :mod:`asyncio` event loop.

A device lives on an event loop: it watches host fds, arms timers and receives its
worker threads' completions there.  Most Python VMMs and tools already run asyncio,
so :class:`AsyncioLoop` lets one device (behind :class:`virtio_devices.mmio.MmioTransport`
or a transport of the embedder's own) live inside someone else's asyncio program::

    loop = AsyncioLoop()                       # in a coroutine: the running loop
    transport = MmioTransport(device, memory, loop, irq)

Each method maps onto one asyncio call on the same thread (``add_reader``,
``remove_reader``, ``call_later``, ``call_soon_threadsafe``), so device callbacks
run on the asyncio loop's thread, as the protocol requires.  Differences smoothed
over: removing an fd that is not watched is ignored (asyncio returns False), and a
callback posted from a worker thread after the loop was closed is dropped (asyncio
raises ``RuntimeError``), as the protocol says.  asyncio's selector loops are
needed (``add_reader``): the default loop on Linux is one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ._pump import FdPump
from .base import TimerHandle

__all__ = ["AsyncioLoop"]


class AsyncioLoop:
    """An :class:`~virtio_devices.base.EventLoop` that runs its callbacks on ``loop``.

    Args:
        loop: the asyncio loop; default: the running loop (call from a coroutine or
            a callback).

    Raises:
        RuntimeError: no ``loop`` given and no loop is running.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()

    def add_reader(self, fd: int, callback: Callable[[], None], pump: FdPump | None = None) -> None:
        # asyncio knows no pumps: the callback runs the pump itself.
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier watch)."""
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``; an fd that is not watched is ignored."""
        self.loop.remove_reader(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback()`` once after ``delay`` seconds (asyncio's monotonic clock)."""
        return self.loop.call_later(delay, callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Post ``callback`` to the loop's thread from any thread; in posting order.

        A closed loop drops the callback (the device was taken down with it).
        """
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:
            if not self.loop.is_closed():
                raise
