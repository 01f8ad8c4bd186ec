"""virtio-rng, the entropy device (VIRTIO 1.2 §5.4), as vhost-device-rng serves it.

Behaviour follows rust-vmm/vhost-device ``vhost-device-rng/src/vhu_rng.rs``:

* device id 4, one request queue (max size 1024), no device feature bits, no
  config space; transport features VERSION_1, NOTIFY_ON_EMPTY, INDIRECT_DESC,
  EVENT_IDX;
* each chain must be exactly one device-writable descriptor.  The driver "MUST
  NOT place driver-readable buffers into the queue" (§5.4.6.1); upstream also
  refuses chains of several writable buffers, and so do we;
* the bytes are read from the entropy source straight into the guest buffer
  (:meth:`virtio_queue.Writer.read_from`, no copy through Python, GIL released);
  the used length is what the read returned, which may be short or even 0 (a
  regular file at its end), as upstream;
* rate limit: at most ``max_bytes`` per ``period_ms`` window.  Each request is
  truncated to what is left of the quota; a request after the window elapsed
  starts a new window with a full quota; when the quota is spent, the next
  request waits for the end of the window and then gets a full quota.

Where we differ from upstream, on purpose (listed in README, "Differences"):

* a malformed chain is returned with used length 0 and logged (rate-limited);
  upstream returns an error from ``handle_event``, which ends the vring worker
  and wedges the device until the front-end reconnects;
* waiting for the next window does not block: upstream ``sleep``\\ s in the worker
  thread, which also stops vhost-user message handling for that device.  We stop
  popping chains (they stay in the avail ring, so ``GET_VRING_BASE`` still sees
  them as not consumed) and arm a timer on the event loop;
* a source that has nothing to give right now (a FIFO, a char device;
  ``EAGAIN``) is waited for with the event loop instead of blocking a thread; if
  the ring is stopped meanwhile, the waiting chain goes back to the avail ring;
* an I/O error of the source is a host fault (:class:`~virtio_devices.hosts.files.RngError`):
  the chain completes with length 0 and the log gets a rate-limited line; upstream
  ends the worker;
* the kernel's random device as the source (``/dev/urandom``, ``/dev/random``) is
  served through the vDSO's ``getrandom`` where the kernel has it
  (:mod:`virtio_devices.hosts.files`): the same bytes a read would give, without a
  system call per request; upstream reads the file.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable

from virtio_queue import ByteSource, DescriptorChain

from .base import COMMON_FEATURES, PARK, Park, TimerHandle, VirtioDevice
from .errors import MalformedRequest
from .hosts.files import EntropySource, RngError

__all__ = ["MAX_PERIOD_MS", "QUEUE_SIZE", "VIRTIO_ID_RNG", "RngDevice"]

log = logging.getLogger(__name__)

#: VIRTIO 1.2 §5: entropy source.
VIRTIO_ID_RNG = 4
#: Upstream's ``QUEUE_SIZE`` for the single request queue.
QUEUE_SIZE = 1024
#: Longest rate-limit period upstream accepts (QEMU's virtio-rng limit, in ms).
MAX_PERIOD_MS = 65536
# Half a millisecond: how early a window timer may fire and still end the window.
_EPSILON = 0.0005


class RngDevice(VirtioDevice):
    """The virtio entropy device over an :class:`~virtio_devices.hosts.files.EntropySource`.

    Built on the drain loop of :class:`~virtio_devices.base.VirtioDevice`: the rate
    limit is :meth:`admit` plus a timer that calls :meth:`resume`; a source with
    nothing to give parks the chain (:data:`~virtio_devices.base.PARK`) and an fd
    reader calls :meth:`resume`; without a rate limit, :meth:`fill_source` lets the
    compiled path fill the requests.

    Args:
        source: where the bytes come from; shared sources (one per daemon, as
            upstream) are fine, reads consume disjoint bytes.
        period_ms: length of a rate-limit window in milliseconds, 1..=65536.
        max_bytes: bytes allowed per window, ``None`` for no limit (upstream's
            default ``usize::MAX``).  The CLI divides ``--max-bytes`` by the
            socket count before it gets here.
        clock: monotonic clock in seconds; tests pass a fake one.

    Raises:
        ValueError: ``period_ms`` or ``max_bytes`` out of range.
    """

    device_id = VIRTIO_ID_RNG
    name = "rng"
    queue_sizes = (QUEUE_SIZE,)
    features = COMMON_FEATURES
    has_config = False

    def __init__(
        self,
        source: EntropySource,
        *,
        period_ms: int = MAX_PERIOD_MS,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not 1 <= period_ms <= MAX_PERIOD_MS:
            raise ValueError(f"rng: period {period_ms} ms out of range 1..={MAX_PERIOD_MS}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"rng: max_bytes {max_bytes} is negative")
        self.source = source
        self.period_ms = period_ms
        self.max_bytes = max_bytes
        self._period = period_ms / 1000.0
        self._clock = clock
        # The window starts when the device is made, as upstream's timer does
        # (VuRngTimerConfig::new); a fresh device exists per front-end connection.
        self._window_start = clock()
        self._quota = max_bytes if max_bytes is not None else 0
        # A new window always lets one chain through, even with a zero quota:
        # upstream then completes it with 0 bytes once per period.
        self._window_fresh = False
        self._timer: TimerHandle | None = None
        # The source fd while a parked chain waits for it to become readable.
        self._reader_fd = -1
        # Only a FIFO, socket or char device can have nothing to give right now; a
        # regular file at its end gives 0 bytes for good (and epoll refuses it).
        self._may_block = not stat.S_ISREG(os.fstat(source.fileno()).st_mode)

    # -- state seen by tests and the transport -------------------------------------
    @property
    def quota_remaining(self) -> int | None:
        """Bytes left in the current window (``None``: unlimited)."""
        return None if self.max_bytes is None else self._quota

    @property
    def throttled(self) -> bool:
        """Whether queue processing waits for a window timer or for the source."""
        return self._timer is not None or self.parked(0) is not None

    # -- lifecycle ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget queues and pending work; cancel the window timer and the source watch.

        The rate-limit window itself survives a reset, as upstream's (its backend
        lives for the whole connection), so a guest cannot reset its way to a
        fresh quota.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().reset()

    def quiesce(self, index: int) -> None:
        """Give the queue back (the parked chain returns to the avail ring) and stop
        watching the source; a window timer stays armed, its :meth:`resume` does
        nothing until the next kick."""
        super().quiesce(index)
        self._unwatch()

    # -- work ----------------------------------------------------------------------------
    def fill_source(self, index: int) -> ByteSource | None:
        """The source while requests need nothing but its bytes: no rate limit, and
        no request parked waiting for the source (it must be served first)."""
        if index != 0 or self.max_bytes is not None or not self.active or self._parked[0] is not None:
            return None
        return self.source.byte_source()

    def admit(self, index: int) -> bool:
        """Whether the rate limit lets the next chain be popped; arm the timer if not.

        Mirrors upstream's per-request check: a window that elapsed restarts with a
        full quota; an exhausted quota inside the window waits for its end (here
        with :meth:`EventLoop.call_later` instead of ``sleep``).
        """
        if self.max_bytes is None:
            return True
        now = self._clock()
        elapsed = now - self._window_start
        # Upstream compares whole milliseconds; a timer may fire a hair early.
        if elapsed >= self._period - _EPSILON:
            self._window_start = now
            self._quota = self.max_bytes
            self._window_fresh = True
            return True
        if self._quota > 0 or self._window_fresh:
            return True
        if self._timer is not None:
            return False  # a kick inside the window: its end resumes the queue
        assert self.loop is not None
        self._timer = self.loop.call_later(self._period - elapsed, self._on_window_end)
        return False

    def _on_window_end(self) -> None:
        """Timer callback: the window is over; resume the queue (which starts a new one)."""
        self._timer = None
        self.resume(0)

    def handle_chain(self, index: int, chain: DescriptorChain, retry: bool = False) -> int | Park:
        """Fill one request from the source; return the used length, or PARK on ``EAGAIN``.

        A FIFO or char device that gives 0 bytes has nothing *now* (``EAGAIN``,
        which :meth:`Writer.read_from` reports as a 0-byte read) or is at its
        end: the chain is parked until the fd is readable, and a ``retry`` that
        again reads 0 bytes is an end of file, completed with length 0 as upstream
        does.

        Raises:
            MalformedRequest: not exactly one device-writable descriptor
                (VIRTIO 1.2 §5.4.6.1).
            RngError: reading the source failed (a host fault: length 0).
        """
        self._window_fresh = False
        descs = chain.descriptors()
        # VIRTIO 1.2 §5.4.6.1: the driver MUST NOT place driver-readable buffers
        # into the queue; upstream further wants exactly one buffer per chain.
        if len(descs) != 1:
            raise MalformedRequest(f"chain has {len(descs)} descriptors, expected 1")
        desc = descs[0]
        if not desc.is_write_only():
            raise MalformedRequest(f"descriptor at {desc.addr:#x} is device-readable")
        want = desc.len
        if self.max_bytes is not None:
            want = min(want, self._quota)
        if want == 0:
            return 0
        try:
            got = self._read_into(chain, want)
        except BlockingIOError:
            return self._park()
        except OSError as e:
            # Not the guest's fault, but the guest must get its buffer back.
            raise RngError(f"reading {self.source.name} failed: {e}") from e
        if got == 0 and self._may_block and not retry:
            return self._park()
        if self.max_bytes is not None:
            self._quota -= got
        return got

    def retry_chain(self, index: int, chain: DescriptorChain) -> int | Park:
        """The parked chain, once the source is readable (:meth:`handle_chain` with
        ``retry``: a second empty read is an end of file)."""
        return self.handle_chain(index, chain, True)

    def _read_into(self, chain: DescriptorChain, want: int) -> int:
        """One zero-copy read of up to ``want`` bytes from the source into the chain."""
        source = self.source.byte_source()
        while True:
            try:
                return chain.writer().read_from(source, want)
            except InterruptedError:  # a signal, nothing read: try again
                continue

    def _park(self) -> Park:
        """Watch the source until it is readable (a FIFO or char device); park the chain."""
        if self._reader_fd < 0:
            assert self.loop is not None
            self._reader_fd = self.source.fileno()
            self.loop.add_reader(self._reader_fd, self._on_source_readable)
        return PARK

    def _on_source_readable(self) -> None:
        """Fd callback: retry the parked chain, then go on with the queue."""
        self._unwatch()
        self.resume(0)

    def _unwatch(self) -> None:
        if self._reader_fd >= 0 and self.loop is not None:
            self.loop.remove_reader(self._reader_fd)
        self._reader_fd = -1
