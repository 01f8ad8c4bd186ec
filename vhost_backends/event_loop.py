"""A single-threaded epoll loop: one per front-end connection (DESIGN.md "Concurrency").

It watches the vhost-user socket, the kick eventfds, the device's host fds and a
stop eventfd, and runs timers from a heap (the epoll timeout is the next deadline).
It implements :class:`virtio_devices.base.EventLoop` for devices.

Everything runs on the thread that calls :meth:`EventLoop.run`, so message
handling and ring processing never race: GET_VRING_BASE stops a ring simply by
removing its kick fd.  Only :meth:`EventLoop.stop` and
:meth:`EventLoop.call_soon_threadsafe` may be called from another thread (each
writes an eventfd); the latter is how worker threads hand results back
(:mod:`virtio_devices.workers`).

The kick path is compiled (:mod:`vhost_backends._fastpath`): a ring added with
:meth:`EventLoop.add_ring` is a :class:`~vhost_backends._fastpath.KickRing`, whose
kicks are served inside the poll, in C: it reads the kick and fills the ring from
the device's host source, or makes one Python call, its ``serve(index)`` (the
device's ``process_queue``).  Other fds get their callbacks, level-triggered: a
callback that does not drain its fd is called again.  Rings may also be polled
for a short, learnt while after each service (``poll_max_us``; see
:mod:`vhost_backends._fastpath`).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from virtio_devices._pump import FdPump

try:
    from vhost_backends._fastpath import Epoll, KickRing
except ImportError as e:  # an unbuilt source tree
    raise ImportError(
        f"vhost_backends._fastpath is not built ({e}): build the extensions with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`)"
    ) from e

__all__ = ["DEFAULT_POLL_MAX_US", "EventLoop", "KickRing", "TimerHandle"]

#: The daemons' longest adaptive polling window (µs) after serving a ring:
#: QEMU's default for its own event loops (``poll-max-ns`` 32768).
DEFAULT_POLL_MAX_US = 32

log = logging.getLogger(__name__)

_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR


class TimerHandle:
    """A pending :meth:`EventLoop.call_later` callback; :meth:`cancel` is idempotent."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """epoll over fds plus a timer heap; see the module docstring.

    ``poll_max_us``: the longest adaptive polling window of rings (0: never poll;
    a loop a daemon runs gets ``DEFAULT_POLL_MAX_US`` unless told otherwise).
    """

    def __init__(self, poll_max_us: int = 0) -> None:
        self._epoll = Epoll(poll_max_us)
        self._readers: dict[int, Callable[[], None]] = {}
        self._rings: dict[int, KickRing] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._closed = False
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        # call_soon_threadsafe: callbacks posted by other threads, and the eventfd
        # that wakes the loop for them (an ordinary reader of the loop).
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        self._soon_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._soon_lock = threading.Lock()
        self.add_reader(self._soon_fd, self._run_soon)

    # -- EventLoop protocol (virtio_devices.base) -------------------------------------
    #: add_reader takes a pump (:class:`virtio_devices._pump.FdPump`) and runs it in C.
    serves_pumps = True

    def fileno(self) -> int:
        """The loop's epoll fd: readable whenever a fd the loop watches is ready (a
        reader, a ring's kick, the stop and wake-up fds), so that code running on the
        loop's thread can wait a short while and stop as soon as the loop has work
        (``poll`` on it consumes nothing).  Timers are not fds: they are not seen."""
        return self._epoll.fileno()

    def add_reader(self, fd: int, callback: Callable[[], None], pump: FdPump | None = None) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (level-triggered); a second
        call for the same fd replaces the callback (and the pump).

        ``pump``: served inside the poll in compiled code when ``fd`` is readable;
        ``callback`` runs only when ``pump_c`` answers 1 or raises (kept in
        ``pump.error`` for the callback's ``pump()`` to raise).
        """
        if fd in self._rings:
            raise ValueError(f"fd {fd} is a ring's kick fd")
        if fd not in self._readers:
            self._epoll.register(fd, _READ_EVENTS)
        self._readers[fd] = callback
        self._epoll.set_pump(fd, _READ_EVENTS, pump)

    def add_ring(self, ring: KickRing) -> None:
        """Serve the kicks of ``ring.kick_fd`` with ``ring`` in compiled code (see the
        module docstring) until :meth:`remove_reader` of that fd.

        Raises:
            ValueError: the ring has no kick fd, or the fd is watched already.
        """
        fd = ring.kick_fd
        if fd < 0:
            raise ValueError(f"ring {ring.index} has no kick fd")
        if fd in self._readers or fd in self._rings:
            raise ValueError(f"fd {fd} is watched by this loop already")
        self._epoll.register(fd, _READ_EVENTS)
        try:
            self._epoll.set_ring(fd, _READ_EVENTS, ring)
        except BaseException:
            self._epoll.unregister(fd)
            raise
        self._rings[fd] = ring

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (a reader or a ring's kick fd); unknown fds are ignored."""
        if self._readers.pop(fd, None) is None and self._rings.pop(fd, None) is None:
            return
        # An fd already closed was dropped from the epoll set by the kernel itself.
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` once after ``delay`` seconds (monotonic clock)."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the loop thread soon; any thread may call it.

        Ordering: callbacks run in the order they were posted (one deque; appends
        are atomic), each once, in the loop iteration after the wake-up eventfd is
        seen, so after the callbacks of the events already being dispatched.  A
        callback posted from a callback runs in a later iteration.  Posting to a
        closed loop drops the callback (the device it was for is gone).
        """
        # The lock keeps close() from closing the eventfd (whose number the kernel
        # may then give to another file) between the check and the write.
        with self._soon_lock:
            if self._closed:
                return
            self._soon.append(callback)
            os.eventfd_write(self._soon_fd, 1)

    def _run_soon(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._soon_fd)
        soon = self._soon
        # Only what was posted before this wake-up: a callback that posts again
        # cannot starve the loop (its eventfd write wakes us next time).
        for _ in range(len(soon)):
            soon.popleft()()

    # -- running ---------------------------------------------------------------------------
    def has_reader(self, fd: int) -> bool:
        return fd in self._readers or fd in self._rings

    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration; thread-safe."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._stop_fd, 1)

    def add_stop_fd(self, fd: int) -> None:
        """Also stop when ``fd`` becomes readable (a daemon-wide shutdown eventfd that
        several loops share: it is never read, so it stays readable for all)."""
        self.add_reader(fd, self.stop)

    def run(self, timeout: float | None = None) -> None:
        """Dispatch events until :meth:`stop` (or until ``timeout`` seconds passed).

        Exceptions from callbacks propagate: they are bugs (front-end and guest errors
        are handled inside the callbacks), and the daemon logs them and closes the
        connection.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._run(deadline)
        finally:
            # Ready for another run(); a stop() before run() makes it return at once.
            self._stopping = False

    def _run(self, deadline: float | None) -> None:
        readers = self._readers
        poll = self._epoll.poll
        timers = self._timers
        stop_fd = self._stop_fd
        while not self._stopping:
            wait = -1.0
            if timers or deadline is not None:
                now = time.monotonic()
                if timers:
                    # A timer callback may have called stop().
                    if self._run_timers(now):
                        break
                    if timers:
                        wait = max(0.0, timers[0][0] - now)
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return
                    wait = left if wait < 0 else min(wait, left)
            for fd in poll(wait):
                if fd == stop_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(stop_fd)
                    self._stopping = True
                    continue
                cb = readers.get(fd)
                # A callback earlier in this batch may have removed this fd.
                if cb is not None:
                    cb()
                if self._stopping:
                    break

    def _run_timers(self, now: float) -> bool:
        """Run due timers; return whether one of them stopped the loop."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _when, _seq, handle = heapq.heappop(timers)
            if not handle.cancelled:
                handle.cancelled = True
                handle.callback()
        return self._stopping

    def close(self) -> None:
        """Release the epoll and stop fds; registered fds are not closed (their owners do)."""
        with self._soon_lock:
            if self._closed:
                return
            self._closed = True
        if self._epoll.gave_way:
            log.debug("ring polling gave the CPU away %d times", self._epoll.gave_way)
        self._readers.clear()
        self._rings.clear()
        self._timers.clear()
        self._epoll.close()
        os.close(self._stop_fd)
        with self._soon_lock:
            os.close(self._soon_fd)
            self._soon.clear()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
