"""The transport-free device interface that every device in this package implements.

A device knows guest memory and virtqueues, never a transport.  A transport (our
vhost-user handler in :mod:`vhost_backends`, the virtio-mmio model in
:mod:`virtio_devices.mmio`, or an embedding VMM of your own) drives it like this::

    dev = RngDevice(source)                      # host backend given to the constructor
    features = dev.device_features()             # offer these to the driver
    dev.ack_features(driver_features)            # what the driver accepted
    data = dev.read_config(offset, size)         # config space (VIRTIO 1.2 §4.x.4)
    dev.activate(memory, queues, interrupt, loop)
    dev.process_queue(i)                         # each time the driver kicks queue i
    dev.reset()                                  # device reset or front-end gone

* ``memory`` is a :class:`virtio_queue.GuestMemory`; it may change (regions added or
  removed) while the device is active, the queues follow it.
* ``queues`` are :class:`virtio_queue.Queue` objects, one per entry of
  :attr:`VirtioDevice.queue_sizes`, already configured and bound to ``memory``.
* ``interrupt`` is the transport's :class:`Interrupt`: ``signal_used(i)`` after used
  buffers were added to queue ``i`` and a notification is due, and
  ``signal_config_change()``.
* ``loop`` is the transport's :class:`EventLoop`: a device registers its host file
  descriptors (an evdev node, a Unix socket, a GPIO line) and timers there, and is
  called back on the same thread that calls :meth:`VirtioDevice.process_queue`, so a
  device never needs a lock against its own queue processing.

Errors: a malformed chain is the guest's fault.  :meth:`VirtioDevice.process_chains`
logs it (rate-limited), returns the chain to the driver with a used length of 0 and
goes on.  A broken ring (``InvalidAvailRingIndex``) stops the queue and is raised to
the transport, which marks the device NEEDS_RESET; the process keeps running.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

from virtio_queue import ByteSource, DescriptorChain, GuestMemory, Queue
from virtio_queue.errors import GuestMemoryError, InvalidAvailRingIndex, QueueError
from virtio_queue.ratelimit import RateLimiter

from .errors import MalformedRequest

__all__ = [
    "COMMON_FEATURES",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "EventLoop",
    "Interrupt",
    "TimerHandle",
    "VirtioDevice",
]

log = logging.getLogger(__name__)

# Reserved feature bits, VIRTIO 1.2 §6.
VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
VIRTIO_F_ANY_LAYOUT = 1 << 27
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34

#: What nearly every upstream daemon offers (shared/reference/upstream-devices.md §0).
COMMON_FEATURES = (
    VIRTIO_F_VERSION_1 | VIRTIO_F_NOTIFY_ON_EMPTY | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
)


class Interrupt(Protocol):
    """The transport's way to notify the driver (vhost-user: the call eventfds)."""

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were added to queue ``queue_index`` and the driver wants to know."""

    def signal_config_change(self) -> None:
        """The device's config space changed (VIRTIO 1.2 §2.5.2)."""


class TimerHandle(Protocol):
    """A pending :meth:`EventLoop.call_later` callback."""

    def cancel(self) -> None:
        """Cancel the callback; cancelling twice or after it ran is harmless."""


class EventLoop(Protocol):
    """The transport's event loop, as a device sees it (single-threaded callbacks)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable, until :meth:`remove_reader`."""

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``; unknown fds are ignored."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback()`` once, ``delay`` seconds from now (monotonic clock)."""


class VirtioDevice(abc.ABC):
    """Base class of every device: identity, features, config space, queues.

    Subclasses set :attr:`device_id`, :attr:`name`, :attr:`queue_sizes`, and
    implement :meth:`process_queue` (usually through :meth:`process_chains`).
    """

    #: VIRTIO device id (VIRTIO 1.2 §5), 0 for the template device that has none.
    device_id: ClassVar[int] = 0
    #: Short name used in logs and in ``vhost-device-<name>``.
    name: ClassVar[str] = "virtio"
    #: Maximum size of each virtqueue, in queue index order.
    queue_sizes: tuple[int, ...] = ()
    #: Device feature bits offered (VIRTIO 1.2 §2.2), transport bits included.
    features: int = COMMON_FEATURES
    #: Whether the device has a config space (vhost-user: offer the CONFIG protocol feature).
    has_config: ClassVar[bool] = False

    def __init__(self) -> None:
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: Sequence[Queue] = ()
        self.interrupt: Interrupt | None = None
        self.loop: EventLoop | None = None
        self.active = False
        self._ratelimit = RateLimiter()

    # -- identity and features ---------------------------------------------------
    @property
    def num_queues(self) -> int:
        """Number of virtqueues this device has."""
        return len(self.queue_sizes)

    def device_features(self) -> int:
        """Feature bits the device offers (VIRTIO 1.2 §2.2)."""
        return self.features

    def ack_features(self, features: int) -> None:
        """Record the features the driver accepted; bits we never offered are dropped."""
        self.acked_features = features & self.device_features()

    def has_feature(self, bit_mask: int) -> bool:
        """Whether the driver acknowledged every bit of ``bit_mask``."""
        return self.acked_features & bit_mask == bit_mask

    # -- config space ------------------------------------------------------------
    def config_space(self) -> bytes:
        """The whole config space as the driver sees it now (empty: none)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of the config space.

        Out-of-range reads return the bytes that exist (possibly none); a transport
        that must answer a fixed size pads.  Subclasses with live fields override
        :meth:`config_space`, not this.
        """
        if offset < 0 or size < 0:
            return b""
        return self.config_space()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write to the config space; read-only by default (writes ignored)."""
        log.debug("%s: ignoring config write of %d bytes at %d", self.name, len(data), offset)

    # -- lifecycle ---------------------------------------------------------------
    def activate(
        self,
        memory: GuestMemory,
        queues: Sequence[Queue],
        interrupt: Interrupt,
        loop: EventLoop,
    ) -> None:
        """Start the device: the driver set DRIVER_OK (or vhost-user started the rings).

        Raises:
            ValueError: ``queues`` does not match :attr:`queue_sizes`.
        """
        if len(queues) != self.num_queues:
            raise ValueError(f"{self.name}: {len(queues)} queues given, device has {self.num_queues}")
        self.memory, self.queues, self.interrupt, self.loop = memory, queues, interrupt, loop
        self.active = True

    def reset(self) -> None:
        """Return to the initial state: forget queues, memory and pending host work."""
        self.active = False
        self.acked_features = 0
        self.memory, self.queues, self.interrupt, self.loop = None, (), None, None

    # -- work ----------------------------------------------------------------------
    @abc.abstractmethod
    def process_queue(self, index: int) -> None:
        """The driver kicked queue ``index``: consume what it made available."""

    def fill_source(self, index: int) -> ByteSource | None:
        """A host source whose bytes are all that a request of queue ``index`` needs, now.

        When it returns a :class:`~virtio_queue.ByteSource` (an fd to read, or
        bytes made another way), whoever runs the queue may serve every request
        that is one device-writable buffer by filling it from the source and
        completing it with the bytes it got (``Queue.fill_from``), without calling
        :meth:`process_queue`, which still gets every kick that path cannot finish
        (another shape of request, a read that gave nothing).  The vhost-user
        transport asks when the ring starts (None then: never for this ring) and on
        every kick, and serves such a queue in compiled code.  None (the default):
        every request goes through :meth:`process_queue`."""
        return None

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        """Serve one chain of queue ``index``; return the used length, or None to keep
        the chain pending (the device completes it later with :meth:`complete`)."""
        raise NotImplementedError(f"{type(self).__name__} must override handle_chain or process_queue")

    def process_chains(self, index: int, limit: int | None = None) -> int:
        """Pop and serve available chains of queue ``index`` with :meth:`handle_chain`.

        Follows the notification-suppression protocol of VIRTIO 1.2 §2.7.10: disable
        notifications while draining, re-enable, and drain again if more chains
        arrived meanwhile.  One interrupt at most per call, and only if
        ``needs_notification()`` says the driver wants one (EVENT_IDX honoured).
        ``limit`` stops after that many chains (a rate limit); notifications then
        stay enabled only if the queue is empty.

        A chain the guest malformed is logged (rate-limited) and returned with used
        length 0.  Returns the number of chains served.

        Raises:
            InvalidAvailRingIndex: the avail ring is broken; the queue is stopped.
        """
        queue = self.queues[index]
        served = 0
        used_any = False
        try:
            while True:
                queue.disable_notification()
                while limit is None or served < limit:
                    try:
                        chain = queue.pop_chain()
                    except InvalidAvailRingIndex:
                        queue.ready = False
                        raise
                    except QueueError as e:
                        # An out-of-range head: the entry is consumed, nothing to return.
                        self._guest_error(index, e)
                        continue
                    if chain is None:
                        break
                    served += 1
                    try:
                        used_len = self.handle_chain(index, chain)
                    except (QueueError, GuestMemoryError, MalformedRequest) as e:
                        self._guest_error(index, e)
                        used_len = 0
                    if used_len is not None:
                        queue.add_used(chain.head_index, used_len)
                        used_any = True
                if limit is not None and served >= limit:
                    break
                if not queue.enable_notification():
                    break
        finally:
            if used_any:
                self.notify(index)
        return served

    def complete(self, index: int, head_index: int, used_len: int, notify: bool = True) -> None:
        """Return a chain that :meth:`handle_chain` left pending."""
        self.queues[index].add_used(head_index, used_len)
        if notify:
            self.notify(index)

    def notify(self, index: int) -> None:
        """Signal the driver for queue ``index`` if it asked for it (EVENT_IDX aware)."""
        if self.interrupt is not None and self.queues[index].needs_notification():
            self.interrupt.signal_used(index)

    def _guest_error(self, index: int, err: Exception) -> None:
        self._ratelimit.log(log, logging.WARNING, index, "%s q%d: dropped chain: %s", self.name, index, err)
